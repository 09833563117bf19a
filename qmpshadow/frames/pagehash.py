"""Keyed page hashing: twin selector plus the sender's :class:`UnchangedFilter`.

``IMPLEMENTATION`` says which twin is live ("c" or "py"); ``QMPSHADOW_NO_EXTENSIONS=1``
forces "py". The functions are documented in ``_pagehash_py``.
"""

from __future__ import annotations

import re
import secrets
import threading
from array import array
from collections.abc import Callable
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

    def scan(self, ram: Any, *, threads: int = 1) -> array[int]:
        """Shared-RAM source: indices of pages of ``ram`` that changed since the last scan.

        Unknown pages (first scan, after :meth:`reset` or :meth:`forget`) are always
        reported. ``threads`` > 1 splits the pages into that many runs hashed in parallel
        (the compiled twin releases the GIL: a stopped primary's RAM is scanned in about
        half the time on two free cores). Raises ConfigError when ``ram`` is not ``npages``
        whole pages or ``threads`` < 1.
        """
        size = memoryview(ram).nbytes
        if size != self.npages * self.page_size:
            raise ConfigError(
                f"RAM buffer is {size} bytes, the filter covers {self.npages} pages of "
                f"{self.page_size}"
            )
        if threads < 1:
            raise ConfigError(f"scan threads must be >= 1, got {threads}")
        if self._unknown == self.npages:
            self._split(hash_pages, ram, threads)
            self.known[:] = b"\x01" * self.npages
            self._unknown = 0
            return array("Q", range(self.npages))
        changed = self._split(scan_changed, ram, threads)
        if self._unknown:
            # Forgotten pages may hash as before; report them anyway.
            extra = [m.start() for m in _UNKNOWN.finditer(self.known)]
            for i in extra:
                self.known[i] = 1
            self._unknown = 0
            changed = array("Q", sorted(set(changed).union(extra)))
        return changed

    def _split(self, fn: Callable[[Any, int, int, Any], Any], ram: Any,
               threads: int) -> array[int]:
        """``fn(ram, page_size, seed, table)`` over ``threads`` runs of pages, the first in
        this thread; the changed indices (if ``fn`` returns any) of all runs, in order."""
        parts = min(threads, self.npages) or 1
        if parts == 1:
            got = fn(ram, self.page_size, self._seed, self.table)
            return got if got is not None else array("Q")
        mv, tv, ps = memoryview(ram).cast("B"), memoryview(self.table), self.page_size
        bounds = [self.npages * k // parts for k in range(parts + 1)]
        results: list[Any] = [None] * parts
        errors: list[BaseException] = []

        def run(k: int) -> None:
            lo, hi = bounds[k], bounds[k + 1]
            try:
                results[k] = fn(mv[lo * ps : hi * ps], ps, self._seed, tv[lo:hi])
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        workers = [threading.Thread(target=run, args=(k,), name=f"scan-{k}")
                   for k in range(1, parts)]
        for w in workers:
            w.start()
        run(0)
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        out = array("Q")
        for k, got in enumerate(results):
            lo = bounds[k]
            out.extend(i + lo for i in got or ())
        return out

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
