"""``qmpshadow stream record``: relay a live migration through qmpshadow and record it.

The source QEMU migrates to the relay's listener (``unix:PATH`` or ``tcp:HOST:PORT``); for
every connection the relay opens one to the destination and forwards bytes unchanged in
both directions, writing the forward bytes and the return-path bytes (COLO acks, postcopy
page requests) to files:

- the main channel (the one starting with the stream magic ``QEVM``): ``FILE`` and
  ``FILE.return``;
- any other connection (multifd channels, postcopy preempt): ``FILE.chN`` and
  ``FILE.chN.return``, N being its accept order (these are recorded, not replayable).

Half-closes are forwarded (EOF from the source becomes a write shutdown to the
destination and back). When the destination connection fails (refused, reset, dead
destination) the source's connection is closed at once, so the source sees its migration
fail and resumes the guest — a relay that kept swallowing bytes would let the source
"complete" into nowhere. (QEMU 7.2's destination reads the trailing vmdesc before it
closes, so a healthy migration never hits this.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, TransportError

CHUNK = 1 << 20
_MAGIC = b"QEVM"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[v6]:PORT``)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def uri(self) -> str:
        """QEMU's spelling of the endpoint."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_endpoint(text: str, *, what: str = "endpoint") -> Endpoint:
    """Parse ``unix:PATH`` / ``tcp:HOST:PORT``.

    Raises:
        ConfigError: anything else (the message shows the accepted forms).
    """
    if text.startswith("unix:") and len(text) > 5:
        return Endpoint("unix", path=text[5:])
    if text.startswith("tcp:"):
        rest = text[4:]
        host, sep, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if sep and host and port.isdigit() and int(port) < 65536:
            return Endpoint("tcp", host=host, port=int(port))
    raise ConfigError(f"{what}: expected unix:PATH or tcp:HOST:PORT, got {text!r}")


@dataclass
class ChannelStats:
    """One relayed connection: what went each way and where it was written."""

    index: int
    kind: str = "unknown"  # main, other (multifd/preempt), or unknown (no byte came)
    forward_bytes: int = 0
    return_bytes: int = 0
    forward_file: str | None = None
    return_file: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"index": self.index, "kind": self.kind, "forward_bytes": self.forward_bytes,
                "return_bytes": self.return_bytes, "forward_file": self.forward_file,
                "return_file": self.return_file, "error": self.error,
                "seconds": None if self.ended is None else round(self.ended - self.started, 3)}


@dataclass
class RelayStats:
    """All connections of one relay run."""

    listen: str
    target: str
    channels: list[ChannelStats] = field(default_factory=list)

    @property
    def forward_bytes(self) -> int:
        """Bytes source → destination, all channels."""
        return sum(c.forward_bytes for c in self.channels)

    @property
    def return_bytes(self) -> int:
        """Bytes destination → source, all channels."""
        return sum(c.return_bytes for c in self.channels)

    @property
    def errors(self) -> list[str]:
        """Errors of the channels, in order."""
        return [f"channel {c.index}: {c.error}" for c in self.channels if c.error]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``stream record --json``)."""
        return {"listen": self.listen, "target": self.target,
                "forward_bytes": self.forward_bytes, "return_bytes": self.return_bytes,
                "channels": [c.as_dict() for c in self.channels], "errors": self.errors}


class Relay:
    """Listener on ``listen``, forwarding every connection to ``target`` and recording it.

    ``await start()`` returns the URI to give the source (a tcp port 0 is resolved);
    ``await wait()`` returns once the main channel ended in both directions and no other
    connection is open; ``await close()`` ends everything (open connections are aborted
    after ``grace`` seconds).
    """

    def __init__(self, listen: Endpoint, target: Endpoint, out: str | os.PathLike[str], *,
                 return_out: str | os.PathLike[str] | None = None,
                 on_bytes: Callable[[int, int], None] | None = None) -> None:
        self.listen = listen
        self.target = target
        self.out = Path(out)
        self.return_out = Path(return_out) if return_out else Path(f"{self.out}.return")
        self.on_bytes = on_bytes
        self.stats = RelayStats(listen.uri, target.uri)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._main_seen = False
        self._main_done = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = 0
        self._uri = listen.uri

    @property
    def uri(self) -> str:
        """Where the source should migrate to (valid after :meth:`start`)."""
        return self._uri

    async def start(self) -> str:
        """Listen; returns the source's URI.

        Raises:
            ConfigError: the output files cannot be created, or the listener cannot bind.
        """
        for path in (self.out, self.return_out):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb"):
                    pass
            except OSError as err:
                raise ConfigError(f"cannot write recording {str(path)!r}: {err.strerror}"
                                  ) from err
        try:
            if self.listen.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.listen.path)
                self._server = await asyncio.start_unix_server(self._accept, self.listen.path)
            else:
                self._server = await asyncio.start_server(
                    self._accept, self.listen.host, self.listen.port)
                sock = self._server.sockets[0].getsockname()
                self._uri = Endpoint("tcp", host=self.listen.host, port=sock[1]).uri
        except OSError as err:
            raise ConfigError(f"cannot listen on {self.listen.uri}: {err.strerror or err}"
                              ) from err
        return self._uri

    async def wait(self, timeout: float | None = None) -> RelayStats:
        """Until the main channel ended (both directions), or a connection failed before
        any main channel began, and every connection closed.

        Raises:
            TransportError: nothing complete within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._main_done.wait()
                await self._idle.wait()
        except TimeoutError as err:
            got = (f"{self.stats.forward_bytes} bytes relayed so far" if self.stats.channels
                   else "no connection came")
            raise TransportError(
                f"relay {self.uri} → {self.target.uri}: the migration did not end within "
                f"{timeout:g} s ({got}); start it with migrate uri={self.uri}, or raise "
                "--timeout") from err
        return self.stats

    async def close(self, grace: float = 5.0) -> RelayStats:
        """Stop listening; give open connections ``grace`` seconds, then abort them."""
        if self._server is not None:
            self._server.close()
            self._server = None
            if self.listen.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.listen.path)
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        return self.stats

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._open += 1
        self._idle.clear()
        ch = ChannelStats(len(self.stats.channels))
        self.stats.channels.append(ch)
        try:
            await self._relay(ch, reader, writer)
        finally:
            ch.ended = time.monotonic()
            self._open -= 1
            if self._open == 0:
                self._idle.set()
            if ch.kind == "main" or (ch.error and not self._main_seen):
                # a connection that failed before any main channel began ends the session
                self._main_done.set()
            if task is not None:
                self._tasks.discard(task)

    async def _connect_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        t = self.target
        if t.kind == "unix":
            return await asyncio.open_unix_connection(t.path)
        return await asyncio.open_connection(t.host, t.port)

    async def _relay(self, ch: ChannelStats, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        up_writer: asyncio.StreamWriter | None = None
        files: list[IO[bytes]] = []
        try:
            try:
                up_reader, up_writer = await self._connect_target()
            except OSError as err:
                ch.error = (f"cannot connect to the destination {self.target.uri}: "
                            f"{err.strerror or err}")
                return
            first = await reader.read(CHUNK)
            if first.startswith(_MAGIC) and not self._main_seen:
                self._main_seen = True
                ch.kind = "main"
                fwd_path, ret_path = self.out, self.return_out
            else:
                ch.kind = "other" if first else "unknown"
                fwd_path = Path(f"{self.out}.ch{ch.index}")
                ret_path = Path(f"{fwd_path}.return")
            fwd_file = open(fwd_path, "wb")  # noqa: SIM115 - closed in finally
            files.append(fwd_file)
            ret_file = open(ret_path, "wb")  # noqa: SIM115
            files.append(ret_file)
            ch.forward_file, ch.return_file = str(fwd_path), str(ret_path)
            forward = asyncio.create_task(
                self._pump(ch, reader, up_writer, fwd_file, "forward", first))
            back = asyncio.create_task(
                self._pump(ch, up_reader, writer, ret_file, "return", b""))
            try:
                done, _ = await asyncio.wait({forward, back},
                                             return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        raise exc
            finally:
                for task in (forward, back):
                    if not task.done():
                        task.cancel()
                await asyncio.wait({forward, back})
        except (OSError, ConnectionError) as err:
            ch.error = ch.error or f"{type(err).__name__}: {err}"
        finally:
            for f in files:
                f.close()
            for w in (writer, up_writer):
                if w is None:
                    continue
                if ch.error:
                    w.transport.abort()  # the peer must see a failure, not a clean end
                else:
                    w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await w.wait_closed()

    async def _pump(self, ch: ChannelStats, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter, sink: IO[bytes], direction: str,
                    first: bytes) -> None:
        chunk = first
        while True:
            if not chunk:
                chunk = await src.read(CHUNK)
                if not chunk:
                    break
            sink.write(chunk)
            if direction == "forward":
                ch.forward_bytes += len(chunk)
            else:
                ch.return_bytes += len(chunk)
            try:
                dst.write(chunk)
                await dst.drain()
            except (OSError, ConnectionError) as err:
                side = "destination" if direction == "forward" else "source"
                ch.error = f"writing to the {side} failed: {type(err).__name__}: {err}"
                raise
            if self.on_bytes is not None:
                self.on_bytes(self.stats.forward_bytes, self.stats.return_bytes)
            chunk = b""
        sink.flush()
        if dst.can_write_eof():
            with contextlib.suppress(OSError, ConnectionError):
                dst.write_eof()


def relay_via(out: Path, run_dir: Path) -> Callable[[str], Awaitable[tuple[Relay, str]]]:
    """For :func:`qmpshadow.migration.orchestrator.migrate`'s ``via``: a relay listening on
    ``run_dir/relay.sock`` that records to ``out`` and forwards to the destination URI.

    The returned callable raises ConfigError for a destination URI that is not unix/tcp.
    """
    async def start(dest_uri: str) -> tuple[Relay, str]:
        relay = Relay(Endpoint("unix", path=str(run_dir / "relay.sock")),
                      parse_endpoint(dest_uri, what="destination"), out)
        return relay, await relay.start()

    return start
