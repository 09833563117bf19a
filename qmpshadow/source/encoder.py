"""Captured epochs → delta frames (sender side, sans-I/O).

Main-RAM pages become PAGES frames through the page codec (ZERO / FULL / DELTA against a
bounded cache of the versions last sent). Pages QEMU reported dirty whose bytes did not
change are dropped first by a per-session keyed xxh3 table (the COLO source; the
shared-RAM source's scan has already done that). Small RAM blocks go as SMALL_BLOCK runs,
only where they changed since they were last sent; the device state as one DEVICE_STATE.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from ..frames.codec import PageCache, encode_pages, max_pages_per_frame
from ..frames.epoch import EpochWriter
from ..frames.limits import DEFAULT_MAX_PAYLOAD
from ..frames.pagehash import UnchangedFilter
from ..frames.wire import BlockFlags, Buffer, DeviceStateFormat
from .epoch import CapturedEpoch


@dataclass(slots=True)
class EncodeStats:
    """What one epoch cost on the wire compared with its raw dirty pages."""

    epoch: int
    reported_pages: int
    sent_pages: int
    unchanged_pages: int
    zero: int
    full: int
    delta: int
    raw_bytes: int
    wire_bytes: int
    frames: int
    digest: int


class EpochEncoder:
    """Stateful encoder: the cache and the unchanged table mirror the shadow's replica.

    Call :meth:`reset` whenever that mirror may be wrong (new link, RESYNC_REQUEST, an
    epoch that was not committed): the next epoch must then be a full one.
    """

    def __init__(self, *, page_size: int, main_pages: int, generation: int = 1,
                 cache_bytes: int = 64 << 20, compress_level: int | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.page_size = page_size
        self.generation = generation
        self.max_payload = max_payload
        self.compress_level = compress_level
        self.cache = PageCache(page_size, cache_bytes)
        self.unchanged = UnchangedFilter(main_pages, page_size)
        self._small_sent: dict[tuple[str, int], bytes] = {}
        self.batch = min(max_pages_per_frame(page_size, max_payload), 1024)

    def reset(self) -> None:
        """Forget what the shadow holds (after a resync or a new link)."""
        self.cache.clear()
        self.unchanged.reset(reseed=True)
        self._small_sent.clear()

    def encode(self, ep: CapturedEpoch) -> tuple[list[list[Buffer]], EncodeStats]:
        """Frames of ``ep`` (each as buffers for ``writelines``), and their stats.

        Raises ConfigError (from the frame layer) for blocks or sizes it cannot encode.
        """
        if ep.full:
            self.reset()
        ps = self.page_size
        w = EpochWriter(generation=self.generation, epoch=ep.number, blocks=ep.blocks,
                        max_payload=self.max_payload, compress_level=self.compress_level,
                        base=0 if ep.full else ep.base)
        index = {b.idstr: i for i, b in enumerate(ep.blocks)}
        out: list[list[Buffer]] = [w.begin()]
        counts = array("Q", [0, 0, 0])
        indices = array("Q", sorted(ep.main))
        pages = bytearray(b"".join(ep.main[i] for i in indices))
        n = len(indices)
        if ep.device_format == DeviceStateFormat.QEMU_SECTIONS and n and not ep.scanned:
            # QEMU's dirty log reports pages rewritten with the same bytes: drop them
            n = self.unchanged.filter(indices, pages)
        main = index[ep.main_block]
        mv = memoryview(pages)
        for a in range(0, n, self.batch):
            b = min(n, a + self.batch)
            records = encode_pages(indices[a:b], mv[a * ps : b * ps], ps, self.cache,
                                   packed=True, stats=counts)
            out.append(w.pages(main, b - a, records))
        for block, blk_pages in sorted(ep.small.items()):
            bi = index[block]
            if not ep.blocks[bi].flags & BlockFlags.SMALL:
                continue
            run_start = -1
            run = bytearray()
            for off in sorted(blk_pages):
                page = blk_pages[off]
                if self._small_sent.get((block, off)) == page:
                    continue
                self._small_sent[(block, off)] = page
                if run and off == run_start + len(run):
                    run += page
                    continue
                if run:
                    out.append(w.small_block(bi, run_start, bytes(run)))
                run_start, run = off, bytearray(page)
            if run:
                out.append(w.small_block(bi, run_start, bytes(run)))
        # disk blocks (a backup job writes up to 1 MiB at a time): cut to the frame bound
        step = self.max_payload - 64
        for disk, offset, data in ep.disk:
            mv_d = memoryview(data)
            for a in range(0, len(data), step):
                out.append(w.disk_block(disk, offset + a, mv_d[a : a + step]))
        out.append(w.device_state(ep.device_format, ep.device_state))
        out.append(w.end())
        stats = EncodeStats(
            epoch=ep.number, reported_pages=ep.reported_pages, sent_pages=n,
            unchanged_pages=len(indices) - n, zero=counts[0], full=counts[1], delta=counts[2],
            raw_bytes=ep.raw_bytes, wire_bytes=w.wire_bytes, frames=w.frames + 1,
            digest=w.digest)
        return out, stats
