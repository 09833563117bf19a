"""Delta-frame wire format: round trips, incremental feeding, corruption and bounds."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpshadow.errors import (
    ConfigError,
    FencedFrameError,
    FrameChecksumError,
    FrameError,
    FrameFormatError,
)
from qmpshadow.frames import wire
from qmpshadow.frames.wire import (
    CLOSED,
    HEADER_SIZE,
    NEED_DATA,
    Ack,
    BlockFlags,
    DeviceState,
    DeviceStateFormat,
    DiskBlock,
    EpochBegin,
    EpochEnd,
    Feature,
    Frame,
    FrameDecoder,
    FrameType,
    Heartbeat,
    Hello,
    Pages,
    RamBlock,
    ResyncReason,
    ResyncRequest,
    Role,
    SmallBlock,
    check_generation,
    encode_frame,
    encode_frame_parts,
)

G, E = 3, 17

SAMPLE: list[Frame] = [
    Hello(
        generation=G,
        epoch=0,
        session_id=bytes(range(16)),
        role=Role.SOURCE,
        page_size=4096,
        features=Feature.ZSTD | Feature.DELTA,
        max_payload=1 << 24,
        name="vm-ünïcode",
    ),
    EpochBegin(
        generation=G,
        epoch=E,
        blocks=(
            RamBlock(idstr="mem", length=1 << 30),
            RamBlock(idstr="pc.bios", length=256 << 10, flags=BlockFlags.SMALL),
        ),
        base=E - 1,
    ),
    Pages(generation=G, epoch=E, block=0, count=2, records=b"\x00\x01" + b"\x07" * 4096),
    Pages(generation=G, epoch=E, block=0, count=0, records=b""),
    SmallBlock(generation=G, epoch=E, block=1, offset=4096, data=b"\xaa" * 1000),
    DeviceState(generation=G, epoch=E, format=DeviceStateFormat.QEMU_SECTIONS, data=b"dev" * 50),
    DiskBlock(generation=G, epoch=E, disk=1, offset=1 << 33, data=b"\x5a" * 700),
    Heartbeat(generation=G, epoch=E, seq=9, timestamp_ns=123456789),
    EpochEnd(generation=G, epoch=E, frames=5, pages=2, blob_bytes=1150, digest=0xFEED),
    Ack(generation=G, epoch=E, digest=0xFEED),
    ResyncRequest(generation=G, epoch=E - 1, reason=ResyncReason.DIGEST_MISMATCH, message="x"),
]


def _stream(frames: list[Frame], level: int | None = None) -> bytes:
    return b"".join(encode_frame(f, compress_level=level) for f in frames)


def _drain(dec: FrameDecoder) -> list[Frame]:
    out = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out
        assert isinstance(ev, Frame)
        out.append(ev)


def _decode_all(data: bytes, **kw: Any) -> list[Frame]:
    dec = FrameDecoder(**kw)
    dec.receive_data(data)
    dec.receive_data(b"")
    frames = _drain(dec)
    assert dec.next_event() is CLOSED
    return frames


# --- round trips and feeding ----------------------------------------------------------------


@pytest.mark.parametrize("level", [None, 3])
def test_every_frame_type_round_trips(level: int | None) -> None:
    frames = _decode_all(_stream(SAMPLE, level))
    assert frames == SAMPLE
    assert {f.TYPE for f in frames} == set(FrameType)
    assert all(f.wire_checksum for f in frames)


def test_compression_sets_the_flag_only_when_it_helps() -> None:
    big = Pages(generation=G, epoch=E, block=0, count=1, records=bytes(8192))
    assert encode_frame(big, compress_level=3)[6] & wire.FrameFlags.ZSTD
    assert len(encode_frame(big, compress_level=3)) < 1000
    tiny = Pages(generation=G, epoch=E, block=0, count=0, records=b"\x01")
    assert not encode_frame(tiny, compress_level=3)[6] & wire.FrameFlags.ZSTD
    ack = Ack(generation=G, epoch=E, digest=0)
    assert encode_frame(ack, compress_level=3) == encode_frame(ack)  # never compressed


def test_header_layout() -> None:
    data = encode_frame(Ack(generation=0x0102, epoch=0x0304, digest=5))
    magic, ver, ftype, flags, gen, epoch, length, res, pcs, hcs = struct.unpack_from(
        "<4sBBHQQIIQQ", data
    )
    assert (magic, ver, ftype, flags, gen, epoch, length, res) == (
        b"QSDF",
        2,
        7,
        0,
        0x0102,
        0x0304,
        8,
        0,
    )
    assert pcs == xxhash.xxh3_64_intdigest(data[HEADER_SIZE:])
    assert hcs == xxhash.xxh3_64_intdigest(data[:40])
    assert len(data) == HEADER_SIZE + 8


def test_memoryview_payloads_encode_like_bytes() -> None:
    buf = bytearray(b"\x01" + bytes(4096) + b"tail")
    view = memoryview(buf)[:4097]
    a = encode_frame(Pages(generation=G, epoch=E, block=0, count=1, records=view))
    b = encode_frame(Pages(generation=G, epoch=E, block=0, count=1, records=bytes(view)))
    assert a == b
    assert encode_frame(
        Pages(generation=G, epoch=E, block=0, count=1, records=view), compress_level=1
    ) == encode_frame(
        Pages(generation=G, epoch=E, block=0, count=1, records=bytes(view)), compress_level=1
    )


def test_parts_avoid_copying_bulk_data() -> None:
    records = b"\x01" + bytes(4096)
    parts = encode_frame_parts(Pages(generation=G, epoch=E, block=0, count=1, records=records))
    assert parts[-1] is records
    assert b"".join(parts) == encode_frame(
        Pages(generation=G, epoch=E, block=0, count=1, records=records)
    )


@pytest.mark.parametrize("level", [None, 1])
def test_fed_whole_byte_by_byte_and_split_everywhere(level: int | None) -> None:
    data = _stream(SAMPLE, level)
    want = SAMPLE
    assert _decode_all(data) == want
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        got += _drain(dec)
    assert got == want
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        got = []
        for chunk in (data[:cut], data[cut:]):
            if chunk:  # b"" would mean EOF
                dec.receive_data(chunk)
            got += _drain(dec)
        assert got == want, cut
        assert dec.offset == len(data) and dec.buffered == 0


def test_offset_tracks_the_stream() -> None:
    dec = FrameDecoder(offset=1000)
    one = encode_frame(SAMPLE[-1])
    dec.receive_data(one + one[:10])
    assert len(_drain(dec)) == 1
    assert dec.offset == 1000 + len(one)
    assert dec.buffered == 10


def test_pending_payload_is_known_once_the_header_is_verified() -> None:
    data = encode_frame(SAMPLE[2])
    dec = FrameDecoder()
    dec.receive_data(data[: HEADER_SIZE - 1])
    assert dec.next_event() is NEED_DATA and dec.pending_payload is None
    dec.receive_data(data[HEADER_SIZE - 1 : HEADER_SIZE + 1])
    assert dec.next_event() is NEED_DATA and dec.pending_payload == len(data) - HEADER_SIZE


# --- EOF -----------------------------------------------------------------------------------


def test_clean_eof_is_closed() -> None:
    assert _decode_all(b"") == []


@pytest.mark.parametrize("cut", [1, 20, HEADER_SIZE, HEADER_SIZE + 3])
def test_eof_inside_a_frame_is_an_error(cut: int) -> None:
    dec = FrameDecoder()
    dec.receive_data(encode_frame(SAMPLE[4])[:cut])
    dec.receive_data(b"")
    with pytest.raises(FrameFormatError, match="stream ended inside"):
        dec.next_event()


def test_data_after_eof_is_refused() -> None:
    dec = FrameDecoder()
    dec.receive_data(b"")
    with pytest.raises(FrameError, match="after EOF"):
        dec.receive_data(b"x")


# --- corruption ------------------------------------------------------------------------------


def _flip_outcomes(data: bytes) -> None:
    want = _decode_all(data)
    for bit in range(len(data) * 8):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        dec = FrameDecoder()
        dec.receive_data(bytes(bad))
        dec.receive_data(b"")
        got: list[Frame] = []
        with pytest.raises(FrameFormatError) as exc:  # "DID NOT RAISE" = silently accepted
            while isinstance(ev := dec.next_event(), Frame):
                got.append(ev)
        # Frames before the damaged one arrive intact; the error points at or before the flip.
        assert got == want[: len(got)]
        assert exc.value.offset <= bit // 8
        with pytest.raises(FrameFormatError, match="already failed"):
            dec.next_event()


@pytest.mark.parametrize("level", [None, 3])
def test_every_single_bit_flip_is_detected(level: int | None) -> None:
    frames = [
        SAMPLE[1],
        Pages(generation=G, epoch=E, block=0, count=1, records=b"\x01" + bytes(range(256)) * 2),
        SAMPLE[7],
    ]
    _flip_outcomes(_stream(frames, level))


def test_frames_before_the_damage_are_delivered() -> None:
    a, b = encode_frame(SAMPLE[6]), encode_frame(SAMPLE[8])
    bad = bytearray(a + b)
    bad[len(a) + HEADER_SIZE] ^= 0x10  # payload of the second frame
    dec = FrameDecoder()
    dec.receive_data(bytes(bad))
    assert dec.next_event() == SAMPLE[6]
    with pytest.raises(FrameChecksumError) as exc:
        dec.next_event()
    assert exc.value.offset == len(a) + HEADER_SIZE


def test_bad_magic_is_refused_before_a_whole_header() -> None:
    dec = FrameDecoder()
    dec.receive_data(b"GET ")
    with pytest.raises(FrameFormatError, match="bad frame magic") as exc:
        dec.next_event()
    assert exc.value.offset == 0


def _forge(
    *,
    version: int = wire.VERSION,
    ftype: int = 7,
    flags: int = 0,
    gen: int = G,
    epoch: int = E,
    length: int | None = None,
    reserved: int = 0,
    payload: bytes = b"\x00" * 8,
) -> bytes:
    """A frame with valid checksums around arbitrary header fields."""
    n = len(payload) if length is None else length
    head = struct.pack(
        "<4sBBHQQIIQ",
        b"QSDF",
        version,
        ftype,
        flags,
        gen,
        epoch,
        n,
        reserved,
        xxhash.xxh3_64_intdigest(payload),
    )
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + payload


def _err(data: bytes, **kw: Any) -> FrameFormatError:
    dec = FrameDecoder(**kw)
    dec.receive_data(data)
    with pytest.raises(FrameFormatError) as exc:
        dec.next_event()
    return exc.value


@pytest.mark.parametrize(
    ("kw", "message", "offset"),
    [
        ({"version": 1}, "unsupported frame version 1", 4),
        ({"ftype": 0}, "unknown frame type 0", 5),
        ({"ftype": 200}, "unknown frame type 200", 5),
        ({"flags": 0x8000}, "unknown frame flags", 6),
        ({"flags": 1}, "ACK frames cannot be compressed", 6),
        ({"reserved": 1}, "reserved header field", 28),
        ({"payload": b"\x00" * 9}, "ACK: 1 trailing bytes", HEADER_SIZE + 8),
        ({"payload": b"\x00" * 7}, "ACK: payload ends after 7 bytes", HEADER_SIZE),
        (
            {"ftype": 8, "payload": b"\x09\0\0\0\0\0\0\0"},
            "unknown resync reason 9",
            HEADER_SIZE + 8,
        ),
        (
            {"ftype": 8, "payload": struct.pack("<IHH", 1, 2, 0) + b"\xff\xfe"},
            "message is not UTF-8",
            HEADER_SIZE + 8,
        ),
        (
            {"ftype": 8, "payload": struct.pack("<IHH", 1, 2000, 0) + b"a" * 2000},
            "at most 1024",
            HEADER_SIZE + 8,
        ),
        ({"ftype": 2, "payload": struct.pack("<I", 5000)}, "5000 RAM blocks", HEADER_SIZE + 4),
        (
            {"ftype": 2, "payload": struct.pack("<IQIB", 1, 4096, 0, 0)},
            "idstr is empty",
            HEADER_SIZE + 17,
        ),
        (
            {"ftype": 2, "payload": struct.pack("<IQIB", 1, 4096, 4, 1) + b"x"},
            "unknown flags 0x4",
            HEADER_SIZE + 17,
        ),
        (
            {"ftype": 2, "payload": struct.pack("<IQIB", 2, 4096, 0, 1) + b"x"},
            "payload ends",
            HEADER_SIZE + 18,
        ),
        (
            {"ftype": 1, "payload": struct.pack("<16sBBHIII", bytes(16), 1, 0, 0, 4000, 0, 0)},
            "page size 4000",
            HEADER_SIZE + 32,
        ),
        (
            {"ftype": 1, "payload": struct.pack("<16sBBHIII", bytes(16), 3, 0, 0, 4096, 0, 0)},
            "unknown HELLO role 3",
            HEADER_SIZE + 32,
        ),
        (
            {"ftype": 1, "payload": struct.pack("<16sBBHIII", bytes(16), 1, 0, 0, 4096, 8, 0)},
            "unknown features 0x8",
            HEADER_SIZE + 32,
        ),
        (
            {"ftype": 5, "payload": struct.pack("<II", 7, 0)},
            "unknown device-state format 7",
            HEADER_SIZE + 8,
        ),
        ({"ftype": 4, "payload": struct.pack("<IIQ", 0, 1, 0)}, "reserved field", HEADER_SIZE + 16),
    ],
)
def test_well_checksummed_but_invalid_frames(kw: dict[str, Any], message: str, offset: int) -> None:
    err = _err(_forge(**kw))
    assert message in err.reason
    assert err.offset == offset


# --- bounds ----------------------------------------------------------------------------------


def test_huge_declared_length_fails_at_the_header() -> None:
    data = _forge(length=0xFFFF_FFFF)[:HEADER_SIZE]
    err = _err(data)  # no payload fed at all: refused on the header alone
    assert "exceeds max_payload" in err.reason and err.offset == 24


def test_configurable_max_payload() -> None:
    data = encode_frame(SAMPLE[2])
    n = len(data) - HEADER_SIZE
    assert _decode_all(data, max_payload=n) == [SAMPLE[2]]
    err = _err(data[:HEADER_SIZE], max_payload=n - 1)
    assert f"payload of {n} bytes exceeds max_payload {n - 1}" in err.reason
    with pytest.raises(ConfigError):
        FrameDecoder(max_payload=1 << 32)


def test_corrupted_length_is_caught_before_waiting() -> None:
    data = bytearray(encode_frame(SAMPLE[8]))
    data[26] ^= 0x40  # length grows by 4 MiB; the header checksum no longer matches
    dec = FrameDecoder()
    dec.receive_data(bytes(data[:HEADER_SIZE]))
    with pytest.raises(FrameChecksumError, match="header checksum"):
        dec.next_event()


def _zstd_frame(payload: bytes, ftype: int = 3) -> bytes:
    return _forge(ftype=ftype, flags=1, payload=payload)


def test_zstd_bomb_is_refused_by_declared_size() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    assert len(bomb) < 10_000
    err = _err(_zstd_frame(bomb), max_payload=1 << 20)
    assert "declares 67108864 bytes, above max_payload 1048576" in err.reason


def test_zstd_without_content_size_is_refused() -> None:
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * 100)
    assert "does not declare its content size" in _err(_zstd_frame(blob)).reason


def test_zstd_with_trailing_data_is_refused() -> None:
    blob = zstandard.ZstdCompressor().compress(struct.pack("<II", 0, 0)) + b"junk"
    assert "not exactly one frame" in _err(_zstd_frame(blob)).reason


def test_zstd_lying_about_its_size_is_refused() -> None:
    blob = bytearray(zstandard.ZstdCompressor().compress(b"\x01" * 1000))
    assert blob[4] == 0x60  # single segment, 2-byte content size (value - 256) follows
    blob[5:7] = struct.pack("<H", 10)
    assert "zstd" in _err(_zstd_frame(bytes(blob))).reason


def test_zstd_garbage_is_refused() -> None:
    assert "zstd payload" in _err(_zstd_frame(b"not zstd at all")).reason


def test_encoder_bounds() -> None:
    big = Pages(generation=G, epoch=E, block=0, count=1, records=bytes(2000))
    with pytest.raises(ConfigError, match="above max_payload 1000"):
        encode_frame(big, max_payload=1000)
    with pytest.raises(ConfigError, match="out of range"):
        encode_frame(Ack(generation=-1, epoch=0, digest=0))
    with pytest.raises(ConfigError, match="out of range"):
        encode_frame(Pages(generation=0, epoch=0, block=1 << 32, count=0, records=b""))
    with pytest.raises(ConfigError, match="session_id"):
        encode_frame(
            Hello(
                generation=0,
                epoch=0,
                session_id=b"short",
                role=Role.SHADOW,
                page_size=4096,
                features=Feature.NONE,
                max_payload=0,
            )
        )
    with pytest.raises(ConfigError, match="idstr"):
        encode_frame(EpochBegin(generation=0, epoch=0, blocks=(RamBlock(idstr="", length=0),)))
    with pytest.raises(ConfigError, match="at most 255"):
        encode_frame(
            EpochBegin(generation=0, epoch=0, blocks=(RamBlock(idstr="x" * 256, length=0),))
        )
    with pytest.raises(ConfigError, match="not a concrete frame type"):
        encode_frame(Frame(generation=0, epoch=0))
    for base in (5, 6, -1):
        with pytest.raises(ConfigError, match="expected 0 or an earlier epoch"):
            encode_frame(EpochBegin(generation=0, epoch=5, blocks=(), base=base))


def test_epoch_begin_base_must_precede_its_epoch() -> None:
    """The decoder refuses a base that is not an earlier epoch (a corrupt or hostile
    EPOCH_BEGIN), before anyone compares it with what the receiver holds."""
    good = encode_frame(EpochBegin(generation=G, epoch=9, blocks=(), base=8))
    assert _decode_all(good)[0].base == 8  # type: ignore[attr-defined]
    bad = bytearray(good)
    struct.pack_into("<Q", bad, HEADER_SIZE + 4, 9)  # base := the epoch itself
    struct.pack_into("<Q", bad, 32, xxhash.xxh3_64_intdigest(bytes(bad[HEADER_SIZE:])))
    struct.pack_into("<Q", bad, 40, xxhash.xxh3_64_intdigest(bytes(bad[:40])))
    dec = FrameDecoder()
    dec.receive_data(bytes(bad))
    with pytest.raises(FrameFormatError, match="base epoch 9"):
        _drain(dec)


# --- fencing ---------------------------------------------------------------------------------


def test_check_generation() -> None:
    f = Ack(generation=5, epoch=1, digest=0)
    assert check_generation(f, 5) == 5
    assert check_generation(f, 2) == 5  # a newer primary: adopt its generation
    with pytest.raises(FencedFrameError) as exc:
        check_generation(f, 6)
    assert (exc.value.frame_generation, exc.value.current_generation) == (5, 6)
    assert isinstance(exc.value, FrameError)


# --- properties ------------------------------------------------------------------------------

u64 = st.integers(0, (1 << 64) - 1)
u32 = st.integers(0, (1 << 32) - 1)
small_bytes = st.binary(max_size=300)
frames_st = st.one_of(
    st.builds(Pages, generation=u64, epoch=u64, block=u32, count=u32, records=small_bytes),
    st.builds(SmallBlock, generation=u64, epoch=u64, block=u32, offset=u64, data=small_bytes),
    st.builds(
        DeviceState,
        generation=u64,
        epoch=u64,
        format=st.sampled_from(DeviceStateFormat),
        data=small_bytes,
    ),
    st.builds(
        EpochBegin,
        generation=u64,
        epoch=u64,
        blocks=st.lists(
            st.builds(
                RamBlock,
                idstr=st.text(min_size=1, max_size=20),
                length=u64,
                flags=st.sampled_from(BlockFlags),
            ),
            max_size=4,
        ).map(tuple),
    ),
    st.builds(
        EpochEnd, generation=u64, epoch=u64, frames=u32, pages=u64, blob_bytes=u64, digest=u64
    ),
    st.builds(Ack, generation=u64, epoch=u64, digest=u64),
    st.builds(Heartbeat, generation=u64, epoch=u64, seq=u64, timestamp_ns=u64),
    st.builds(
        ResyncRequest,
        generation=u64,
        epoch=u64,
        reason=st.sampled_from(ResyncReason),
        message=st.text(max_size=50),
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(frames_st, max_size=5),
    level=st.sampled_from([None, 1]),
    cuts=st.lists(st.integers(0, 5000), max_size=4),
)
def test_random_frames_round_trip_at_any_split(
    frames: list[Frame], level: int | None, cuts: list[int]
) -> None:
    data = _stream(frames, level)
    dec = FrameDecoder()
    got: list[Frame] = []
    prev = 0
    for c in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        if c > prev:
            dec.receive_data(data[prev:c])
        prev = c
        got += _drain(dec)
    dec.receive_data(b"")
    assert dec.next_event() is CLOSED
    assert got == frames


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), prefix=st.booleans())
def test_garbage_only_ever_raises_frame_errors(data: bytes, prefix: bool) -> None:
    if prefix:
        data = b"QSDF\x02" + data
    dec = FrameDecoder(max_payload=1 << 16)
    dec.receive_data(data)
    dec.receive_data(b"")
    with contextlib.suppress(FrameFormatError):
        _drain(dec)
