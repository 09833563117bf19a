"""What a stream holds, summarised from its events (used by ``qmpshadow stream inspect``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .constants import Command, RamFlag
from .events import (
    ColoMessageEvent,
    ColoVmstate,
    CommandSection,
    Configuration,
    DeviceSection,
    Event,
    Header,
    RamMemSize,
    RamRecords,
    RamXbzrle,
    SectionEnd,
    SectionPart,
    SectionStart,
    VmDescription,
)
from .writer import device_section_bytes

_SEEN_PAGE = 1
_SEEN_ZERO = 2


@dataclass
class _Block:
    idstr: str
    length: int
    gpa: int | None
    pages_map: bytearray
    page_records: int = 0
    zero_records: int = 0
    xbzrle_records: int = 0


@dataclass
class _Checkpoint:
    index: int
    page_records: int = 0
    zero_records: int = 0
    xbzrle_records: int = 0
    device_state_size: int = 0
    devices: int = 0


@dataclass
class StreamSummary:
    """Accumulates events; :meth:`as_dict` gives the ``inspect --json`` document.

    Per block, ``pages``/``zero_pages`` count distinct pages whose last record was a page
    (or XBZRLE) / a zero page, so on a full precopy stream they add up to length/page size;
    ``*_records`` count records including re-sends.
    """

    keep_pages: bool = False
    version: int | None = None
    machine_type: str | None = None
    capabilities: tuple[str, ...] = ()
    page_size: int = 4096
    blocks: dict[str, _Block] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, int] = field(
        default_factory=lambda: {"start": 0, "part": 0, "end": 0, "full": 0})
    vmdesc_size: int | None = None
    vmdesc: dict[str, Any] | None = None
    colo_enabled: bool = False
    checkpoints: list[_Checkpoint] = field(default_factory=list)
    pages: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    _current: _Checkpoint | None = None

    def feed(self, ev: Event) -> None:
        """Account for one event."""
        if isinstance(ev, RamRecords):
            self._records(ev)
        elif isinstance(ev, RamXbzrle):
            blk = self.blocks[ev.block]
            blk.xbzrle_records += 1
            blk.pages_map[ev.offset // self.page_size] = _SEEN_PAGE
            if self._current is not None:
                self._current.xbzrle_records += 1
            if self.keep_pages:
                self._page(ev.block, ev.offset, "xbzrle")
        elif isinstance(ev, Header):
            self.version = ev.version
        elif isinstance(ev, Configuration):
            self.machine_type = ev.machine_type
            self.capabilities = ev.capabilities
            if ev.target_page_bits:
                self.page_size = 1 << ev.target_page_bits
        elif isinstance(ev, RamMemSize):
            for b in ev.blocks:
                self.blocks[b.idstr] = _Block(
                    b.idstr, b.used_length, b.gpa, bytearray(b.used_length // self.page_size))
        elif isinstance(ev, SectionStart):
            self.sections["start"] += 1
        elif isinstance(ev, SectionPart):
            self.sections["part"] += 1
        elif isinstance(ev, SectionEnd):
            self.sections["end"] += 1
        elif isinstance(ev, DeviceSection):
            self.sections["full"] += 1
            self.devices.append(_device(ev))
        elif isinstance(ev, CommandSection):
            try:
                name = Command(ev.command).name
            except ValueError:
                name = str(ev.command)
            self.commands.append({"command": name, "length": len(ev.data)})
            if ev.command == Command.ENABLE_COLO:
                self.colo_enabled = True
        elif isinstance(ev, VmDescription):
            self.vmdesc_size = len(ev.json_bytes)
            try:
                self.vmdesc = ev.parsed()
            except ValueError:
                self.vmdesc = None
            if not self.colo_enabled:
                self.complete = True
        elif isinstance(ev, ColoMessageEvent):
            if ev.message.name == "CHECKPOINT_REQUEST":
                self._current = _Checkpoint(len(self.checkpoints) + 1)
        elif isinstance(ev, ColoVmstate):
            cp = self._current or _Checkpoint(len(self.checkpoints) + 1)
            cp.devices = len(ev.sections)
            cp.device_state_size = sum(len(device_section_bytes(s)) for s in ev.sections) + 1
            self.checkpoints.append(cp)
            self._current = None
        elif type(ev).__name__ == "EndOfStream":
            self.complete = True

    def _records(self, ev: RamRecords) -> None:
        ps = self.page_size
        blocks = self.blocks
        cur = self._current
        last_name = None
        blk: _Block | None = None
        pmap = bytearray()
        pages = zeros = 0
        for flags, offset, name, _pos in ev.records:
            if name is not last_name:
                if blk is not None:
                    blk.page_records += pages
                    blk.zero_records += zeros
                    pages = zeros = 0
                blk = blocks[name]
                pmap = blk.pages_map
                last_name = name
            if flags & RamFlag.PAGE:
                pmap[offset // ps] = _SEEN_PAGE
                pages += 1
            else:
                pmap[offset // ps] = _SEEN_ZERO
                zeros += 1
            if self.keep_pages:
                self._page(name, offset, "page" if flags & RamFlag.PAGE else "zero")
        if blk is not None:
            blk.page_records += pages
            blk.zero_records += zeros
        if cur is not None:
            for flags, *_ in ev.records:
                if flags & RamFlag.PAGE:
                    cur.page_records += 1
                else:
                    cur.zero_records += 1

    def _page(self, block: str, offset: int, kind: str) -> None:
        entry: dict[str, Any] = {"block": block, "offset": offset, "kind": kind}
        if self._current is not None:
            entry["checkpoint"] = self._current.index
        self.pages.append(entry)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready summary."""
        ram_blocks = []
        for b in self.blocks.values():
            ram_blocks.append({
                "id": b.idstr,
                "length": b.length,
                "pages": b.pages_map.count(_SEEN_PAGE),
                "zero_pages": b.pages_map.count(_SEEN_ZERO),
                "page_records": b.page_records,
                "zero_records": b.zero_records,
                "xbzrle_records": b.xbzrle_records,
                "gpa": b.gpa,
            })
        doc: dict[str, Any] = {
            "version": self.version,
            "machine_type": self.machine_type,
            "capabilities": list(self.capabilities),
            "page_size": self.page_size,
            "ram_blocks": ram_blocks,
            "devices": self.devices,
            "sections": self.sections,
            "commands": self.commands,
            "vmdesc_size": self.vmdesc_size,
            "colo": self.colo_enabled,
            "colo_checkpoints": len(self.checkpoints),
            "checkpoints": [cp.__dict__ for cp in self.checkpoints],
            "complete": self.complete,
        }
        if self.keep_pages:
            doc["pages"] = self.pages
        return doc


def _device(ev: DeviceSection) -> dict[str, Any]:
    return {"name": ev.idstr, "instance": ev.instance_id, "size": len(ev.payload),
            "version": ev.version_id, "section_id": ev.section_id}
