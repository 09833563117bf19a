"""Golden streams recorded here from real QEMU 7.2 parse, round-trip and match QEMU."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qmpshadow.errors import AccelError
from qmpshadow.migstream import StreamParser, StreamWriter
from qmpshadow.migstream.events import Event, RamRecords, RamXbzrle
from qmpshadow.migstream.image import RamImage
from qmpshadow.qemu.accel import detect_accel
from tests.integration.golden import MEM_MIB, Golden, record
from tests.unit.test_migstream_parser import normalize, parse_chunks

pytestmark = [pytest.mark.qemu]

VARIANTS = {
    "tcg-plain": dict(accel="tcg"),
    "tcg-shared": dict(accel="tcg", ignore_shared=True),
    "tcg-xbzrle": dict(accel="tcg", xbzrle=True),
    "kvm-plain": dict(accel="kvm"),
    "kvm-shared": dict(accel="kvm", ignore_shared=True),
}


def _kvm_reason() -> str | None:
    try:
        detect_accel("kvm")
    except AccelError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def goldens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Golden]:
    out = Path(tmp_path_factory.mktemp("golden"))
    kvm_missing = _kvm_reason()

    async def run_all() -> dict[str, Golden]:
        res = {}
        for name, kw in VARIANTS.items():
            if kw["accel"] == "kvm" and kvm_missing:
                continue
            res[name] = await record(name, out, **kw)  # type: ignore[arg-type]
        return res

    return asyncio.run(run_all())


@pytest.fixture(params=list(VARIANTS))
def golden(request: pytest.FixtureRequest, goldens: dict[str, Golden]) -> Golden:
    if request.param not in goldens:
        pytest.skip(f"KVM unusable here: {_kvm_reason()}")
    return goldens[request.param]


@pytest.fixture(params=[v for v, kw in VARIANTS.items() if not kw.get("ignore_shared")])
def full_golden(request: pytest.FixtureRequest, goldens: dict[str, Golden]) -> Golden:
    if request.param not in goldens:
        pytest.skip(f"KVM unusable here: {_kvm_reason()}")
    return goldens[request.param]


def _parse(data: bytes) -> list[Event]:
    return parse_chunks([data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)])


def test_parses_and_round_trips_byte_exact(golden: Golden) -> None:
    data = golden.stream.read_bytes()
    evs = _parse(data)
    assert StreamWriter().write_all(evs) == data


def _prefix_events(chunks: list[bytes]) -> list[object]:
    """Events of a stream prefix (no end of input: a parser mid-stream)."""
    p = StreamParser()
    out: list[Event] = []
    for c in chunks:
        if c:
            p.receive_data(c)
            out += p.events()
    return normalize(out)


def test_byte_by_byte_and_splits_yield_same_events(golden: Golden) -> None:
    data = golden.stream.read_bytes()
    whole = normalize(_parse(data))
    head = 32 << 10
    assert normalize(parse_chunks([data[i : i + 1] for i in range(head)] + [data[head:]])) \
        == whole
    prefix = data[: 64 << 10]
    expect = _prefix_events([prefix])
    for cut in range(1, 4096):
        assert _prefix_events([prefix[:cut], prefix[cut:]]) == expect, cut


def test_tail_byte_by_byte(golden: Golden) -> None:
    """The device sections and vmdesc (found while streaming) byte by byte."""
    data = golden.stream.read_bytes()
    whole = normalize(_parse(data))
    tail = 200_000
    cut = max(0, len(data) - tail)
    chunks = [data[:cut]] + [data[i : i + 1] for i in range(cut, len(data))]
    assert normalize(parse_chunks(chunks)) == whole


def _inspect(path: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "qmpshadow.cli.main", "stream", "inspect",
                          str(path), "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_inspect_json_matches_qemu(golden: Golden) -> None:
    doc = _inspect(golden.stream)
    assert doc["version"] == 3
    blocks = doc["ram_blocks"]
    assert [(b["id"], b["length"]) for b in blocks] == golden.ramblocks  # type: ignore[union-attr]
    shared = "shared" in golden.name
    for b in blocks:  # type: ignore[union-attr]
        if shared and b["id"] == "mem":
            assert b["pages"] + b["zero_pages"] == 0  # x-ignore-shared: not in the stream
        else:
            assert b["pages"] + b["zero_pages"] == b["length"] // 4096, b
    names = [d["name"] for d in doc["devices"]]  # type: ignore[union-attr]
    assert "cpu" in names and "serial" in names
    assert all(d["size"] > 0 for d in doc["devices"])  # type: ignore[union-attr]
    assert doc["colo_checkpoints"] == 0


def test_stream_reproduces_guest_ram(full_golden: Golden) -> None:
    golden = full_golden
    assert golden.ramdump is not None
    image = RamImage(only={"pc.ram"})
    xbz = 0
    for ev in _parse(golden.stream.read_bytes()):
        image.apply(ev)
        xbz += isinstance(ev, RamXbzrle)
    ram = image.blocks["pc.ram"]
    dump = golden.ramdump.read_bytes()
    assert len(dump) == len(ram) == MEM_MIB << 20
    # 0xa0000-0xfffff is VGA/ROM space in the physical map, not pc.ram, in a pmemsave
    assert ram[:0xA0000] == dump[:0xA0000]
    assert ram[0x100000:] == dump[0x100000:]
    if "xbzrle" in golden.name:
        assert xbz > 0, "the XBZRLE recording holds no XBZRLE page"


def test_xbzrle_recording_has_xbzrle_pages(goldens: dict[str, Golden]) -> None:
    evs = _parse(goldens["tcg-xbzrle"].stream.read_bytes())
    assert sum(isinstance(e, RamXbzrle) for e in evs) > 0
    assert sum(len(e.records) for e in evs if isinstance(e, RamRecords)) > 0
