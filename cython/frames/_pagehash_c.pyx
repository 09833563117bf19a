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
    #include <stdint.h>
    #include <string.h>

    /* On x86-64 with GCC/Clang, xxhash.h's AVX2 kernels are compiled alongside the default
       SSE2 ones (target attribute) and picked at run time: AVX2 hashes a page about twice as
       fast, which is what lets the scan keep up with memory. The AVX2 accumulator uses
       aligned stores, hence the 64-byte accumulator/secret alignment. */
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #  define QS_X86 1
    #  include <immintrin.h>
    #  define XXH_DISPATCH_AVX2 1
    #  define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
    #  define XXH_ACC_ALIGN 64
    #endif
    #define XXH_INLINE_ALL
    #include <xxhash.h>

    /* Pages are longer than XXH3's 240-byte mid-size limit, so a page's hash is XXH3's
       long-input kernel over the secret derived from the seed: deriving it once per call
       instead of once per page gives the same values as XXH3_64bits_withSeed. This reaches
       into xxhash.h 0.8.x internals; other versions use the public call. */
    #if XXH_VERSION_MAJOR == 0 && XXH_VERSION_MINOR == 8
    #  define QS_SECRET_KERNEL 1
    #endif

    typedef struct {
        XXH_ALIGN(64) unsigned char secret[XXH_SECRET_DEFAULT_SIZE];
        uint64_t seed;
        int avx2;
    } qs_key;

    static int qs_avx2_usable = -1;

    static inline void qs_key_init(qs_key *k, uint64_t seed) {
        k->seed = seed;
        k->avx2 = 0;
    #ifdef QS_SECRET_KERNEL
        XXH3_initCustomSecret(k->secret, seed);
    #  ifdef QS_X86
        if (qs_avx2_usable < 0) {
            __builtin_cpu_init();
            qs_avx2_usable = __builtin_cpu_supports("avx2") ? 1 : 0;
        }
        k->avx2 = qs_avx2_usable;
    #  endif
    #endif
    }

    static uint64_t qs_hash_default(const unsigned char *p, size_t len, const qs_key *k) {
    #ifdef QS_SECRET_KERNEL
        return XXH3_hashLong_64b_internal(p, len, k->secret, sizeof(k->secret),
                                          XXH3_accumulate_512, XXH3_scrambleAcc);
    #else
        return XXH3_64bits_withSeed(p, len, k->seed);
    #endif
    }

    #if defined(QS_SECRET_KERNEL) && defined(QS_X86)
    XXH_TARGET_AVX2 static uint64_t qs_hash_avx2(const unsigned char *p, size_t len,
                                                 const qs_key *k) {
        return XXH3_hashLong_64b_internal(p, len, k->secret, sizeof(k->secret),
                                          XXH3_accumulate_512_avx2, XXH3_scrambleAcc_avx2);
    }
    #endif

    /* One page's keyed hash; len must exceed 240 bytes (pages are at least 512). */
    static inline uint64_t qs_hash(const unsigned char *p, size_t len, const qs_key *k) {
    #if defined(QS_SECRET_KERNEL) && defined(QS_X86)
        if (k->avx2) return qs_hash_avx2(p, len, k);
    #endif
        return qs_hash_default(p, len, k);
    }

    static int qs_kernel_avx2(void) {
        qs_key k;
        qs_key_init(&k, 0);
        return k.avx2;
    }

    /* Tests and the benchmark pin a kernel; AVX2 only where the CPU has it. */
    static int qs_select_avx2(int want) {
    #ifdef QS_X86
        if (!want) { qs_avx2_usable = 0; return 0; }
        __builtin_cpu_init();
        qs_avx2_usable = __builtin_cpu_supports("avx2") ? 1 : 0;
    #else
        (void)want;
    #endif
        return qs_kernel_avx2();
    }

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
    ctypedef struct qs_key:
        pass
    void qs_key_init(qs_key *k, uint64_t seed) nogil
    uint64_t qs_hash(const unsigned char *p, size_t length, const qs_key *k) nogil
    int qs_kernel_avx2()
    int qs_select_avx2(int want)
    uint64_t qs_memread(const unsigned char *p, size_t n) nogil

# Keep in sync with qmpshadow/frames/limits.py (the tests compare both twins).
PAGE_SIZE_MIN = 512
PAGE_SIZE_MAX = 1 << 20

__all__ = [
    "KERNEL",
    "PAGE_SIZE_MAX",
    "PAGE_SIZE_MIN",
    "filter_changed",
    "hash_pages",
    "memread",
    "scan_changed",
]

#: Which xxh3 kernel hashes pages here: "avx2" or "default" (SSE2 on x86-64).
KERNEL = "avx2" if qs_kernel_avx2() else "default"


def _select_kernel(avx2):
    """Pin the kernel (tests, benchmark); returns the one now in use. Not thread-safe."""
    return "avx2" if qs_select_avx2(1 if avx2 else 0) else "default"

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
    cdef qs_key key
    with nogil:
        qs_key_init(&key, s)
        for i in range(npages):
            t[i] = qs_hash(p + i * ps, ps, &key)


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
    cdef qs_key key
    try:
        with nogil:
            qs_key_init(&key, s)
            for i in range(npages):
                h = qs_hash(p + i * ps, ps, &key)
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
    cdef qs_key key
    with nogil:
        qs_key_init(&key, s)
        for k in range(n):
            i = ip[k]
            h = qs_hash(p + k * ps, ps, &key)
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
