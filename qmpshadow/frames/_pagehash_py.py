"""Keyed per-page hashing, pure-Python twin (the specification).

A page's hash is ``xxh3_64(page, seed)`` with a per-session random 64-bit ``seed``: the guest
cannot precompute colliding pages without the seed, and hashes never compare across sessions
or VMs. The compiled twin (cython/frames/_pagehash_c.pyx) computes the same values with
xxhash.h inlined; this one calls the ``xxhash`` package once per page.

Tables are writable uint64 buffers (``array('Q')``) with one entry per page.
"""

from __future__ import annotations

from array import array
from typing import Any, Final

import xxhash

from qmpshadow.errors import ConfigError
from qmpshadow.frames.limits import PAGE_SIZE_MAX, PAGE_SIZE_MIN, check_page_size

__all__ = [
    "KERNEL",
    "PAGE_SIZE_MAX",
    "PAGE_SIZE_MIN",
    "filter_changed",
    "hash_pages",
    "memread",
    "scan_changed",
]

_U64_MAX: Final = (1 << 64) - 1

#: Which xxh3 implementation hashes pages here (the compiled twin says "avx2" or "default").
KERNEL: Final = "xxhash-package"


def _seed(seed: int) -> int:
    if not isinstance(seed, int) or not 0 <= seed <= _U64_MAX:
        raise ConfigError(f"hash seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


def _u64(buf: Any, what: str, writable: bool) -> memoryview:
    mv = memoryview(buf)
    if mv.itemsize != 8 or mv.format not in ("Q", "L", "<Q", "=Q", "@Q"):
        raise ConfigError(f"{what} must be a buffer of uint64 (array('Q')), got {mv.format!r}")
    if writable and mv.readonly:
        raise ConfigError(f"{what} must be writable")
    return mv.cast("B").cast("Q")


def _pages(buf: Any, page_size: int) -> tuple[memoryview, int]:
    check_page_size(page_size)
    mv = memoryview(buf).cast("B")
    if len(mv) % page_size:
        raise ConfigError(
            f"buffer of {len(mv)} bytes is not a whole number of {page_size}-byte pages"
        )
    return mv, len(mv) // page_size


def hash_pages(buf: Any, page_size: int, seed: int, out_table: Any) -> None:
    """Store ``xxh3_64(page, seed)`` of every page of ``buf`` into ``out_table[i]``.

    Raises ConfigError when ``buf`` is not whole pages, the table is shorter than the page
    count or not a writable uint64 buffer, or the seed is out of range.
    """
    mv, npages = _pages(buf, page_size)
    s = _seed(seed)
    table = _u64(out_table, "out_table", True)
    if len(table) < npages:
        raise ConfigError(f"out_table holds {len(table)} entries, the buffer has {npages} pages")
    h = xxhash.xxh3_64_intdigest
    for i in range(npages):
        table[i] = h(mv[i * page_size : (i + 1) * page_size], s)


def scan_changed(buf: Any, page_size: int, seed: int, table: Any) -> array[int]:
    """Indices (ascending ``array('Q')``) of pages whose hash differs from ``table``.

    ``table`` is updated to the new hashes. This is the shared-RAM source's per-checkpoint
    scan. Raises ConfigError as :func:`hash_pages`.
    """
    mv, npages = _pages(buf, page_size)
    s = _seed(seed)
    tab = _u64(table, "table", True)
    if len(tab) < npages:
        raise ConfigError(f"table holds {len(tab)} entries, the buffer has {npages} pages")
    h = xxhash.xxh3_64_intdigest
    changed = array("Q")
    for i in range(npages):
        v = h(mv[i * page_size : (i + 1) * page_size], s)
        if v != tab[i]:
            tab[i] = v
            changed.append(i)
    return changed


def filter_changed(
    indices: Any, pages: Any, page_size: int, seed: int, table: Any, known: Any
) -> int:
    """Drop the pages of a batch whose bytes did not change since last kept; compact in place.

    ``indices`` (writable uint64) names the pages, ``pages`` holds them back to back. A page is
    kept when ``known[index]`` is 0 or its hash differs from ``table[index]``; both are then
    updated. Kept pages and their indices move to the front, order preserved; returns their
    count. Raises ConfigError (before touching anything) for an index outside ``table``,
    a ``known`` shorter than ``table``, or buffers of the wrong type or size.
    """
    check_page_size(page_size)
    s = _seed(seed)
    idx = _u64(indices, "indices", True)
    pg = memoryview(pages).cast("B")
    if pg.readonly:
        raise ConfigError("pages must be writable (kept pages are compacted in place)")
    tab = _u64(table, "table", True)
    kn = memoryview(known).cast("B")
    if kn.readonly or len(kn) < len(tab):
        raise ConfigError(f"known must be a writable byte buffer of at least {len(tab)}")
    n = len(idx)
    if len(pg) < n * page_size:
        raise ConfigError(f"pages holds {len(pg) // page_size} pages, indices name {n}")
    for i in idx:
        if i >= len(tab):
            raise ConfigError(f"page index {i} is outside the table ({len(tab)} pages)")
    h = xxhash.xxh3_64_intdigest
    kept = 0
    for k in range(n):
        i = idx[k]
        page = pg[k * page_size : (k + 1) * page_size]
        v = h(page, s)
        if kn[i] and tab[i] == v:
            continue
        tab[i] = v
        kn[i] = 1
        if kept != k:
            pg[kept * page_size : (kept + 1) * page_size] = page
            idx[kept] = i
        kept += 1
    return kept


def memread(buf: Any) -> int:
    """XOR of the buffer's little-endian u64 words (a trailing partial word is ignored).

    A plain read of every byte: the bandwidth anchor the benchmark prints next to the scan.
    """
    mv = memoryview(buf).cast("B")
    end = len(mv) - len(mv) % 8
    acc = 0
    chunk = 1 << 20
    for off in range(0, end, chunk):
        x = int.from_bytes(mv[off : min(off + chunk, end)], "little")
        bits = x.bit_length()
        width = 64
        while width < bits:
            width *= 2
        # Fold halves until one 64-bit lane is left; halves stay multiples of 64 bits so
        # lanes line up with words.
        while width > 64:
            width //= 2
            x = (x >> width) ^ (x & ((1 << width) - 1))
        acc ^= x
    return acc
