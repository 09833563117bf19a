"""Keyed page hashing: one suite over both twins, the twins against each other, the filter."""

from __future__ import annotations

import random
from array import array
from types import ModuleType

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpshadow._twins import extensions_disabled
from qmpshadow.errors import ConfigError
from qmpshadow.frames import _pagehash_py as py_twin
from qmpshadow.frames import limits, pagehash
from qmpshadow.frames.pagehash import UnchangedFilter
from tests.twins import twin_modules

PS = 512
SEED = 0x0123_4567_89AB_CDEF


@pytest.fixture(scope="module", params=twin_modules("qmpshadow.frames", "_pagehash"))
def twin(request: pytest.FixtureRequest) -> ModuleType:
    if request.param is None:
        pytest.fail(
            "the compiled twin qmpshadow.frames._pagehash_c did not import: run "
            "`.venv/bin/python setup.py build_ext --inplace` (or QMPSHADOW_NO_EXTENSIONS=1)"
        )
    return request.param  # type: ignore[no-any-return]


def _c_twin() -> ModuleType:
    if extensions_disabled():
        pytest.skip("QMPSHADOW_NO_EXTENSIONS=1: no compiled twin to compare")
    mod = twin_modules("qmpshadow.frames", "_pagehash")[-1].values[0]  # type: ignore[union-attr]
    if mod is None:
        pytest.fail("qmpshadow.frames._pagehash_c did not import: build the extensions")
    return mod  # type: ignore[no-any-return]


def test_selector_reports_the_live_twin() -> None:
    if extensions_disabled():
        assert pagehash.IMPLEMENTATION == "py"
    else:
        assert pagehash.IMPLEMENTATION == "c", "compiled _pagehash_c silently did not load"


def test_twins_share_constants(twin: ModuleType) -> None:
    assert (twin.PAGE_SIZE_MIN, twin.PAGE_SIZE_MAX) == (limits.PAGE_SIZE_MIN, limits.PAGE_SIZE_MAX)


def _table(n: int) -> array[int]:
    return array("Q", bytes(8 * n))


def test_hash_is_seeded_xxh3(twin: ModuleType) -> None:
    buf = random.Random(1).randbytes(8 * PS)
    table = _table(8)
    twin.hash_pages(buf, PS, SEED, table)
    assert list(table) == [
        xxhash.xxh3_64_intdigest(buf[i * PS : (i + 1) * PS], SEED) for i in range(8)
    ]
    other = _table(8)
    twin.hash_pages(buf, PS, SEED + 1, other)
    assert all(a != b for a, b in zip(table, other, strict=True))


@pytest.mark.parametrize("ps", [512, 4096, 65536, 1 << 20])
@pytest.mark.parametrize("seed", [0, 1, SEED, (1 << 64) - 1])
def test_every_kernel_matches_xxhash(twin: ModuleType, ps: int, seed: int) -> None:
    buf = random.Random(ps ^ seed).randbytes(3 * ps)
    want = [xxhash.xxh3_64_intdigest(buf[i * ps : (i + 1) * ps], seed) for i in range(3)]
    kernels = [None]
    if hasattr(twin, "_select_kernel"):
        kernels = [False, True]
    try:
        for avx2 in kernels:
            if avx2 is not None:
                twin._select_kernel(avx2)
            table = _table(3)
            twin.hash_pages(buf, ps, seed, table)
            assert list(table) == want, f"kernel avx2={avx2}"
            assert list(twin.scan_changed(buf, ps, seed, _table(3))) == [0, 1, 2]
    finally:
        if kernels != [None]:
            twin._select_kernel(True)


def test_scan_reports_changed_pages_and_updates_table(twin: ModuleType) -> None:
    buf = bytearray(random.Random(2).randbytes(16 * PS))
    table = _table(16)
    twin.hash_pages(buf, PS, SEED, table)
    assert list(twin.scan_changed(buf, PS, SEED, table)) == []
    buf[3 * PS + 7] ^= 1
    buf[15 * PS] ^= 0x80
    changed = twin.scan_changed(buf, PS, SEED, table)
    assert isinstance(changed, array) and changed.typecode == "Q"
    assert list(changed) == [3, 15]
    assert list(twin.scan_changed(buf, PS, SEED, table)) == []


def test_scan_of_empty_buffer(twin: ModuleType) -> None:
    assert list(twin.scan_changed(b"", PS, SEED, _table(0))) == []
    twin.hash_pages(b"", PS, SEED, _table(0))


def test_filter_changed_compacts_in_place(twin: ModuleType) -> None:
    table = _table(10)
    known = bytearray(10)
    pages = bytearray(b"".join(bytes([i]) * PS for i in range(4)))
    idx = array("Q", [1, 4, 6, 9])
    assert twin.filter_changed(idx, pages, PS, SEED, table, known) == 4  # all unknown
    assert list(idx) == [1, 4, 6, 9] and known[4] == 1
    # Same bytes again for 4 and 9, new bytes for 6: only 6 survives, moved to the front.
    pages2 = bytearray(bytes([1]) * PS + bytes([7]) * PS + bytes([3]) * PS)
    idx2 = array("Q", [4, 6, 9])
    assert twin.filter_changed(idx2, pages2, PS, SEED, table, known) == 1
    assert idx2[0] == 6 and pages2[:PS] == bytes([7]) * PS


def test_filter_rejects_before_touching(twin: ModuleType) -> None:
    table = _table(4)
    known = bytearray(4)
    idx = array("Q", [0, 9])
    with pytest.raises(ConfigError, match="page index 9 is outside the table"):
        twin.filter_changed(idx, bytearray(2 * PS), PS, SEED, table, known)
    assert known == bytearray(4) and list(table) == [0] * 4
    with pytest.raises(ConfigError, match="known"):
        twin.filter_changed(array("Q"), bytearray(), PS, SEED, table, bytearray(3))
    with pytest.raises(ConfigError, match="pages holds"):
        twin.filter_changed(array("Q", [0]), bytearray(PS - 1), PS, SEED, table, known)


@pytest.mark.parametrize("seed", [-1, 1 << 64, 1.5])
def test_bad_seed(twin: ModuleType, seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        twin.hash_pages(bytes(PS), PS, seed, _table(1))


def test_bad_buffers(twin: ModuleType) -> None:
    with pytest.raises(ConfigError, match="whole number"):
        twin.scan_changed(bytes(PS + 1), PS, SEED, _table(2))
    with pytest.raises(ConfigError, match="holds 1 entries"):
        twin.scan_changed(bytes(2 * PS), PS, SEED, _table(1))
    with pytest.raises(ConfigError, match="uint64"):
        twin.hash_pages(bytes(PS), PS, SEED, array("I", [0, 0]))
    with pytest.raises(ConfigError, match="writable"):
        twin.hash_pages(bytes(PS), PS, SEED, memoryview(_table(1)).toreadonly())
    with pytest.raises(ConfigError, match="page size"):
        twin.hash_pages(bytes(PS), 1000, SEED, _table(1))


def test_memread(twin: ModuleType) -> None:
    data = random.Random(5).randbytes(1000)
    expect = 0
    for i in range(0, 1000 - 7, 8):
        expect ^= int.from_bytes(data[i : i + 8], "little")
    assert twin.memread(data) == expect
    assert twin.memread(b"") == 0


@settings(max_examples=60, deadline=None)
@given(
    pages=st.lists(st.one_of(st.just(bytes(PS)), st.binary(min_size=PS, max_size=PS)), max_size=12),
    flips=st.lists(st.integers(0, 12 * PS - 1), max_size=6),
    seed=st.integers(0, (1 << 64) - 1),
)
def test_twins_agree(pages: list[bytes], flips: list[int], seed: int) -> None:
    c_twin = _c_twin()
    buf = bytearray(b"".join(pages))
    n = len(pages)
    results = []
    for tw in (py_twin, c_twin):
        table = _table(n)
        tw.hash_pages(buf, PS, seed, table)
        b2 = bytearray(buf)
        for f in flips:
            if f < len(b2):
                b2[f] ^= 0x5A
        changed = tw.scan_changed(b2, PS, seed, table)
        idx = array("Q", range(n))
        known = bytearray([1, 0] * n)[:n]
        packed = bytearray(b2)
        kept = tw.filter_changed(idx, packed, PS, seed, table, known)
        results.append((list(table), list(changed), kept, list(idx), bytes(packed), tw.memread(b2)))
    assert results[0] == results[1]


# --- UnchangedFilter ------------------------------------------------------------------------


def test_filter_scan_first_reports_all_then_changes() -> None:
    ram = bytearray(random.Random(9).randbytes(32 * PS))
    f = UnchangedFilter(32, PS)
    assert list(f.scan(ram)) == list(range(32))
    assert list(f.scan(ram)) == []
    ram[5 * PS] ^= 1
    assert list(f.scan(ram)) == [5]


@pytest.mark.parametrize("threads", [2, 3, 7, 64])
def test_filter_scan_in_threads_equals_one_thread(threads: int) -> None:
    """Runs split at page boundaries (31 pages: uneven runs; 64 threads: more threads
    than pages) report the same pages, in order, and leave the same table."""
    rng = random.Random(threads)
    ram = bytearray(rng.randbytes(31 * PS))
    one, many = UnchangedFilter(31, PS, seed=7), UnchangedFilter(31, PS, seed=7)
    assert list(many.scan(ram, threads=threads)) == list(one.scan(ram)) == list(range(31))
    assert many.table == one.table
    for _ in range(5):
        for i in rng.sample(range(31), rng.randrange(0, 9)):
            ram[i * PS + rng.randrange(PS)] ^= 0xFF
        forgotten = rng.sample(range(31), 2)
        one.forget(forgotten)
        many.forget(forgotten)
        got = list(many.scan(ram, threads=threads))
        assert got == list(one.scan(ram)) and got == sorted(got)
        assert many.table == one.table
    with pytest.raises(ConfigError):
        many.scan(ram, threads=0)


def test_filter_forget_and_reset() -> None:
    ram = bytearray(32 * PS)
    f = UnchangedFilter(32, PS, seed=42)
    f.scan(ram)
    f.forget([3, 30])
    ram[7 * PS] = 1
    assert list(f.scan(ram)) == [3, 7, 30]
    assert list(f.scan(ram)) == []
    f.reset()
    assert f.seed != 42
    assert list(f.scan(ram)) == list(range(32))
    with pytest.raises(ConfigError):
        f.forget([32])


def test_filter_dirty_batches() -> None:
    f = UnchangedFilter(16, PS)
    pages = bytearray(bytes([1]) * PS + bytes([2]) * PS)
    idx = array("Q", [2, 3])
    assert f.filter(idx, pages) == 2
    pages = bytearray(bytes([1]) * PS + bytes([9]) * PS)  # QEMU says both dirty; 2 is not
    idx = array("Q", [2, 3])
    assert f.filter(idx, pages) == 1 and idx[0] == 3
    f.reset(reseed=False)
    idx = array("Q", [2])
    assert f.filter(idx, bytearray(bytes([1]) * PS)) == 1


def test_filter_never_logs_its_seed() -> None:
    f = UnchangedFilter(4, PS, seed=0xDEADBEEF)
    assert "deadbeef" not in repr(f).lower() and str(0xDEADBEEF) not in repr(f)


def test_filter_checks_sizes() -> None:
    with pytest.raises(ConfigError):
        UnchangedFilter(4, PS).scan(bytes(3 * PS))
    with pytest.raises(ConfigError):
        UnchangedFilter(4, PS, seed=-1)
    with pytest.raises(ConfigError):
        UnchangedFilter(-1, PS)


def test_seeds_differ_per_filter() -> None:
    assert len({UnchangedFilter(1, PS).seed for _ in range(8)}) == 8
