"""Page codec: one suite over both twins, and the twins against each other."""

from __future__ import annotations

import mmap
import os
import random
from array import array
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpshadow._twins import extensions_disabled
from qmpshadow.errors import ConfigError, FrameFormatError
from qmpshadow.frames import _pagecodec, codec, limits
from qmpshadow.frames import _pagecodec_py as py_twin
from tests.twins import twin_modules

PS = 512  # the smallest page keeps Hypothesis fast; a few tests use 4096
EMPTY = limits.EMPTY_TAG


@pytest.fixture(scope="module", params=twin_modules("qmpshadow.frames", "_pagecodec"))
def twin(request: pytest.FixtureRequest) -> ModuleType:
    if request.param is None:
        pytest.fail(
            "the compiled twin qmpshadow.frames._pagecodec_c did not import: run "
            "`.venv/bin/python setup.py build_ext --inplace` (or QMPSHADOW_NO_EXTENSIONS=1)"
        )
    return request.param  # type: ignore[no-any-return]


def _c_twin() -> ModuleType:
    """The compiled twin, or a test failure saying why it is missing."""
    if extensions_disabled():
        pytest.skip("QMPSHADOW_NO_EXTENSIONS=1: no compiled twin to compare")
    mod = twin_modules("qmpshadow.frames", "_pagecodec")[-1].values[0]  # type: ignore[union-attr]
    if mod is None:
        pytest.fail("qmpshadow.frames._pagecodec_c did not import: build the extensions")
    return mod  # type: ignore[no-any-return]


def test_selector_reports_the_live_twin() -> None:
    if extensions_disabled():
        assert _pagecodec.IMPLEMENTATION == "py"
        assert codec.IMPLEMENTATION == "py"
    else:
        assert _pagecodec.IMPLEMENTATION == "c", "compiled _pagecodec_c silently did not load"
        assert codec.IMPLEMENTATION == "c"


def test_twins_share_constants(twin: ModuleType) -> None:
    assert (twin.PAGE_SIZE_MIN, twin.PAGE_SIZE_MAX) == (limits.PAGE_SIZE_MIN, limits.PAGE_SIZE_MAX)
    assert (twin.ZERO, twin.FULL, twin.DELTA, twin.EMPTY_TAG) == (0, 1, 2, EMPTY)
    assert twin.ENCODE_SLACK == limits.ENCODE_SLACK


def _cache(nslots: int, ps: int = PS) -> tuple[bytearray, array[int]]:
    return bytearray(nslots * ps), array("Q", [EMPTY]) * nslots


def _encode(
    twin: ModuleType,
    indices: list[int],
    src: Any,
    ps: int = PS,
    cache: tuple[bytearray, array[int]] | None = None,
    packed: bool = False,
    stats: array[int] | None = None,
) -> bytes:
    cd, tags = cache if cache is not None else (None, None)
    out = twin.encode_pages(array("Q", indices), src, ps, cd, tags, packed, stats)
    assert isinstance(out, bytes)
    return out


# --- encodings -------------------------------------------------------------------------------


def test_zero_page_is_one_byte(twin: ModuleType) -> None:
    assert _encode(twin, [0], bytes(PS)) == bytes([0 << 2 | 0])


def test_full_page_without_cache(twin: ModuleType) -> None:
    page = bytes(range(256)) * (PS // 256)
    assert _encode(twin, [0], page) == bytes([1]) + page


def test_index_gaps_are_in_the_tag(twin: ModuleType) -> None:
    src = bytes(10 * PS)
    # gaps 3, 0, 4 -> tags 12, 0, 16 (kind ZERO)
    assert _encode(twin, [3, 4, 9], src) == bytes([12, 0, 16])


def test_delta_layout(twin: ModuleType) -> None:
    old = bytearray(b"\x11" * PS)
    new = bytearray(old)
    new[5] = 0x22
    new[6] = 0x23
    new[200] = 0x99
    cache = _cache(4)
    _encode(twin, [0], bytes(old), cache=cache)
    rec = _encode(twin, [0], bytes(new), cache=cache)
    body = bytes([5, 2, 0x22, 0x23]) + _varint(200 - 7) + bytes([1, 0x99])
    assert rec == bytes([2, len(body)]) + body


def test_equal_word_splits_runs_and_partial_gaps_do_not(twin: ModuleType) -> None:
    old = bytes(b"\x55" * PS)
    new = bytearray(old)
    new[7] = 0  # word 0 differs in its last byte
    new[16] = 0  # word 1 equal -> split; word 2 differs in its first byte
    new[23] = 0  # same word 2: one run 16..24
    new[24] = 0  # word 3 differs in its first byte: adjacent dirty word, same run
    cache = _cache(1)
    _encode(twin, [0], old, cache=cache)
    rec = _encode(twin, [0], bytes(new), cache=cache)
    body = bytes([7, 1, 0, 8, 9]) + bytes(new[16:25])
    assert rec == bytes([2, len(body)]) + body


def test_identical_page_is_an_empty_delta(twin: ModuleType) -> None:
    page = b"\x01" * PS
    cache = _cache(2)
    _encode(twin, [1], page * 2, cache=cache)
    assert _encode(twin, [1], page * 2, cache=cache) == bytes([1 << 2 | 2, 0])


def test_delta_that_does_not_beat_full_is_sent_full(twin: ModuleType) -> None:
    rng = random.Random(7)
    old = rng.randbytes(PS)
    new = rng.randbytes(PS)
    cache = _cache(1)
    _encode(twin, [0], old, cache=cache)
    assert _encode(twin, [0], new, cache=cache) == bytes([1]) + new


def test_stats_accumulate(twin: ModuleType) -> None:
    stats = array("Q", [0, 0, 0])
    cache = _cache(8)
    src = bytearray(4 * PS)
    src[PS : 2 * PS] = b"\x07" * PS
    src[2 * PS : 3 * PS] = b"\x08" * PS
    _encode(twin, [0, 1, 2], src, cache=cache, stats=stats)
    src[PS + 3] = 0
    _encode(twin, [0, 1, 2, 3], src, cache=cache, stats=stats)
    assert list(stats) == [3, 2, 2]  # zero, full, delta: [z,f,f] then [z,d,d(empty),z]


def test_cache_is_direct_mapped_and_evicts(twin: ModuleType) -> None:
    src = bytearray(b"\x03" * (8 * PS))
    cache = _cache(4)
    _encode(twin, [1], src, cache=cache)
    assert cache[1][1] == 1
    assert bytes(cache[0][PS : 2 * PS]) == bytes(src[PS : 2 * PS])
    _encode(twin, [5], src, cache=cache)  # same slot 1: evicts page 1
    assert cache[1][1] == 5
    src[PS] = 9
    rec = _encode(twin, [1], src, cache=cache)
    assert rec[0] & 3 == 1  # FULL: page 1 is no longer cached


def test_packed_source(twin: ModuleType) -> None:
    pages = b"\x01" * PS + bytes(PS)
    rec = _encode(twin, [10, 20], pages, packed=True)
    dst = bytearray(32 * PS)
    assert twin.apply_pages(rec, dst, PS, 2) == 2
    assert dst[10 * PS : 11 * PS] == b"\x01" * PS
    assert dst[20 * PS : 21 * PS] == bytes(PS)


def test_encode_into_reused_buffer_matches_encode(twin: ModuleType) -> None:
    rng = random.Random(4)
    old = bytearray(rng.randbytes(8 * PS))
    new = bytearray(old)
    new[100:110] = bytes(10)
    new[3 * PS : 4 * PS] = bytes(PS)
    out = bytearray(codec.encoded_size_bound(8, PS))
    c1, c2 = _cache(4), _cache(4)
    idx = array("Q", range(8))
    for src in (old, new):
        want = twin.encode_pages(idx, src, PS, c1[0], c1[1], False, None)
        n = twin.encode_pages_into(out, idx, src, PS, c2[0], c2[1], False, None)
        assert out[:n] == want
    assert c1 == c2
    assert twin.encode_pages_into(bytearray(), array("Q"), b"", PS) == 0


def test_encode_into_checks_capacity_first(twin: ModuleType) -> None:
    cache = _cache(2)
    small = bytearray(2 * (PS + limits.ENCODE_SLACK) - 1)
    with pytest.raises(ConfigError, match="needs 1056"):
        twin.encode_pages_into(small, array("Q", [0, 1]), b"\x01" * (2 * PS), PS, *cache)
    assert set(cache[1]) == {EMPTY}, "a refused call must not touch the cache"
    with pytest.raises(ConfigError, match="writable"):
        twin.encode_pages_into(bytes(4 * PS), array("Q", [0]), bytes(PS), PS)


def test_encode_from_readonly_mmap_apply_into_mmap(twin: ModuleType) -> None:
    ps = 4096
    rng = random.Random(3)
    with mmap.mmap(-1, 16 * ps) as ram, mmap.mmap(-1, 16 * ps) as replica:
        ram[:] = rng.randbytes(16 * ps)
        view = memoryview(ram).toreadonly()
        rec = _encode(twin, list(range(16)), view, ps)
        del view
        assert twin.apply_pages(rec, replica, ps, 16) == 16
        assert replica[:] == ram[:]


# --- argument errors (local misuse: ConfigError, nothing touched) -----------------------------


@pytest.mark.parametrize("ps", [0, 256, 513, 3 << 10, 2 << 20, "4096"])
def test_bad_page_size(twin: ModuleType, ps: Any) -> None:
    with pytest.raises(ConfigError, match="page size"):
        twin.encode_pages(array("Q"), b"", ps, None, None, False, None)
    with pytest.raises(ConfigError, match="page size"):
        twin.apply_pages(b"", bytearray(), ps)


def test_indices_must_increase(twin: ModuleType) -> None:
    with pytest.raises(ConfigError, match="strictly increasing: 1 after 2"):
        _encode(twin, [0, 2, 1], bytes(4 * PS))
    with pytest.raises(ConfigError, match="strictly increasing"):
        _encode(twin, [2, 2], bytes(4 * PS))


def test_index_outside_src(twin: ModuleType) -> None:
    with pytest.raises(ConfigError, match="page index 4 is outside src"):
        _encode(twin, [1, 4], bytes(4 * PS))
    with pytest.raises(ConfigError, match="packed src holds 1 pages"):
        _encode(twin, [1, 4], bytes(PS), packed=True)


def test_bad_cache(twin: ModuleType) -> None:
    cd, tags = _cache(4)
    with pytest.raises(ConfigError, match="both or neither"):
        twin.encode_pages(array("Q", [0]), bytes(PS), PS, cd, None, False, None)
    with pytest.raises(ConfigError, match="cache_data must hold"):
        twin.encode_pages(array("Q", [0]), bytes(PS), PS, cd + b"x", tags, False, None)
    with pytest.raises(ConfigError, match="uint64"):
        twin.encode_pages(array("Q", [0]), bytes(PS), PS, cd, array("I", [0] * 4), False, None)
    with pytest.raises(ConfigError, match="uint64"):
        twin.encode_pages(array("i", [0]), bytes(PS), PS, None, None, False, None)


def test_readonly_dst_refused(twin: ModuleType) -> None:
    with pytest.raises(ConfigError, match="writable"):
        twin.apply_pages(b"\x00", bytes(PS), PS)


# --- decoding hostile payloads (FrameFormatError, target untouched) ---------------------------


def _apply_err(twin: ModuleType, rec: bytes, npages: int = 4, count: int = -1) -> Any:
    dst = bytearray(b"\xee" * (npages * PS))
    with pytest.raises(FrameFormatError) as exc:
        twin.apply_pages(rec, dst, PS, count)
    assert dst == b"\xee" * (npages * PS), "a refused payload wrote into the target"
    return exc.value


def _varint(v: int) -> bytes:
    return py_twin._varint(v)


@pytest.mark.parametrize(
    ("rec", "message", "offset"),
    [
        (bytes([0, 16]), "page index 5 is outside the target (4 pages)", 1),
        (_varint(1 << 62), "outside the target", 0),
        (bytes([1]) + bytes(PS - 1), "FULL page 0 needs 512 bytes, 511 left", 0),
        (bytes([3]), "unknown page encoding 3", 0),
        (bytes([0x80]), "page record tag varint runs past its end", 0),
        (bytes([0x80, 0x00]), "page record tag varint is not canonical", 0),
        (b"\xff" * 9 + b"\x02", "page record tag varint overflows 64 bits", 0),
        (bytes([2, 5, 0, 1]), "DELTA body of page 0 is 5 bytes, 2 left", 0),
        (bytes([2, 2, 0, 0]), "DELTA op (skip 0, literal 0)", 2),
        (bytes([2, 4, 0x80, 0x04, 1, 7]), "DELTA op (skip 512, literal 1) at byte 0", 2),
        (bytes([2, 3, 10, 5, 1]), "DELTA literal of 5 bytes runs past the body", 2),
        (bytes([2, 1, 10]), "DELTA literal length varint runs past its end", 3),
        (bytes([2, 0x80]), "DELTA length varint runs past its end", 1),
        (bytes([2, 2, 0x80, 0x00]), "DELTA skip varint is not canonical", 2),
    ],
)
def test_malformed_records(twin: ModuleType, rec: bytes, message: str, offset: int) -> None:
    err = _apply_err(twin, rec)
    assert message in err.reason
    assert err.offset == offset


def test_count_mismatch(twin: ModuleType) -> None:
    err = _apply_err(twin, bytes([0, 0]), count=3)
    assert "holds 2 page records, the frame says 3" in err.reason
    assert err.offset == 2


def test_error_late_in_payload_leaves_target_untouched(twin: ModuleType) -> None:
    good = _encode(twin, [0, 1], b"\x05" * (2 * PS))
    _apply_err(twin, good + bytes([3]))


def test_apply_twice_is_harmless(twin: ModuleType) -> None:
    old = bytes(b"\x10" * 4 * PS)
    new = bytearray(old)
    new[3] = 1
    new[PS + 100 : PS + 120] = b"x" * 20
    cache = _cache(8)
    _encode(twin, [0, 1, 2, 3], old, cache=cache)
    rec = _encode(twin, [0, 1, 2, 3], bytes(new), cache=cache)
    dst = bytearray(old)
    twin.apply_pages(rec, dst, PS)
    twin.apply_pages(rec, dst, PS)
    assert dst == new


# --- properties ------------------------------------------------------------------------------


@st.composite
def page_versions(draw: st.DrawFn, ps: int = PS) -> tuple[bytes, bytes]:
    """(old, new) page pairs: edits, zero pages, unrelated pages, identical pages."""
    old = draw(
        st.one_of(
            st.just(bytes(ps)),
            st.binary(min_size=ps, max_size=ps),
            st.builds(lambda b: (b * ps)[:ps], st.binary(min_size=1, max_size=16)),
        )
    )
    kind = draw(st.sampled_from(["edit", "edit", "zero", "random", "same"]))
    if kind == "zero":
        return old, bytes(ps)
    if kind == "random":
        return old, draw(st.binary(min_size=ps, max_size=ps))
    if kind == "same":
        return old, old
    new = bytearray(old)
    for pos, chunk in draw(
        st.lists(st.tuples(st.integers(0, ps - 1), st.binary(min_size=1, max_size=40)), max_size=12)
    ):
        chunk = chunk[: ps - pos]
        new[pos : pos + len(chunk)] = chunk
    return old, bytes(new)


batches = st.lists(page_versions(), min_size=1, max_size=6)


def _roundtrip(twin: ModuleType, pairs: list[tuple[bytes, bytes]], nslots: int) -> bytes:
    n = len(pairs)
    old = b"".join(o for o, _ in pairs)
    new = b"".join(v for _, v in pairs)
    cache = _cache(nslots)
    replica = bytearray(n * PS)
    rec1 = _encode(twin, list(range(n)), old, cache=cache)
    assert twin.apply_pages(rec1, replica, PS, n) == n
    assert replica == old
    rec2 = _encode(twin, list(range(n)), new, cache=cache)
    assert twin.apply_pages(rec2, replica, PS, n) == n
    assert replica == new
    return rec1 + rec2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=batches, nslots=st.sampled_from([1, 3, 8]))
def test_apply_encode_roundtrip(
    twin: ModuleType, pairs: list[tuple[bytes, bytes]], nslots: int
) -> None:
    _roundtrip(twin, pairs, nslots)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=batches, nslots=st.sampled_from([1, 3, 8]))
def test_twins_encode_identical_bytes(pairs: list[tuple[bytes, bytes]], nslots: int) -> None:
    c_twin = _c_twin()
    assert _roundtrip(py_twin, pairs, nslots) == _roundtrip(c_twin, pairs, nslots)


@settings(max_examples=30, deadline=None)
@given(pair=page_versions(ps=4096), sparse=st.lists(st.integers(0, 63), max_size=8, unique=True))
def test_twins_agree_on_4k_pages_and_sparse_indices(
    pair: tuple[bytes, bytes], sparse: list[int]
) -> None:
    c_twin = _c_twin()
    idx = sorted(sparse) or [0]
    old = bytearray(64 * 4096)
    new = bytearray(64 * 4096)
    for i in idx:
        old[i * 4096 : (i + 1) * 4096] = pair[0]
        new[i * 4096 : (i + 1) * 4096] = pair[1]
    outs = []
    for tw in (py_twin, c_twin):
        cache = _cache(16, 4096)
        outs.append((_encode(tw, idx, old, 4096, cache), _encode(tw, idx, new, 4096, cache), cache))
        replica = bytearray(64 * 4096)
        tw.apply_pages(outs[-1][0], replica, 4096)
        tw.apply_pages(outs[-1][1], replica, 4096)
        assert replica == new
    assert outs[0] == outs[1]


@settings(max_examples=400, deadline=None)
@given(
    rec=st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda head, body: head + body,
            st.sampled_from([b"\x02", b"\x06", b"\x01", b"\x00", b"\x0a"]),
            st.binary(max_size=PS + 16),
        ),
    ),
    count=st.sampled_from([-1, 0, 1, 2]),
)
def test_hostile_payloads_never_escape_the_target(rec: bytes, count: int) -> None:
    """Random bytes: both twins accept or refuse alike, and never write outside the target."""
    outcomes = []
    for tw in (py_twin, _c_twin()):
        arena = bytearray(b"\xaa" * (6 * PS))
        target = memoryview(arena)[PS : 5 * PS]
        try:
            n: Any = tw.apply_pages(rec, target, PS, count)
        except FrameFormatError as exc:
            n = (exc.reason, exc.offset)
        target.release()
        assert arena[:PS] == b"\xaa" * PS and arena[5 * PS :] == b"\xaa" * PS
        outcomes.append((n, bytes(arena)))
    assert outcomes[0] == outcomes[1]


def test_public_wrapper_accepts_lists_and_cache_object() -> None:
    cache = codec.PageCache(PS, 4 * PS)
    src = bytearray(b"\x01" * (4 * PS))
    rec = codec.encode_pages([0, 2], src, PS, cache)
    src[2 * PS] = 7
    rec2 = codec.encode_pages(range(4), src, PS, cache)
    dst = bytearray(4 * PS)
    assert codec.apply_pages(rec, dst, PS, 2) == 2
    assert codec.apply_pages(rec2, dst, PS, 4) == 4
    assert dst == src
    cache.clear()
    assert set(cache.tags) == {EMPTY}
    with pytest.raises(ConfigError, match="cache holds 512-byte pages"):
        codec.encode_pages([0], bytes(4096), 4096, cache)
    with pytest.raises(ConfigError):
        codec.PageCache(PS, PS - 1)


def test_max_pages_per_frame_fits_the_worst_case() -> None:
    n = codec.max_pages_per_frame(4096, 1 << 20)
    rng = random.Random(1)
    src = rng.randbytes(n * 4096)
    rec = codec.encode_pages(range(n), src, 4096)
    assert len(rec) + 8 <= 1 << 20
    with pytest.raises(ConfigError):
        codec.max_pages_per_frame(4096, 4000)


def test_forget_drops_cached_pages() -> None:
    cache = codec.PageCache(PS, 2 * PS)
    codec.encode_pages([0, 1], b"\x01" * (2 * PS), PS, cache)
    cache.forget([1, 3])
    assert list(cache.tags) == [0, EMPTY]


def test_cache_edge_page_sizes(twin: ModuleType) -> None:
    for ps in (limits.PAGE_SIZE_MIN, limits.PAGE_SIZE_MAX):
        old = bytes(b"\x01" * ps)
        new = bytearray(old)
        new[-1] = 2
        cache = _cache(1, ps)
        _encode(twin, [0], old, ps, cache)
        rec = _encode(twin, [0], bytes(new), ps, cache)
        dst = bytearray(old)
        twin.apply_pages(rec, dst, ps, 1)
        assert dst == new


def test_hand_built_delta_applies(twin: ModuleType) -> None:
    dst = bytearray(b"\x09" * (2 * PS))
    # page 1: keep 3 bytes, write 2; keep 10, write 1
    assert twin.apply_pages(bytes([1 << 2 | 2, 7, 3, 2, 1, 2, 10, 1, 3]), dst, PS, 1) == 1
    assert dst[PS : PS + 17] == b"\x09" * 3 + b"\x01\x02" + b"\x09" * 10 + b"\x03" + b"\x09"
    assert dst[:PS] == b"\x09" * PS


def test_cache_mirrors_the_receiver_while_the_source_changes() -> None:
    """A running guest may write pages while they are encoded: the records may then carry a
    mix of old and new bytes, but the cache must still equal what the receiver holds.

    The "guest" is a forked child rewriting pages of shared memory in a tight loop, so it
    runs truly concurrently with the encoder (a thread would mostly wait for the GIL). The
    race windows are short: an encoder that copies the cache from the source instead of from
    its output fails here in about one run out of three, the correct one never did.
    """
    c_twin = _c_twin()
    ps, n = 4096, 8
    ram = mmap.mmap(-1, n * ps)  # MAP_SHARED: the child's writes land here
    flag = mmap.mmap(-1, 1)
    rng = random.Random(8)
    variants = [rng.randbytes(ps) for _ in range(3)]
    variants.append(bytes(ps))
    edited = bytearray(variants[0])
    edited[100:140] = bytes(40)
    variants.append(bytes(edited))
    pid = os.fork()
    if pid == 0:  # the guest
        try:
            k = 0
            while flag[0] == 0:
                k += 1
                p = (k * 7919) % n * ps
                ram[p : p + ps] = variants[k % len(variants)]
        finally:
            os._exit(0)
    try:
        replica = bytearray(n * ps)
        cd, tags = _cache(n, ps)
        idx = array("Q", range(n))
        for _ in range(3000):
            rec = c_twin.encode_pages(idx, ram, ps, cd, tags, False, None)
            c_twin.apply_pages(rec, replica, ps, n)
            assert replica == cd, "the cache no longer mirrors the receiver"
    finally:
        flag[0] = 1
        os.waitpid(pid, 0)
        ram.close()
        flag.close()


@settings(max_examples=300, deadline=None)
@given(
    rec=st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda head, body: head + body,
            st.sampled_from([b"\x02", b"\x06", b"\x01", b"\x00", b"\x0a"]),
            st.binary(max_size=PS + 16),
        ),
    ),
    count=st.sampled_from([-1, 0, 1, 2]),
)
def test_check_pages_agrees_with_apply_pages(rec: bytes, count: int) -> None:
    """check_pages refuses exactly what apply_pages refuses, with the same error, in both
    twins, and returns the same count."""
    for tw in (py_twin, _c_twin()):
        target = bytearray(4 * PS)
        try:
            want: Any = tw.apply_pages(rec, target, PS, count)
        except FrameFormatError as exc:
            want = (exc.reason, exc.offset)
        try:
            got: Any = tw.check_pages(rec, 4, PS, count)
        except FrameFormatError as exc:
            got = (exc.reason, exc.offset)
        assert got == want


def test_check_pages_writes_nothing_and_bounds(twin: ModuleType) -> None:
    src = bytes(PS) + b"\x05" * PS + b"\x06" * PS
    rec = codec.encode_pages([0, 1, 2], src, PS)
    assert twin.check_pages(rec, 3, PS, 3) == 3
    assert codec.check_pages(rec, 3, PS) == 3
    with pytest.raises(FrameFormatError, match="outside the target"):
        twin.check_pages(rec, 2, PS)
    with pytest.raises(ConfigError):
        twin.check_pages(rec, -1, PS)
    with pytest.raises(ConfigError):
        twin.check_pages(rec, 3, 1000)
    assert twin.check_pages(b"", 0, PS, 0) == 0
