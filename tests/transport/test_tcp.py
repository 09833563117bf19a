"""TCP specifics: mutual TLS refusals (each side, each way), plain TCP only on loopback,
socket options, listener behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator

import pytest

from qmpshadow.errors import ConfigError, TransportError
from qmpshadow.frames.wire import Heartbeat, encode_frame
from qmpshadow.transport import LinkClosedError, LinkOptions, PeerAuthError, tcp
from qmpshadow.transport._stream import StreamLink
from tests.transport.cases import Pki, free_tcp_port

HB = encode_frame(Heartbeat(generation=1, epoch=0, seq=1, timestamp_ns=2))


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[tcp.TcpListener]:
    """The shadow agent's TLS listener; accepts 'source' only."""
    lst = await tcp.listen("127.0.0.1", 0, tls=pki.tls("shadow", "source"))
    yield lst
    await lst.close()


async def _settle(lst: tcp.TcpListener, rejected: int = 1) -> None:
    async with asyncio.timeout(5):
        while lst.stats.rejected < rejected:
            await asyncio.sleep(0.01)


async def test_mutual_tls_link(pki: Pki, server: tcp.TcpListener) -> None:
    accept = asyncio.create_task(server.accept())
    c = await tcp.connect("127.0.0.1", server.port, tls=pki.tls("source", "shadow"))
    async with c, await accept as s:
        assert c.peer.name == "shadow" and s.peer.name == "source"
        assert c.peer.authenticated and c.peer.encrypted and c.peer.transport == "tcp-tls"
        assert s.peer.address.startswith("127.0.0.1:")
        for link in (c, s):
            assert isinstance(link, StreamLink)
            assert link.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await c.send(HB)
        assert encode_frame(await s.receive()) == HB
    assert server.stats.accepted == 1 and server.stats.rejected == 0


async def test_socket_options(pki: Pki) -> None:
    ka = tcp.KeepAlive(idle=7, interval=3, count=4)
    lst = await tcp.listen("127.0.0.1", 0, tls=pki.tls("shadow", "source"), keepalive=ka)
    try:
        accept = asyncio.create_task(lst.accept())
        c = await tcp.connect("127.0.0.1", lst.port, tls=pki.tls("source", "shadow"), keepalive=ka)
        s = await accept
        for link in (c, s):
            assert isinstance(link, StreamLink)
            sock = link.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 19000
        await c.close()
        await s.close()
    finally:
        await lst.close()


def _raw_client_context(pki: Pki, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.dir / "ca.pem")
    if cert is not None:
        ctx.load_cert_chain(f"{cert}.pem", f"{cert}.key")
    return ctx


async def test_client_without_certificate_is_refused(pki: Pki, server: tcp.TcpListener) -> None:
    """A TLS client presenting no certificate: the server's handshake refuses it and drops
    the connection (the client reads EOF or an alert, never data).
    """
    r, w = await asyncio.open_connection("127.0.0.1", server.port,
                                         ssl=_raw_client_context(pki, None))
    try:
        try:
            data = await asyncio.wait_for(r.read(100), 5)
        except (ssl.SSLError, ConnectionError):
            data = b""
        assert data == b""
    finally:
        w.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await w.wait_closed()
    await _settle(server)
    err = server.stats.recent_rejections[-1]
    assert isinstance(err, PeerAuthError)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(err).upper()


@pytest.mark.parametrize("which", ["rogue", "selfsigned"])
async def test_client_certificate_from_another_ca_is_refused(
    pki: Pki, server: tcp.TcpListener, which: str
) -> None:
    """A 'source' certificate signed by a foreign CA, or self-signed: refused by the server
    during the handshake; the client learns it at connect time, with the TLS alert.
    """
    d = pki.rogue_dir if which == "rogue" else pki.selfsigned_dir
    cfg = tcp.TlsConfig(ca=pki.dir / "ca.pem", cert=d / "source.pem", key=d / "source.key",
                        peer_names=("shadow",))
    with pytest.raises(PeerAuthError, match="refused this side's certificate"):
        await tcp.connect("127.0.0.1", server.port, tls=cfg)
    await _settle(server)
    assert "CERTIFICATE_VERIFY_FAILED" in str(server.stats.recent_rejections[-1]).upper()


async def test_client_with_wrong_identity_is_refused(pki: Pki, server: tcp.TcpListener) -> None:
    """Valid CA, wrong name ('intruder' where 'source' is expected)."""
    with pytest.raises(PeerAuthError, match=r"server at .* refused this side"):
        await tcp.connect("127.0.0.1", server.port, tls=pki.tls("intruder", "shadow"))
    await _settle(server)
    err = str(server.stats.recent_rejections[-1])
    assert "['intruder']" in err and "['source']" in err


async def test_server_with_wrong_identity_is_refused(pki: Pki, server: tcp.TcpListener) -> None:
    """The client expects 'shadow-2'; the server presents 'shadow'."""
    want = r"certificate for \['shadow'\], expected one of \['shadow-2'\]"
    with pytest.raises(PeerAuthError, match=want):
        await tcp.connect("127.0.0.1", server.port, tls=pki.tls("source", "shadow-2"))
    await _settle(server)
    assert "the client at" in str(server.stats.recent_rejections[-1])
    assert "refused this side" in str(server.stats.recent_rejections[-1])


async def test_server_from_another_ca_is_refused(pki: Pki) -> None:
    """The client verifies the server too: a server whose certificate another CA signed."""
    rogue = tcp.TlsConfig.from_dir(pki.rogue_dir, name="source", peers="source")
    lst = await tcp.listen("127.0.0.1", 0, tls=rogue)
    try:
        with pytest.raises(PeerAuthError, match="CERTIFICATE_VERIFY_FAILED"):
            await tcp.connect("127.0.0.1", lst.port, tls=pki.tls("source", "source"))
        await _settle(lst)
    finally:
        await lst.close()


async def test_tls12_client_is_refused(pki: Pki, server: tcp.TcpListener) -> None:
    ctx = _raw_client_context(pki, str(pki.dir / "source"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", server.port, ssl=ctx), 5)
    await _settle(server)


async def test_plain_client_to_tls_server(pki: Pki, server: tcp.TcpListener) -> None:
    with pytest.raises(TransportError, match="closed the connection during link setup"):
        await tcp.connect("127.0.0.1", server.port, insecure_loopback=True)
    await _settle(server)


async def test_tls_client_to_plain_server(pki: Pki) -> None:
    lst = await tcp.listen("127.0.0.1", 0, insecure_loopback=True)
    try:
        with pytest.raises(PeerAuthError, match="WRONG_VERSION_NUMBER"):
            await tcp.connect("127.0.0.1", lst.port, tls=pki.tls("source", "shadow"))
        await _settle(lst)
        assert "it looks like TLS" in str(lst.stats.recent_rejections[-1])
    finally:
        await lst.close()


async def test_insecure_only_on_loopback(pki: Pki) -> None:
    """Plain TCP is refused for any non-loopback address, before any packet is sent."""
    with pytest.raises(ConfigError, match="only on loopback"):
        await tcp.connect("192.0.2.1", 7000, insecure_loopback=True)
    for host in ("0.0.0.0", "", "::"):
        with pytest.raises(ConfigError, match="insecure_loopback refuses"):
            await tcp.listen(host, 0, insecure_loopback=True)
    with pytest.raises(ConfigError, match="need mutual TLS"):
        await tcp.connect("127.0.0.1", 7000)
    with pytest.raises(ConfigError, match="need mutual TLS"):
        await tcp.listen("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="not both"):
        await tcp.listen("127.0.0.1", 0, tls=pki.tls("shadow", "source"), insecure_loopback=True)
    # Other loopback addresses are fine.
    lst = await tcp.listen("127.0.0.2", 0, insecure_loopback=True)
    try:
        accept = asyncio.create_task(lst.accept())
        async with await tcp.connect("127.0.0.2", lst.port, insecure_loopback=True) as c:
            assert not c.peer.authenticated and c.peer.transport == "tcp"
            (await accept).abort()
    finally:
        await lst.close()


async def test_connect_errors_are_clear(pki: Pki) -> None:
    port = free_tcp_port()
    with pytest.raises(TransportError, match=r"cannot connect to 127\.0\.0\.1:.*refused"):
        await tcp.connect("127.0.0.1", port, tls=pki.tls("source", "shadow"))
    missing = tcp.TlsConfig(ca=pki.dir / "nope.pem", cert=pki.dir / "source.pem",
                            key=pki.dir / "source.key", peer_names=("shadow",))
    with pytest.raises(ConfigError, match="cannot load the CA bundle"):
        await tcp.connect("127.0.0.1", port, tls=missing)
    mismatched = tcp.TlsConfig(ca=pki.dir / "ca.pem", cert=pki.dir / "source.pem",
                               key=pki.dir / "shadow.key", peer_names=("shadow",))
    with pytest.raises(ConfigError, match="matching"):
        mismatched.client_context()
    with pytest.raises(ConfigError, match="at least one peer name"):
        tcp.TlsConfig.from_dir(pki.dir, name="source", peers=())
    with pytest.raises(ConfigError):
        tcp.KeepAlive(idle=0)


async def test_handshake_timeout(pki: Pki) -> None:
    """A server that accepts TCP but never answers: connect fails after handshake_timeout."""
    writers: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TransportError, match=r"timed out after 0\.3 s"):
            await tcp.connect("127.0.0.1", port, tls=pki.tls("source", "shadow"),
                              options=LinkOptions(handshake_timeout=0.3))
    finally:
        for w in writers:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        silent.close()
        await silent.wait_closed()


async def test_listener_close_wakes_accept_and_drops_unaccepted(pki: Pki) -> None:
    lst = await tcp.listen("127.0.0.1", 0, tls=pki.tls("shadow", "source"))
    c = await tcp.connect("127.0.0.1", lst.port, tls=pki.tls("source", "shadow"))
    await asyncio.sleep(0.05)  # established, never accepted
    waiter = asyncio.create_task(lst.accept())
    got = await asyncio.wait_for(waiter, 5)  # the queued one
    waiter = asyncio.create_task(lst.accept())
    await asyncio.sleep(0.01)
    await lst.close()
    with pytest.raises(LinkClosedError, match=r"listener .* is closed"):
        await waiter
    assert [x async for x in lst] == []
    got.abort()
    with pytest.raises(TransportError):
        await asyncio.wait_for(c.receive(), 5)
    with pytest.raises(TransportError, match="cannot connect"):
        await tcp.connect("127.0.0.1", lst.port, tls=pki.tls("source", "shadow"))
