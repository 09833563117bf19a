"""Output commit's sans-I/O cores: redirector framing, the release queue, the epoch policy;
and the NIC / output_commit keys of the VM spec with their QEMU arguments."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpshadow.errors import ConfigError
from qmpshadow.output import EpochPolicy, FrameDecoder, HoldQueue, encode_frames
from qmpshadow.output.core import MAX_FRAME, OutputFramingError
from qmpshadow.output.shell import _chardev_paths
from qmpshadow.qemu.argv import RunPaths, primary_argv, shadow_argv
from qmpshadow.qemu.spec import VmSpec

frames_st = st.lists(st.binary(min_size=1, max_size=1600), max_size=12)


@given(frames_st, st.integers(min_value=1, max_value=97))
def test_decoder_whole_and_split_at_every_chunk_size(frames: list[bytes], step: int) -> None:
    stream = b"".join(struct.pack(">I", len(f)) + f for f in frames)  # the redirector's
    assert encode_frames(frames) == stream
    whole = FrameDecoder()
    whole.receive_data(stream)
    assert whole.frames() == frames and whole.buffered == 0
    dec = FrameDecoder()
    got: list[bytes] = []
    for i in range(0, len(stream), step):
        dec.receive_data(stream[i : i + step])
        got += dec.frames()
    assert got == frames and dec.buffered == 0


def test_decoder_split_at_every_offset() -> None:
    frames = [b"\x01" * 60, b"abc", b"\xff" * 1514]
    stream = b"".join(encode_frames([f]) for f in frames)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        dec.receive_data(stream[:cut])
        first = dec.frames()
        dec.receive_data(stream[cut:])
        assert first + dec.frames() == frames


def test_decoder_bounds_the_length_and_skips_empty_frames() -> None:
    dec = FrameDecoder()
    dec.receive_data(struct.pack(">I", 0) + encode_frames([b"x"]))
    assert dec.frames() == [b"x"]
    dec.receive_data(struct.pack(">I", MAX_FRAME + 1) + b"\0" * 8)
    with pytest.raises(OutputFramingError) as err:
        dec.frames()
    assert err.value.offset == 9 and err.value.length == MAX_FRAME + 1
    assert "vnet_hdr" in str(err.value)
    with pytest.raises(OutputFramingError):
        encode_frames([b"\0" * (MAX_FRAME + 1)])
    with pytest.raises(OutputFramingError):
        encode_frames([b"x", b"\0" * (MAX_FRAME + 1)])


def test_hold_queue_releases_only_committed_epochs_in_order() -> None:
    q = HoldQueue()
    q.hold(b"a")
    q.hold(b"b")
    q.seal(1)
    q.hold(b"c")  # produced after cont of checkpoint 1: epoch 2
    assert q.commit(0) == []
    assert q.open_items == 1 and q.held_items == 3
    assert q.commit(1) == [b"a", b"b"]
    assert q.commit(1) == []  # an ack seen twice releases nothing twice
    q.seal(2)
    q.hold(b"d")
    q.seal(3)
    assert q.commit(3) == [b"c", b"d"]
    assert (q.released_items, q.released_bytes, q.held_items) == (4, 4, 0)


def test_hold_queue_drop_forgets_uncommitted_output() -> None:
    q = HoldQueue()
    q.hold(b"x")
    q.seal(5)
    q.hold(b"y")
    assert q.drop() == 2
    assert q.commit(10) == [] and q.dropped_items == 2 and q.held_bytes == 0


def test_hold_queue_retried_epoch_merges_and_empty_seals_are_free() -> None:
    q = HoldQueue()
    q.seal(1)  # nothing held: no entry
    q.hold(b"a")
    q.seal(2)
    q.hold(b"b")
    q.seal(2)  # a failed checkpoint retried under the same number
    assert q.commit(1) == []
    assert q.commit(2) == [b"a", b"b"]


@given(st.lists(st.tuples(st.sampled_from(["hold", "seal", "commit"]),
                          st.integers(min_value=0, max_value=6)), max_size=60))
def test_hold_queue_never_releases_early_or_twice(ops: list[tuple[str, int]]) -> None:
    """Model: every item is released at most once, in order, and only once an epoch
    at or above the one it was sealed into has committed."""
    q = HoldQueue()
    sealed_into: dict[bytes, int] = {}
    open_items: list[bytes] = []
    released: list[bytes] = []
    epoch = 0
    for i, (op, n) in enumerate(ops):
        if op == "hold":
            item = b"%d" % i
            q.hold(item)
            open_items.append(item)
        elif op == "seal":
            epoch += 1
            q.seal(epoch)
            for item in open_items:
                sealed_into[item] = epoch
            open_items.clear()
        else:
            upto = min(n, epoch)
            out = q.commit(upto)
            for item in out:
                assert item in sealed_into and sealed_into[item] <= upto
            released += out
    assert len(released) == len(set(released))
    assert released == sorted(released, key=lambda b: int(b))


def test_policy_shortens_at_once_and_lengthens_when_idle() -> None:
    p = EpochPolicy(20, 200, idle_epochs=2)
    assert p.adaptive and p.current_ms == 200
    assert p.next_ms(True) == 20
    assert p.next_ms(False) == 20
    assert p.next_ms(False) == 40
    assert [p.next_ms(False) for _ in range(6)] == [40, 80, 80, 160, 160, 200]
    assert p.next_ms(False) == 200
    assert p.next_ms(True) == 20
    assert (p.shortened, p.lengthened) == (2, 4)
    assert p.wake_after_ms(5.0) == 15.0 and p.wake_after_ms(50.0) == 0.0
    assert p.status() == {"epoch_ms": 20, "epoch_min_ms": 20, "epoch_max_ms": 200,
                          "adaptive": True}


def test_policy_fixed_and_invalid() -> None:
    p = EpochPolicy(50, 50)
    assert not p.adaptive
    assert {p.next_ms(a) for a in (True, False, False, False, False)} == {50}
    for lo, hi in ((0, 10), (30, 20)):
        with pytest.raises(ConfigError, match="min"):
            EpochPolicy(lo, hi)


NET_TOML = """
name = "oc"
output_commit = "on"
[memory]
size_mib = 64
backend = "file"
backend_id = "mem"
mem_path = "/dev/shm/oc.ram"
[[nics]]
id = "n0"
mac = "52:54:00:12:34:56"
ifname = "qsp0"
shadow_ifname = "qss0"
"""


def test_spec_nics_round_trip_and_argv_per_role() -> None:
    spec = VmSpec.from_toml_text(NET_TOML)
    assert spec.output_commit and spec.nics[0].model == "e1000"
    assert VmSpec.from_dict(spec.to_dict()) == spec
    run = RunPaths(Path("/run/qs/oc"))
    p = primary_argv(spec, run, accel="tcg")
    j = " ".join(p)
    assert "tap,id=n0,ifname=qsp0,script=no,downscript=no" in j
    assert "e1000,netdev=n0,mac=52:54:00:12:34:56" in j
    # the measured working chain: indev redirector (r2) created before the outdev one
    r2 = p.index("filter-redirector,id=oc-n0-in-r2,netdev=n0,queue=rx,indev=oc-n0-in")
    r1 = p.index("filter-redirector,id=oc-n0-out-r1,netdev=n0,queue=rx,outdev=oc-n0-out")
    assert r2 < r1
    assert "socket,id=serial0,path=/run/qs/oc/serial-oc.sock,server=on,wait=off" in p
    s = " ".join(shadow_argv(spec, run, accel="tcg", mem_path="/dev/shm/oc.shadow"))
    assert "ifname=qss0" in s and "filter-redirector" not in s
    assert "file,id=serial0,path=/run/qs/oc/serial.log" in s
    off = " ".join(primary_argv(spec.replace(output_commit=False), run, accel="tcg"))
    assert "filter-redirector" not in off and "file,id=serial0" in off


@pytest.mark.parametrize(("change", "match"), [
    ('output_commit = "maybe"', "output_commit"),
    ('[[nics]]\nid = "n1"\nmac = "01:00:00:00:00:01"\nifname = "a"\nshadow_ifname = "b"',
     "unicast"),
    ('[[nics]]\nid = "n1"\nmac = "52:54:00:00:00:01"\nifname = "a"\nshadow_ifname = "a"',
     "own tap"),
    ('[[nics]]\nid = "n0"\nmac = "52:54:00:00:00:01"\nifname = "a"\nshadow_ifname = "b"',
     "unique"),
    ('[[nics]]\nid = "n1"\nmac = "52:54:00:00:00:01"\nifname = "a"', "shadow_ifname"),
    ('[[nics]]\nid = "n1"\nmac = "52:54:00:00:00:01"\nifname = "a"\nshadow_ifname = "b"\n'
     'colour = "red"', "nics.colour"),
])
def test_spec_nic_errors_name_the_key(change: str, match: str) -> None:
    text = NET_TOML.replace('output_commit = "on"', "") + "\n" + change
    if change.startswith("output_commit"):
        text = change + "\n" + NET_TOML.replace('output_commit = "on"', "")
    with pytest.raises(ConfigError, match=match):
        VmSpec.from_toml_text(text)


def test_chardev_paths_from_query_chardev() -> None:
    info = [{"label": "oc-n0-out", "filename": "disconnected:unix:/r/oc-n0-out.sock,server=on"},
            {"label": "serial0", "filename": "unix:/r/serial-oc.sock,server=on"},
            {"label": "compat_monitor0", "filename": "stdio"}]
    assert _chardev_paths(info) == {"oc-n0-out": "/r/oc-n0-out.sock",
                                    "serial0": "/r/serial-oc.sock"}
