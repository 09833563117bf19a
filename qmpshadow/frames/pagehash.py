"""Keyed page hashing: twin selector plus the sender's :class:`UnchangedFilter`.

``IMPLEMENTATION`` says which twin is live ("c" or "py"); ``QMPSHADOW_NO_EXTENSIONS=1``
forces "py". The functions are documented in ``_pagehash_py``.
"""

from __future__ import annotations

import re
import secrets
from array import array
from typing import TYPE_CHECKING, Any

from qmpshadow._twins import load_twin
from qmpshadow.errors import ConfigError
from qmpshadow.frames.limits import check_page_size

_mod, IMPLEMENTATION = load_twin(__package__, "_pagehash")

if TYPE_CHECKING:
    from qmpshadow.frames._pagehash_py import (
        KERNEL,
        filter_changed,
        hash_pages,
        memread,
        scan_changed,
    )
else:
    KERNEL = _mod.KERNEL
    hash_pages = _mod.hash_pages
    scan_changed = _mod.scan_changed
    filter_changed = _mod.filter_changed
    memread = _mod.memread

__all__ = [
    "IMPLEMENTATION",
    "KERNEL",
    "UnchangedFilter",
    "filter_changed",
    "hash_pages",
    "memread",
    "new_seed",
    "scan_changed",
]

_UNKNOWN = re.compile(b"\x00")


def new_seed() -> int:
    """A fresh random 64-bit hash seed from the OS CSPRNG."""
    return secrets.randbits(64)


class UnchangedFilter:
    """Per-session table answering "did this page change since it was last sent?".

    One keyed xxh3-64 per page (8 bytes) plus a "known" byte. The seed is random per session
    and never leaves the sender, so a guest cannot aim for collisions and nothing is ever
    compared across VMs. It is the sender's promise about the receiver's replica: call
    :meth:`reset` whenever that promise breaks (reconnect, RESYNC_REQUEST, an epoch that was
    not committed), and :meth:`forget` for pages that were filtered in but not delivered.
    """

    def __init__(self, npages: int, page_size: int, *, seed: int | None = None) -> None:
        """Raises ConfigError for a negative page count, a bad page size or seed."""
        check_page_size(page_size)
        if npages < 0:
            raise ConfigError(f"page count must be >= 0, got {npages}")
        if seed is not None and not 0 <= seed < 1 << 64:
            raise ConfigError(f"hash seed must be in [0, 2**64), got {seed}")
        self.npages = npages
        self.page_size = page_size
        self._seed = new_seed() if seed is None else seed
        self.table = array("Q", bytes(8 * npages))
        self.known = bytearray(npages)
        self._unknown = npages

    @property
    def seed(self) -> int:
        """The session's hash seed (keep it local: the receiver never needs it)."""
        return self._seed

    def __repr__(self) -> str:
        # The seed stays out of logs.
        return (
            f"UnchangedFilter(npages={self.npages}, page_size={self.page_size}, "
            f"unknown={self._unknown})"
        )

    def scan(self, ram: Any) -> array[int]:
        """Shared-RAM source: indices of pages of ``ram`` that changed since the last scan.

        Unknown pages (first scan, after :meth:`reset` or :meth:`forget`) are always
        reported. Raises ConfigError when ``ram`` is not ``npages`` whole pages.
        """
        size = memoryview(ram).nbytes
        if size != self.npages * self.page_size:
            raise ConfigError(
                f"RAM buffer is {size} bytes, the filter covers {self.npages} pages of "
                f"{self.page_size}"
            )
        if self._unknown == self.npages:
            hash_pages(ram, self.page_size, self._seed, self.table)
            self.known[:] = b"\x01" * self.npages
            self._unknown = 0
            return array("Q", range(self.npages))
        changed = scan_changed(ram, self.page_size, self._seed, self.table)
        if self._unknown:
            # Forgotten pages may hash as before; report them anyway.
            extra = [m.start() for m in _UNKNOWN.finditer(self.known)]
            for i in extra:
                self.known[i] = 1
            self._unknown = 0
            changed = array("Q", sorted(set(changed).union(extra)))
        return changed

    def filter(self, indices: Any, pages: Any) -> int:
        """Batch of dirty pages (COLO source): keep only the changed ones, compacted in place.

        ``indices`` (writable ``array('Q')``) and ``pages`` (writable, back to back) are
        rewritten so that their first *n* entries are the pages to send; returns *n*. Raises
        ConfigError as :func:`filter_changed`.
        """
        before = self._unknown
        kept = filter_changed(indices, pages, self.page_size, self._seed, self.table, self.known)
        if before:
            self._unknown = self.known.count(0)
        return kept

    def forget(self, indices: Any) -> None:
        """Mark pages unknown so the next scan/filter reports them (e.g. their send failed)."""
        for i in indices:
            if not 0 <= i < self.npages:
                raise ConfigError(f"page index {i} is outside the filter ({self.npages} pages)")
            if self.known[i]:
                self.known[i] = 0
                self._unknown += 1

    def reset(self, *, reseed: bool = True) -> None:
        """Forget every page (the receiver's replica can no longer be trusted to match).

        A new seed is drawn unless ``reseed`` is false, so one seed lives one session.
        """
        if reseed:
            self._seed = new_seed()
        self.known[:] = bytes(self.npages)
        self._unknown = self.npages
