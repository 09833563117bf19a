"""XBZRLE page encoding (migration/xbzrle.c): runs of unchanged bytes and literal new bytes.

Encoded data is a sequence of (uleb128 zero-run, uleb128 nonzero-run, nonzero-run bytes);
run lengths are "small" uleb128 (at most two bytes). The literal bytes are the page's new
bytes, written over its previous contents.
"""

from __future__ import annotations


def _uleb_small(src: bytes, i: int) -> tuple[int, int]:
    b0 = src[i]
    if b0 < 0x80:
        return b0, 1
    if i + 1 >= len(src):
        raise ValueError("truncated uleb128")
    b1 = src[i + 1]
    if b1 >= 0x80:
        raise ValueError("uleb128 longer than two bytes")
    return (b0 & 0x7F) | (b1 << 7), 2


def xbzrle_runs(src: bytes, page_size: int) -> list[tuple[int, bytes]]:
    """Decode to (destination offset, literal bytes) runs, validating like QEMU.

    Raises ValueError when the encoding is malformed or writes past ``page_size``.
    """
    i = d = 0
    runs: list[tuple[int, bytes]] = []
    slen = len(src)
    while i < slen:
        if slen - i < 2:
            raise ValueError("truncated zero run")
        count, n = _uleb_small(src, i)
        if i and not count:
            raise ValueError("empty zero run")
        i += n
        d += count
        if d > page_size:
            raise ValueError("zero run past the page")
        if slen - i < 2:
            raise ValueError("truncated literal run")
        count, n = _uleb_small(src, i)
        if not count:
            raise ValueError("empty literal run")
        i += n
        if d + count > page_size or i + count > slen:
            raise ValueError("literal run past the page or the data")
        runs.append((d, src[i : i + count]))
        d += count
        i += count
    return runs


def xbzrle_apply(page: bytearray | memoryview, src: bytes) -> None:
    """Apply an encoded XBZRLE page onto ``page`` (its previous contents) in place."""
    for off, lit in xbzrle_runs(src, len(page)):
        page[off : off + len(lit)] = lit


def _uleb_encode(v: int) -> bytes:
    if v < 0x80:
        return bytes([v])
    return bytes([(v & 0x7F) | 0x80, v >> 7])


def xbzrle_encode(old: bytes, new: bytes) -> bytes:
    """Encode ``new`` against ``old`` (for tests and synthetic streams)."""
    out = bytearray()
    i, n = 0, len(new)
    while i < n:
        z = i
        while i < n and old[i] == new[i]:
            i += 1
        if i == n:
            break
        zrun = i - z
        nz = i
        while i < n and old[i] != new[i]:
            i += 1
        out += _uleb_encode(zrun) + _uleb_encode(i - nz) + new[nz:i]
    return bytes(out)
