"""Events of the migration-stream codec: what the parser yields and the writer consumes.

Every event is a frozen, slotted dataclass. Together the events of a stream carry every byte
of it, so writing them back gives the input byte for byte. RAM page data is not copied into
per-page objects: a :class:`RamRecords` batch refers into the immutable input chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .constants import ColoMessage, RamFlag

# A RAM record inside a batch: (flags, offset, block idstr, payload position in ``data``).
# ``flags`` are the raw low header bits (ZERO or PAGE, maybe with CONTINUE); the payload is
# one fill byte for ZERO and ``page_size`` bytes for PAGE.
RamRecord = tuple[int, int, str, int]


@dataclass(frozen=True, slots=True)
class Header:
    """The stream header: magic and version (always 3 for QEMU 7.2)."""

    version: int


@dataclass(frozen=True, slots=True)
class Subsection:
    """A vmstate subsection: ``0x05``, name, be32 version, then ``payload``."""

    name: str
    version: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Configuration:
    """The configuration section: machine type and its subsections."""

    machine_type: str
    subsections: tuple[Subsection, ...] = ()

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Migration capabilities listed in ``configuration/capabilities``."""
        for sub in self.subsections:
            if sub.name == "configuration/capabilities":
                return decode_capabilities(sub.payload)
        return ()

    @property
    def target_page_bits(self) -> int | None:
        """Page bits when the stream states them (only when not the target default)."""
        for sub in self.subsections:
            if sub.name == "configuration/target-page-bits":
                return int.from_bytes(sub.payload, "big")
        return None


def decode_capabilities(payload: bytes) -> tuple[str, ...]:
    """Decode the payload of ``configuration/capabilities`` (be32 count, then len+name)."""
    count = int.from_bytes(payload[:4], "big")
    caps = []
    pos = 4
    for _ in range(count):
        n = payload[pos]
        caps.append(payload[pos + 1 : pos + 1 + n].decode("ascii"))
        pos += 1 + n
    return tuple(caps)


def encode_capabilities(caps: tuple[str, ...]) -> bytes:
    """Inverse of :func:`decode_capabilities`."""
    out = bytearray(len(caps).to_bytes(4, "big"))
    for cap in caps:
        raw = cap.encode("ascii")
        out.append(len(raw))
        out += raw
    return bytes(out)


@dataclass(frozen=True, slots=True)
class SectionStart:
    """SECTION_START (iterable section, e.g. ``ram``) header."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart:
    """SECTION_PART header of an iterable section."""

    section_id: int
    idstr: str


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """SECTION_END header of an iterable section."""

    section_id: int
    idstr: str


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """QEMU_VM_SECTION_FOOTER with the id of the section it closes."""

    section_id: int


@dataclass(frozen=True, slots=True)
class RamBlockDecl:
    """One RAM block as announced in the RAM setup record."""

    idstr: str
    used_length: int
    gpa: int | None = None  # present when x-ignore-shared is on


@dataclass(frozen=True, slots=True)
class RamMemSize:
    """RAM_SAVE_FLAG_MEM_SIZE record: total bytes and the block list."""

    total: int
    blocks: tuple[RamBlockDecl, ...]


@dataclass(frozen=True, slots=True, eq=False)
class RamRecords:
    """A batch of ZERO/PAGE records whose payloads lie in ``data``.

    ``data`` is immutable input (bytes, or a memoryview over bytes); ``records`` are
    :data:`RamRecord` tuples in stream order.
    """

    section_id: int
    data: bytes | memoryview
    records: list[RamRecord]
    page_size: int

    def payload(self, record: RamRecord) -> bytes:
        """The payload bytes of one record (fill byte for ZERO, page for PAGE)."""
        flags, _off, _blk, pos = record
        n = self.page_size if flags & RamFlag.PAGE else 1
        return bytes(self.data[pos : pos + n])

    def iter_pages(self) -> Iterator[tuple[str, int, bool, bytes]]:
        """Yield (block, offset, is_zero, bytes-or-fill) per record; slow, for tools."""
        for rec in self.records:
            yield rec[2], rec[1], not (rec[0] & RamFlag.PAGE), self.payload(rec)


@dataclass(frozen=True, slots=True)
class RamXbzrle:
    """An XBZRLE-encoded page (decoded against the page's previous contents)."""

    section_id: int
    flags: int
    block: str
    offset: int
    encoded: bytes


@dataclass(frozen=True, slots=True)
class RamEos:
    """End of a RAM section's records (RAM_SAVE_FLAG_EOS)."""

    section_id: int


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """A SECTION_FULL device state section; ``payload`` is opaque vmstate bytes."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    payload: bytes
    footer: bool = True


@dataclass(frozen=True, slots=True)
class CommandSection:
    """QEMU_VM_COMMAND: be16 command, be16 length, data."""

    command: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    """QEMU_VM_EOF: end of a stream (or of a COLO checkpoint's RAM or device part)."""


@dataclass(frozen=True, slots=True)
class VmDescription:
    """QEMU_VM_VMDESCRIPTION: JSON describing every device field of the stream."""

    json_bytes: bytes = field(repr=False)

    def parsed(self) -> dict[str, Any]:
        """The JSON document (raises ValueError when it is not JSON)."""
        doc = json.loads(self.json_bytes)
        if not isinstance(doc, dict):
            raise ValueError("vmdesc is not a JSON object")
        return doc


@dataclass(frozen=True, slots=True)
class ColoMessageEvent:
    """A COLO message; ``value`` is set for VMSTATE_SIZE."""

    message: ColoMessage
    value: int | None = None


@dataclass(frozen=True, slots=True)
class ColoVmstate:
    """The device state of one COLO checkpoint (``size`` bytes after VMSTATE_SIZE).

    ``data`` is those bytes as sent (the sections, then the EOF byte), for a consumer that
    keeps the blob whole instead of writing the sections back out; it is what the sections
    say, so it takes no part in comparisons.
    """

    checkpoint: int
    sections: tuple[DeviceSection, ...]
    data: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The input ended at a point where the stream may end."""


Event = (
    Header
    | Configuration
    | SectionStart
    | SectionPart
    | SectionEnd
    | SectionFooter
    | RamMemSize
    | RamRecords
    | RamXbzrle
    | RamEos
    | DeviceSection
    | CommandSection
    | Eof
    | VmDescription
    | ColoMessageEvent
    | ColoVmstate
    | EndOfStream
)


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` when more bytes are needed.
NEED_DATA = _NeedData()
