"""Page codec, pure-Python twin: the specification of the PAGES record format.

The compiled twin (cython/frames/_pagecodec_c.pyx) must produce byte-identical output and
accept/refuse exactly the same inputs; the test suite checks both.

Records, one per page, concatenated (varints are unsigned LEB128, canonical, at most 10 bytes)::

    tag   varint  = (index - previous_index - 1) << 2 | kind     (previous_index starts at -1)
    kind 0 ZERO   no body: the page is all zero bytes
    kind 1 FULL   page_size bytes: the new page
    kind 2 DELTA  varint L, then L bytes of ops against the receiver's current page:
                  op = varint skip, varint n (n >= 1), n literal bytes
                  (skip bytes are kept, then the n bytes are replaced by the literals)
    kind 3        refused

Indices in one batch are strictly increasing. DELTA runs are found on the XOR of the
previous and the new version at u64-word granularity: a run is a maximal sequence of words
that differ, trimmed to its first and last differing byte; a word that is equal splits runs.
Literals carry the *new* bytes, not the XOR, so applying a record twice is harmless (a journal
replay after a crash can re-apply a frame) and apply is a plain copy. The encoder picks ZERO
for an all-zero page, else DELTA when the sender's cache holds the page's previous version and
``varint_len(L) + L < page_size``, else FULL.

The previous-version cache is direct-mapped: ``slot = index % len(cache_tags)``; a slot holds
the last version *sent* of the page whose index is its tag (``EMPTY_TAG`` when empty). Every
encoded page is stored into its slot, evicting whatever was there.
"""

from __future__ import annotations

import re
from typing import Any, Final

from qmpshadow.errors import ConfigError, FrameFormatError
from qmpshadow.frames.limits import (
    EMPTY_TAG,
    ENCODE_SLACK,
    PAGE_SIZE_MAX,
    PAGE_SIZE_MIN,
    check_page_size,
)

__all__ = [
    "DELTA",
    "EMPTY_TAG",
    "ENCODE_SLACK",
    "FULL",
    "PAGE_SIZE_MAX",
    "PAGE_SIZE_MIN",
    "ZERO",
    "apply_pages",
    "check_pages",
    "encode_pages",
    "encode_pages_into",
]

ZERO: Final = 0
FULL: Final = 1
DELTA: Final = 2

_U64_MAX: Final = (1 << 64) - 1
# A run of >= 8 equal bytes is the only place an all-equal aligned word can hide.
_ZERO_RUN = re.compile(rb"\x00{8,}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    """Decode a canonical LEB128 u64 from ``data[pos:end]``; FrameFormatError if it is not."""
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise FrameFormatError(f"{what} varint runs past its end", offset=start)
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise FrameFormatError(f"{what} varint overflows 64 bits", offset=start)
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and pos - start > 1:
                raise FrameFormatError(f"{what} varint is not canonical", offset=start)
            return value, pos
        shift += 7


def _delta_body(old: bytes, new: bytes, page_size: int) -> bytes:
    """Ops turning ``old`` into ``new`` (see the module docstring), b"" when equal."""
    xored = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
    if not xored:
        return b""
    x = xored.to_bytes(page_size, "little")
    last = len(x.rstrip(b"\x00"))  # one past the last differing byte
    start = page_size - len(x.lstrip(b"\x00"))  # first differing byte
    runs = []
    for m in _ZERO_RUN.finditer(x, start, last):
        zs, ze = m.span()
        # Split only where the equal run covers a whole aligned word (as the C word scan does).
        if ((zs + 7) & ~7) + 8 <= ze:
            runs.append((start, zs))
            start = ze
    runs.append((start, last))
    out = bytearray()
    prev_end = 0
    for lo, hi in runs:
        out += _varint(lo - prev_end)
        out += _varint(hi - lo)
        out += new[lo:hi]
        prev_end = hi
    return bytes(out)


def _check_u64_buffer(buf: Any, what: str) -> memoryview:
    mv = memoryview(buf)
    if mv.itemsize != 8 or mv.format not in ("Q", "L", "<Q", "=Q", "@Q"):
        raise ConfigError(f"{what} must be a buffer of uint64 (array('Q')), got {mv.format!r}")
    return mv.cast("B").cast("Q")


def encode_pages(
    indices: Any,
    src: Any,
    page_size: int,
    cache_data: Any = None,
    cache_tags: Any = None,
    packed: bool = False,
    stats: Any = None,
) -> bytes:
    """Encode pages ``indices`` (uint64 buffer, strictly increasing) into PAGES records.

    ``src`` holds the new contents: the whole RAM (page ``i`` at ``i * page_size``) or, when
    ``packed``, the batch's pages back to back. ``cache_data``/``cache_tags`` (both or neither)
    are the sender's previous-version cache, updated in place. ``stats``, a writable uint64
    buffer of 3, is incremented by the ZERO, FULL and DELTA counts. Raises ConfigError on bad
    arguments (nothing is encoded or cached then).
    """
    check_page_size(page_size)
    ps = page_size
    srcv = memoryview(src).cast("B")
    idx_list = _check_u64_buffer(indices, "indices").tolist()
    _validate_indices(idx_list, len(srcv), ps, packed)
    tags: memoryview | None = None
    cdata: memoryview | None = None
    if (cache_data is None) != (cache_tags is None):
        raise ConfigError("cache_data and cache_tags go together: pass both or neither")
    if cache_tags is not None:
        tags = _check_u64_buffer(cache_tags, "cache_tags")
        cdata = memoryview(cache_data).cast("B")
        if cdata.readonly or tags.readonly:
            raise ConfigError("the page cache buffers must be writable")
        if len(tags) == 0 or len(cdata) != len(tags) * ps:
            raise ConfigError(
                f"cache_data must hold len(cache_tags) * page_size = {len(tags) * ps} bytes, "
                f"holds {len(cdata)}"
            )
    st = None
    if stats is not None:
        st = _check_u64_buffer(stats, "stats")
        if len(st) < 3 or st.readonly:
            raise ConfigError("stats must be a writable uint64 buffer of at least 3")
    zero_page = bytes(ps)
    counts = [0, 0, 0]
    out = bytearray()
    prev = -1
    for k, idx in enumerate(idx_list):
        off = k * ps if packed else idx * ps
        new = bytes(srcv[off : off + ps])
        tag = (idx - prev - 1) << 2
        prev = idx
        old = None
        slot = 0
        if tags is not None and cdata is not None:
            slot = idx % len(tags)
            if tags[slot] == idx:
                old = bytes(cdata[slot * ps : (slot + 1) * ps])
            cdata[slot * ps : (slot + 1) * ps] = new
            tags[slot] = idx
        if new == zero_page:
            out += _varint(tag | ZERO)
            counts[ZERO] += 1
            continue
        if old is not None:
            body = _delta_body(old, new, ps)
            head = _varint(len(body))
            if len(head) + len(body) < ps:
                out += _varint(tag | DELTA)
                out += head
                out += body
                counts[DELTA] += 1
                continue
        out += _varint(tag | FULL)
        out += new
        counts[FULL] += 1
    if st is not None:
        for kind in (ZERO, FULL, DELTA):
            st[kind] = (st[kind] + counts[kind]) & _U64_MAX
    return bytes(out)


def encode_pages_into(
    out: Any,
    indices: Any,
    src: Any,
    page_size: int,
    cache_data: Any = None,
    cache_tags: Any = None,
    packed: bool = False,
    stats: Any = None,
) -> int:
    """:func:`encode_pages` writing into the writable buffer ``out``; returns the length.

    ``out`` must hold ``len(indices) * (page_size + ENCODE_SLACK)`` bytes (ConfigError
    otherwise, before anything is encoded). Reusing one buffer avoids faulting in fresh
    memory for every batch, which costs more than encoding incompressible pages.
    """
    check_page_size(page_size)
    n = len(_check_u64_buffer(indices, "indices"))
    dst = memoryview(out)
    if dst.readonly:
        raise ConfigError("out must be writable")
    dst = dst.cast("B")
    need = n * (page_size + ENCODE_SLACK)
    if len(dst) < need:
        raise ConfigError(
            f"out holds {len(dst)} bytes, a batch of {n} pages needs {need} "
            f"(len(indices) * (page_size + {ENCODE_SLACK}))"
        )
    records = encode_pages(indices, src, page_size, cache_data, cache_tags, packed, stats)
    dst[: len(records)] = records
    return len(records)


def _validate_indices(indices: list[int], src_len: int, ps: int, packed: bool) -> None:
    prev = -1
    for idx in indices:
        if idx <= prev:
            raise ConfigError(f"page indices must be strictly increasing: {idx} after {prev}")
        prev = idx
    if packed:
        if len(indices) * ps > src_len:
            raise ConfigError(
                f"packed src holds {src_len // ps} pages, the batch has {len(indices)}"
            )
    elif indices and (indices[-1] + 1) * ps > src_len:
        raise ConfigError(
            f"page index {indices[-1]} is outside src ({src_len // ps} pages of {ps} bytes)"
        )


def apply_pages(records: Any, dst: Any, page_size: int, count: int = -1) -> int:
    """Apply PAGES ``records`` to ``dst`` (writable, page ``i`` at ``i * page_size``).

    Returns the number of records. The whole payload is validated before the first byte is
    written, so a malformed payload leaves ``dst`` untouched: FrameFormatError (offset into
    ``records``) for a bad varint, unknown kind, index outside ``dst``, body overrunning the
    payload or an op overrunning its page, or a record count differing from ``count`` (when
    ``count >= 0``). ConfigError for a bad page size or a read-only ``dst``.
    """
    check_page_size(page_size)
    rec = memoryview(records).cast("B")
    out = memoryview(dst).cast("B")
    if out.readonly:
        raise ConfigError("apply_pages needs a writable destination buffer")
    n = _walk(rec, None, page_size, len(out) // page_size, count)
    _walk(rec, out, page_size, len(out) // page_size, count)
    return n


def check_pages(records: Any, npages: int, page_size: int, count: int = -1) -> int:
    """Validate PAGES ``records`` for a target of ``npages`` pages without applying them.

    Runs exactly the checks of :func:`apply_pages` (same errors, same offsets) and returns
    the record count, so a receiver can refuse a bad payload before it commits to applying
    a batch of them. Raises FrameFormatError as :func:`apply_pages`; ConfigError for a bad
    page size or a negative ``npages``.
    """
    check_page_size(page_size)
    if npages < 0:
        raise ConfigError(f"npages must be >= 0, got {npages}")
    return _walk(memoryview(records).cast("B"), None, page_size, npages, count)


def _walk(rec: memoryview, out: memoryview | None, ps: int, npages: int, count: int) -> int:
    """Validate (``out`` None) or apply the records; both passes run the same checks."""
    end = len(rec)
    pos = 0
    prev = -1
    n = 0
    while pos < end:
        at = pos
        tag, pos = _read_varint(rec, pos, end, "page record tag")
        kind = tag & 3
        gap = tag >> 2
        if gap >= npages - (prev + 1):
            raise FrameFormatError(
                f"page index {prev + 1 + gap} is outside the target ({npages} pages)", offset=at
            )
        idx = prev + 1 + gap
        prev = idx
        base = idx * ps
        if kind == ZERO:
            if out is not None:
                out[base : base + ps] = bytes(ps)
        elif kind == FULL:
            if end - pos < ps:
                raise FrameFormatError(
                    f"FULL page {idx} needs {ps} bytes, {end - pos} left", offset=at
                )
            if out is not None:
                out[base : base + ps] = rec[pos : pos + ps]
            pos += ps
        elif kind == DELTA:
            body_len, pos = _read_varint(rec, pos, end, "DELTA length")
            if body_len > end - pos:
                raise FrameFormatError(
                    f"DELTA body of page {idx} is {body_len} bytes, {end - pos} left", offset=at
                )
            body_end = pos + body_len
            in_page = 0
            while pos < body_end:
                op_at = pos
                skip, pos = _read_varint(rec, pos, body_end, "DELTA skip")
                lit, pos = _read_varint(rec, pos, body_end, "DELTA literal length")
                if lit == 0 or skip > ps - in_page or lit > ps - in_page - skip:
                    raise FrameFormatError(
                        f"DELTA op (skip {skip}, literal {lit}) at byte {in_page} does not fit "
                        f"page {idx} of {ps} bytes",
                        offset=op_at,
                    )
                if lit > body_end - pos:
                    raise FrameFormatError(
                        f"DELTA literal of {lit} bytes runs past the body of page {idx}",
                        offset=op_at,
                    )
                in_page += skip
                if out is not None:
                    out[base + in_page : base + in_page + lit] = rec[pos : pos + lit]
                in_page += lit
                pos += lit
        else:
            raise FrameFormatError(f"unknown page encoding {kind} for page {idx}", offset=at)
        n += 1
    if count >= 0 and n != count:
        raise FrameFormatError(
            f"payload holds {n} page records, the frame says {count}", offset=end
        )
    return n
