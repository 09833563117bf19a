# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Page codec, compiled twin of qmpshadow/frames/_pagecodec_py.py (the specification).

Same record format, same encoder choices, byte-identical output, same errors. The per-page
loops run without the GIL once the arguments are validated.
"""

from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memmove, memset

from qmpshadow.errors import ConfigError, FrameFormatError

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* Little-endian u64 load: byte order matters only where ctz/clz locate a byte. */
    static inline uint64_t qs_le64(const unsigned char *p) {
        uint64_t v;
        memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline int qs_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    static inline int qs_clz64(uint64_t x) { return __builtin_clzll(x); }

    /* 1 when the n bytes (a multiple of 64) are all zero; ORs 8 words per test so the
       compiler keeps the inner loop branch-free. */
    static inline int qs_is_zero(const unsigned char *p, size_t n) {
        for (size_t i = 0; i < n; i += 64) {
            uint64_t acc = 0;
            for (int j = 0; j < 8; j++) { uint64_t w; memcpy(&w, p + i + 8 * j, 8); acc |= w; }
            if (acc) return 0;
        }
        return 1;
    }

    /* Index of the first word at or after w (of nw) where a and b differ, nw if none. */
    static inline size_t qs_next_diff(const unsigned char *a, const unsigned char *b,
                                      size_t w, size_t nw) {
        while (w + 4 <= nw) {
            uint64_t a0, a1, a2, a3, b0, b1, b2, b3;
            memcpy(&a0, a + 8 * w, 8); memcpy(&b0, b + 8 * w, 8);
            memcpy(&a1, a + 8 * w + 8, 8); memcpy(&b1, b + 8 * w + 8, 8);
            memcpy(&a2, a + 8 * w + 16, 8); memcpy(&b2, b + 8 * w + 16, 8);
            memcpy(&a3, a + 8 * w + 24, 8); memcpy(&b3, b + 8 * w + 24, 8);
            if ((a0 ^ b0) | (a1 ^ b1) | (a2 ^ b2) | (a3 ^ b3)) break;
            w += 4;
        }
        while (w < nw) {
            uint64_t x, y;
            memcpy(&x, a + 8 * w, 8); memcpy(&y, b + 8 * w, 8);
            if (x != y) return w;
            w++;
        }
        return nw;
    }

    /* Index of the first word at or after w where a and b are equal, nw if none. */
    static inline size_t qs_next_same(const unsigned char *a, const unsigned char *b,
                                      size_t w, size_t nw) {
        while (w < nw) {
            uint64_t x, y;
            memcpy(&x, a + 8 * w, 8); memcpy(&y, b + 8 * w, 8);
            if (x == y) return w;
            w++;
        }
        return nw;
    }

    static inline size_t qs_varint_len(uint64_t v) {
        size_t n = 1;
        while (v >= 0x80) { v >>= 7; n++; }
        return n;
    }

    static inline size_t qs_put_varint(unsigned char *out, uint64_t v) {
        size_t n = 0;
        while (v >= 0x80) { out[n++] = (unsigned char)((v & 0x7F) | 0x80); v >>= 7; }
        out[n++] = (unsigned char)v;
        return n;
    }
    """
    uint64_t qs_le64(const unsigned char *p) nogil
    int qs_ctz64(uint64_t x) nogil
    int qs_clz64(uint64_t x) nogil
    int qs_is_zero(const unsigned char *p, size_t n) nogil
    size_t qs_next_diff(const unsigned char *a, const unsigned char *b, size_t w, size_t nw) nogil
    size_t qs_next_same(const unsigned char *a, const unsigned char *b, size_t w, size_t nw) nogil
    size_t qs_varint_len(uint64_t v) nogil
    size_t qs_put_varint(unsigned char *out, uint64_t v) nogil

cdef extern from "Python.h":
    PyObject *qs_bytes_new "PyBytes_FromStringAndSize"(const char *v, Py_ssize_t n) except NULL
    char *qs_bytes_data "PyBytes_AS_STRING"(PyObject *o)
    int qs_bytes_resize "_PyBytes_Resize"(PyObject **o, Py_ssize_t n) except -1

# Keep in sync with qmpshadow/frames/limits.py (the tests compare both twins).
PAGE_SIZE_MIN = 512
PAGE_SIZE_MAX = 1 << 20
EMPTY_TAG = 0xFFFFFFFFFFFFFFFF
ENCODE_SLACK = 16
ZERO = 0
FULL = 1
DELTA = 2

cdef enum:
    K_ZERO = 0
    K_FULL = 1
    K_DELTA = 2
    # Output room per page beyond page_size (ENCODE_SLACK): a tag takes <= 10 bytes and a
    # DELTA attempt writes at most tag + 3 + (page_size - 2) bytes before it is kept or
    # abandoned.
    C_ENCODE_SLACK = 16

__all__ = [
    "DELTA",
    "EMPTY_TAG",
    "ENCODE_SLACK",
    "FULL",
    "PAGE_SIZE_MAX",
    "PAGE_SIZE_MIN",
    "ZERO",
    "apply_pages",
    "encode_pages",
    "encode_pages_into",
]


cdef int _check_page_size(object page_size) except -1:
    if (
        not isinstance(page_size, int)
        or page_size < PAGE_SIZE_MIN
        or page_size > PAGE_SIZE_MAX
        or page_size & (page_size - 1)
    ):
        raise ConfigError(
            f"page size must be a power of two in [{PAGE_SIZE_MIN}, {PAGE_SIZE_MAX}], "
            f"got {page_size!r}"
        )
    return 0


cdef inline Py_ssize_t _delta_body(
    uint8_t *slot, const uint8_t *new, size_t ps, uint8_t *out
) noexcept nogil:
    """Write the DELTA ops turning ``slot`` into ``new`` at ``out``; their length, or -1 once
    DELTA cannot beat FULL (never writes more than ps - 2 bytes: that already loses).

    Each literal is also copied from ``out`` into ``slot``, so the cache ends up holding
    exactly the bytes sent even if ``new`` changes meanwhile (on -1 the caller overwrites the
    whole slot). Literals lie in words already compared, so the scan ahead is unaffected.
    """
    cdef size_t nw = ps >> 3
    cdef size_t w = 0, w2, start, end, lit, need
    cdef size_t o = 0, prev_end = 0
    cdef size_t budget = ps - 2
    cdef uint64_t x, xe
    while True:
        w = qs_next_diff(slot, new, w, nw)
        if w == nw:
            return <Py_ssize_t>o
        w2 = qs_next_same(slot, new, w + 1, nw)
        # A source that changes under us (a running guest) may make a word equal between the
        # scan and these re-reads: then the whole word counts as differing, which is still a
        # valid encoding, and ctz/clz never see 0, so always start < end.
        x = qs_le64(slot + 8 * w) ^ qs_le64(new + 8 * w)
        start = 8 * w + (<size_t>qs_ctz64(x) >> 3) if x else 8 * w
        xe = x if w2 - 1 == w else qs_le64(slot + 8 * (w2 - 1)) ^ qs_le64(new + 8 * (w2 - 1))
        end = 8 * (w2 - 1) + ((63 - <size_t>qs_clz64(xe)) >> 3) + 1 if xe else 8 * w2
        lit = end - start
        need = qs_varint_len(start - prev_end) + qs_varint_len(lit) + lit
        if o + need > budget:
            return -1
        o += qs_put_varint(out + o, start - prev_end)
        o += qs_put_varint(out + o, lit)
        memcpy(out + o, new + start, lit)
        memcpy(slot + start, out + o, lit)
        o += lit
        prev_end = end
        w = w2


cdef class _EncodeJob:
    """Validated arguments of one encode call (all checks happen before any byte moves)."""

    cdef const uint64_t[::1] idx
    cdef const uint8_t[::1] srcv
    cdef uint8_t[::1] cdv
    cdef uint64_t[::1] tagv
    cdef uint64_t[::1] stv
    cdef size_t ps, n, nslots
    cdef bint packed, has_cache, has_stats

    def __init__(self, indices, src, page_size, cache_data, cache_tags, packed, stats):
        _check_page_size(page_size)
        self.ps = page_size
        self.idx = _u64_view(indices, "indices", False)
        self.srcv = _byte_view(src, "src", False)
        self.n = self.idx.shape[0]
        self.packed = bool(packed)
        cdef size_t k, ps = self.ps, n = self.n
        for k in range(1, n):
            if self.idx[k] <= self.idx[k - 1]:
                raise ConfigError(
                    f"page indices must be strictly increasing: {self.idx[k]} after "
                    f"{self.idx[k - 1]}"
                )
        if self.packed:
            if n * ps > <size_t>self.srcv.shape[0]:
                raise ConfigError(
                    f"packed src holds {self.srcv.shape[0] // ps} pages, the batch has {n}"
                )
        elif n and self.idx[n - 1] >= <uint64_t>(self.srcv.shape[0] // ps):
            raise ConfigError(
                f"page index {self.idx[n - 1]} is outside src "
                f"({self.srcv.shape[0] // ps} pages of {ps} bytes)"
            )
        if (cache_data is None) != (cache_tags is None):
            raise ConfigError("cache_data and cache_tags go together: pass both or neither")
        self.has_cache = cache_tags is not None
        if self.has_cache:
            self.tagv = _u64_view(cache_tags, "cache_tags", True)
            self.cdv = _byte_view(cache_data, "cache_data", True)
            self.nslots = self.tagv.shape[0]
            if self.nslots == 0 or <size_t>self.cdv.shape[0] != self.nslots * ps:
                raise ConfigError(
                    f"cache_data must hold len(cache_tags) * page_size = {self.nslots * ps} "
                    f"bytes, holds {self.cdv.shape[0]}"
                )
        self.has_stats = stats is not None
        if self.has_stats:
            self.stv = _u64_view(stats, "stats", True)
            if self.stv.shape[0] < 3:
                raise ConfigError("stats must be a writable uint64 buffer of at least 3")

    cdef size_t bound(self):
        return self.n * (self.ps + C_ENCODE_SLACK)

    cdef size_t run(self, uint8_t *out):
        """Encode into ``out`` (at least bound() bytes); returns the length written."""
        cdef uint64_t counts[3]
        counts[0] = counts[1] = counts[2] = 0
        cdef const uint8_t *src = &self.srcv[0] if self.srcv.shape[0] else NULL
        cdef uint8_t *cdata = &self.cdv[0] if self.has_cache else NULL
        cdef uint64_t *tags = &self.tagv[0] if self.has_cache else NULL
        cdef const uint64_t *idx = &self.idx[0] if self.n else NULL
        cdef size_t n = self.n, ps = self.ps, nslots = self.nslots
        cdef bint packed = self.packed
        cdef size_t length = 0
        cdef int k
        if n:
            with nogil:
                length = _encode_loop(idx, n, src, ps, packed, cdata, tags, nslots, out, counts)
        if self.has_stats:
            for k in range(3):
                self.stv[k] += counts[k]
        return length


cdef size_t _encode_loop(
    const uint64_t *idx,
    size_t n,
    const uint8_t *src,
    size_t ps,
    bint packed,
    uint8_t *cdata,
    uint64_t *tags,
    size_t nslots,
    uint8_t *out,
    uint64_t *counts,
) noexcept nogil:
    cdef size_t k, o = 0, hl, lv
    cdef uint64_t i, prev = <uint64_t>-1, tag
    cdef const uint8_t *page
    cdef uint8_t *slotp = NULL
    cdef bint has_old
    cdef Py_ssize_t body
    for k in range(n):
        i = idx[k]
        page = src + (k * ps if packed else i * ps)
        tag = (i - prev - 1) << 2  # prev = 2**64-1 first: wraps to i, as intended
        prev = i
        has_old = False
        if cdata != NULL:
            slotp = cdata + (i % nslots) * ps
            has_old = tags[i % nslots] == i
            tags[i % nslots] = i
        if qs_is_zero(page, ps):
            o += qs_put_varint(out + o, tag | K_ZERO)
            if slotp != NULL:
                memset(slotp, 0, ps)
            counts[K_ZERO] += 1
            continue
        if has_old:
            hl = qs_put_varint(out + o, tag | K_DELTA)
            # Body goes 3 bytes further (the widest length varint for ps <= 1 MiB), then
            # slides back once its length is known.
            body = _delta_body(slotp, page, ps, out + o + hl + 3)
            if body >= 0:
                lv = qs_varint_len(<uint64_t>body)
                if lv + <size_t>body < ps:
                    qs_put_varint(out + o + hl, <uint64_t>body)
                    if lv != 3:
                        memmove(out + o + hl + lv, out + o + hl + 3, <size_t>body)
                    o += hl + lv + <size_t>body
                    counts[K_DELTA] += 1
                    continue
        o += qs_put_varint(out + o, tag | K_FULL)
        memcpy(out + o, page, ps)
        if slotp != NULL:
            # From the output, not the source: the cache must hold what was sent.
            memcpy(slotp, out + o, ps)
        o += ps
        counts[K_FULL] += 1
    return o


def encode_pages(
    indices,
    src,
    page_size,
    cache_data=None,
    cache_tags=None,
    packed=False,
    stats=None,
):
    """Encode pages ``indices`` (uint64 buffer, strictly increasing) into PAGES records.

    ``src`` holds the new contents: the whole RAM (page ``i`` at ``i * page_size``) or, when
    ``packed``, the batch's pages back to back. ``cache_data``/``cache_tags`` (both or neither)
    are the sender's previous-version cache, updated in place. ``stats``, a writable uint64
    buffer of 3, is incremented by the ZERO, FULL and DELTA counts. Raises ConfigError on bad
    arguments (nothing is encoded or cached then).
    """
    cdef _EncodeJob job = _EncodeJob(
        indices, src, page_size, cache_data, cache_tags, packed, stats
    )
    cdef PyObject *raw = qs_bytes_new(NULL, <Py_ssize_t>job.bound())
    cdef size_t length = job.run(<uint8_t *>qs_bytes_data(raw))
    qs_bytes_resize(&raw, <Py_ssize_t>length)  # on failure raw is freed and NULL
    result = <object>raw
    Py_DECREF(result)  # <object> took a second reference; result now owns the only one
    return result


def encode_pages_into(
    out,
    indices,
    src,
    page_size,
    cache_data=None,
    cache_tags=None,
    packed=False,
    stats=None,
):
    """:func:`encode_pages` writing into the writable buffer ``out``; returns the length.

    ``out`` must hold ``len(indices) * (page_size + ENCODE_SLACK)`` bytes (ConfigError
    otherwise, before anything is encoded). Reusing one buffer avoids faulting in fresh
    memory for every batch, which costs more than encoding incompressible pages.
    """
    cdef _EncodeJob job = _EncodeJob(
        indices, src, page_size, cache_data, cache_tags, packed, stats
    )
    mv = memoryview(out)
    if mv.readonly:
        raise ConfigError("out must be writable")
    cdef uint8_t[::1] outv = mv.cast("B")
    if <size_t>outv.shape[0] < job.bound():
        raise ConfigError(
            f"out holds {outv.shape[0]} bytes, a batch of {job.n} pages needs "
            f"{job.bound()} (len(indices) * (page_size + {ENCODE_SLACK}))"
        )
    if job.n == 0:
        return 0
    return job.run(&outv[0])


cdef object _u64_view(object buf, str what, bint writable):
    """A uint64 memoryview of ``buf``; ConfigError for any other element type."""
    mv = memoryview(buf)
    if mv.itemsize != 8 or mv.format not in ("Q", "L", "<Q", "=Q", "@Q"):
        raise ConfigError(f"{what} must be a buffer of uint64 (array('Q')), got {mv.format!r}")
    if writable and mv.readonly:
        raise ConfigError(f"{what} must be writable")
    return mv.cast("B").cast("Q")


cdef object _byte_view(object buf, str what, bint writable):
    mv = memoryview(buf)
    if writable and mv.readonly:
        raise ConfigError(f"{what} must be writable")
    return mv.cast("B")


cdef int _read_varint(
    const uint8_t *p, size_t *pos, size_t end, uint64_t *value
) noexcept nogil:
    """0 on success; 1 past end, 2 overflow, 3 non-canonical (messages built by the caller)."""
    cdef uint64_t v = 0
    cdef unsigned shift = 0
    cdef size_t start = pos[0], q = pos[0]
    cdef uint8_t b
    while True:
        if q >= end:
            return 1
        b = p[q]
        q += 1
        if shift == 63 and b > 1:
            return 2
        v |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            if b == 0 and q - start > 1:
                return 3
            pos[0] = q
            value[0] = v
            return 0
        shift += 7


cdef struct WalkError:
    int code
    size_t offset
    uint64_t a
    uint64_t b
    uint64_t c
    uint64_t d


cdef enum:
    E_NONE = 0
    E_VARINT = 1
    E_INDEX = 2
    E_FULL_SHORT = 3
    E_DELTA_SHORT = 4
    E_OP_FIT = 5
    E_LIT_SHORT = 6
    E_KIND = 7

# Which varint failed, for the message: index into _VARINT_WHAT.
_VARINT_WHAT = ("page record tag", "DELTA length", "DELTA skip", "DELTA literal length")
_VARINT_WHY = ("", "runs past its end", "overflows 64 bits", "is not canonical")


cdef size_t _walk(
    const uint8_t *rec,
    size_t end,
    uint8_t *out,
    size_t ps,
    uint64_t npages,
    bint write,
    WalkError *err,
) noexcept nogil:
    """Validate (``write`` false) or apply the records; both passes run the same checks."""
    cdef size_t pos = 0, at, body_end, op_at, in_page, n = 0
    cdef uint64_t tag, gap, idx, prev = <uint64_t>-1, body_len, skip, lit
    cdef uint64_t first  # index the next record would have with gap 0
    cdef uint8_t *base
    cdef int kind, rc
    while pos < end:
        at = pos
        rc = _read_varint(rec, &pos, end, &tag)
        if rc:
            err.code = E_VARINT; err.offset = at; err.a = 0; err.b = rc
            return n
        kind = <int>(tag & 3)
        gap = tag >> 2
        first = prev + 1  # prev starts at 2**64-1: first wraps to 0
        if gap >= npages - first or first > npages:
            err.code = E_INDEX; err.offset = at; err.a = first; err.b = gap; err.c = npages
            return n
        idx = first + gap
        prev = idx
        base = out + idx * ps
        if kind == K_ZERO:
            if write:
                memset(base, 0, ps)
        elif kind == K_FULL:
            if end - pos < ps:
                err.code = E_FULL_SHORT; err.offset = at; err.a = idx; err.b = end - pos
                return n
            if write:
                memcpy(base, rec + pos, ps)
            pos += ps
        elif kind == K_DELTA:
            rc = _read_varint(rec, &pos, end, &body_len)
            if rc:
                err.code = E_VARINT; err.offset = pos; err.a = 1; err.b = rc
                return n
            if body_len > end - pos:
                err.code = E_DELTA_SHORT; err.offset = at; err.a = idx; err.b = body_len
                err.c = end - pos
                return n
            body_end = pos + body_len
            in_page = 0
            while pos < body_end:
                op_at = pos
                rc = _read_varint(rec, &pos, body_end, &skip)
                if rc:
                    err.code = E_VARINT; err.offset = op_at; err.a = 2; err.b = rc
                    return n
                rc = _read_varint(rec, &pos, body_end, &lit)
                if rc:
                    err.code = E_VARINT; err.offset = pos; err.a = 3; err.b = rc
                    return n
                if lit == 0 or skip > ps - in_page or lit > ps - in_page - skip:
                    err.code = E_OP_FIT; err.offset = op_at; err.a = skip; err.b = lit
                    err.c = in_page; err.d = idx
                    return n
                if lit > body_end - pos:
                    err.code = E_LIT_SHORT; err.offset = op_at; err.a = lit; err.b = idx
                    return n
                in_page += skip
                if write:
                    memcpy(base + in_page, rec + pos, lit)
                in_page += lit
                pos += lit
        else:
            err.code = E_KIND; err.offset = at; err.a = kind; err.b = idx
            return n
        n += 1
    return n


cdef object _walk_error(WalkError *e, size_t ps, uint64_t npages):
    if e.code == E_VARINT:
        return FrameFormatError(
            f"{_VARINT_WHAT[e.a]} varint {_VARINT_WHY[e.b]}", offset=e.offset
        )
    if e.code == E_INDEX:
        # The spec reports first + gap; past 2**64 it cannot be a page anyway.
        return FrameFormatError(
            f"page index {e.a + e.b} is outside the target ({e.c} pages)", offset=e.offset
        )
    if e.code == E_FULL_SHORT:
        return FrameFormatError(
            f"FULL page {e.a} needs {ps} bytes, {e.b} left", offset=e.offset
        )
    if e.code == E_DELTA_SHORT:
        return FrameFormatError(
            f"DELTA body of page {e.a} is {e.b} bytes, {e.c} left", offset=e.offset
        )
    if e.code == E_OP_FIT:
        return FrameFormatError(
            f"DELTA op (skip {e.a}, literal {e.b}) at byte {e.c} does not fit "
            f"page {e.d} of {ps} bytes",
            offset=e.offset,
        )
    if e.code == E_LIT_SHORT:
        return FrameFormatError(
            f"DELTA literal of {e.a} bytes runs past the body of page {e.b}", offset=e.offset
        )
    return FrameFormatError(f"unknown page encoding {e.a} for page {e.b}", offset=e.offset)


def check_pages(records, npages, page_size, count=-1):
    """Validate PAGES ``records`` for a target of ``npages`` pages without applying them.

    Runs exactly the checks of :func:`apply_pages` (same errors, same offsets) and returns
    the record count. FrameFormatError as :func:`apply_pages`; ConfigError for a bad page
    size or a negative ``npages``.
    """
    _check_page_size(page_size)
    if npages < 0:
        raise ConfigError(f"npages must be >= 0, got {npages}")
    cdef size_t ps = page_size
    cdef const uint8_t[::1] rec = memoryview(records).cast("B")
    cdef uint64_t np = npages
    cdef size_t end = rec.shape[0]
    cdef const uint8_t *recp = &rec[0] if end else NULL
    cdef WalkError err
    cdef size_t n
    err.code = E_NONE
    with nogil:
        n = _walk(recp, end, NULL, ps, np, False, &err)
    if err.code != E_NONE:
        raise _walk_error(&err, ps, np)
    if count >= 0 and n != <size_t>count:
        raise FrameFormatError(
            f"payload holds {n} page records, the frame says {count}", offset=end
        )
    return n


def apply_pages(records, dst, page_size, count=-1):
    """Apply PAGES ``records`` to ``dst`` (writable, page ``i`` at ``i * page_size``).

    Returns the number of records. The whole payload is validated before the first byte is
    written, so a malformed payload leaves ``dst`` untouched: FrameFormatError (offset into
    ``records``) for a bad varint, unknown kind, index outside ``dst``, body overrunning the
    payload or an op overrunning its page, or a record count differing from ``count`` (when
    ``count >= 0``). ConfigError for a bad page size or a read-only ``dst``.
    """
    _check_page_size(page_size)
    cdef size_t ps = page_size
    cdef const uint8_t[::1] rec = memoryview(records).cast("B")
    mv = memoryview(dst)
    if mv.readonly:
        raise ConfigError("apply_pages needs a writable destination buffer")
    cdef uint8_t[::1] out = mv.cast("B")
    cdef uint64_t npages = out.shape[0] // ps
    cdef size_t end = rec.shape[0]
    cdef const uint8_t *recp = &rec[0] if end else NULL
    cdef uint8_t *outp = &out[0] if out.shape[0] else NULL
    cdef WalkError err
    cdef size_t n, n2
    err.code = E_NONE
    with nogil:
        n = _walk(recp, end, outp, ps, npages, False, &err)
    if err.code != E_NONE:
        raise _walk_error(&err, ps, npages)
    if count >= 0 and n != <size_t>count:
        raise FrameFormatError(
            f"payload holds {n} page records, the frame says {count}", offset=end
        )
    with nogil:
        n2 = _walk(recp, end, outp, ps, npages, True, &err)
    if err.code != E_NONE:
        # Only reachable if records changed between the passes (a bytearray shared with
        # another thread); the pages already written are the caller's problem then.
        raise _walk_error(&err, ps, npages)
    return n2
