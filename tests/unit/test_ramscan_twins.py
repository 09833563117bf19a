"""The RAM-record hot loop: one suite over both twins, and the twins against each other."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpshadow._twins import extensions_disabled
from qmpshadow.migstream import _ramscan_py as py_twin
from qmpshadow.migstream import ramscan
from tests.twins import twin_modules

PS = 4096
BLOCKS = {b"pc.ram": ("pc.ram", 64 * PS), b"pc.rom": ("pc.rom", 4 * PS)}


@pytest.fixture(params=twin_modules("qmpshadow.migstream", "_ramscan"))
def twin(request: pytest.FixtureRequest) -> ModuleType:
    if request.param is None:
        pytest.fail("the compiled twin qmpshadow.migstream._ramscan_c did not import: "
                    "run `make build` (or set QMPSHADOW_NO_EXTENSIONS=1 to test Python only)")
    return request.param  # type: ignore[no-any-return]


def test_selector_reports_the_live_twin() -> None:
    if extensions_disabled():
        assert ramscan.IMPLEMENTATION == "py"
    else:
        assert ramscan.IMPLEMENTATION == "c", "compiled _ramscan_c silently did not load"


def _record(flags: int, off: int, name: bytes | None, payload: bytes) -> bytes:
    out = (off | flags).to_bytes(8, "big")
    if name is not None:
        out += bytes([len(name)]) + name
    return out + payload


def _random_stream(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    first = True
    for _ in range(n):
        name = rng.choice([b"pc.ram", b"pc.rom"]) if first or rng.random() < 0.1 else None
        length = BLOCKS[name][1] if name else 4 * PS
        off = rng.randrange(length // PS) * PS
        if rng.random() < 0.5:
            out += _record(0x08 | (0 if name else 0x20), off, name, rng.randbytes(PS))
        else:
            out += _record(0x02 | (0 if name else 0x20), off, name, b"\x00")
        first = False
    return bytes(out)


def test_scan_decodes_pages_and_zero(twin: ModuleType) -> None:
    data = _record(0x08, PS, b"pc.ram", b"\x11" * PS) + _record(0x22, 2 * PS, None, b"\x00")
    pos, block, recs, status = twin.scan_records(data, 0, len(data), PS, None, BLOCKS, 100)
    assert pos == len(data) and status == twin.NEED_DATA
    assert block == ("pc.ram", 64 * PS)
    assert recs == [(0x08, PS, "pc.ram", 15), (0x22, 2 * PS, "pc.ram", 15 + PS + 8)]


@pytest.mark.parametrize("tail", [
    (0x10).to_bytes(8, "big"),                      # EOS
    _record(0x40, 0, b"pc.ram", b"\x01\x00\x00"),    # XBZRLE
    _record(0x08, 0, b"nope", b""),                  # unknown block
    _record(0x08, 64 * PS, b"pc.ram", b""),          # offset past block
    _record(0x22, 0, None, b"\x00"),                  # CONTINUE with no block
    (0x0a).to_bytes(8, "big"),                      # two kinds
])
def test_scan_stops_before_special(twin: ModuleType, tail: bytes) -> None:
    pos, _b, recs, status = twin.scan_records(tail, 0, len(tail), PS, None, BLOCKS, 100)
    assert (pos, recs, status) == (0, [], twin.SPECIAL)


def test_scan_needs_data_at_every_cut(twin: ModuleType) -> None:
    data = _random_stream(random.Random(3), 5)
    full = twin.scan_records(data, 0, len(data), PS, None, BLOCKS, 100)
    for cut in range(len(data)):
        pos, _b, recs, status = twin.scan_records(data, 0, cut, PS, None, BLOCKS, 100)
        assert status == twin.NEED_DATA
        assert recs == full[2][: len(recs)]
        assert pos <= cut


def test_limit(twin: ModuleType) -> None:
    data = _random_stream(random.Random(4), 10)
    pos, _b, recs, status = twin.scan_records(data, 0, len(data), PS, None, BLOCKS, 3)
    assert len(recs) == 3 and status == twin.LIMIT and pos < len(data)


def test_apply_records(twin: ModuleType) -> None:
    data = _random_stream(random.Random(5), 200)
    _pos, _b, recs, _s = twin.scan_records(data, 0, len(data), PS, None, BLOCKS, 1000)
    targets = {"pc.ram": bytearray(b"\xee" * 64 * PS), "pc.rom": bytearray(4 * PS)}
    expect = {k: bytearray(v) for k, v in targets.items()}
    py_twin.apply_records(data, recs, PS, expect)
    pages, zeros = twin.apply_records(data, recs, PS, targets)
    assert pages + zeros == len(recs)
    assert targets == expect


def test_apply_rejects_short_target(twin: ModuleType) -> None:
    data = _record(0x08, 8 * PS, b"pc.ram", b"\x01" * PS)
    _p, _b, recs, _s = twin.scan_records(data, 0, len(data), PS, None, BLOCKS, 10)
    with pytest.raises(ValueError):
        twin.apply_records(data, recs, PS, {"pc.ram": bytearray(PS)})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 20))
def test_twins_agree_on_garbage(data: bytes, start: int) -> None:
    start = min(start, len(data))
    results = []
    for mod in (p.values[0] for p in twin_modules("qmpshadow.migstream", "_ramscan")):
        if mod is None:
            continue
        results.append(mod.scan_records(data, start, len(data), 256, None,
                                        {b"a": ("a", 1024)}, 50))
    assert all(r == results[0] for r in results)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 60))
def test_twins_agree_on_streams(seed: int, n: int) -> None:
    data = _random_stream(random.Random(seed), n)
    mods = [p.values[0] for p in twin_modules("qmpshadow.migstream", "_ramscan")]
    results = [m.scan_records(data, 0, len(data), PS, None, BLOCKS, 1000) for m in mods if m]
    assert all(r == results[0] for r in results)
    assert len(results[0][2]) == n
