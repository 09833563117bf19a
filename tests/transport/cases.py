"""The transports the conformance suite runs over, and a bit-flipping relay.

Each :class:`Case` knows how to listen, how to connect (directly or to another address, e.g.
a relay's), what error TLS-less vs TLS integrity failures raise, and how to describe itself
to a peer subprocess (``tests/transport/_peer.py``). Adding a transport (RDMA) means adding a
Case subclass and an entry in :data:`CASES`; its ``available()`` can skip it where the
hardware is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpshadow.errors import FrameChecksumError
from qmpshadow.transport import Link, LinkOptions, Listener, local, rdma, tcp
from qmpshadow.transport.errors import LinkIntegrityError

#: An address a case can connect to: (host, port) for TCP, a path for unix sockets.
Address = Any


@dataclass
class Pki:
    """Certificates of the test session (see conftest.pki)."""

    dir: Path
    rogue_dir: Path
    selfsigned_dir: Path

    def tls(self, name: str, peers: str | tuple[str, ...]) -> tcp.TlsConfig:
        return tcp.TlsConfig.from_dir(self.dir, name=name, peers=peers)


class Case:
    """One transport under test."""

    name: str = ""
    #: "tcp" or "unix": what kind of relay can sit in the middle (None: no relay possible).
    relay_kind: str | None = None
    #: What the receiver raises when bytes were flipped on the wire.
    integrity_error: type[Exception] = FrameChecksumError
    authenticated = True
    encrypted = False

    def __init__(self, pki: Pki, tmp: Path) -> None:
        self.pki = pki
        self.tmp = tmp

    def available(self) -> str | None:
        """None when usable here, else the reason to skip."""
        return None

    async def listen(self, options: LinkOptions | None = None) -> Listener:
        raise NotImplementedError

    def address(self, listener: Listener) -> Address:
        raise NotImplementedError

    async def connect(self, address: Address, options: LinkOptions | None = None) -> Link:
        raise NotImplementedError

    def peer_spec(self, address: Address) -> dict[str, Any]:
        """JSON for _peer.py to connect the same way."""
        raise NotImplementedError


class TcpTls(Case):
    name = "tcp-tls"
    relay_kind = "tcp"
    integrity_error = LinkIntegrityError
    encrypted = True

    async def listen(self, options: LinkOptions | None = None) -> Listener:
        return await tcp.listen("127.0.0.1", 0, tls=self.pki.tls("shadow", "source"),
                                options=options)

    def address(self, listener: Listener) -> Address:
        assert isinstance(listener, tcp.TcpListener)
        return (listener.host, listener.port)

    async def connect(self, address: Address, options: LinkOptions | None = None) -> Link:
        return await tcp.connect(*address, tls=self.pki.tls("source", "shadow"), options=options)

    def peer_spec(self, address: Address) -> dict[str, Any]:
        return {"kind": "tcp-tls", "host": address[0], "port": address[1],
                "pki": str(self.pki.dir)}


class TcpInsecure(Case):
    name = "tcp-insecure-loopback"
    relay_kind = "tcp"
    authenticated = False

    async def listen(self, options: LinkOptions | None = None) -> Listener:
        return await tcp.listen("127.0.0.1", 0, insecure_loopback=True, options=options)

    def address(self, listener: Listener) -> Address:
        assert isinstance(listener, tcp.TcpListener)
        return (listener.host, listener.port)

    async def connect(self, address: Address, options: LinkOptions | None = None) -> Link:
        return await tcp.connect(*address, insecure_loopback=True, options=options)

    def peer_spec(self, address: Address) -> dict[str, Any]:
        return {"kind": "tcp-insecure-loopback", "host": address[0], "port": address[1]}


class Local(Case):
    name = "local"
    relay_kind = "unix"

    async def listen(self, options: LinkOptions | None = None) -> Listener:
        return await local.listen(self.tmp / "link.sock", options=options)

    def address(self, listener: Listener) -> Address:
        assert isinstance(listener, local.UnixListener)
        return str(listener.path)

    async def connect(self, address: Address, options: LinkOptions | None = None) -> Link:
        return await local.connect(address, options=options)

    def peer_spec(self, address: Address) -> dict[str, Any]:
        return {"kind": "local", "path": address}


class Rdma(Case):
    """RC queue pair (pyverbs) with a mutual-TLS control link. Runs where an RDMA device is
    active: inside the soft-RoCE guest (tests/rdma/test_in_guest.py); skipped elsewhere.
    """

    name = "rdma"
    relay_kind = None  # RDMA writes go NIC to NIC: no byte relay can sit in the middle
    encrypted = False  # the control link is TLS, the RDMA data path is not encrypted

    def available(self) -> str | None:
        reason = rdma.available()
        if reason:
            return f"{reason}; it runs inside the soft-RoCE guest (tests/rdma/test_in_guest.py)"
        return None

    #: Without explicit options: a 4 MiB ring. Below an RDMA link there is only the peer's
    #: ring (read_buffer), where a TCP link also has kernel socket buffers (MiBs on loopback)
    #: that tests sending a few MiB before anyone reads rely on.
    default_options = LinkOptions(read_buffer=4 << 20)

    async def listen(self, options: LinkOptions | None = None) -> Listener:
        return await rdma.listen("127.0.0.1", 0, tls=self.pki.tls("shadow", "source"),
                                 options=options or self.default_options)

    def address(self, listener: Listener) -> Address:
        assert isinstance(listener, rdma.RdmaListener)
        return (listener.host, listener.port)

    async def connect(self, address: Address, options: LinkOptions | None = None) -> Link:
        return await rdma.connect(*address, tls=self.pki.tls("source", "shadow"),
                                  options=options or self.default_options)

    def peer_spec(self, address: Address) -> dict[str, Any]:
        return {"kind": "rdma", "host": address[0], "port": address[1], "pki": str(self.pki.dir)}


#: name -> Case class.
CASES: dict[str, type[Case]] = {c.name: c for c in (TcpTls, TcpInsecure, Local, Rdma)}


async def connect_spec(spec: dict[str, Any], options: LinkOptions | None = None) -> Link:
    """Connect as described by :meth:`Case.peer_spec` (used by the peer subprocess)."""
    kind = spec["kind"]
    if kind == "tcp-tls":
        tls = tcp.TlsConfig.from_dir(spec["pki"], name="source", peers="shadow")
        return await tcp.connect(spec["host"], spec["port"], tls=tls, options=options)
    if kind == "tcp-insecure-loopback":
        return await tcp.connect(spec["host"], spec["port"], insecure_loopback=True,
                                 options=options)
    if kind == "local":
        return await local.connect(spec["path"], options=options)
    if kind == "rdma":
        tls = tcp.TlsConfig.from_dir(spec["pki"], name="source", peers="shadow")
        return await rdma.connect(spec["host"], spec["port"], tls=tls, options=options)
    raise ValueError(f"unknown transport kind {kind!r}")


@contextlib.asynccontextmanager
async def link_pair(
    case: Case, options: LinkOptions | None = None, address: Address | None = None,
    listener: Listener | None = None,
) -> AsyncIterator[tuple[Link, Link]]:
    """(client, server) links of ``case``; everything is closed on exit."""
    own = listener is None
    lst = listener if listener is not None else await case.listen(options)
    try:
        accept = asyncio.create_task(lst.accept())
        try:
            client = await case.connect(address or case.address(lst), options)
        except BaseException:
            accept.cancel()
            raise
        server = await asyncio.wait_for(accept, 5)
        try:
            yield client, server
        finally:
            client.abort()
            server.abort()
            await asyncio.sleep(0)
    finally:
        if own:
            await lst.close()


# ---------------------------------------------------------------------------------------------
# Relay

Mutate = Callable[[str, bytes], bytes]


class Relay:
    """A man in the middle on loopback: forwards both directions, passing each chunk
    through ``mutate(direction, chunk)`` ("up" is client to server).
    """

    def __init__(self, kind: str, target: Address, mutate: Mutate, tmp: Path) -> None:
        self.kind = kind
        self.target = target
        self.mutate = mutate
        self.tmp = tmp
        self.address: Address = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Relay:
        if self.kind == "tcp":
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.address = self._server.sockets[0].getsockname()[:2]
        else:
            path = self.tmp / "relay.sock"
            self._server = await asyncio.start_unix_server(self._handle, str(path))
            self.address = str(path)
        return self

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.kind == "tcp":
            sr, sw = await asyncio.open_connection(*self.target)
        else:
            sr, sw = await asyncio.open_unix_connection(self.target)
        self._writers += [cw, sw]
        up = asyncio.create_task(self._pump("up", cr, sw))
        down = asyncio.create_task(self._pump("down", sr, cw))
        self._tasks |= {up, down}
        await asyncio.gather(up, down, return_exceptions=True)

    async def _pump(self, direction: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(self.mutate(direction, data))
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        await self._server.wait_closed()


class BitFlipper:
    """``mutate`` for a Relay: once armed, flips bit ``bit`` of byte ``offset`` of the next
    upstream chunk long enough (once).
    """

    def __init__(self, offset: int, bit: int = 3) -> None:
        self.offset = offset
        self.bit = bit
        self.armed = False
        self.flipped = False

    def __call__(self, direction: str, data: bytes) -> bytes:
        if direction != "up" or not self.armed or self.flipped or len(data) <= self.offset:
            return data
        self.flipped = True
        b = bytearray(data)
        b[self.offset] ^= 1 << self.bit
        return bytes(b)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
