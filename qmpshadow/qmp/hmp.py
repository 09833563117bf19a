"""Parsers for HMP (human monitor) output that QMP has no structured equivalent for.

``info ramblock`` on QEMU 7.2 prints (lines end in CRLF)::

                  Block Name    PSize              Offset               Used              Total
                      pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
        /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000

Block names may contain '/', '@' and (in principle) spaces, so the parser anchors on the
numeric columns at the end of the line. Offset is the block's position in QEMU's
ram_addr_t space, not a guest-physical address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmpshadow.errors import QmpError

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}

_ROW = re.compile(
    r"^\s*(?P<name>\S(?:.*?\S)?)\s+"
    r"(?P<psize>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?\s+"
    r"(?:0x(?P<offset>[0-9a-fA-F]+)\s+)?"
    r"0x(?P<used>[0-9a-fA-F]+)\s+0x(?P<total>[0-9a-fA-F]+)\s*$"
)


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    """One RAMBlock: ``idstr`` (the name migration streams use), ``page_size`` in bytes,
    ``offset`` in ram_addr_t space (``None`` if the column is absent), ``used_length``
    and ``max_length`` in bytes."""

    idstr: str
    page_size: int
    offset: int | None
    used_length: int
    max_length: int


def parse_info_ramblock(text: str) -> list[RamBlockInfo]:
    """Parse the output of HMP ``info ramblock`` into blocks, in QEMU's order.

    Raises:
        QmpError: the text does not look like ``info ramblock`` output (no header, or a
            row that does not parse); the message quotes the offending line.
    """
    lines = [ln for ln in text.replace("\r", "").split("\n") if ln.strip()]
    if not lines or "Block Name" not in lines[0]:
        first = lines[0] if lines else ""
        raise QmpError(
            f"HMP 'info ramblock': expected a header line with 'Block Name', got {first!r}; "
            "this QEMU may print a different format (tested on 7.2)"
        )
    blocks: list[RamBlockInfo] = []
    for line in lines[1:]:
        m = _ROW.match(line)
        if m is None:
            raise QmpError(
                f"HMP 'info ramblock': expected '<name> <page size> <offset> <used> "
                f"<total>', got {line!r}; this QEMU may print a different format "
                "(tested on 7.2)"
            )
        unit = (m["unit"] or "").upper()
        if unit not in _UNITS:
            # "KB" style without the i: QEMU's size_to_str uses binary units anyway.
            unit = unit.replace("B", "IB") if unit else unit
        page_size = int(float(m["psize"]) * _UNITS.get(unit, 1))
        blocks.append(
            RamBlockInfo(
                idstr=m["name"],
                page_size=page_size,
                offset=int(m["offset"], 16) if m["offset"] is not None else None,
                used_length=int(m["used"], 16),
                max_length=int(m["total"], 16),
            )
        )
    return blocks
