"""Promotion stream builder (sans-I/O): composition, replay checks, refusals, fuzzing."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpshadow.frames.wire import BlockFlags, DeviceStateFormat, RamBlock
from qmpshadow.migstream import StreamParser, StreamWriter
from qmpshadow.migstream.constants import Command, RamFlag
from qmpshadow.migstream.events import (
    CommandSection,
    Configuration,
    DeviceSection,
    EndOfStream,
    Eof,
    Event,
    Header,
    RamBlockDecl,
    RamEos,
    RamMemSize,
    RamRecords,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    Subsection,
    VmDescription,
    encode_capabilities,
)
from qmpshadow.migstream.image import RamImage
from qmpshadow.migstream.writer import device_section_bytes
from qmpshadow.shadow.errors import PromotionStreamError
from qmpshadow.shadow.promotion import (
    PromotionBuilder,
    PromotionStream,
    TargetBlock,
    build_promotion_stream,
    check_promotion_stream,
)
from qmpshadow.shadow.replica import CommittedDeviceState
from tests.synth import devices, records, vmdesc_for

PS = 4096
MACHINE = "pc-i440fx-7.2"
SHARED = RamBlock(idstr="mem", length=64 * PS)
SMALL = (
    RamBlock(idstr="/rom@etc/acpi/tables", length=4 * PS, flags=BlockFlags.SMALL),
    RamBlock(idstr="pc.bios", length=8 * PS, flags=BlockFlags.SMALL),
    RamBlock(idstr="pc.rom", length=2 * PS, flags=BlockFlags.SMALL),
)
GPAS = {"mem": 0, "/rom@etc/acpi/tables": 0, "pc.bios": 0xFFFC0000, "pc.rom": 0xC0000}


def _small_contents(seed: int = 3) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    for b in SMALL:
        pages = []
        for i in range(b.length // PS):
            pages.append(bytes(PS) if i % 3 == 1 else rng.randbytes(PS))
        out[b.idstr] = b"".join(pages)
    return out


@dataclass
class FakeReplica:
    """The read side of a replica, in memory (the builder is sans-I/O)."""

    device_state: CommittedDeviceState | None
    small: dict[str, bytes] = field(default_factory=_small_contents)
    blocks: tuple[RamBlock, ...] = (SHARED, *SMALL)
    machine_type: str | None = MACHINE
    committed_epoch: int = 5
    generation: int = 2

    def small_block(self, idstr: str) -> bytes:
        return self.small[idstr]


def qemu_like_stream(small: dict[str, bytes], devs: list[DeviceSection] | None = None,
                     *, caps: tuple[str, ...] = ("x-ignore-shared",),
                     machine: str = MACHINE, extra: list[Event] | None = None) -> bytes:
    """A stream laid out like QEMU 7.2's x-ignore-shared migration of a stopped VM."""
    devs = devs if devs is not None else devices()
    sub = Subsection("configuration/capabilities", 1, encode_capabilities(caps))
    blocks = (SHARED, *SMALL)
    evs: list[Event] = [
        Header(3), Configuration(machine, (sub,)), *(extra or []),
        SectionStart(2, "ram", 0, 4),
        RamMemSize(sum(b.length for b in blocks),
                   tuple(RamBlockDecl(b.idstr, b.length, GPAS[b.idstr]) for b in blocks)),
        RamEos(2), SectionFooter(2), SectionPart(2, "ram"),
    ]
    recs = []
    for b in SMALL:
        for i, off in enumerate(range(0, b.length, PS)):
            page = small[b.idstr][off : off + PS]
            cont = RamFlag.CONTINUE if i else 0
            if page == bytes(PS):
                recs.append((RamFlag.ZERO | cont, off, b.idstr, b"\x00"))
            else:
                recs.append((RamFlag.PAGE | cont, off, b.idstr, page))
    evs += [records(2, recs), RamEos(2), SectionFooter(2), SectionEnd(2, "ram"), RamEos(2),
            SectionFooter(2), *devs, Eof(), vmdesc_for(devs)]
    return StreamWriter(ignore_shared="x-ignore-shared" in caps).write_all(evs)


def sections_blob(devs: list[DeviceSection] | None = None) -> bytes:
    devs = devs if devs is not None else devices()
    return b"".join(device_section_bytes(d) for d in devs) + b"\x00"


def parse(data: bytes) -> list[Event]:
    p = StreamParser()
    p.receive_data(data)
    p.receive_data(b"")
    return p.events()


def sections_replica(**kw: object) -> FakeReplica:
    dev = CommittedDeviceState(DeviceStateFormat.QEMU_SECTIONS, sections_blob())
    return FakeReplica(device_state=dev, **kw)  # type: ignore[arg-type]


def stream_replica(data: bytes | None = None, **kw: object) -> FakeReplica:
    r = FakeReplica(device_state=None, **kw)  # type: ignore[arg-type]
    blob = data if data is not None else qemu_like_stream(r.small)
    r.device_state = CommittedDeviceState(DeviceStateFormat.IGNORE_SHARED_STREAM, blob)
    return r


# --------------------------------------------------------------------------- composition


def test_composed_stream_layout() -> None:
    r = sections_replica()
    ps = build_promotion_stream(r)
    assert isinstance(ps, PromotionStream)
    assert (ps.generation, ps.epoch, ps.machine_type, ps.replayed) == (2, 5, MACHINE, False)
    assert ps.format is DeviceStateFormat.QEMU_SECTIONS
    assert ps.small_pages == 14 and ps.device_sections == len(devices())
    evs = parse(ps.data)
    kinds = [type(e) for e in evs]
    assert kinds[:4] == [Header, Configuration, SectionStart, RamMemSize]
    cfg = evs[1]
    assert isinstance(cfg, Configuration)
    assert cfg.machine_type == MACHINE and cfg.capabilities == ("x-ignore-shared",)
    assert evs[2] == SectionStart(2, "ram", 0, 4)
    mem = evs[3]
    assert isinstance(mem, RamMemSize)
    assert mem.blocks == tuple(RamBlockDecl(b.idstr, b.length, 0) for b in r.blocks)
    assert mem.total == sum(b.length for b in r.blocks)
    assert [e for e in evs if isinstance(e, DeviceSection)] == devices()
    assert kinds[-3:] == [Eof, VmDescription, EndOfStream]
    image = RamImage()
    zeros = 0
    for e in evs:
        image.apply(e)
        if isinstance(e, RamRecords):
            assert all(rec[2] != "mem" for rec in e.records)
            zeros += sum(1 for rec in e.records if rec[0] & RamFlag.ZERO)
    zero_pages = sum(1 for data in r.small.values() for off in range(0, len(data), PS)
                     if data[off : off + PS] == bytes(PS))
    assert zeros == zero_pages > 0
    for b in SMALL:
        assert bytes(image.blocks[b.idstr]) == r.small[b.idstr]
    assert bytes(image.blocks["mem"]) == bytes(SHARED.length)  # nothing written to it
    # the writer's round trip holds: the stream is exactly what its events say
    assert StreamWriter().write_all(evs) == ps.data


def test_composed_stream_carries_be64_gpa_zero() -> None:
    data = build_promotion_stream(sections_replica()).data
    entry = bytes([3]) + b"mem" + SHARED.length.to_bytes(8, "big") + bytes(8)
    assert entry in data


def test_ram_section_id_avoids_device_ids() -> None:
    devs = [replace(d, section_id=2) if i == 0 else d for i, d in enumerate(devices())]
    r = FakeReplica(device_state=CommittedDeviceState(DeviceStateFormat.QEMU_SECTIONS,
                                                      sections_blob(devs)))
    evs = parse(build_promotion_stream(r).data)
    start = next(e for e in evs if isinstance(e, SectionStart))
    assert start.section_id not in {d.section_id for d in devs}


def test_machine_type_sources() -> None:
    r = sections_replica(machine_type=None)
    with pytest.raises(PromotionStreamError, match="machine type is unknown"):
        build_promotion_stream(r)
    assert build_promotion_stream(r, machine_type="pc-q35-7.2").machine_type == "pc-q35-7.2"
    r2 = sections_replica()
    with pytest.raises(PromotionStreamError, match=re.escape("shadow QEMU runs 'pc-q35-7.2'")):
        build_promotion_stream(r2, machine_type="pc-q35-7.2")
    assert build_promotion_stream(r2, machine_type=MACHINE).machine_type == MACHINE


def test_nothing_committed() -> None:
    with pytest.raises(PromotionStreamError, match="no committed epoch"):
        build_promotion_stream(FakeReplica(device_state=None))
    r = sections_replica(committed_epoch=0)
    with pytest.raises(PromotionStreamError, match="no committed epoch"):
        build_promotion_stream(r)


@pytest.mark.parametrize("blob, match", [
    (b"", "do not parse|do not end"),
    (b"\x00", "has 0 device sections"),
    (sections_blob()[:-1], "do not parse|do not end"),
    (sections_blob()[:100], "do not parse|do not end"),
    (b"\x99" + sections_blob(), "do not parse"),
    (StreamWriter().write(CommandSection(Command.ENABLE_COLO, b"")) + sections_blob(),
     "besides device sections"),
])
def test_bad_sections_blob(blob: bytes, match: str) -> None:
    r = FakeReplica(device_state=CommittedDeviceState(DeviceStateFormat.QEMU_SECTIONS, blob))
    with pytest.raises(PromotionStreamError, match=match):
        build_promotion_stream(r)


# --------------------------------------------------------------------------- replay


def test_stored_stream_is_replayed_as_is() -> None:
    r = stream_replica()
    ps = build_promotion_stream(r)
    assert r.device_state is not None and ps.data is r.device_state.data
    assert ps.replayed and ps.format is DeviceStateFormat.IGNORE_SHARED_STREAM
    assert (ps.small_pages, ps.device_sections) == (14, len(devices()))
    assert ps.machine_type == MACHINE


def test_stored_stream_small_page_mismatch() -> None:
    r = stream_replica()
    small = dict(r.small)
    bios = bytearray(small["pc.bios"])
    bios[3 * PS + 17] ^= 1
    small["pc.bios"] = bytes(bios)
    r.small = small
    with pytest.raises(PromotionStreamError,
                       match=re.escape("page 0x3000 of small block 'pc.bios'")):
        build_promotion_stream(r)
    # a zero page of the stream that the replica holds as non-zero
    r2 = stream_replica()
    small = dict(r2.small)
    rom = bytearray(small["pc.rom"])
    rom[PS + 5] = 1  # page 1 is a ZERO record in the stream
    small["pc.rom"] = bytes(rom)
    r2.small = small
    with pytest.raises(PromotionStreamError,
                       match=re.escape("page 0x1000 of small block 'pc.rom'")):
        build_promotion_stream(r2)


def test_stored_stream_refusals() -> None:
    small = _small_contents()
    no_cap = qemu_like_stream(small, caps=())
    with pytest.raises(PromotionStreamError, match="does not declare x-ignore-shared"):
        build_promotion_stream(stream_replica(no_cap))
    colo = qemu_like_stream(small, extra=[CommandSection(Command.ENABLE_COLO, b"")])
    with pytest.raises(PromotionStreamError, match="CommandSection"):
        build_promotion_stream(stream_replica(colo))
    with pytest.raises(PromotionStreamError, match=re.escape("shadow QEMU runs 'pc-q35-7.2'")):
        build_promotion_stream(stream_replica(), machine_type="pc-q35-7.2")
    # a block the replica does not have
    r = stream_replica(blocks=(SHARED, *SMALL[:2]))
    with pytest.raises(PromotionStreamError, match="declares blocks"):
        build_promotion_stream(r)
    # a page of the shared block in the stream
    w = StreamWriter(ignore_shared=True)
    good = qemu_like_stream(small)
    cut = good.index(w.write(SectionEnd(2, "ram")))
    bad = good[:cut] + w.write(SectionPart(2, "ram")) + w.write(
        records(2, [(RamFlag.PAGE, 0, "mem", b"\x11" * PS)])) + w.write(RamEos(2)) + w.write(
        SectionFooter(2)) + good[cut:]
    with pytest.raises(PromotionStreamError, match="pages of the shared block 'mem'"):
        build_promotion_stream(stream_replica(bad))


def test_stored_stream_missing_page() -> None:
    small = _small_contents()
    r = stream_replica()
    data = qemu_like_stream(small)
    # rebuild with the last pc.rom page left out
    short = dict(small)
    r.blocks = (SHARED, SMALL[0], SMALL[1], RamBlock(idstr="pc.rom", length=2 * PS,
                                                     flags=BlockFlags.SMALL))
    evs = parse(data)
    out = []
    for e in evs:
        if isinstance(e, RamRecords):
            keep = [rec for rec in e.records if not (rec[2] == "pc.rom" and rec[1] == PS)]
            e = RamRecords(e.section_id, e.data, keep, e.page_size)
        out.append(e)
    r.device_state = CommittedDeviceState(DeviceStateFormat.IGNORE_SHARED_STREAM,
                                          StreamWriter().write_all(out))
    r.small = short
    with pytest.raises(PromotionStreamError, match="no page at offset 0x1000 of small block"):
        build_promotion_stream(r)


def test_builder_reuses_the_checked_small_blocks_only_while_they_are_unchanged() -> None:
    """PromotionBuilder: the same streams as build_promotion_stream, epoch after epoch,
    recomposing and rechecking the small-block part only when its inputs changed."""
    b = PromotionBuilder()
    r = sections_replica()
    assert b.build(r) == build_promotion_stream(r)
    assert (b.hits, b.misses) == (0, 1)
    # next epoch: new device state, same small blocks -> the prefix is reused
    devs = [replace(d, payload=d.payload + b"\x01") for d in devices()]
    r.device_state = CommittedDeviceState(DeviceStateFormat.QEMU_SECTIONS, sections_blob(devs))
    r.committed_epoch = 6
    got = b.build(r)
    assert got == build_promotion_stream(r) and got.epoch == 6
    assert [e for e in parse(got.data) if isinstance(e, DeviceSection)] == devs
    assert (b.hits, b.misses) == (1, 1)
    # a changed small-block page, a device id taking the RAM section's id, another
    # machine type or target: composed and checked in full again
    page = bytearray(r.small["pc.rom"])
    page[5] ^= 0xFF
    r.small = {**r.small, "pc.rom": bytes(page)}
    assert b.build(r) == build_promotion_stream(r)
    moved = [replace(d, section_id=2) if i == 0 else d for i, d in enumerate(devs)]
    r.device_state = CommittedDeviceState(DeviceStateFormat.QEMU_SECTIONS,
                                          sections_blob(moved))
    assert b.build(r) == build_promotion_stream(r)
    assert b.build(r, target=_target()) == build_promotion_stream(r, target=_target())
    assert (b.hits, b.misses) == (1, 4)
    # refusals stay refusals with a cached prefix
    with pytest.raises(PromotionStreamError, match=re.escape("shadow QEMU runs 'pc-q35-7.2'")):
        b.build(r, machine_type="pc-q35-7.2")
    r.device_state = CommittedDeviceState(DeviceStateFormat.QEMU_SECTIONS, b"\x00")
    with pytest.raises(PromotionStreamError, match="0 device sections"):
        b.build(r, target=_target())
    with pytest.raises(PromotionStreamError, match="without an EOF"):
        b.build(FakeReplica(device_state=CommittedDeviceState(
            DeviceStateFormat.QEMU_SECTIONS, sections_blob()[:-1])))
    # a stored x-ignore-shared stream is replayed as before
    sr = stream_replica()
    assert b.build(sr) == build_promotion_stream(sr)


# --------------------------------------------------------------------------- target blocks


def _target() -> list[TargetBlock]:
    return [TargetBlock(b.idstr, b.length, max(b.length, 2 << 20)) for b in (SHARED, *SMALL)]


def test_target_blocks() -> None:
    r = sections_replica()
    build_promotion_stream(r, target=_target())
    with pytest.raises(PromotionStreamError, match=re.escape("has no RAM block 'pc.rom'")):
        build_promotion_stream(r, target=_target()[:-1])
    t = _target()
    t[0] = TargetBlock("mem", SHARED.length * 2, SHARED.length * 2)
    with pytest.raises(PromotionStreamError, match="memory size"):
        build_promotion_stream(r, target=t)
    t = _target()
    t[2] = TargetBlock("pc.bios", PS, PS)
    with pytest.raises(PromotionStreamError, match=re.escape("'pc.bios'")):
        build_promotion_stream(stream_replica(), target=t)
    # a resizable block may grow up to its max length
    t = _target()
    t[1] = TargetBlock("/rom@etc/acpi/tables", PS, 2 << 20)
    build_promotion_stream(r, target=t)


# --------------------------------------------------------------------------- robustness


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_device_state_only_ever_refused(data: st.DataObject) -> None:
    """Any truncation or byte damage: either a valid stream or PromotionStreamError."""
    fmt = data.draw(st.sampled_from(list(DeviceStateFormat)))
    r = sections_replica() if fmt is DeviceStateFormat.QEMU_SECTIONS else stream_replica()
    assert r.device_state is not None
    blob = bytearray(r.device_state.data)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
    r.device_state = CommittedDeviceState(fmt, bytes(blob))
    try:
        ps = build_promotion_stream(r)
    except PromotionStreamError:
        return
    # whatever passed is a stream the checks accept on its own
    check_promotion_stream(ps.data, r)
