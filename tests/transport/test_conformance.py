"""One suite, every transport (see cases.CASES): what the layer above may rely on.

- the same frames arrive, byte-identical, and epochs assemble with the sender's digest;
- 1 MiB and 64 MiB of RAM arrive byte for byte (split into frames below max_payload);
- a slow receiver throttles the sender (bounded buffering, measured);
- a peer killed mid-epoch gives a TransportError, never a partial frame;
- bit flips on the wire (a relay in the middle) are refused and end the link;
- close/abort/cancel semantics, whole-frame sends, oversized frames refused by header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpshadow.errors import ConfigError, FrameError, FrameFormatError, TransportError
from qmpshadow.frames import (
    EpochAssembler,
    EpochComplete,
    EpochWriter,
    Frame,
    FrameDecoder,
    apply_pages,
    encode_pages,
    max_pages_per_frame,
)
from qmpshadow.frames.wire import (
    Ack,
    BlockFlags,
    DeviceState,
    DeviceStateFormat,
    Feature,
    Heartbeat,
    Hello,
    Pages,
    RamBlock,
    ResyncReason,
    ResyncRequest,
    Role,
    encode_frame,
    encode_frame_parts,
)
from qmpshadow.transport import (
    LinkClosedError,
    LinkDroppedError,
    LinkOptions,
    LinkState,
)
from tests.transport.cases import BitFlipper, Case, Relay, link_pair

REPO = Path(__file__).resolve().parents[2]
PS = 4096


def _mixed_frames(gen: int = 3) -> tuple[list[bytes], EpochWriter]:
    """Every frame type: HELLO, one whole epoch, heartbeat inside it, ACK, RESYNC."""
    rng = random.Random(7)
    blocks = (
        RamBlock(idstr="mem", length=64 * PS),
        RamBlock(idstr="pc.bios", length=2 * PS, flags=BlockFlags.SMALL),
    )
    ram = bytearray(rng.randbytes(64 * PS))
    ram[PS : 2 * PS] = bytes(PS)  # a zero page
    w = EpochWriter(generation=gen, epoch=5, blocks=blocks, compress_level=3)
    frames: list[bytes] = [
        encode_frame(Hello(generation=gen, epoch=4, session_id=b"s" * 16, role=Role.SOURCE,
                           page_size=PS, features=Feature.ZSTD, max_payload=1 << 20,
                           name="vm1")),
        b"".join(w.begin()),
        b"".join(w.pages(0, 32, encode_pages(list(range(32)), ram, PS))),
        encode_frame(Heartbeat(generation=gen, epoch=5, seq=1, timestamp_ns=time.time_ns())),
        b"".join(w.small_block(1, 0, bytes(2 * PS))),
        b"".join(w.pages(0, 32, encode_pages(list(range(32, 64)), ram, PS))),
        b"".join(w.device_state(DeviceStateFormat.QEMU_SECTIONS, b"\x04dev" * 999)),
        b"".join(w.end()),
        encode_frame(Ack(generation=gen, epoch=5, digest=w.digest)),
        encode_frame(ResyncRequest(generation=gen, epoch=5, reason=ResyncReason.EPOCH_GAP,
                                   message="gap")),
    ]
    return frames, w


async def test_same_frames_both_ways(case: Case) -> None:
    frames, writer = _mixed_frames()
    async with link_pair(case) as (client, server):
        assert client.peer.authenticated is case.authenticated
        assert client.peer.encrypted is case.encrypted
        assert server.peer.authenticated is case.authenticated
        for tx, rx in ((client, server), (server, client)):
            sender = asyncio.create_task(_send_all(tx, frames))
            got = [await rx.receive() for _ in frames]
            await sender
            # The same frames: equal to decoding the sent bytes locally, with the same header
            # checksum (which covers the payload checksum: the same bytes crossed).
            assert got == _decode_all(b"".join(frames))
            for raw, frame in zip(frames, got, strict=True):
                assert frame.wire_checksum == int.from_bytes(raw[40:48], "little")
            asm = EpochAssembler(generation=3, last_epoch=4)
            done = [r for f in got[1:8] if (r := asm.feed(f)) is not None]
            assert done == [
                EpochComplete(generation=3, epoch=5, blocks=writer.blocks, frames=writer.frames,
                              pages=64, blob_bytes=writer.blob_bytes, digest=writer.digest)
            ]
        assert client.stats.frames_sent == server.stats.frames_received == len(frames)
        assert client.stats.bytes_sent == server.stats.bytes_received == sum(map(len, frames))


def _decode_all(data: bytes) -> list[Frame]:
    dec = FrameDecoder()
    dec.receive_data(data)
    out = []
    while isinstance(ev := dec.next_event(), Frame):
        out.append(ev)
    return out


async def _send_all(link: object, frames: list[bytes]) -> None:
    for f in frames:
        await link.send(f)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def ram64() -> bytes:
    """64 MiB: 1 MiB of random bytes repeated, every page stamped with its index (so a page
    landing in the wrong place is caught); much faster to make than 64 MiB of urandom.
    """
    buf = bytearray(os.urandom(1 << 20) * 64)
    for i in range(len(buf) // PS):
        buf[i * PS : i * PS + 8] = i.to_bytes(8, "little")
    return bytes(buf)


@pytest.mark.parametrize("size", [1 << 20, 64 << 20], ids=["1MiB", "64MiB"])
async def test_ram_byte_for_byte(case: Case, size: int, ram64: bytes) -> None:
    """A RAM block of ``size`` goes as PAGES frames below a 4 MiB max_payload, plus a 1 MiB
    device-state blob in one frame; the replica equals the source byte for byte.
    """
    max_payload = 4 << 20
    ram = memoryview(ram64)[:size]
    blocks = (RamBlock(idstr="mem", length=size),)
    opts = LinkOptions(max_payload=max_payload)
    batch = max_pages_per_frame(PS, max_payload)
    npages = size // PS
    w = EpochWriter(generation=1, epoch=1, blocks=blocks, max_payload=max_payload)
    # One 64 MiB frame would exceed max_payload: the encoder refuses it.
    if size > max_payload:
        with pytest.raises(ConfigError, match="max_payload"):
            encode_frame_parts(Pages(generation=1, epoch=1, block=0, count=npages,
                                     records=encode_pages(range(npages), ram, PS)),
                               max_payload=max_payload)
    blob = ram64[-(1 << 20):]
    async with link_pair(case, opts) as (client, server):

        async def send() -> None:
            await client.send(w.begin())
            for first in range(0, npages, batch):
                idx = range(first, min(first + batch, npages))
                await client.send(w.pages(0, len(idx), encode_pages(idx, ram, PS)))
            await client.send(w.device_state(DeviceStateFormat.QEMU_SECTIONS, blob))
            await client.send(w.end())

        sender = asyncio.create_task(send())
        replica = bytearray(size)
        asm = EpochAssembler()
        complete = None
        got_blob = b""
        while complete is None:
            frame = await server.receive()
            complete = asm.feed(frame)
            if isinstance(frame, Pages):
                apply_pages(frame.records, replica, PS, frame.count)
            elif isinstance(frame, DeviceState):
                got_blob = bytes(frame.data)
        await sender
        assert complete.digest == w.digest and complete.pages == npages
        assert w.frames == 2 + -(-npages // batch)
        assert replica == ram
        assert got_blob == blob


async def test_slow_receiver_throttles_sender(case: Case) -> None:
    """Receiver consumes one 32 KiB frame per 4 ms; the sender must be held back to within
    what the bounded buffers hold, not run ahead by megabytes. Measured here (5 MiB sent):
    the sender leads by at most 12-13 frames (~400 KiB) on plain TCP and unix sockets, ~38
    frames (~1.2 MiB) over TLS (asyncio's TLS layer buffers 256 KiB more each way).
    """
    opts = LinkOptions(write_buffer=64 << 10, read_buffer=64 << 10, socket_buffer=64 << 10)
    n, size, delay = 160, 32 << 10, 0.004
    frame = encode_frame(DeviceState(generation=1, epoch=1,
                                     format=DeviceStateFormat.QEMU_SECTIONS,
                                     data=bytes(size - 56)))
    assert len(frame) == size
    consumed = 0
    max_lead = 0
    async with link_pair(case, opts) as (client, server):

        async def slow_reader() -> None:
            nonlocal consumed
            for _ in range(n):
                await server.receive()
                consumed += 1
                await asyncio.sleep(delay)

        reader = asyncio.create_task(slow_reader())
        t0 = time.monotonic()
        for sent in range(1, n + 1):
            await client.send(frame)
            max_lead = max(max_lead, sent - consumed)
        send_time = time.monotonic() - t0
        await reader
        total_time = time.monotonic() - t0
        # What the buffers can hold: link write buffer, kernel send+receive buffers (the kernel
        # doubles the setting), link read buffer plus one recv, TLS's own buffers (256 KiB in,
        # 64 KiB raw out); generous: 2 MiB. Unthrottled, the sender would be 5 MiB ahead.
        bound = 2 << 20
        assert max_lead * size <= bound, (max_lead, bound)
        assert client.stats.send_blocked_s > 0.25, client.stats
        assert server.stats.read_pauses > 0
        # The sender finished only when the reader had nearly caught up.
        assert send_time >= total_time - (bound / size + 1) * delay * 1.5


async def _wait_line(proc: subprocess.Popen[str], want: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = await loop.run_in_executor(None, proc.stdout.readline)
            if not line:
                raise AssertionError(f"peer exited before printing {want!r}: {proc.wait()}")
            if line.strip() == want:
                return


@pytest.mark.parametrize("mode", ["mid-frame", "between-frames"])
async def test_peer_killed_mid_epoch(case: Case, mode: str) -> None:
    """SIGKILL the sending process inside an epoch: the receiver gets the whole frames sent
    before, then a TransportError (dropped inside a frame, or closed between frames), never
    a partial frame; the epoch stays open for the layer above to abort and resync.
    """
    listener = await case.listen(LinkOptions(read_buffer=64 << 10))
    spec = json.dumps(case.peer_spec(case.address(listener)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.transport._peer", spec, mode],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        link = await asyncio.wait_for(listener.accept(), 20)
        asm = EpochAssembler()
        for _ in range(3):  # EPOCH_BEGIN, PAGES, PAGES
            assert asm.feed(await link.receive()) is None
        await _wait_line(proc, "sent")
        if mode == "mid-frame":
            await _wait_line(proc, "blocked")  # the 32 MiB frame is part-way out
        proc.send_signal(signal.SIGKILL)
        await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        with pytest.raises(TransportError) as info:
            frame = await link.receive()
            pytest.fail(f"got {frame!r} after the peer died")
        if mode == "mid-frame":
            assert isinstance(info.value, LinkDroppedError), info.value
            assert info.value.partial_bytes > 0
            assert "inside a frame" in str(info.value)
            assert link.state is LinkState.FAILED
        else:
            assert isinstance(info.value, LinkClosedError) and info.value.by_peer
            assert link.state is LinkState.CLOSED
        assert asm.open_epoch == 1  # incomplete: the shadow aborts it and asks for a resync
        with pytest.raises(TransportError):
            await link.receive()  # the same end, again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        await listener.close()


@pytest.mark.parametrize("offset", [16, 300], ids=["in-header", "in-payload"])
async def test_bit_flip_on_the_wire_is_refused(case: Case, offset: int) -> None:
    """A relay flips one bit of the next chunk once armed. Plain streams: the frame checksum
    refuses it; TLS: the record MAC does. Either way no altered frame is delivered, the frames
    before arrive intact, and the link ends (the sender notices too).
    """
    if case.relay_kind is None:
        pytest.skip(f"{case.name}: no relay can sit in the middle")
    frames = [
        encode_frame(DeviceState(generation=1, epoch=i, format=DeviceStateFormat.QEMU_SECTIONS,
                                 data=bytes([i]) * 2000))
        for i in range(1, 6)
    ]
    listener = await case.listen()
    flipper = BitFlipper(offset)
    relay = await Relay(case.relay_kind, case.address(listener), flipper, case.tmp).start()
    try:
        async with link_pair(case, address=relay.address, listener=listener) as (client, server):
            await client.send(frames[0])
            assert encode_frame(await server.receive()) == frames[0]
            flipper.armed = True
            for f in frames[1:]:
                with contextlib.suppress(TransportError):
                    await client.send(f)
            with pytest.raises((case.integrity_error, TransportError, FrameError)) as info:
                got = await server.receive()
                pytest.fail(f"altered stream delivered {got!r}")
            assert flipper.flipped
            assert isinstance(info.value, case.integrity_error), repr(info.value)
            assert server.state is LinkState.FAILED
            assert server.error is info.value
            # The receiver closed the connection: the sender's link ends as well.
            with pytest.raises(TransportError):
                async with asyncio.timeout(5):
                    await client.receive()
            assert client.state in (LinkState.CLOSED, LinkState.FAILED)
    finally:
        await relay.close()
        await listener.close()


async def test_oversized_frame_refused_from_its_header(case: Case) -> None:
    """A frame above the receiver's max_payload is refused on its header alone (the receiver
    never waits for or buffers its payload), and the link ends.
    """
    async with link_pair(case, LinkOptions(max_payload=1 << 20)) as (client, server):
        big = encode_frame_parts(
            DeviceState(generation=1, epoch=1, format=DeviceStateFormat.QEMU_SECTIONS,
                        data=bytes(8 << 20)),
        )
        sender = asyncio.create_task(client.send(big))
        with pytest.raises(FrameFormatError, match="exceeds max_payload"):
            await server.receive()
        assert server.state is LinkState.FAILED
        with contextlib.suppress(TransportError):
            await asyncio.wait_for(sender, 5)


async def test_close_and_abort(case: Case) -> None:
    frame = encode_frame(Heartbeat(generation=1, epoch=0, seq=1, timestamp_ns=2))
    async with link_pair(case) as (client, server):
        await client.send(frame)
        await client.close()
        assert client.state is LinkState.CLOSED and client.error is None
        # Frames sent before the close arrive; then the peer sees a clean close.
        assert encode_frame(await server.receive()) == frame
        with pytest.raises(LinkClosedError) as info:
            await server.receive()
        assert info.value.by_peer
        assert [f async for f in server] == []  # iteration ends quietly on a clean close
        with pytest.raises(LinkClosedError) as local:
            await client.send(frame)
        assert not local.value.by_peer
        with pytest.raises(LinkClosedError):
            await client.receive()
        await client.close()  # idempotent
        client.abort()
    async with link_pair(case) as (client, server):
        pending = asyncio.create_task(server.receive())
        await asyncio.sleep(0.01)
        server.abort()
        with pytest.raises(LinkClosedError):
            await pending
        with pytest.raises(TransportError):
            await asyncio.wait_for(client.receive(), 5)


async def test_send_takes_whole_frames_only(case: Case) -> None:
    frame = encode_frame(Heartbeat(generation=1, epoch=0, seq=1, timestamp_ns=2))
    async with link_pair(case) as (client, server):
        for bad in (frame[:30], frame[:-1], frame + frame, b"x" * 60, [frame[:48]]):
            with pytest.raises(ConfigError, match="frame"):
                await client.send(bad)
        assert client.state is LinkState.OPEN
        # Parts may be split anywhere, and mutable buffers are fine.
        await client.send([frame[:10], bytearray(frame[10:50]), memoryview(frame)[50:]])
        assert encode_frame(await server.receive()) == frame


async def test_concurrent_senders_never_interleave(case: Case) -> None:
    opts = LinkOptions(write_buffer=64 << 10)
    async with link_pair(case, opts) as (client, server):
        frames = [
            encode_frame_parts(DeviceState(generation=1, epoch=i,
                                           format=DeviceStateFormat.QEMU_SECTIONS,
                                           data=bytearray([i]) * (700 << 10)))
            for i in range(1, 7)
        ]
        senders = [asyncio.create_task(client.send(f)) for f in frames]
        got: list[Frame] = [await server.receive() for _ in frames]
        await asyncio.gather(*senders)
        assert sorted(f.epoch for f in got) == list(range(1, 7))
        for f in got:
            assert isinstance(f, DeviceState) and f.data == bytes([f.epoch]) * (700 << 10)


async def test_cancelled_send_mid_frame_ends_the_link(case: Case) -> None:
    """Cancelling a send part-way through a frame aborts the link: the peer sees a dropped
    link with the partial frame discarded, not a frame stitched from two sends.
    """
    opts = LinkOptions(write_buffer=64 << 10, read_buffer=64 << 10, socket_buffer=64 << 10)
    async with link_pair(case, opts) as (client, server):
        big = encode_frame_parts(DeviceState(generation=1, epoch=1,
                                             format=DeviceStateFormat.QEMU_SECTIONS,
                                             data=bytes(16 << 20)))
        task = asyncio.create_task(client.send(big))
        await asyncio.sleep(0.2)  # nobody reads: blocked part-way
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.state is LinkState.FAILED
        assert isinstance(client.error, LinkDroppedError)
        with pytest.raises(LinkDroppedError):
            await client.send(encode_frame(Heartbeat(generation=1, epoch=0, seq=1,
                                                     timestamp_ns=1)))
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(server.receive(), 5)
        assert isinstance(info.value, LinkDroppedError), info.value


def test_case_table_is_extensible() -> None:
    """The conformance matrix is data: an rdma case is one more entry in CASES."""
    from tests.transport.cases import CASES

    assert {"tcp-tls", "tcp-insecure-loopback", "local"} <= set(CASES)
    assert all(issubclass(c, Case) for c in CASES.values())
    assert os.path.exists(REPO / "tests" / "transport" / "_peer.py")


@pytest.mark.parametrize("readonly", [False, True], ids=["bytearray", "readonly-view"])
async def test_caller_may_reuse_buffers_once_send_returns(case: Case, readonly: bool) -> None:
    """send() returns with bytes still queued (nobody reads yet); overwriting the caller's
    buffer then must not change what the peer receives (the payload checksum would catch it).
    The link copies every non-bytes piece, so this holds whatever the asyncio transport does
    with what it is given (CPython 3.11's happen to copy too, so this guards the contract
    rather than a failure seen here).
    """
    buf = bytearray(b"\x5a" * (3 << 19))
    data = memoryview(buf).toreadonly() if readonly else buf
    async with link_pair(case) as (client, server):
        await client.send(encode_frame_parts(
            DeviceState(generation=1, epoch=1, format=DeviceStateFormat.QEMU_SECTIONS,
                        data=data)))
        buf[:] = b"\xa5" * len(buf)
        got = await server.receive()
        assert isinstance(got, DeviceState) and got.data == b"\x5a" * (3 << 19)
