"""Epoch writer/assembler, and a whole source → shadow replication pass without sockets."""

from __future__ import annotations

import random
from array import array

import pytest

from qmpshadow.errors import ConfigError, FencedFrameError, FrameError
from qmpshadow.frames import (
    CLOSED,
    NEED_DATA,
    EpochAssembler,
    EpochComplete,
    EpochWriter,
    Frame,
    FrameDecoder,
    PageCache,
    UnchangedFilter,
    apply_pages,
    encode_pages,
    max_pages_per_frame,
)
from qmpshadow.frames.wire import (
    Ack,
    BlockFlags,
    DeviceState,
    DeviceStateFormat,
    EpochBegin,
    Heartbeat,
    Pages,
    RamBlock,
    SmallBlock,
    encode_frame,
)

PS = 4096
BLOCKS = (
    RamBlock(idstr="mem", length=64 * PS),
    RamBlock(idstr="pc.bios", length=4 * PS, flags=BlockFlags.SMALL),
)


def _frames(data: bytes) -> list[Frame]:
    dec = FrameDecoder()
    dec.receive_data(data)
    dec.receive_data(b"")
    out = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out
        out.append(ev)


def _epoch_bytes(
    gen: int = 1, epoch: int = 1, level: int | None = None, base: int = 0
) -> tuple[bytes, EpochWriter]:
    w = EpochWriter(generation=gen, epoch=epoch, blocks=BLOCKS, compress_level=level,
                    base=base)
    parts = w.begin()
    parts += w.pages(0, 2, encode_pages([0, 5], bytes(64 * PS), PS))
    parts += w.small_block(1, PS, b"\x01" * 100)
    parts += w.device_state(DeviceStateFormat.QEMU_SECTIONS, b"devstate")
    parts += w.end()
    return b"".join(parts), w


@pytest.mark.parametrize("level", [None, 3])
def test_writer_and_assembler_agree(level: int | None) -> None:
    data, w = _epoch_bytes(level=level)
    asm = EpochAssembler()
    results = [asm.feed(f) for f in _frames(data)]
    assert results[:-1] == [None] * 4
    done = results[-1]
    assert isinstance(done, EpochComplete)
    assert (done.epoch, done.frames, done.pages, done.blob_bytes) == (1, 4, 2, 108)
    assert done.digest == w.digest and done.blocks == BLOCKS
    assert asm.last_epoch == 1 and asm.open_epoch is None
    assert w.wire_bytes == len(data)


def test_heartbeats_may_interleave() -> None:
    frames = _frames(_epoch_bytes()[0])
    hb = _frames(encode_frame(Heartbeat(generation=1, epoch=1, seq=1, timestamp_ns=0)))[0]
    asm = EpochAssembler()
    for f in [frames[0], hb, *frames[1:3], hb, *frames[3:]]:
        last = asm.feed(f)
    assert isinstance(last, EpochComplete)


def test_missing_frame_is_detected() -> None:
    frames = _frames(_epoch_bytes()[0])
    asm = EpochAssembler()
    with pytest.raises(FrameError, match="incomplete or altered"):
        for f in frames[:2] + frames[3:]:
            asm.feed(f)


def test_reordered_frames_are_detected() -> None:
    frames = _frames(_epoch_bytes()[0])
    asm = EpochAssembler()
    with pytest.raises(FrameError, match="digest"):
        for f in [frames[0], frames[2], frames[1], *frames[3:]]:
            asm.feed(f)


def test_frame_of_another_epoch_inside_is_refused() -> None:
    a = _frames(_epoch_bytes(epoch=1)[0])
    b = _frames(_epoch_bytes(epoch=2)[0])
    asm = EpochAssembler()
    asm.feed(a[0])
    with pytest.raises(FrameError, match="of epoch 2 generation 1 inside epoch 1"):
        asm.feed(b[1])


def test_epochs_must_increase_and_begin_first() -> None:
    asm = EpochAssembler(last_epoch=5)
    frames = _frames(_epoch_bytes(epoch=5)[0])
    with pytest.raises(FrameError, match="epochs must increase"):
        asm.feed(frames[0])
    with pytest.raises(FrameError, match="PAGES frame not expected while idle"):
        asm.feed(frames[1])
    asm2 = EpochAssembler()
    asm2.feed(frames[0])
    with pytest.raises(FrameError, match="EPOCH_BEGIN frame not expected while open"):
        asm2.feed(frames[0])
    with pytest.raises(FrameError, match="ACK frame not expected"):
        asm2.feed(Ack(generation=1, epoch=5, digest=0))
    asm2.abort()
    assert asm2.open_epoch is None
    for f in frames:
        asm2.feed(f)
    assert asm2.last_epoch == 5


def test_a_delta_completes_only_its_base_epoch() -> None:
    """A delta epoch is taken only on top of exactly its base: after a lost or refused
    epoch, the deltas in flight behind it are refused until a full epoch (base 0) comes."""
    asm = EpochAssembler(last_epoch=3)
    assert asm.feed(_frames(_epoch_bytes(epoch=4, base=3)[0])[0]) is None  # 3 -> 4: fine
    asm.abort()
    for base in (2, 5):  # epoch 4 is a delta against something the receiver does not hold
        with pytest.raises(FrameError, match=f"delta against epoch {base}, but the receiver "
                           "holds epoch 3"):
            asm.feed(_frames(_epoch_bytes(epoch=6, base=base)[0])[0])
    done = None
    for f in _frames(_epoch_bytes(epoch=6, base=0)[0]):  # a full epoch needs no base
        done = asm.feed(f)
    assert done is not None and done.epoch == 6 and asm.last_epoch == 6
    for f in _frames(_epoch_bytes(epoch=7, base=6)[0]):
        done = asm.feed(f)
    assert done is not None and done.epoch == 7


def test_fencing() -> None:
    asm = EpochAssembler(generation=7)
    frames = _frames(_epoch_bytes(gen=6)[0])
    with pytest.raises(FencedFrameError):
        asm.feed(frames[0])
    newer = _frames(_epoch_bytes(gen=9)[0])
    for f in newer:
        asm.feed(f)
    assert asm.generation == 9


def test_generation_change_mid_epoch_is_refused() -> None:
    asm = EpochAssembler()
    asm.feed(_frames(_epoch_bytes(gen=1)[0])[0])
    with pytest.raises(FrameError, match="generation 2 inside epoch 1 generation 1"):
        asm.feed(_frames(_epoch_bytes(gen=2)[0])[1])


def test_block_table_is_enforced() -> None:
    begin = EpochBegin(generation=1, epoch=1, blocks=BLOCKS)
    bad = [
        (Pages(generation=1, epoch=1, block=2, count=0, records=b""), "names block 2"),
        (Pages(generation=1, epoch=1, block=1, count=0, records=b""), "not sent that way"),
        (SmallBlock(generation=1, epoch=1, block=0, offset=0, data=b""), "not sent that way"),
        (
            SmallBlock(generation=1, epoch=1, block=1, offset=4 * PS - 1, data=b"ab"),
            "overruns block 'pc.bios'",
        ),
        (
            SmallBlock(generation=1, epoch=1, block=1, offset=1 << 63, data=b""),
            "overruns",
        ),
    ]
    for frame, message in bad:
        asm = EpochAssembler()
        asm.feed(begin)
        with pytest.raises(FrameError, match=message):
            asm.feed(frame)


def test_writer_misuse() -> None:
    w = EpochWriter(generation=1, epoch=1, blocks=BLOCKS)
    with pytest.raises(ConfigError, match="pages\\(\\) in epoch writer state 'new'"):
        w.pages(0, 0, b"")
    w.begin()
    with pytest.raises(ConfigError, match="not in the table"):
        w.pages(3, 0, b"")
    with pytest.raises(ConfigError, match="not sent as SMALL_BLOCK"):
        w.small_block(0, 0, b"")
    with pytest.raises(ConfigError, match="overrun"):
        w.small_block(1, 4 * PS, b"x")
    w.end()
    with pytest.raises(ConfigError):
        w.end()


def test_replication_pass_source_to_shadow() -> None:
    """Shared-RAM flow: scan → encode (cache) → frames → decode → assemble → apply."""
    rng = random.Random(11)
    npages = 64
    ram = bytearray(npages * PS)
    for i in range(0, npages, 3):
        ram[i * PS : (i + 1) * PS] = rng.randbytes(PS)
    replica = bytearray(npages * PS)
    filt = UnchangedFilter(npages, PS)
    cache = PageCache(PS, 16 * PS)
    asm = EpochAssembler()
    per_frame = max_pages_per_frame(PS, 64 * 1024)
    for epoch in range(1, 6):
        if epoch > 1:
            for _ in range(20):  # small edits, text-like
                pos = rng.randrange(len(ram))
                ram[pos : pos + 4] = rng.randbytes(4)
        changed = filt.scan(ram)
        w = EpochWriter(
            generation=1, epoch=epoch, blocks=BLOCKS, max_payload=64 * 1024, compress_level=1
        )
        parts = w.begin()
        stats = array("Q", [0, 0, 0])
        for lo in range(0, len(changed), per_frame):
            batch = changed[lo : lo + per_frame]
            rec = encode_pages(batch, ram, PS, cache, stats=stats)
            parts += w.pages(0, len(batch), rec)
        parts += w.device_state(DeviceStateFormat.IGNORE_SHARED_STREAM, b"QEVM...")
        parts += w.end()
        if epoch > 1:
            assert stats[2] > 0  # some pages went as DELTA
        dec = FrameDecoder(max_payload=64 * 1024)
        dec.receive_data(b"".join(parts))
        staged: list[Pages] = []
        done = None
        while isinstance(ev := dec.next_event(), Frame):
            done = asm.feed(ev)
            if isinstance(ev, Pages):
                staged.append(ev)
            elif isinstance(ev, DeviceState):
                assert ev.data == b"QEVM..."
        assert isinstance(done, EpochComplete) and done.epoch == epoch
        # Commit: apply only once the epoch is known complete.
        for p in staged:
            apply_pages(p.records, replica, PS, p.count)
        assert replica == ram
