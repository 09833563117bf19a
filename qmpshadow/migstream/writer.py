"""Events back to bytes: the inverse of :mod:`.parser`, byte for byte.

:class:`StreamWriter` keeps the little state the format needs (section names for footers
are explicit events; RAM records carry their CONTINUE flag), so ``write(parse(x)) == x``.
It is also how qmpshadow composes streams of its own (e.g. promotion streams).
"""

from __future__ import annotations

from collections.abc import Iterable

from .constants import QEMU_VM_FILE_MAGIC, RamFlag, SectionType
from .events import (
    ColoMessageEvent,
    ColoVmstate,
    CommandSection,
    Configuration,
    DeviceSection,
    EndOfStream,
    Eof,
    Event,
    Header,
    RamEos,
    RamMemSize,
    RamRecords,
    RamXbzrle,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    VmDescription,
)


def _be(v: int, n: int) -> bytes:
    return v.to_bytes(n, "big")


def _name(s: str) -> bytes:
    raw = s.encode("ascii")
    if not 0 < len(raw) < 256:
        raise ValueError(f"name {s!r} must be 1..255 ASCII bytes")
    return bytes([len(raw)]) + raw


def device_section_bytes(sec: DeviceSection) -> bytes:
    """A SECTION_FULL device section with header and (when set) footer."""
    out = (
        bytes([SectionType.FULL]) + _be(sec.section_id, 4) + _name(sec.idstr)
        + _be(sec.instance_id, 4) + _be(sec.version_id, 4) + sec.payload
    )
    if sec.footer:
        out += bytes([SectionType.FOOTER]) + _be(sec.section_id, 4)
    return out


class StreamWriter:
    """Serialize events; ``ignore_shared`` decides whether block declarations carry a GPA."""

    def __init__(self, *, ignore_shared: bool | None = None) -> None:
        self.ignore_shared = ignore_shared

    def write(self, ev: Event) -> bytes:
        """Bytes of one event. Raises ValueError for an event that cannot be written."""
        if isinstance(ev, RamRecords):
            return self._records(ev)
        if isinstance(ev, Header):
            return _be(QEMU_VM_FILE_MAGIC, 4) + _be(ev.version, 4)
        if isinstance(ev, Configuration):
            if self.ignore_shared is None:
                self.ignore_shared = "x-ignore-shared" in ev.capabilities
            machine = ev.machine_type.encode("ascii")
            out = bytearray([SectionType.CONFIGURATION]) + _be(len(machine), 4) + machine
            for sub in ev.subsections:
                out += bytes([SectionType.SUBSECTION]) + _name(sub.name)
                out += _be(sub.version, 4) + sub.payload
            return bytes(out)
        if isinstance(ev, SectionStart):
            return (bytes([SectionType.START]) + _be(ev.section_id, 4) + _name(ev.idstr)
                    + _be(ev.instance_id, 4) + _be(ev.version_id, 4))
        if isinstance(ev, SectionPart):
            return bytes([SectionType.PART]) + _be(ev.section_id, 4)
        if isinstance(ev, SectionEnd):
            return bytes([SectionType.END]) + _be(ev.section_id, 4)
        if isinstance(ev, SectionFooter):
            return bytes([SectionType.FOOTER]) + _be(ev.section_id, 4)
        if isinstance(ev, RamMemSize):
            out = bytearray(_be(ev.total | RamFlag.MEM_SIZE, 8))
            for b in ev.blocks:
                out += _name(b.idstr) + _be(b.used_length, 8)
                if self.ignore_shared:
                    if b.gpa is None:
                        raise ValueError(f"block {b.idstr!r} needs a GPA with x-ignore-shared")
                    out += _be(b.gpa, 8)
            return bytes(out)
        if isinstance(ev, RamXbzrle):
            out = bytearray(_be(ev.offset | ev.flags, 8))
            if not ev.flags & RamFlag.CONTINUE:
                out += _name(ev.block)
            out += b"\x01" + _be(len(ev.encoded), 2) + ev.encoded
            return bytes(out)
        if isinstance(ev, RamEos):
            return _be(RamFlag.EOS, 8)
        if isinstance(ev, DeviceSection):
            return device_section_bytes(ev)
        if isinstance(ev, CommandSection):
            return (bytes([SectionType.COMMAND]) + _be(ev.command, 2) + _be(len(ev.data), 2)
                    + ev.data)
        if isinstance(ev, Eof):
            return bytes([SectionType.EOF])
        if isinstance(ev, VmDescription):
            return bytes([SectionType.VMDESCRIPTION]) + _be(len(ev.json_bytes), 4) + ev.json_bytes
        if isinstance(ev, ColoMessageEvent):
            msg = _be(int(ev.message), 4)
            return msg if ev.value is None else msg + _be(ev.value, 8)
        if isinstance(ev, ColoVmstate):
            return b"".join(device_section_bytes(s) for s in ev.sections) + bytes(
                [SectionType.EOF])
        if isinstance(ev, EndOfStream):
            return b""
        raise ValueError(f"cannot write event {ev!r}")

    def _records(self, ev: RamRecords) -> bytes:
        out = bytearray()
        data = ev.data
        ps = ev.page_size
        for flags, offset, block, pos in ev.records:
            out += _be(offset | flags, 8)
            if not flags & RamFlag.CONTINUE:
                out += _name(block)
            out += data[pos : pos + (ps if flags & RamFlag.PAGE else 1)]
        return bytes(out)

    def write_all(self, events: Iterable[Event]) -> bytes:
        """Concatenated bytes of ``events``."""
        return b"".join(self.write(ev) for ev in events)


def colo_vmstate_size(ev: ColoVmstate) -> int:
    """Byte size of a COLO checkpoint's device state as sent after VMSTATE_SIZE."""
    return len(StreamWriter().write(ev))
