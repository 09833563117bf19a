"""Sans-I/O: thin the pure TCP ACKs of one release (RFC 3449 §5.2.2, ACK filtering).

Output commit holds the guest's frames until their epoch commits and then releases them
all at once, so a flow's held ACKs reach its peer within the same instant: the earlier of
two cumulative ACKs tells the peer nothing the later one does not. Releasing them all is
not harmless, though. A Linux peer's CUBIC samples the RTT of the first 8 ACKs of each
round trip (HyStart) and leaves slow start when their minimum rises a few ms above the
lowest it has seen; a held flow's RTT is the epoch cycle, which moves by that much from
epoch to epoch, so the peer left slow start at 100–320 segments in about 1 run in 4 of
``bench/output_commit.py`` (docs/output-commit.md). With one ACK per flow per release, a
round trip holds fewer than 8 samples and the test never fires.

:func:`thin_acks` drops an ACK only when a later frame of the same release and flow is
also a pure ACK that acknowledges strictly more. Kept, always: anything with payload,
SYN/FIN/RST/URG or ECN flags (ECE/CWR carry congestion signals), SACK options or a
repeated ACK number (duplicate ACKs are the peer's loss signal), IP fragments and IP
options, and every frame that is not plain IPv4/IPv6 TCP over Ethernet (optionally one
802.1Q tag). A frame this module cannot fully parse is kept, never dropped.
"""

from __future__ import annotations

import struct

_ETH_IPV4 = 0x0800
_ETH_IPV6 = 0x86DD
_ETH_VLAN = (0x8100, 0x88A8)
_PROTO_TCP = 6
# FIN SYN RST PSH ACK URG ECE CWR = 0x01 0x02 0x04 0x08 0x10 0x20 0x40 0x80
_ACK = 0x10
_NOT_PURE = 0x01 | 0x02 | 0x04 | 0x20 | 0x40 | 0x80
_OPT_EOL, _OPT_NOP, _OPT_SACK = 0, 1, 5
# the longest pure ACK: Ethernet + 802.1Q + IPv6 + TCP with 40 bytes of options; anything
# longer carries payload (or headers this module does not follow) and is skipped unparsed
_MAX_PURE_ACK = 14 + 4 + 40 + 60
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

FlowKey = tuple[bytes, bytes, int, int]


def pure_ack(frame: bytes) -> tuple[FlowKey, int] | None:
    """``(flow, ack number)`` when ``frame`` is a pure cumulative TCP ACK that a later,
    larger one may stand for; None otherwise (including anything unparsable)."""
    n = len(frame)
    if n < 14 or n > _MAX_PURE_ACK:
        return None
    (etype,) = _U16.unpack_from(frame, 12)
    off = 14
    if etype in _ETH_VLAN:
        if n < 18:
            return None
        (etype,) = _U16.unpack_from(frame, 16)
        off = 18
    if etype == _ETH_IPV4:
        if n < off + 20 or frame[off] != 0x45:  # version 4, no IP options
            return None
        (total,) = _U16.unpack_from(frame, off + 2)
        (frag,) = _U16.unpack_from(frame, off + 6)
        if frame[off + 9] != _PROTO_TCP or frag & 0x3FFF or total < 20 or off + total > n:
            return None  # not TCP, a fragment (MF or an offset), or a truncated packet
        src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
        tcp, end = off + 20, off + total
    elif etype == _ETH_IPV6:
        if n < off + 40 or frame[off] >> 4 != 6 or frame[off + 6] != _PROTO_TCP:
            return None  # extension headers are not followed
        (plen,) = _U16.unpack_from(frame, off + 4)
        src, dst = frame[off + 8:off + 24], frame[off + 24:off + 40]
        tcp, end = off + 40, off + 40 + plen
        if end > n:
            return None
    else:
        return None
    if end - tcp < 20:
        return None
    hlen = (frame[tcp + 12] >> 4) * 4
    flags = frame[tcp + 13]
    if hlen < 20 or tcp + hlen != end or not flags & _ACK or flags & _NOT_PURE:
        return None  # payload (or a bad header length), no ACK, or a flag to keep
    if not _options_ok(frame, tcp + 20, end):
        return None
    (sport,) = _U16.unpack_from(frame, tcp)
    (dport,) = _U16.unpack_from(frame, tcp + 2)
    (ack,) = _U32.unpack_from(frame, tcp + 8)
    return (src, dst, sport, dport), ack


def _options_ok(frame: bytes, pos: int, end: int) -> bool:
    """The options parse and carry no SACK block."""
    while pos < end:
        kind = frame[pos]
        if kind == _OPT_EOL:
            return True
        if kind == _OPT_NOP:
            pos += 1
            continue
        if kind == _OPT_SACK or pos + 1 >= end:
            return False
        length = frame[pos + 1]
        if length < 2 or pos + length > end:
            return False
        pos += length
    return True


def _after(a: int, b: int) -> bool:
    """TCP sequence order: ``a`` is after ``b`` (mod 2**32)."""
    return 0 < (a - b) & 0xFFFFFFFF < 0x80000000


def thin_acks(frames: list[bytes]) -> tuple[list[bytes], int]:
    """The frames of one release without the pure ACKs a later one stands for, in order;
    and how many were dropped. Never raises: a frame it cannot parse is kept."""
    parsed = [pure_ack(f) for f in frames]
    if sum(p is not None for p in parsed) < 2:
        return frames, 0
    # walk backwards: a pure ACK is dropped when a later pure ACK of its flow acks more
    newest: dict[FlowKey, int] = {}
    keep = [True] * len(frames)
    for i in range(len(frames) - 1, -1, -1):
        p = parsed[i]
        if p is None:
            continue
        flow, ack = p
        later = newest.get(flow)
        if later is not None and _after(later, ack):
            keep[i] = False
        else:
            newest[flow] = ack
    dropped = keep.count(False)
    if not dropped:
        return frames, 0
    return [f for f, k in zip(frames, keep, strict=True) if k], dropped
