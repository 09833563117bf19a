"""A RAM image built from stream events: what a destination's memory holds after loading."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from . import ramscan
from .events import Event, RamMemSize, RamRecords, RamXbzrle
from .xbzrle import xbzrle_apply


class RamImage:
    """Per-block bytearrays updated by RAM events (PAGE, ZERO and XBZRLE records).

    ``only`` limits which blocks are kept (None = all announced blocks).
    """

    def __init__(self, only: set[str] | None = None, *, impl: ModuleType | None = None) -> None:
        self.only = only
        self._apply = (impl or ramscan).apply_records
        self.blocks: dict[str, bytearray] = {}
        self.page_size = 4096

    def adopt(self, blocks: Mapping[str, bytearray]) -> None:
        """Use existing buffers (e.g. a replica's) as the block images."""
        self.blocks.update(blocks)

    def apply(self, ev: Event) -> None:
        """Update the image from one event; other event types are ignored."""
        if isinstance(ev, RamRecords):
            self.page_size = ev.page_size
            self._apply(ev.data, ev.records, ev.page_size, self.blocks)
        elif isinstance(ev, RamXbzrle):
            buf = self.blocks.get(ev.block)
            if buf is not None:
                page = memoryview(buf)[ev.offset : ev.offset + self.page_size]
                xbzrle_apply(page, ev.encoded)
        elif isinstance(ev, RamMemSize):
            for b in ev.blocks:
                if (self.only is None or b.idstr in self.only) and b.idstr not in self.blocks:
                    self.blocks[b.idstr] = bytearray(b.used_length)
