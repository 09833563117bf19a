"""Pure-Python twin (and specification) of the RAM-record hot loop.

``scan_records`` decodes as many consecutive ZERO/PAGE records as it can from ``data``
starting at ``pos``. It never raises on peer data: anything it does not handle on the fast
path (EOS, MEM_SIZE, XBZRLE, unknown flags, an unknown block, an offset past the block) makes
it stop *before* that record with status ``SPECIAL`` so that the parser's slow path decodes
or rejects it with a precise error. ``apply_records`` writes decoded records into RAM images.
"""

from __future__ import annotations

from collections.abc import Mapping

Buffer = bytes | bytearray | memoryview

NEED_DATA = 0
SPECIAL = 1
LIMIT = 2

_ZERO = 0x02
_PAGE = 0x08
_CONT = 0x20

# (idstr, used_length) of the block a CONTINUE record refers to.
Block = tuple[str, int]


def scan_records(
    data: Buffer,
    pos: int,
    end: int,
    page_size: int,
    block: Block | None,
    blocks: Mapping[bytes, Block],
    max_records: int,
) -> tuple[int, Block | None, list[tuple[int, int, str, int]], int]:
    """Decode ZERO/PAGE records in ``data[pos:end]``.

    Returns ``(new_pos, block, records, status)``: records are
    ``(flags, offset, idstr, payload_pos)``; status says why it stopped: ``NEED_DATA`` (the
    record at ``new_pos`` is incomplete), ``SPECIAL`` (the record at ``new_pos`` needs the
    slow path) or ``LIMIT`` (``max_records`` decoded). Raises nothing for bad input.
    """
    mv = memoryview(data)
    records: list[tuple[int, int, str, int]] = []
    mask = page_size - 1
    while len(records) < max_records:
        if end - pos < 8:
            return pos, block, records, NEED_DATA
        hdr = int.from_bytes(mv[pos : pos + 8], "big")
        flags = hdr & mask
        offset = hdr - flags
        kind = flags & ~_CONT
        if kind == _PAGE:
            plen = page_size
        elif kind == _ZERO:
            plen = 1
        else:
            return pos, block, records, SPECIAL
        p = pos + 8
        cur = block
        if not flags & _CONT:
            if p >= end:
                return pos, block, records, NEED_DATA
            n = mv[p]
            if end - p < 1 + n:
                return pos, block, records, NEED_DATA
            cur = blocks.get(bytes(mv[p + 1 : p + 1 + n]))
            if cur is None:
                return pos, block, records, SPECIAL
            p += 1 + n
        elif cur is None:
            return pos, block, records, SPECIAL
        if offset + page_size > cur[1]:
            return pos, block, records, SPECIAL
        if end - p < plen:
            return pos, block, records, NEED_DATA
        records.append((flags, offset, cur[0], p))
        pos = p + plen
        block = cur
    return pos, block, records, LIMIT


def apply_records(
    data: Buffer,
    records: list[tuple[int, int, str, int]],
    page_size: int,
    targets: Mapping[str, Buffer],
) -> tuple[int, int]:
    """Write records into ``targets[idstr]`` (writable buffers of the block's length).

    Records of blocks absent from ``targets`` are skipped. Returns (pages, zero pages)
    written. Offsets were bounded by ``scan_records``; a target shorter than its block
    raises ValueError.
    """
    src = memoryview(data)
    views: dict[str, memoryview] = {}
    pages = zeros = 0
    for flags, offset, name, pos in records:
        view = views.get(name)
        if view is None:
            target = targets.get(name)
            if target is None:
                continue
            view = views[name] = memoryview(target).cast("B")
        if offset + page_size > len(view):
            raise ValueError(f"target for block {name!r} is shorter than offset {offset}")
        if flags & _PAGE:
            view[offset : offset + page_size] = src[pos : pos + page_size]
            pages += 1
        else:
            view[offset : offset + page_size] = bytes([src[pos]]) * page_size
            zeros += 1
    return pages, zeros
