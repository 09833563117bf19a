"""Two test hosts: the server in one network namespace, the client in another, joined by a
veth pair (a private /30 that exists only inside the namespaces this test makes).
"""

from __future__ import annotations

import asyncio

import pytest

from qmpshadow.errors import ConfigError
from qmpshadow.frames.wire import DeviceState, DeviceStateFormat, encode_frame
from qmpshadow.transport import PeerAuthError, tcp
from tests.transport.cases import Pki
from tests.transport.conftest import TwoHosts

pytestmark = pytest.mark.netns
PORT = 7411


async def test_mutual_tls_across_hosts(two_hosts: TwoHosts, pki: Pki) -> None:
    h = two_hosts
    lst = await tcp.listen(h.addr_b, PORT, tls=pki.tls("shadow", "source"),
                           sock=h.tcp_socket(h.b, (h.addr_b, PORT)))
    try:
        accept = asyncio.create_task(lst.accept())
        client = await tcp.connect(h.addr_b, PORT, tls=pki.tls("source", "shadow"),
                                   sock=h.tcp_socket(h.a))
        server = await asyncio.wait_for(accept, 5)
        async with client, server:
            assert client.peer.name == "shadow" and client.peer.encrypted
            assert client.peer.address == f"{h.addr_b}:{PORT}"
            assert server.peer.name == "source"
            assert server.peer.address.startswith(f"{h.addr_a}:")
            frame = encode_frame(DeviceState(generation=2, epoch=9,
                                             format=DeviceStateFormat.QEMU_SECTIONS,
                                             data=bytes(range(256)) * 4096))
            await client.send(frame)
            assert encode_frame(await server.receive()) == frame

        # A client whose certificate another CA signed is refused, on both sides.
        rogue = tcp.TlsConfig(ca=pki.dir / "ca.pem", cert=pki.rogue_dir / "source.pem",
                              key=pki.rogue_dir / "source.key", peer_names=("shadow",))
        with pytest.raises(PeerAuthError, match="refused this side's certificate"):
            await tcp.connect(h.addr_b, PORT, tls=rogue, sock=h.tcp_socket(h.a))
        async with asyncio.timeout(5):
            while not lst.stats.rejected:
                await asyncio.sleep(0.01)
        assert "CERTIFICATE_VERIFY_FAILED" in str(lst.stats.recent_rejections[-1])
        # So is a self-signed one.
        selfsigned = tcp.TlsConfig(ca=pki.dir / "ca.pem",
                                   cert=pki.selfsigned_dir / "source.pem",
                                   key=pki.selfsigned_dir / "source.key",
                                   peer_names=("shadow",))
        with pytest.raises(PeerAuthError):
            await tcp.connect(h.addr_b, PORT, tls=selfsigned, sock=h.tcp_socket(h.a))
        assert lst.stats.accepted == 1
    finally:
        await lst.close()


async def test_plain_tcp_refused_off_loopback(two_hosts: TwoHosts) -> None:
    h = two_hosts
    sock = h.tcp_socket(h.b, (h.addr_b, PORT))
    with pytest.raises(ConfigError, match="only on loopback"):
        await tcp.listen(h.addr_b, PORT, insecure_loopback=True, sock=sock)
    sock.close()
    client_sock = h.tcp_socket(h.a)
    with pytest.raises(ConfigError, match="only on loopback"):
        await tcp.connect(h.addr_b, PORT, insecure_loopback=True, sock=client_sock)
    assert client_sock.fileno() == -1  # closed by connect()
