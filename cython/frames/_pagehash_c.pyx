# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Keyed per-page hashing, compiled twin of qmpshadow/frames/_pagehash_py.py (the spec).

xxh3-64 comes from xxhash.h inlined (XXH_INLINE_ALL; Debian: libxxhash-dev), so the
per-page call costs nothing and the scan runs at memory read bandwidth. Loops release the
GIL: callers may scan disjoint slices from several threads.
"""

from cpython cimport array as carray
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import array

from qmpshadow.errors import ConfigError

cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include <xxhash.h>
    #include <string.h>

    static inline uint64_t qs_memread(const unsigned char *p, size_t n) {
        /* Four independent accumulators keep several loads in flight. */
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, w;
        size_t i = 0;
        for (; i + 32 <= n; i += 32) {
            memcpy(&w, p + i, 8); a0 ^= w;
            memcpy(&w, p + i + 8, 8); a1 ^= w;
            memcpy(&w, p + i + 16, 8); a2 ^= w;
            memcpy(&w, p + i + 24, 8); a3 ^= w;
        }
        for (; i + 8 <= n; i += 8) { memcpy(&w, p + i, 8); a0 ^= w; }
        w = a0 ^ a1 ^ a2 ^ a3;
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }
    """
    uint64_t XXH3_64bits_withSeed(const void *data, size_t length, uint64_t seed) nogil
    uint64_t qs_memread(const unsigned char *p, size_t n) nogil

# Keep in sync with qmpshadow/frames/limits.py (the tests compare both twins).
PAGE_SIZE_MIN = 512
PAGE_SIZE_MAX = 1 << 20

__all__ = [
    "PAGE_SIZE_MAX",
    "PAGE_SIZE_MIN",
    "filter_changed",
    "hash_pages",
    "memread",
    "scan_changed",
]

cdef carray.array _U64_TEMPLATE = array.array("Q")


cdef uint64_t _seed(object seed) except? 0:
    if not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
        raise ConfigError(f"hash seed must be an integer in [0, 2**64), got {seed!r}")
    return <uint64_t>seed


cdef object _u64(object buf, str what, bint writable):
    mv = memoryview(buf)
    if mv.itemsize != 8 or mv.format not in ("Q", "L", "<Q", "=Q", "@Q"):
        raise ConfigError(f"{what} must be a buffer of uint64 (array('Q')), got {mv.format!r}")
    if writable and mv.readonly:
        raise ConfigError(f"{what} must be writable")
    return mv.cast("B").cast("Q")


cdef object _pages(object buf, object page_size):
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
    mv = memoryview(buf).cast("B")
    if len(mv) % page_size:
        raise ConfigError(
            f"buffer of {len(mv)} bytes is not a whole number of {page_size}-byte pages"
        )
    return mv


def hash_pages(buf, page_size, seed, out_table):
    """Store ``xxh3_64(page, seed)`` of every page of ``buf`` into ``out_table[i]``.

    Raises ConfigError when ``buf`` is not whole pages, the table is shorter than the page
    count or not a writable uint64 buffer, or the seed is out of range.
    """
    cdef const uint8_t[::1] mv = _pages(buf, page_size)
    cdef uint64_t s = _seed(seed)
    cdef uint64_t[::1] table = _u64(out_table, "out_table", True)
    cdef size_t ps = page_size
    cdef size_t npages = mv.shape[0] // ps
    cdef size_t i
    if <size_t>table.shape[0] < npages:
        raise ConfigError(
            f"out_table holds {table.shape[0]} entries, the buffer has {npages} pages"
        )
    if npages == 0:
        return
    cdef const uint8_t *p = &mv[0]
    cdef uint64_t *t = &table[0]
    with nogil:
        for i in range(npages):
            t[i] = XXH3_64bits_withSeed(p + i * ps, ps, s)


def scan_changed(buf, page_size, seed, table):
    """Indices (ascending ``array('Q')``) of pages whose hash differs from ``table``.

    ``table`` is updated to the new hashes. This is the shared-RAM source's per-checkpoint
    scan. Raises ConfigError as :func:`hash_pages`.
    """
    cdef const uint8_t[::1] mv = _pages(buf, page_size)
    cdef uint64_t s = _seed(seed)
    cdef uint64_t[::1] tab = _u64(table, "table", True)
    cdef size_t ps = page_size
    cdef size_t npages = mv.shape[0] // ps
    cdef size_t i, m = 0
    cdef uint64_t h
    if <size_t>tab.shape[0] < npages:
        raise ConfigError(f"table holds {tab.shape[0]} entries, the buffer has {npages} pages")
    cdef carray.array result
    if npages == 0:
        return carray.clone(_U64_TEMPLATE, 0, False)
    cdef uint64_t *found = <uint64_t *>malloc(npages * sizeof(uint64_t))
    if found == NULL:
        raise MemoryError()
    cdef const uint8_t *p = &mv[0]
    cdef uint64_t *t = &tab[0]
    try:
        with nogil:
            for i in range(npages):
                h = XXH3_64bits_withSeed(p + i * ps, ps, s)
                if h != t[i]:
                    t[i] = h
                    found[m] = i
                    m += 1
        result = carray.clone(_U64_TEMPLATE, m, False)
        if m:
            memcpy(result.data.as_voidptr, found, m * sizeof(uint64_t))
    finally:
        free(found)
    return result


def filter_changed(indices, pages, page_size, seed, table, known):
    """Drop the pages of a batch whose bytes did not change since last kept; compact in place.

    ``indices`` (writable uint64) names the pages, ``pages`` holds them back to back. A page is
    kept when ``known[index]`` is 0 or its hash differs from ``table[index]``; both are then
    updated. Kept pages and their indices move to the front, order preserved; returns their
    count. Raises ConfigError (before touching anything) for an index outside ``table``,
    a ``known`` shorter than ``table``, or buffers of the wrong type or size.
    """
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
    cdef uint64_t s = _seed(seed)
    cdef uint64_t[::1] idx = _u64(indices, "indices", True)
    pmv = memoryview(pages).cast("B")
    if pmv.readonly:
        raise ConfigError("pages must be writable (kept pages are compacted in place)")
    cdef uint8_t[::1] pg = pmv
    cdef uint64_t[::1] tab = _u64(table, "table", True)
    kmv = memoryview(known).cast("B")
    if kmv.readonly or len(kmv) < tab.shape[0]:
        raise ConfigError(f"known must be a writable byte buffer of at least {tab.shape[0]}")
    cdef uint8_t[::1] kn = kmv
    cdef size_t ps = page_size
    cdef size_t n = idx.shape[0]
    cdef size_t k, kept = 0
    cdef uint64_t i, h
    if <size_t>pg.shape[0] < n * ps:
        raise ConfigError(f"pages holds {pg.shape[0] // ps} pages, indices name {n}")
    for k in range(n):
        if idx[k] >= <uint64_t>tab.shape[0]:
            raise ConfigError(
                f"page index {idx[k]} is outside the table ({tab.shape[0]} pages)"
            )
    if n == 0:
        return 0
    cdef uint8_t *p = &pg[0]
    cdef uint64_t *ip = &idx[0]
    cdef uint64_t *t = &tab[0]
    cdef uint8_t *kp = &kn[0]
    with nogil:
        for k in range(n):
            i = ip[k]
            h = XXH3_64bits_withSeed(p + k * ps, ps, s)
            if kp[i] and t[i] == h:
                continue
            t[i] = h
            kp[i] = 1
            if kept != k:
                memcpy(p + kept * ps, p + k * ps, ps)
                ip[kept] = i
            kept += 1
    return kept


def memread(buf):
    """XOR of the buffer's little-endian u64 words (a trailing partial word is ignored).

    A plain read of every byte: the bandwidth anchor the benchmark prints next to the scan.
    """
    cdef const uint8_t[::1] mv = memoryview(buf).cast("B")
    cdef size_t n = mv.shape[0]
    cdef uint64_t r = 0
    if n == 0:
        return 0
    cdef const uint8_t *p = &mv[0]
    with nogil:
        r = qs_memread(p, n)
    return r
