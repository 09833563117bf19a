"""Page codec API: the sender's previous-version cache and batch encode/apply.

The record format is specified in ``_pagecodec_py``; the hot loops run in the compiled twin
when it is live (see ``_pagecodec.IMPLEMENTATION``).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any, Final

from qmpshadow.errors import ConfigError
from qmpshadow.frames import _pagecodec
from qmpshadow.frames.limits import EMPTY_TAG, ENCODE_SLACK, check_page_size

__all__ = [
    "IMPLEMENTATION",
    "PageCache",
    "apply_pages",
    "check_pages",
    "encode_pages",
    "encode_pages_into",
    "encoded_size_bound",
    "max_pages_per_frame",
]

IMPLEMENTATION: Final = _pagecodec.IMPLEMENTATION

#: Worst-case bytes of one record beyond the page itself (the tag varint).
RECORD_OVERHEAD: Final = 10
#: Fixed part of a PAGES payload (block, count).
PAGES_PREFIX: Final = 8


class PageCache:
    """The sender's bounded cache of the last version sent of each page (direct-mapped).

    Slot ``index % nslots`` holds one page and its index; a page that meets its own index in
    its slot is sent as a DELTA against it. The cache mirrors the receiver's replica, so
    :meth:`clear` it whenever that mirror may be wrong (reconnect, RESYNC_REQUEST, an epoch
    the receiver did not commit).
    """

    def __init__(self, page_size: int, max_bytes: int) -> None:
        """Use at most ``max_bytes`` (at least one page). Raises ConfigError when invalid."""
        check_page_size(page_size)
        if max_bytes < page_size:
            raise ConfigError(f"cache of {max_bytes} bytes cannot hold one {page_size}-byte page")
        self.page_size = page_size
        self.nslots = max_bytes // page_size
        self.data = bytearray(self.nslots * page_size)
        self.tags = array("Q", [EMPTY_TAG]) * self.nslots

    @property
    def nbytes(self) -> int:
        """Memory held by the cached pages."""
        return len(self.data)

    def clear(self) -> None:
        """Forget every cached page (contents are left; an empty tag makes them unused)."""
        self.tags[:] = array("Q", [EMPTY_TAG]) * self.nslots

    def forget(self, indices: Iterable[int]) -> None:
        """Drop the given pages from the cache (e.g. frames that were never delivered)."""
        for i in indices:
            slot = i % self.nslots
            if self.tags[slot] == i:
                self.tags[slot] = EMPTY_TAG


def _as_u64(indices: Any) -> Any:
    """Indices as a uint64 buffer (array('Q') passes through; any int iterable is copied)."""
    try:
        mv = memoryview(indices)
    except TypeError:
        return array("Q", indices)
    if mv.itemsize == 8 and mv.format in ("Q", "L", "<Q", "=Q", "@Q"):
        return indices
    return array("Q", mv.tolist())


def encode_pages(
    indices: Any,
    src: Any,
    page_size: int,
    cache: PageCache | None = None,
    *,
    packed: bool = False,
    stats: Any = None,
) -> bytes:
    """Encode pages ``indices`` (strictly increasing) of ``src`` into PAGES records.

    ``src`` is the whole RAM (page ``i`` at ``i * page_size``), or the batch's pages back to
    back when ``packed``. With a ``cache`` (same page size), pages whose previous version is
    cached may go as DELTA, and every encoded page is cached. ``stats``: optional writable
    ``array('Q', [0, 0, 0])`` incremented by the ZERO/FULL/DELTA counts. The output is at
    most ``len(indices) * (page_size + 10)`` bytes. Raises ConfigError on bad arguments.
    """
    if cache is None:
        return _pagecodec.encode_pages(_as_u64(indices), src, page_size, None, None, packed, stats)
    if cache.page_size != page_size:
        raise ConfigError(f"cache holds {cache.page_size}-byte pages, not {page_size}")
    return _pagecodec.encode_pages(
        _as_u64(indices), src, page_size, cache.data, cache.tags, packed, stats
    )


def encode_pages_into(
    out: Any,
    indices: Any,
    src: Any,
    page_size: int,
    cache: PageCache | None = None,
    *,
    packed: bool = False,
    stats: Any = None,
) -> int:
    """:func:`encode_pages` into a reusable writable buffer; returns the bytes written.

    ``out`` must hold :func:`encoded_size_bound` bytes for the batch (ConfigError otherwise).
    Reusing it per batch saves faulting in fresh memory each time, which otherwise dominates
    for incompressible pages; send ``memoryview(out)[:n]`` before reusing ``out``.
    """
    if cache is None:
        return _pagecodec.encode_pages_into(
            out, _as_u64(indices), src, page_size, None, None, packed, stats
        )
    if cache.page_size != page_size:
        raise ConfigError(f"cache holds {cache.page_size}-byte pages, not {page_size}")
    return _pagecodec.encode_pages_into(
        out, _as_u64(indices), src, page_size, cache.data, cache.tags, packed, stats
    )


def encoded_size_bound(npages: int, page_size: int) -> int:
    """Bytes :func:`encode_pages_into` needs in ``out`` for a batch of ``npages``."""
    return npages * (page_size + ENCODE_SLACK)


def apply_pages(records: Any, dst: Any, page_size: int, count: int = -1) -> int:
    """Apply PAGES ``records`` to the writable ``dst`` (e.g. an mmap of the replica's RAM).

    Validates the whole payload first: a FrameFormatError leaves ``dst`` untouched. Returns
    the record count (checked against ``count`` when >= 0). See ``_pagecodec_py``.
    """
    return _pagecodec.apply_pages(records, dst, page_size, count)


def check_pages(records: Any, npages: int, page_size: int, count: int = -1) -> int:
    """Validate PAGES ``records`` for a target of ``npages`` pages without writing anything.

    The same checks and errors as :func:`apply_pages` (FrameFormatError with the offset in
    the records; ConfigError for a bad page size): a receiver that journals frames calls it
    when a frame arrives, so that applying the committed epoch later cannot fail halfway.
    Returns the record count (checked against ``count`` when >= 0).
    """
    return _pagecodec.check_pages(records, npages, page_size, count)


def max_pages_per_frame(page_size: int, max_payload: int) -> int:
    """Pages per PAGES frame that can never exceed ``max_payload``, whatever they encode to."""
    check_page_size(page_size)
    n = (max_payload - PAGES_PREFIX) // (page_size + RECORD_OVERHEAD)
    if n < 1:
        raise ConfigError(f"max_payload {max_payload} cannot hold one {page_size}-byte page")
    return n
