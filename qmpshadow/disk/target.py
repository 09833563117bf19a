"""The source agent as ``blockdev-backup`` target: an NBD server on a unix socket.

QEMU's backup job writes the blocks of the checkpoint into the ``nbd`` node that points
here; each write lands in :attr:`NbdTarget.writes` as ``(offset, data)``, ready to go into
the epoch's DISK_BLOCK frames: no staging file, no extra copy through the page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from qmpshadow.errors import DiskError, NbdProtocolError

from .nbd import NEED_DATA, Disconnect, Flush, NbdServerCore, Write

log = logging.getLogger(__name__)

_READ = 1 << 20


class NbdTarget:
    """Serves export ``name`` of ``size`` bytes at ``sock_path``; records every write."""

    def __init__(self, sock_path: str | os.PathLike[str], name: str, size: int) -> None:
        self.sock_path = Path(sock_path)
        self.name = name
        self.size = size
        self.writes: list[tuple[int, bytes]] = []
        self.error: str | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen. Raises DiskError when the socket cannot be bound."""
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.sock_path))
        except OSError as exc:
            raise DiskError(f"cannot listen on {self.sock_path} for the disk backup target: "
                            f"{exc}") from exc

    async def close(self) -> None:
        """Stop listening (open connections end when QEMU drops its node)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()

    def take(self) -> list[tuple[int, bytes]]:
        """The writes received since the last take (in arrival order)."""
        out, self.writes = self.writes, []
        return out

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        core = NbdServerCore(self.name, self.size)
        try:
            writer.write(core.data_to_send())
            while True:
                ev = core.next_event()
                if ev is NEED_DATA:
                    # option replies are produced without an event
                    writer.write(core.data_to_send())
                    await writer.drain()
                    core.receive_data(await reader.read(_READ))
                    continue
                if isinstance(ev, Write):
                    self.writes.append((ev.offset, ev.data))
                    core.reply(ev.handle)
                elif isinstance(ev, Flush):
                    core.reply(ev.handle)
                elif isinstance(ev, Disconnect):
                    break
                writer.write(core.data_to_send())
            writer.write(core.data_to_send())
        except NbdProtocolError as exc:
            self.error = str(exc)
            log.warning("disk backup target %s: %s", self.name, exc)
        except OSError as exc:
            log.info("disk backup target %s: connection ended: %s", self.name, exc)
        finally:
            writer.close()
