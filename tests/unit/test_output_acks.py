"""ACK thinning (qmpshadow.output.acks): byte-level cases and properties."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from qmpshadow.output.acks import pure_ack, thin_acks

MAC = b"\x52\x54\x00\x12\x34\x56" + b"\x02\x00\x00\x00\x00\x01"
GUEST4, PEER4 = bytes([10, 77, 0, 2]), bytes([10, 77, 0, 1])
GUEST6, PEER6 = bytes(15) + b"\x02", bytes(15) + b"\x01"
ACK, FIN, SYN, RST, PSH, URG, ECE, CWR = 0x10, 0x01, 0x02, 0x04, 0x08, 0x20, 0x40, 0x80
TS = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: what Linux puts on every ACK


def tcp(ack: int, *, flags: int = ACK, sport: int = 5002, dport: int = 40000,
        opts: bytes = TS, payload: bytes = b"") -> bytes:
    assert len(opts) % 4 == 0
    off = (20 + len(opts)) // 4
    return struct.pack(">HHIIBBHHH", sport, dport, 1000, ack & 0xFFFFFFFF, off << 4, flags,
                       8192, 0, 0) + opts + payload


def v4(seg: bytes, *, frag: int = 0x4000, proto: int = 6, ihl: int = 5,
       pad: int = 0, src: bytes = GUEST4) -> bytes:
    hdr = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(seg), 1, frag, 64,
                      proto, 0, src, PEER4) + bytes(4 * ihl - 20)
    return MAC + b"\x08\x00" + hdr + seg + bytes(pad)


def v6(seg: bytes, *, nxt: int = 6) -> bytes:
    hdr = struct.pack(">IHBB16s16s", 6 << 28, len(seg), nxt, 64, GUEST6, PEER6)
    return MAC + b"\x86\xdd" + hdr + seg


def vlan(frame: bytes) -> bytes:
    return frame[:12] + b"\x81\x00\x00\x05" + frame[12:]


def test_pure_acks_of_one_flow_keep_only_the_newest() -> None:
    frames = [v4(tcp(100)), v4(tcp(200)), v4(tcp(300))]
    out, dropped = thin_acks(frames)
    assert out == [frames[2]] and dropped == 2


def test_ipv6_and_vlan_and_ethernet_padding() -> None:
    for make in (lambda a: v6(tcp(a)), lambda a: vlan(v4(tcp(a))),
                 lambda a: v4(tcp(a), pad=6)):  # a 54-byte ACK padded to 60 on the wire
        frames = [make(1), make(2)]
        assert pure_ack(frames[0]) is not None
        assert thin_acks(frames) == ([frames[1]], 1)


def test_flows_are_apart() -> None:
    a1, b1, a2 = v4(tcp(10)), v4(tcp(10, dport=40001)), v4(tcp(20))
    other_host = v4(tcp(5), src=bytes([10, 77, 0, 3]))
    out, dropped = thin_acks([a1, b1, other_host, a2])
    assert out == [b1, other_host, a2] and dropped == 1


def test_what_is_always_kept() -> None:
    newest = v4(tcp(10**6))
    kept = [
        v4(tcp(1, payload=b"data")),                   # data
        v4(tcp(2, flags=ACK | PSH, payload=b"x")),
        v4(tcp(3, flags=ACK | FIN)), v4(tcp(4, flags=ACK | SYN)),
        v4(tcp(5, flags=ACK | RST)), v4(tcp(6, flags=ACK | URG)),
        v4(tcp(7, flags=ACK | ECE)), v4(tcp(8, flags=ACK | CWR)),  # congestion signals
        v4(tcp(9, flags=0)),                            # no ACK flag
        v4(tcp(10, opts=b"\x01\x01\x05\x0a" + bytes(8))),  # a SACK block: loss news
        v4(tcp(11), frag=0x2000), v4(tcp(12), frag=0x0001),  # fragments
        v4(tcp(13), ihl=6),                             # IP options
        v4(tcp(14), proto=17),                          # not TCP
        v6(tcp(15), nxt=0),                             # an IPv6 extension header
        v4(tcp(16))[:-4],                               # truncated
        v4(tcp(17, opts=b"\x01\x01\x03\x00")),         # an option of length 0
        v4(tcp(18, opts=b"\x01\x01\x03\x08")),         # an option past the header
        MAC + b"\x08\x06" + bytes(28),                  # ARP
        b"\x00" * 10,                                   # not even Ethernet
    ]
    for f in kept:
        assert pure_ack(f) is None, f.hex()
    out, dropped = thin_acks([*kept, newest])
    assert out == [*kept, newest] and dropped == 0


def test_a_repeated_ack_number_is_a_duplicate_ack_and_stays() -> None:
    frames = [v4(tcp(100)), v4(tcp(100)), v4(tcp(100))]
    assert thin_acks(frames) == (frames, 0)
    # ... but an older one before them goes
    out, dropped = thin_acks([v4(tcp(50)), *frames])
    assert out == frames and dropped == 1


def test_a_later_smaller_ack_does_not_stand_for_an_earlier_larger_one() -> None:
    frames = [v4(tcp(300)), v4(tcp(200))]  # reordered by the guest? keep both
    assert thin_acks(frames) == (frames, 0)


def test_sequence_numbers_wrap() -> None:
    frames = [v4(tcp(0xFFFFFF00)), v4(tcp(0x10))]
    assert thin_acks(frames) == ([frames[1]], 1)


def test_one_or_no_ack_is_returned_as_is() -> None:
    data = [v4(tcp(1, payload=b"x"))]
    assert thin_acks(data) == (data, 0)
    assert thin_acks([]) == ([], 0)


_frame = st.one_of(
    st.builds(lambda a, p, f, port: v4(tcp(a, flags=f, payload=p, dport=port)),
              st.integers(0, 2**32 - 1), st.sampled_from([b"", b"", b"", b"d"]),
              st.sampled_from([ACK, ACK, ACK, ACK | FIN, ACK | ECE]),
              st.sampled_from([40000, 40001])),
    st.builds(lambda a: v6(tcp(a)), st.integers(0, 2**32 - 1)),
    st.binary(max_size=80),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_frame, max_size=30))
def test_properties(frames: list[bytes]) -> None:
    out, dropped = thin_acks(frames)
    assert len(out) + dropped == len(frames)
    # a subsequence, in order
    it = iter(frames)
    assert all(any(x is y for y in it) for x in out)
    kept_ids = {id(x) for x in out}
    last: dict[object, bytes] = {}
    for f in frames:
        p = pure_ack(f)
        if p is None:
            assert id(f) in kept_ids  # only pure ACKs are ever dropped
        else:
            last[p[0]] = f
    for f in last.values():
        assert id(f) in kept_ids  # each flow's last pure ACK always goes out
    for i, f in enumerate(frames):
        p = pure_ack(f)
        if p is not None and id(f) not in kept_ids:  # dropped: a later kept one acks more
            assert any((q := pure_ack(g)) is not None and q[0] == p[0]
                       and 0 < (q[1] - p[1]) % 2**32 < 2**31
                       for g in frames[i + 1:] if id(g) in kept_ids)
