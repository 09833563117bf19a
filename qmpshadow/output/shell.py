"""Asyncio shell of output commit: QEMU's chardev sockets ↔ the hold queues.

The source agent finds the primary's output-commit chardevs with ``query-chardev`` (ids
``oc-<nic>-out``/``oc-<nic>-in`` and ``serial0``, see qmpshadow.qemu.nics), connects to
them, holds everything the guest sends, and:

- :meth:`OutputCommit.seal` — while the primary is stopped for checkpoint N, after reading
  every byte already in the sockets: all held output belongs to epochs <= N;
- :meth:`OutputCommit.commit` — on the shadow's ack for N: released frames are written to
  the NIC's ``-in`` chardev (QEMU passes them on to the backend), released serial bytes are
  appended to the serial log;
- :meth:`OutputCommit.drop` — uncommitted output is never released.

Reads are non-blocking ``recv`` on the socket from the event loop's reader callback, so that
``seal`` can drain synchronously what QEMU wrote before the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, QmpShadowError
from ..qemu.nics import NicSpec, chardev_ids
from ..qmp.control import QmpControl
from .acks import thin_acks
from .core import FrameDecoder, HoldQueue, encode_frames

log = logging.getLogger(__name__)
_READ = 1 << 16


def _chardev_paths(info: list[dict[str, Any]]) -> dict[str, str]:
    """label → unix socket path from ``query-chardev`` (filename ``unix:PATH,server=on``,
    prefixed ``disconnected:`` while no client is connected)."""
    out: dict[str, str] = {}
    for c in info:
        name = str(c.get("filename", "")).removeprefix("disconnected:")
        if name.startswith("unix:"):
            out[str(c.get("label"))] = name[5:].split(",server")[0]
    return out


@dataclass(eq=False)
class _Channel:
    """One output source: a socket we read, a queue, and where released output goes."""

    name: str
    sock: socket.socket
    queue: HoldQueue = field(default_factory=HoldQueue)
    decoder: FrameDecoder | None = None  # None: serial bytes, no framing
    sink_writer: asyncio.StreamWriter | None = None  # NIC: the -in chardev
    sink_file: IO[bytes] | None = None  # serial: the log
    closed: bool = False
    read_bytes: int = 0
    thin: bool = False  # NIC: drop the pure ACKs a later one of the release stands for
    thinned: int = 0

    def drain(self) -> int:
        """Read what the socket holds now (never blocks); returns the bytes read."""
        got = 0
        while not self.closed:
            try:
                data = self.sock.recv(_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("output channel %s: %s", self.name, exc)
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            got += len(data)
            if self.decoder is None:
                self.queue.hold(data)
            else:
                self.decoder.receive_data(data)
                for frame in self.decoder.frames():
                    self.queue.hold(frame)
        self.read_bytes += got
        return got

    def release(self, items: list[bytes]) -> None:
        if not items:
            return
        if self.sink_writer is not None:
            if not self.sink_writer.is_closing():
                if self.thin:
                    items, dropped = thin_acks(items)
                    self.thinned += dropped
                self.sink_writer.write(encode_frames(items))
        elif self.sink_file is not None:
            self.sink_file.write(b"".join(items))
            self.sink_file.flush()


class OutputCommit:
    """The source agent's output-commit shell for one primary.

    ``on_output`` is called (from the loop) whenever new output is held: the checkpoint
    loop uses it to cut an idle epoch short. ``thin_acks``: each NIC release leaves out
    the pure TCP ACKs that a later ACK of the same flow and release stands for
    (qmpshadow.output.acks, docs/output-commit.md).
    """

    def __init__(self, nics: tuple[NicSpec, ...], *, serial: bool,
                 serial_log: Path | None = None,
                 on_output: Callable[[], None] | None = None,
                 thin_acks: bool = True) -> None:
        self.nics = nics
        self.serial = serial
        self.thin_acks = thin_acks
        self.serial_log = serial_log
        self.on_output = on_output
        self.channels: list[_Channel] = []
        self.sealed_epoch = 0
        self._active = False
        # seal time per epoch not yet committed: the hold time the commit adds (status)
        self._sealed_at: dict[int, float] = {}
        self.commit_lag_ms: float | None = None

    async def open(self, qmp: QmpControl) -> None:
        """Find and connect the primary's output-commit chardevs.

        Raises ConfigError when the primary was not started with output commit (no such
        chardev), QmpShadowError when a socket cannot be connected.
        """
        paths = _chardev_paths(await qmp.execute("query-chardev"))
        loop = asyncio.get_running_loop()
        wanted: list[tuple[str, str, NicSpec | None]] = []
        for n in self.nics:
            out, inn = chardev_ids(n)
            wanted.append((out, inn, n))
        if self.serial:
            wanted.append(("serial0", "", None))
        for out, inn, nic in wanted:
            if out not in paths or (inn and inn not in paths):
                raise ConfigError(
                    f"output commit: the primary has no socket chardev {out!r}"
                    f"{' / ' + repr(inn) if inn else ''} (found {sorted(paths)}); start it "
                    "from a spec with output_commit = \"on\" (qmpshadow.qemu.argv)")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await loop.sock_connect(sock, paths[out])
            except OSError as exc:
                sock.close()
                raise QmpShadowError(f"output commit: cannot connect {paths[out]}: {exc}; is "
                                     "another agent connected to the primary?") from None
            sock.setblocking(False)
            ch = _Channel(name=out, sock=sock)
            if nic is not None:
                ch.decoder = FrameDecoder()
                ch.thin = self.thin_acks
                try:
                    _r, ch.sink_writer = await asyncio.open_unix_connection(paths[inn])
                except OSError as exc:
                    sock.close()
                    raise QmpShadowError(f"output commit: cannot connect {paths[inn]}: "
                                         f"{exc}") from None
            else:
                log_path = self.serial_log or Path(paths[out]).parent / "serial.log"
                ch.sink_file = log_path.open("ab")
            self.channels.append(ch)
            loop.add_reader(sock.fileno(), self._readable, ch)

    def _readable(self, ch: _Channel) -> None:
        try:
            got = ch.drain()
        except QmpShadowError as exc:  # framing lost: nothing after it can be trusted
            log.error("output channel %s: %s", ch.name, exc)
            ch.closed = True
            got = 0
        if ch.closed:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(ch.sock.fileno())
        if got:
            self._active = True
            if self.on_output is not None:
                self.on_output()

    def seal(self, epoch: int) -> None:
        """Call while the primary is stopped for checkpoint ``epoch``: drains the sockets
        and attributes everything held so far to epochs <= ``epoch``."""
        for ch in self.channels:
            self._readable(ch)
            ch.queue.seal(epoch)
        self.sealed_epoch = max(self.sealed_epoch, epoch)
        self._sealed_at.setdefault(epoch, time.monotonic())

    def commit(self, epoch: int) -> None:
        """The shadow committed ``epoch``: release its output (and any earlier)."""
        for ch in self.channels:
            ch.release(ch.queue.commit(epoch))
        at = self._sealed_at.pop(epoch, None)
        for n in [n for n in self._sealed_at if n < epoch]:
            del self._sealed_at[n]
        if at is not None:
            self.commit_lag_ms = (time.monotonic() - at) * 1000

    def drop(self) -> int:
        """Forget every held item (failover, or protection ends uncommitted)."""
        return sum(ch.queue.drop() for ch in self.channels)

    def take_activity(self) -> bool:
        """Whether output arrived since the last call (the epoch policy's input)."""
        active, self._active = self._active, False
        return active

    def status(self) -> dict[str, float | int | None]:
        """Counters for status documents and metrics; ``commit_lag_ms``: seal → release
        of the last committed epoch (what output commit adds after the epoch ended);
        ``output_acks_thinned``: committed pure ACKs left out of their release (counted
        in ``output_released`` too)."""
        qs = [ch.queue for ch in self.channels]
        return {"commit_lag_ms": self.commit_lag_ms,"output_held": sum(q.held_items for q in qs),
                "output_held_bytes": sum(q.held_bytes for q in qs),
                "output_released": sum(q.released_items for q in qs),
                "output_released_bytes": sum(q.released_bytes for q in qs),
                "output_dropped": sum(q.dropped_items for q in qs),
                "output_acks_thinned": sum(ch.thinned for ch in self.channels)}

    async def close(self) -> None:
        """Drop what is held (it was never committed) and close the sockets."""
        self.drop()
        loop = asyncio.get_running_loop()
        for ch in self.channels:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(ch.sock.fileno())
            ch.sock.close()
            if ch.sink_writer is not None:
                ch.sink_writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await ch.sink_writer.wait_closed()
            if ch.sink_file is not None:
                ch.sink_file.close()
        self.channels.clear()
