"""Sans-I/O migration-stream parser: round trips, feeding patterns, bad input, fuzzing."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpshadow.errors import StreamFormatError, StreamUnsupportedError
from qmpshadow.migstream import NEED_DATA, Limits, StreamParser, StreamWriter
from qmpshadow.migstream.constants import ColoMessage, RamFlag
from qmpshadow.migstream.events import (
    ColoMessageEvent,
    ColoVmstate,
    DeviceSection,
    EndOfStream,
    Event,
    RamRecords,
    VmDescription,
)
from qmpshadow.migstream.image import RamImage
from tests import synth


def parse_chunks(chunks: list[bytes], limits: Limits | None = None) -> list[Event]:
    p = StreamParser(limits)
    out: list[Event] = []
    for c in chunks:
        if c:  # b"" would mean the end of input
            p.receive_data(c)
            out += p.events()
    p.receive_data(b"")
    out += p.events()
    return out


def normalize(evs: list[Event]) -> list[object]:
    """Events with RAM batches expanded per record (batching depends on chunking)."""
    out: list[object] = []
    for ev in evs:
        if isinstance(ev, RamRecords):
            for rec in ev.records:
                out.append(("rec", rec[0], rec[1], rec[2], ev.payload(rec)))
        else:
            out.append(ev)
    return out


@pytest.fixture(params=["plain", "ignore-shared", "colo"])
def stream(request: pytest.FixtureRequest) -> bytes:
    kind = request.param
    evs = synth.precopy_events(ignore_shared=kind == "ignore-shared", colo=kind == "colo")
    return synth.stream_bytes(evs)


def test_round_trip_whole(stream: bytes) -> None:
    evs = parse_chunks([stream])
    assert isinstance(evs[-1], EndOfStream)
    assert StreamWriter().write_all(evs) == stream


def test_events_match_what_was_written() -> None:
    src = synth.precopy_events(colo=True, checkpoints=3)
    got = parse_chunks([synth.stream_bytes(src)])
    assert normalize(got[:-1]) == normalize(src)
    assert sum(isinstance(e, ColoVmstate) for e in got) == 3


def test_byte_by_byte_equals_whole(stream: bytes) -> None:
    whole = normalize(parse_chunks([stream]))
    one = normalize(parse_chunks([stream[i : i + 1] for i in range(len(stream))]))
    assert one == whole


def test_split_at_every_offset(stream: bytes) -> None:
    whole = normalize(parse_chunks([stream]))
    for cut in range(0, min(len(stream), 3000), 7):
        assert normalize(parse_chunks([stream[:cut], stream[cut:]])) == whole, cut


def test_random_chunking_round_trips(stream: bytes) -> None:
    rng = random.Random(1)
    for _ in range(20):
        chunks, pos = [], 0
        while pos < len(stream):
            n = rng.choice([1, 2, 3, 8, 100, 4095, 4097, 65536])
            chunks.append(stream[pos : pos + n])
            pos += n
        evs = parse_chunks(chunks)
        assert StreamWriter().write_all(evs) == stream


def test_page_payloads_are_zero_copy_views() -> None:
    stream = synth.stream_bytes(synth.precopy_events())
    p = StreamParser()
    p.receive_data(stream)
    batches = [e for e in p.events() if isinstance(e, RamRecords)]
    assert any(e.data is stream for e in batches)


def test_ram_image_applies_pages_zero_and_xbzrle() -> None:
    evs = parse_chunks([synth.stream_bytes(synth.precopy_events())])
    img = RamImage()
    for ev in evs:
        img.apply(ev)
    ram = img.blocks["pc.ram"]
    assert ram[5 * 4096 : 6 * 4096] == b"\xab" * 4096
    assert ram[3 * 4096 + 100 : 3 * 4096 + 110] == b"0123456789"
    assert ram[1 * 4096 : 2 * 4096] == bytes(4096)
    assert img.blocks["pc.rom"][:256] == bytes(range(256))


def test_devices_split_despite_fake_footer_in_payload() -> None:
    evs = parse_chunks([synth.stream_bytes(synth.precopy_events())])
    devs = [e for e in evs if isinstance(e, DeviceSection)]
    assert [(d.idstr, d.instance_id) for d in devs] == [
        (d.idstr, d.instance_id) for d in synth.devices()]
    assert [d.payload for d in devs] == [d.payload for d in synth.devices()]


def test_colo_checkpoints_split_when_their_layout_changes() -> None:
    """Checkpoints after the first reuse its section layout when it still fits; a
    section that grew, a new header, or a fake footer where the old one was must still
    split exactly as written."""
    from dataclasses import replace

    base = synth.devices()
    grown = [replace(d, payload=d.payload + b"xy") if d.idstr == "dma" else d for d in base]
    renamed = [replace(d, version_id=d.version_id + 1) if d.idstr == "apic" else d
               for d in base]
    # the same total size as base, but a fake footer of the cpu section sits right where
    # the real one was (which moved 5 bytes on; the next section is 5 bytes shorter): the
    # old layout must not be taken
    i = next(i for i, d in enumerate(base) if d.idstr == "cpu")
    fake = b"\x7e" + base[i].section_id.to_bytes(4, "big")
    assert len(base[i + 1].payload) >= 5
    shifted = list(base)
    shifted[i] = replace(base[i], payload=base[i].payload + fake)
    shifted[i + 1] = replace(base[i + 1], payload=base[i + 1].payload[5:])
    cps = [base, base, grown, grown, renamed, base, shifted]
    evs: list[Event] = [e for e in synth.precopy_events(colo=True, checkpoints=0)]
    for cp, devs in enumerate(cps, 1):
        vm = ColoVmstate(cp, tuple(devs))
        evs += [ColoMessageEvent(ColoMessage.VMSTATE_SIZE, len(StreamWriter().write(vm))), vm]
    data = synth.stream_bytes(evs)
    got = [e for e in parse_chunks([data]) if isinstance(e, ColoVmstate)]
    assert [e.sections for e in got] == [tuple(d) for d in cps]
    for e in got:
        assert e.data == StreamWriter().write(e)  # the blob after VMSTATE_SIZE


# -- bad input ---------------------------------------------------------------------------

def _err(data: bytes, limits: Limits | None = None) -> StreamFormatError:
    with pytest.raises(StreamFormatError) as info:
        parse_chunks([data], limits)
    return info.value


def test_wrong_magic() -> None:
    e = _err(b"QEVN\x00\x00\x00\x03")
    assert e.offset == 0 and "magic" in str(e)


def test_wrong_version() -> None:
    e = _err(b"QEVM\x00\x00\x00\x02")
    assert e.offset == 4 and "version" in str(e)


def test_unknown_section_type() -> None:
    e = _err(b"QEVM\x00\x00\x00\x03\x42")
    assert e.offset == 8 and "0x42" in str(e)


def test_truncated_at_every_offset(stream: bytes) -> None:
    vmdesc_at = stream.find(b'{"page_size') - 5  # just after the EOF byte
    cuts = set(range(0, 200)) | set(range(200, len(stream) - 1, 97)) | {len(stream) - 1}
    cuts |= set(range(vmdesc_at - 300, vmdesc_at + 10))
    for cut in sorted(cuts):
        if cut == vmdesc_at and b"ENABLE" not in stream:
            continue  # EOF without the optional vmdesc is a complete stream
        with pytest.raises(StreamFormatError) as info:
            parse_chunks([stream[:cut]])
        assert 0 <= info.value.offset <= cut + 1, (cut, info.value)


def _ram_stream(record: bytes) -> bytes:
    evs = synth.precopy_events()
    head = synth.stream_bytes(evs[:6])  # header, config, START, MEM_SIZE, EOS, footer
    return head + b"\x02\x00\x00\x00\x02" + record


def test_unknown_ram_flags() -> None:
    e = _err(_ram_stream((0x1000 | 0x400).to_bytes(8, "big")))
    assert "flags" in str(e) and e.section == "ram"


def test_two_kinds_in_one_record() -> None:
    e = _err(_ram_stream((RamFlag.PAGE | RamFlag.ZERO).to_bytes(8, "big")))
    assert "flags" in str(e)


def test_unknown_block() -> None:
    e = _err(_ram_stream(RamFlag.PAGE.to_bytes(8, "big") + b"\x04nope" + bytes(4096)))
    assert "unknown block" in str(e) and "pc.ram" in str(e)


def test_offset_past_block() -> None:
    rec = (0x100000 | RamFlag.ZERO).to_bytes(8, "big") + b"\x06pc.rom\x00"
    assert "past block" in str(_err(_ram_stream(rec)))


def test_continue_without_block() -> None:
    rec = (RamFlag.ZERO | RamFlag.CONTINUE).to_bytes(8, "big") + b"\x00"
    assert "no block" in str(_err(_ram_stream(rec)))


def test_compressed_page_is_refused_clearly() -> None:
    rec = (RamFlag.COMPRESS_PAGE).to_bytes(8, "big") + b"\x06pc.ram" + b"\x00\x00\x00\x10"
    e = _err(_ram_stream(rec))
    assert isinstance(e, StreamUnsupportedError) and "compress" in str(e)


def test_malformed_xbzrle() -> None:
    rec = RamFlag.XBZRLE.to_bytes(8, "big") + b"\x06pc.ram\x01\x00\x03\x00\x7f\x01"
    assert "XBZRLE" in str(_err(_ram_stream(rec)))


def test_xbzrle_length_bound() -> None:
    rec = RamFlag.XBZRLE.to_bytes(8, "big") + b"\x06pc.ram\x01\x20\x00"
    assert "exceeds" in str(_err(_ram_stream(rec)))


def test_vmdesc_length_bound() -> None:
    head = synth.stream_bytes(synth.precopy_events()[:6])
    data = head + b"\x00\x06" + (1 << 30).to_bytes(4, "big")
    e = _err(data, Limits(max_vmdesc=1 << 20))
    assert "bound" in str(e)


def test_colo_vmstate_size_bound() -> None:
    evs = synth.precopy_events(colo=True, checkpoints=1)
    data = synth.stream_bytes(evs)
    idx = next(i for i, e in enumerate(evs) if isinstance(e, ColoVmstate))
    head = synth.stream_bytes(evs[: idx - 1])
    bad = head + b"\x00\x00\x00\x04" + (1 << 40).to_bytes(8, "big")
    assert "size" in str(_err(bad))
    assert len(data) > len(head)


def test_device_region_bound_without_vmdesc() -> None:
    head = synth.stream_bytes(synth.precopy_events()[:6])
    data = head + b"\x04" + b"\x01" * 5000
    e = _err(data, Limits(max_device_state=1000, max_vmdesc=1000))
    assert "bound" in str(e)


def test_trailing_bytes_after_stream() -> None:
    data = synth.stream_bytes(synth.precopy_events()) + b"junk"
    assert "after the end" in str(_err(data))


def test_return_path_message_on_forward_stream() -> None:
    evs = synth.precopy_events(colo=True, checkpoints=1)
    idx = next(i for i, e in enumerate(evs) if isinstance(e, VmDescription))
    data = synth.stream_bytes(evs[: idx + 1]) + b"\x00\x00\x00\x05"
    assert "return path" in str(_err(data))


def test_need_data_not_error_mid_stream(stream: bytes) -> None:
    p = StreamParser()
    p.receive_data(stream[:100])
    p.events()
    assert p.next_event() is NEED_DATA


# -- fuzzing -----------------------------------------------------------------------------

HEADER = b"QEVM\x00\x00\x00\x03"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_garbage_after_header_fails_cleanly(tail: bytes) -> None:
    limits = Limits(max_device_state=1 << 16, max_vmdesc=1 << 16)
    try:
        parse_chunks([HEADER + tail], limits)
    except StreamFormatError as e:
        assert 0 <= e.offset <= len(HEADER) + len(tail) + 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_stream_fails_cleanly_or_round_trips(data: st.DataObject) -> None:
    base = bytearray(synth.stream_bytes(synth.precopy_events(colo=True, checkpoints=1)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    blob = bytes(base)
    try:
        evs = parse_chunks([blob], Limits(max_device_state=1 << 20, max_vmdesc=1 << 20))
    except StreamFormatError:
        return
    assert StreamWriter().write_all(evs) == blob


def test_vmdesc_is_json() -> None:
    evs = parse_chunks([synth.stream_bytes(synth.precopy_events())])
    vd = next(e for e in evs if isinstance(e, VmDescription))
    assert json.loads(vd.json_bytes)["devices"][0]["name"] == "timer"
