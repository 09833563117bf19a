"""RDMA-specific behaviour of the link, on soft-RoCE (rxe0 on lo) inside the test guest.

What the transport-neutral conformance suite cannot see: the queue pair and its ring,
pieces cut at slot boundaries, traffic both ways at once, a queue-pair error while the
control link stays up, setup against something that is not an RDMA endpoint, and that
links leave no verbs objects or descriptors behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sys
from pathlib import Path

import pytest

from qmpshadow.errors import TransportError
from qmpshadow.frames import EpochAssembler
from qmpshadow.frames.wire import (
    DeviceState,
    DeviceStateFormat,
    Feature,
    Heartbeat,
    Hello,
    Role,
    encode_frame,
)
from qmpshadow.transport import (
    LinkClosedError,
    LinkDroppedError,
    LinkOptions,
    LinkState,
    rdma,
    tcp,
)
from qmpshadow.transport._verbs import RdmaUnavailableError
from tests.rdma.guest.conftest import open_fds, rdma_pair, rdma_resources


def _blob(epoch: int, size: int) -> bytes:
    """A DEVICE_STATE frame of exactly ``size`` bytes on the wire."""
    data = random.Random(epoch).randbytes(size - 56)
    frame = encode_frame(DeviceState(generation=1, epoch=epoch,
                                     format=DeviceStateFormat.QEMU_SECTIONS, data=data))
    assert len(frame) == size
    return frame


async def test_identity_over_mutual_tls(pki_dir: Path) -> None:
    async with rdma_pair(tls_dir=pki_dir) as (client, server, lst):
        for link, name in ((client, "shadow"), (server, "source")):
            assert link.peer.transport == "rdma"
            assert link.peer.name == name
            assert link.peer.authenticated and not link.peer.encrypted
            assert "rxe0" in link.device
        assert lst.stats.accepted == 1
        await client.send_frame(Heartbeat(generation=1, epoch=0, seq=7, timestamp_ns=1))
        got = await server.receive()
        assert isinstance(got, Heartbeat) and got.seq == 7


async def test_frames_cut_at_every_slot_boundary() -> None:
    """Frames of sizes around one and several slots (8 KiB here), both directions, arrive
    byte for byte in order."""
    opts = LinkOptions(read_buffer=64 << 10, write_buffer=64 << 10)
    slots, slot = rdma.ring_geometry(opts.read_buffer)
    assert (slots, slot) == (8, 8 << 10)
    sizes = [56, 57, slot - 1, slot, slot + 1, 2 * slot, 3 * slot - 7, 9 * slot + 3,
             slots * slot, slots * slot + 1, 2 << 20]
    frames = [_blob(i + 1, n) for i, n in enumerate(sizes)]
    async with rdma_pair(opts) as (client, server, _):
        for tx, rx in ((client, server), (server, client)):

            async def send_all(link: rdma.RdmaLink = tx) -> None:
                for f in frames:
                    await link.send(f)

            sender = asyncio.create_task(send_all())
            for f in frames:
                assert encode_frame(await rx.receive()) == f
            await sender
        assert client.stats.bytes_sent == server.stats.bytes_received == sum(sizes)


async def test_both_directions_at_once() -> None:
    """Each side sends 12 MiB while receiving 12 MiB: credits flow both ways on one queue
    pair, nothing deadlocks, every byte arrives."""
    opts = LinkOptions(read_buffer=256 << 10, write_buffer=256 << 10)
    frames = [_blob(i, 3 << 20) for i in range(1, 5)]
    async with rdma_pair(opts) as (client, server, _):

        async def pump(tx: rdma.RdmaLink, rx: rdma.RdmaLink) -> None:
            async def send() -> None:
                for f in frames:
                    await tx.send(f)

            sender = asyncio.create_task(send())
            for f in frames:
                assert encode_frame(await rx.receive()) == f
            await sender

        await asyncio.wait_for(asyncio.gather(pump(client, server), pump(server, client)),
                               120)
        for link in (client, server):
            assert link.stats.send_blocked_s > 0  # the rings were full at times
            assert link.is_open


async def test_queue_pair_error_ends_the_link() -> None:
    """A write the peer's device refuses (a wrong rkey: remote access error) puts the queue
    pair in error: the link fails with LinkDroppedError naming the completion status, the
    peer's link ends too (its control link is dropped), and the layer above reconnects.

    (A peer queue pair that silently vanished while its control link stays up is not used
    here: soft-RoCE on this kernel kept retrying such writes for longer than 25 s instead
    of failing after retry_cnt x timeout; a dead peer process is noticed through its
    control link, see the conformance suite's peer-killed tests.)
    """
    frame = encode_frame(Heartbeat(generation=1, epoch=0, seq=1, timestamp_ns=1))
    async with rdma_pair() as (client, server, _):
        await client.send(frame)
        assert encode_frame(await server.receive()) == frame
        client._remote = dataclasses.replace(client._remote, rkey=client._remote.rkey ^ 0x5A5A)
        for _ in range(8):  # a signaled write among them reports the error
            with contextlib.suppress(LinkDroppedError):
                await client.send(frame)
        with pytest.raises(LinkDroppedError, match="queue pair error") as info:
            await asyncio.wait_for(client.receive(), 30)
        assert "remote access error" in str(info.value), info.value
        assert client.state is LinkState.FAILED
        with pytest.raises(LinkDroppedError):
            await client.send(frame)
        with pytest.raises(TransportError):
            await asyncio.wait_for(server.receive(), 30)
        assert server.state in (LinkState.CLOSED, LinkState.FAILED)


async def test_peer_that_is_not_an_rdma_endpoint() -> None:
    """A plain TCP agent answers setup with its own HELLO: refused with a clear error."""
    lst = await tcp.listen("127.0.0.1", 0, insecure_loopback=True)

    async def tcp_agent() -> None:
        link = await lst.accept()
        await link.send_frame(Hello(generation=1, epoch=0, session_id=b"s" * 16,
                                    role=Role.SHADOW, page_size=4096, features=Feature.DELTA,
                                    max_payload=1 << 20, name="shadow-vm1"))
        await asyncio.sleep(5)
        link.abort()

    agent = asyncio.create_task(tcp_agent())
    try:
        with pytest.raises(TransportError, match="not an RDMA endpoint") as info:
            await rdma.connect(lst.host, lst.port, insecure_loopback=True)
        assert "shadow-vm1" in str(info.value)
    finally:
        agent.cancel()
        await asyncio.gather(agent, return_exceptions=True)
        await lst.close()


async def test_setup_times_out_on_a_silent_peer() -> None:
    lst = await tcp.listen("127.0.0.1", 0, insecure_loopback=True)
    accepted = asyncio.create_task(lst.accept())
    try:
        with pytest.raises(TransportError, match=r"timed out after 1\.0 s"):
            await rdma.connect(lst.host, lst.port, insecure_loopback=True,
                               options=LinkOptions(handshake_timeout=1.0))
    finally:
        accepted.cancel()
        await asyncio.gather(accepted, return_exceptions=True)
        await lst.close()


async def test_unknown_device_is_named() -> None:
    with pytest.raises(RdmaUnavailableError, match="devices here: rxe0") as info:
        await rdma.connect("127.0.0.1", 9, insecure_loopback=True, device="mlx5_7")
    assert "--transport tcp" in str(info.value)


async def test_links_leave_nothing_behind() -> None:
    """Six links set up, used and ended (close, abort, peer close): descriptors and
    verbs objects return to where they were."""
    frame = _blob(1, 300 << 10)
    async with rdma_pair():  # warm up: pyverbs, the device, asyncio's own descriptors
        pass
    fds, res = open_fds(), rdma_resources()
    for i in range(6):
        async with rdma_pair() as (client, server, _):
            sender = asyncio.create_task(client.send(frame))
            assert encode_frame(await server.receive()) == frame
            await sender
            if i % 3 == 0:
                await client.close()
            elif i % 3 == 1:
                server.abort()
            else:
                await server.close()
                with pytest.raises(TransportError):
                    await asyncio.wait_for(client.receive(), 10)
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    assert open_fds() == fds
    assert rdma_resources() == res, (res, rdma_resources())


async def test_listener_close_drops_unaccepted_links() -> None:
    lst = await rdma.listen("127.0.0.1", 0, insecure_loopback=True)
    client = await rdma.connect(lst.host, lst.port, insecure_loopback=True)
    for _ in range(100):  # until the server side finished its setup
        if lst._links:
            break
        await asyncio.sleep(0.02)
    await lst.close()
    with pytest.raises(TransportError):
        await asyncio.wait_for(client.receive(), 10)
    client.abort()


def test_runs_inside_the_guest() -> None:
    """Sanity: this suite runs inside the guest (the host has no RDMA device)."""
    assert os.environ.get("QMPSHADOW_IN_RDMA_GUEST") == "1"
    assert rdma.available() is None


async def _line(proc: asyncio.subprocess.Process, want: str, timeout: float = 60) -> None:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"peer exited before printing {want!r}: {await proc.wait()}")
            if line.decode().strip() == want:
                return


async def _spawn(lst: rdma.RdmaListener, mode: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.rdma.guest._peer", lst.host, str(lst.port), mode,
        cwd=Path(__file__).resolve().parents[3], stdout=asyncio.subprocess.PIPE)


@pytest.mark.parametrize("mode", ["mid-frame", "between-frames"])
async def test_sender_killed_mid_epoch(mode: str) -> None:
    """SIGKILL the sending process inside an epoch (mid-frame: while its 32 MiB frame is
    part-way through the ring): the frames sent before arrive whole, then LinkDroppedError
    with the partial frame dropped, or LinkClosedError between frames; never a partial
    frame; the epoch stays open for the layer above to abort and resync."""
    lst = await rdma.listen("127.0.0.1", 0, insecure_loopback=True,
                            options=LinkOptions(read_buffer=64 << 10))
    proc = await _spawn(lst, mode)
    try:
        link = await asyncio.wait_for(lst.accept(), 60)
        asm = EpochAssembler()
        for _ in range(3):
            assert asm.feed(await link.receive()) is None
        await _line(proc, "sent")
        if mode == "mid-frame":
            await _line(proc, "blocked")
        proc.kill()
        await proc.wait()
        with pytest.raises(TransportError) as info:
            frame = await asyncio.wait_for(link.receive(), 30)
            pytest.fail(f"got {frame!r} after the peer died")
        if mode == "mid-frame":
            assert isinstance(info.value, LinkDroppedError), info.value
            assert info.value.partial_bytes > 0
            assert "inside a frame" in str(info.value)
            assert link.state is LinkState.FAILED
        else:
            assert isinstance(info.value, LinkClosedError) and info.value.by_peer
            assert link.state is LinkState.CLOSED
        assert asm.open_epoch == 1
        with pytest.raises(TransportError):
            await link.receive()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await lst.close()


async def test_receiver_killed_while_sender_waits() -> None:
    """The receiving process dies while this side's send waits for ring slots: the send
    fails with a TransportError instead of waiting forever."""
    lst = await rdma.listen("127.0.0.1", 0, insecure_loopback=True,
                            options=LinkOptions(write_buffer=64 << 10))
    proc = await _spawn(lst, "receiver")
    try:
        link = await asyncio.wait_for(lst.accept(), 60)
        await link.send(_blob(1, 4096))
        await _line(proc, "got-one")
        big = asyncio.create_task(link.send(_blob(2, 8 << 20)))
        for _ in range(3000):
            if isinstance(link, rdma.RdmaLink) and link.send_waiting:
                break
            await asyncio.sleep(0.01)
        assert not big.done()
        proc.kill()
        await proc.wait()
        with pytest.raises(TransportError):
            await asyncio.wait_for(big, 30)
        assert link.state in (LinkState.CLOSED, LinkState.FAILED)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await lst.close()
