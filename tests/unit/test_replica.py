"""Replica: journaled epochs over real files (no QEMU), recovery, misuse.

A small model VM (``FakeVm``) produces epochs the way a source agent would: EpochWriter
frames with page records from the page codec (ZERO/FULL/DELTA with a sender cache), small
blocks as SMALL_BLOCK frames, a device-state blob. They go through the frame decoder and
the epoch assembler into the replica, exactly as on the shadow agent.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash

from qmpshadow.errors import ConfigError, FencedFrameError, FrameError, FrameFormatError
from qmpshadow.frames import codec
from qmpshadow.frames.epoch import EpochAssembler, EpochComplete, EpochWriter
from qmpshadow.frames.wire import (
    BlockFlags,
    DeviceStateFormat,
    EpochBegin,
    Frame,
    FrameDecoder,
    Heartbeat,
    Pages,
    RamBlock,
    encode_frame,
)
from qmpshadow.shadow.errors import ReplicaCorruptError, ReplicaError
from qmpshadow.shadow.replica import (
    JOURNAL_FILE,
    STATE_FILE,
    STATE_SLOT,
    TRAILER_SIZE,
    RecoveryAction,
    Replica,
    StepHook,
)

PS = 4096
NPAGES = 96
SMALL_BLOCKS = (("pc.bios", 4), ("/rom@etc/acpi/tables", 2), ("pc.rom", 1))


@dataclass
class Snapshot:
    """What the replica must hold after an epoch: the reference built in memory."""

    epoch: int
    ram: bytes
    small: dict[str, bytes]
    device: bytes
    fmt: DeviceStateFormat


@dataclass
class FakeVm:
    """A primary in memory: RAM, small blocks, device state; emits epochs as frame bytes."""

    seed: int = 1
    generation: int = 1
    npages: int = NPAGES
    rng: random.Random = field(init=False)
    ram: bytearray = field(init=False)
    small: dict[str, bytearray] = field(init=False)
    dirty: set[int] = field(default_factory=set)
    small_dirty: dict[str, set[int]] = field(default_factory=dict)
    epoch: int = 0
    device: bytes = b""
    cache: codec.PageCache = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.ram = bytearray(self.npages * PS)
        self.small = {name: bytearray(n * PS) for name, n in SMALL_BLOCKS}
        self.cache = codec.PageCache(PS, self.npages * PS)
        self.mutate(self.npages // 2)
        for name, n in SMALL_BLOCKS:
            self.small[name][:] = self.rng.randbytes(n * PS)

    @property
    def blocks(self) -> tuple[RamBlock, ...]:
        small = (RamBlock(idstr=name, length=n * PS, flags=BlockFlags.SMALL)
                 for name, n in SMALL_BLOCKS)
        return (RamBlock(idstr="mem", length=self.npages * PS), *small)

    def mutate(self, pages: int, *, small_pages: int = 0) -> None:
        """Change ``pages`` random pages (zeroed, rewritten, or a few bytes poked)."""
        for _ in range(pages):
            i = self.rng.randrange(self.npages)
            kind = self.rng.random()
            base = i * PS
            if kind < 0.15:
                self.ram[base : base + PS] = bytes(PS)
            elif kind < 0.45:
                self.ram[base : base + PS] = self.rng.randbytes(PS)
            else:
                for _ in range(self.rng.randrange(1, 6)):
                    at = base + self.rng.randrange(PS - 8)
                    self.ram[at : at + 8] = self.rng.randbytes(8)
            self.dirty.add(i)
        for _ in range(small_pages):
            name, n = self.rng.choice(SMALL_BLOCKS)
            p = self.rng.randrange(n)
            self.small[name][p * PS + 5 : p * PS + 9] = self.rng.randbytes(4)
            self.small_dirty.setdefault(name, set()).add(p)

    def snapshot(self, fmt: DeviceStateFormat) -> Snapshot:
        return Snapshot(self.epoch, bytes(self.ram), {k: bytes(v) for k, v in self.small.items()},
                        self.device, fmt)

    def epoch_bytes(
        self,
        *,
        full: bool = False,
        compress: int | None = None,
        batch: int = 16,
        fmt: DeviceStateFormat = DeviceStateFormat.QEMU_SECTIONS,
        device: bool = True,
    ) -> tuple[bytes, Snapshot]:
        """Frames of the next epoch (all pages when ``full``) and what it leaves behind."""
        self.epoch += 1
        if full:
            self.cache.clear()
        w = EpochWriter(generation=self.generation, epoch=self.epoch, blocks=self.blocks,
                        compress_level=compress)
        parts = list(w.begin())
        pages = sorted(range(self.npages) if full else self.dirty)
        for k in range(0, len(pages), batch):
            idx = pages[k : k + batch]
            rec = codec.encode_pages(idx, self.ram, PS, self.cache)
            parts += w.pages(0, len(idx), rec)
        for bi, (name, n) in enumerate(SMALL_BLOCKS, 1):
            sel = range(n) if full else sorted(self.small_dirty.get(name, ()))
            for p in sel:
                parts += w.small_block(bi, p * PS, bytes(self.small[name][p * PS : (p + 1) * PS]))
        self.device = self.rng.randbytes(self.rng.randrange(100, 3000))
        if device:
            parts += w.device_state(fmt, self.device)
        parts += w.end()
        self.dirty.clear()
        self.small_dirty.clear()
        return b"".join(bytes(p) for p in parts), self.snapshot(fmt)


def decode(data: bytes) -> Iterator[Frame]:
    dec = FrameDecoder()
    dec.receive_data(data)
    dec.receive_data(b"")
    while True:
        ev = dec.next_event()
        if not isinstance(ev, Frame):
            return
        yield ev


def feed(replica: Replica, data: bytes, *, last_epoch: int | None = None,
         on_sealed: Callable[[], object] | None = None) -> EpochComplete:
    """Decode an epoch's frames, stage them, commit on EPOCH_END (as the shadow agent)."""
    asm = EpochAssembler(generation=replica.generation,
                         last_epoch=replica.committed_epoch if last_epoch is None else last_epoch)
    complete = None
    for frame in decode(data):
        complete = asm.feed(frame)
        if complete is None:
            replica.stage(frame)
        else:
            replica.commit(complete, on_sealed=on_sealed)
    assert complete is not None
    return complete


def ram_bytes(replica: Replica) -> bytes:
    """The guest RAM part of the RAM file (a trailer page follows it)."""
    with open(replica.ram_path, "rb") as f:
        return f.read(replica.shared_block.length)


def assert_holds(replica: Replica, snap: Snapshot) -> None:
    assert replica.committed_epoch == snap.epoch
    assert ram_bytes(replica) == snap.ram
    for name, data in snap.small.items():
        assert replica.small_block(name) == data, name
    dev = replica.device_state
    assert dev is not None
    assert (dev.format, dev.data) == (snap.fmt, snap.device)


@pytest.fixture
def vm() -> FakeVm:
    return FakeVm()


@pytest.fixture
def rdir(tmp_path: Path) -> Path:
    return tmp_path / "replica"


def fresh(rdir: Path, vm: FakeVm, **kw: object) -> Replica:
    r = Replica.open(rdir, **kw)  # type: ignore[arg-type]
    r.reset(vm.blocks, vm.generation, machine_type="pc-i440fx-7.2")
    return r


# --------------------------------------------------------------------------- happy paths


def test_full_then_delta_epochs_reopen(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        assert r.committed_epoch == 0 and r.device_state is None
        assert r.ram_path == rdir / "ram"
        assert r.ram_path.stat().st_size == NPAGES * PS + TRAILER_SIZE
        data, snap = vm.epoch_bytes(full=True)
        complete = feed(r, data)
        assert_holds(r, snap)
        assert r.committed_digest == complete.digest
        for _ in range(3):
            vm.mutate(20, small_pages=3)
            data, snap = vm.epoch_bytes()
            feed(r, data)
            assert_holds(r, snap)
        assert (rdir / JOURNAL_FILE).stat().st_size == 0
        devfiles = sorted(p.name for p in rdir.glob("devstate-*"))
        assert devfiles == [f"devstate-1-{snap.epoch}.bin"]
    with Replica.open(rdir) as r2:
        assert r2.recovery.action is RecoveryAction.NONE
        assert_holds(r2, snap)
        assert r2.generation == vm.generation
        assert r2.blocks == vm.blocks and r2.shared_block.idstr == "mem"
        assert r2.machine_type == "pc-i440fx-7.2"


def test_compressed_frames_and_heartbeats(rdir: Path, vm: FakeVm) -> None:
    """zstd frames are journaled uncompressed; heartbeats are ignored."""
    with fresh(rdir, vm) as r:
        data, snap = vm.epoch_bytes(full=True, compress=3)
        hb = encode_frame(Heartbeat(generation=vm.generation, epoch=0, seq=1, timestamp_ns=5))
        # a heartbeat between EPOCH_BEGIN and the first PAGES frame
        first = next(iter(decode(data)))
        assert isinstance(first, EpochBegin)
        cut = len(encode_frame(first))
        feed(r, data[:cut] + hb + data[cut:])
        assert_holds(r, snap)


def test_large_epoch_is_reread_from_the_journal(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm, memory_limit=3 * PS) as r:
        data, snap = vm.epoch_bytes(full=True, fmt=DeviceStateFormat.IGNORE_SHARED_STREAM)
        feed(r, data)
        assert_holds(r, snap)
        vm.mutate(30, small_pages=2)
        data, snap = vm.epoch_bytes()
        feed(r, data)
        assert_holds(r, snap)


def test_external_ram_path(tmp_path: Path, vm: FakeVm) -> None:
    ram = tmp_path / "elsewhere.ram"
    with Replica.open(tmp_path / "r", ram_path=ram) as r:
        r.reset(vm.blocks, 1)
        data, snap = vm.epoch_bytes(full=True)
        feed(r, data)
        assert r.ram_path == ram
        assert ram_bytes(r) == snap.ram
    with Replica.open(tmp_path / "r") as r2:  # the state remembers it
        assert r2.ram_path == ram
        assert_holds(r2, snap)


# --------------------------------------------------------------------------- misuse


def _frames(data: bytes) -> list[Frame]:
    return list(decode(data))


def test_stage_order_and_fencing(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        data, snap = vm.epoch_bytes(full=True)
        frames = _frames(data)
        with pytest.raises(FrameError, match="no epoch open"):
            r.stage(frames[1])
        with pytest.raises(FrameError, match="not staged"):
            r.stage(frames[-1])  # EPOCH_END
        old = EpochBegin(generation=0, epoch=1, blocks=vm.blocks)
        with pytest.raises(FencedFrameError):
            r.stage(old)
        with pytest.raises(FrameError, match="reset"):
            r.stage(EpochBegin(generation=2, epoch=1, blocks=vm.blocks))
        with pytest.raises(FrameError, match="block table"):
            r.stage(EpochBegin(generation=1, epoch=1, blocks=vm.blocks[:-1]))
        r.stage(frames[0])
        with pytest.raises(FrameError, match="commit\\(\\) or abort\\(\\)"):
            r.stage(frames[0])
        with pytest.raises(FrameError, match="inside epoch"):
            r.stage(Pages(generation=1, epoch=7, block=0, count=0, records=b""))
        with pytest.raises(FrameError, match="not sent that way"):
            r.stage(Pages(generation=1, epoch=1, block=1, count=0, records=b""))
        with pytest.raises(FrameError, match="names block 9"):
            r.stage(Pages(generation=1, epoch=1, block=9, count=0, records=b""))
        with pytest.raises(FrameFormatError):
            r.stage(Pages(generation=1, epoch=1, block=0, count=1, records=b"\x03"))
        with pytest.raises(FrameFormatError, match="outside the target"):
            rec = codec.encode_pages([NPAGES], bytes((NPAGES + 1) * PS), PS)
            r.stage(Pages(generation=1, epoch=1, block=0, count=1, records=rec))
        r.abort()
        assert r.open_epoch is None and (rdir / JOURNAL_FILE).stat().st_size == 0
        feed(r, data)
        assert_holds(r, snap)
        with pytest.raises(FrameError, match="already committed"):
            r.stage(frames[0])


def test_commit_must_match_what_was_staged(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        data, snap = vm.epoch_bytes(full=True)
        feed(r, data)
        vm.mutate(10)
        data2, _ = vm.epoch_bytes()
        asm = EpochAssembler(generation=1, last_epoch=r.committed_epoch)
        frames = _frames(data2)
        complete = None
        for i, f in enumerate(frames):
            complete = asm.feed(f)
            if complete is None and i != 2:  # "forget" to stage one PAGES frame
                r.stage(f)
        assert complete is not None
        with pytest.raises(FrameError, match="does not match the staged epoch"):
            r.commit(complete)
        r.abort()
        with pytest.raises(ReplicaError, match="no epoch staged"):
            r.commit(complete)
        assert_holds(r, snap)


def test_epoch_needs_one_device_state(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        data, _ = vm.epoch_bytes(full=True, device=False)
        with pytest.raises(FrameError, match="no DEVICE_STATE"):
            feed(r, data)
        r.abort()
        vm.epoch -= 1
        data, _ = vm.epoch_bytes(full=True)
        frames = _frames(data)
        dev = frames[-2]
        for f in frames[:-1]:
            r.stage(f)
        with pytest.raises(FrameError, match="second DEVICE_STATE"):
            r.stage(dev)
        assert r.committed_epoch == 0


def test_reset_validates_and_zeroes(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        data, _ = vm.epoch_bytes(full=True)
        feed(r, data)
        with pytest.raises(ConfigError, match="exactly one"):
            r.reset([RamBlock(idstr="a", length=PS, flags=BlockFlags.SMALL)], 1)
        with pytest.raises(ConfigError, match="exactly one"):
            r.reset([RamBlock(idstr="a", length=PS), RamBlock(idstr="b", length=PS)], 1)
        with pytest.raises(ConfigError, match="repeats"):
            r.reset([RamBlock(idstr="a", length=PS),
                     RamBlock(idstr="a", length=PS, flags=BlockFlags.SMALL)], 1)
        with pytest.raises(ConfigError, match="multiple"):
            r.reset([RamBlock(idstr="a", length=PS + 1)], 1)
        with pytest.raises(FencedFrameError):
            r.reset(vm.blocks, 0)
        assert r.committed_epoch == 1
        r.reset(vm.blocks, 2)
        assert (r.committed_epoch, r.generation, r.device_state) == (0, 2, None)
        assert ram_bytes(r) == bytes(NPAGES * PS)
        assert r.small_block("pc.bios") == bytes(4 * PS)
        assert not list(rdir.glob("devstate-*"))
        with pytest.raises(ReplicaError, match="not a small block"):
            r.small_block("mem")
        # a new RAM size resizes the file
        r.reset((RamBlock(idstr="mem", length=8 * PS),), 2)
        assert r.ram_path.stat().st_size == 8 * PS + TRAILER_SIZE


def test_lock_and_closed(rdir: Path, vm: FakeVm) -> None:
    r = fresh(rdir, vm)
    with pytest.raises(ReplicaError, match="in use by another process"):
        Replica.open(rdir)
    r.close()
    r.close()
    with pytest.raises(ReplicaError, match="closed"):
        r.reset(vm.blocks, 1)
    Replica.open(rdir).close()


def test_retire_is_persistent(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        data, snap = vm.epoch_bytes(full=True)
        feed(r, data)
        r.retire()
        assert r.retired
        with pytest.raises(ReplicaError, match="retired"):
            r.stage(_frames(data)[0])
    with Replica.open(rdir) as r2:
        assert r2.retired
        assert_holds(r2, snap)  # still readable (the promotion stream needs it)
        with pytest.raises(ReplicaError, match="retired"):
            r2.reset(vm.blocks, 2)


# --------------------------------------------------------------------------- damage


def _slots(path: Path) -> list[tuple[int, int, bytes]]:
    """(slot, sequence, JSON) of the written slots of a state file."""
    raw = path.read_bytes()
    out = []
    for slot in (0, 1):
        head = raw[slot * STATE_SLOT : slot * STATE_SLOT + 28]
        if len(head) == 28 and head[:8] == b"QSREPST1":
            seq = int.from_bytes(head[8:16], "big")
            n = int.from_bytes(head[16:20], "big")
            out.append((slot, seq, raw[slot * STATE_SLOT + 28 : slot * STATE_SLOT + 28 + n]))
    return out


def _poke(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


def test_state_slots_alternate(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        feed(r, vm.epoch_bytes(full=True)[0])
        slots = _slots(rdir / STATE_FILE)
        assert len(slots) == 2
        newest = max(slots, key=lambda t: t[1])
        assert b'"epoch": 1' in newest[2] and newest[0] == newest[1] % 2
        vm.mutate(3)
        feed(r, vm.epoch_bytes()[0])
        again = max(_slots(rdir / STATE_FILE), key=lambda t: t[1])
        assert again[1] == newest[1] + 1 and again[0] != newest[0]
        assert b'"epoch": 2' in again[2]


def test_torn_state_write_falls_back_and_replays(tmp_path: Path, vm: FakeVm) -> None:
    """A state write torn by a crash: the other slot holds the previous state, and the
    committed journal (still there: it is truncated only after the state) replays."""
    base = tmp_path / "r"
    with fresh(base, vm) as r:
        feed(r, vm.epoch_bytes(full=True)[0])
    vm.mutate(9, small_pages=1)
    data, after = vm.epoch_bytes()
    r = Replica.open(base, step_hook=_crash_at("commit:state-written"))
    with pytest.raises(_Crash):
        feed(r, data)
    r.close()
    slot, _, _ = max(_slots(base / STATE_FILE), key=lambda t: t[1])
    _poke(base / STATE_FILE, slot * STATE_SLOT + 28 + 10)
    with Replica.open(base) as r2:
        assert r2.recovery.action is RecoveryAction.REPLAYED
        assert_holds(r2, after)


def test_corrupt_state_file_is_refused(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        feed(r, vm.epoch_bytes(full=True)[0])
    state = rdir / STATE_FILE
    raw = state.read_bytes()
    for slot, _, _ in _slots(state):
        _poke(state, slot * STATE_SLOT + 28 + 3)
    with pytest.raises(ReplicaCorruptError, match="no valid slot"):
        Replica.open(rdir)
    # a slot that verifies but holds what this build cannot read
    body = b'{"format": 99}'
    head = b"QSREPST1" + (99).to_bytes(8, "big") + len(body).to_bytes(4, "big") + \
        xxhash.xxh3_64_intdigest(body).to_bytes(8, "big")
    state.write_bytes(raw)
    with open(state, "r+b") as f:
        f.seek(STATE_SLOT)
        f.write(head + body)
    with pytest.raises(ReplicaCorruptError, match="format 99"):
        Replica.open(rdir)
    state.write_bytes(raw)
    Replica.open(rdir).close()


def test_damaged_device_state_invalidates(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        feed(r, vm.epoch_bytes(full=True)[0])
    (dev,) = rdir.glob("devstate-*")
    raw = bytearray(dev.read_bytes())
    raw[0] ^= 1
    dev.write_bytes(raw)
    with Replica.open(rdir) as r2:
        assert r2.recovery.action is RecoveryAction.INVALIDATED
        assert "checksum" in r2.recovery.detail
        assert (r2.committed_epoch, r2.device_state) == (0, None)
        assert ram_bytes(r2) == bytes(NPAGES * PS)  # epoch 0 holds nothing


def test_replaced_ram_file_invalidates(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        data, snap = vm.epoch_bytes(full=True)
        feed(r, data)
    ram = rdir / "ram"
    whole = ram.read_bytes()
    # A byte-identical copy (trailer included) is the same replica.
    ram.unlink()
    ram.write_bytes(whole)
    with Replica.open(rdir) as r1:
        assert r1.recovery.action is RecoveryAction.NONE
        assert_holds(r1, snap)
    # What a shadow QEMU creates when the file is missing: the RAM size, no trailer.
    ram.unlink()
    ram.write_bytes(snap.ram)
    with Replica.open(rdir) as r2:
        assert r2.recovery.action is RecoveryAction.INVALIDATED
        assert "recreated" in r2.recovery.detail
        assert r2.committed_epoch == 0
        # and it accepts the next full epoch
        vm.mutate(5)
        data, snap = vm.epoch_bytes(full=True)
        feed(r2, data)
        assert_holds(r2, snap)
    # Same size, another replica's trailer.
    ram.write_bytes(snap.ram + b"QSRAMID1" + bytes(TRAILER_SIZE - 8))
    with Replica.open(rdir) as r3:
        assert r3.recovery.action is RecoveryAction.INVALIDATED
        assert "trailer" in r3.recovery.detail
    ram.unlink()
    with Replica.open(rdir) as r4:
        assert r4.recovery.action is RecoveryAction.NONE  # epoch 0 already: nothing to lose
        assert r4.ram_path.stat().st_size == NPAGES * PS + TRAILER_SIZE


def test_uncommitted_journal_is_discarded(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        data, snap = vm.epoch_bytes(full=True)
        feed(r, data)
        vm.mutate(10)
        frames = _frames(vm.epoch_bytes()[0])
        for f in frames[:-2]:
            r.stage(f)
    with Replica.open(rdir) as r2:
        assert r2.recovery.action is RecoveryAction.DISCARDED
        assert "no commit record" in r2.recovery.detail
        assert_holds(r2, snap)
        assert (rdir / JOURNAL_FILE).stat().st_size == 0


class _Crash(Exception):
    pass


def _crash_at(step: str) -> StepHook:
    def hook(name: str) -> None:
        if name == step:
            raise _Crash(name)

    return hook


def test_torn_commit_record(tmp_path: Path, vm: FakeVm) -> None:
    """Cut the journal at every offset of its tail: only a whole commit record commits."""
    base = tmp_path / "base"
    with fresh(base, vm) as r:
        data, before = vm.epoch_bytes(full=True)
        feed(r, data)
    vm.mutate(12, small_pages=2)
    data, after = vm.epoch_bytes()
    r = Replica.open(base, step_hook=_crash_at("commit:record-written"))
    with pytest.raises(_Crash):
        feed(r, data)
    r.close()
    journal = (base / JOURNAL_FILE).read_bytes()
    tail = 300  # the commit record (ACK 56 + EPOCH_END 80 bytes) and the end of DEVICE_STATE
    cuts = list(range(len(journal) - tail, len(journal) + 1)) + list(range(0, len(journal), 997))
    for cut in cuts:
        d = tmp_path / f"cut{cut}"
        shutil.copytree(base, d)
        with open(d / JOURNAL_FILE, "r+b") as f:
            f.truncate(cut)
        with Replica.open(d, durable=False) as r2:
            if cut == len(journal):
                assert r2.recovery.action is RecoveryAction.REPLAYED
                assert_holds(r2, after)
            else:
                assert r2.recovery.action in (RecoveryAction.DISCARDED, RecoveryAction.NONE)
                assert_holds(r2, before)
        shutil.rmtree(d)


def test_corrupt_byte_in_committed_journal_discards(tmp_path: Path, vm: FakeVm) -> None:
    base = tmp_path / "base"
    with fresh(base, vm) as r:
        data, before = vm.epoch_bytes(full=True)
        feed(r, data)
    vm.mutate(12)
    data, _ = vm.epoch_bytes()
    r = Replica.open(base, step_hook=_crash_at("commit:record-written"))
    with pytest.raises(_Crash):
        feed(r, data)
    r.close()
    jpath = base / JOURNAL_FILE
    raw = bytearray(jpath.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    jpath.write_bytes(raw)
    with Replica.open(base) as r2:
        assert r2.recovery.action is RecoveryAction.DISCARDED
        assert_holds(r2, before)


def test_exception_after_commit_record_leaves_replica_broken(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm) as r:
        feed(r, vm.epoch_bytes(full=True)[0])
    vm.mutate(12)
    data, after = vm.epoch_bytes()
    r = Replica.open(rdir, step_hook=_crash_at("commit:applied:2"))
    with pytest.raises(_Crash):
        feed(r, data)
    with pytest.raises(ReplicaError, match="reopen the replica"):
        r.stage(_frames(data)[0])
    r.abort()  # must not drop the committed journal
    assert (rdir / JOURNAL_FILE).stat().st_size > 0
    r.close()
    with Replica.open(rdir) as r2:
        assert r2.recovery.action is RecoveryAction.REPLAYED
        assert_holds(r2, after)


def test_durable_false_still_works(rdir: Path, vm: FakeVm) -> None:
    with fresh(rdir, vm, durable=False) as r:
        data, snap = vm.epoch_bytes(full=True)
        feed(r, data)
        assert_holds(r, snap)


def test_durable_is_resolved_from_the_ram_file(tmp_path: Path, vm: FakeVm) -> None:
    with Replica.open(tmp_path / "a") as r:
        assert r.durable  # RAM file under /tmp: a disk here
    shm = Path("/dev/shm") / f"qs-unit-{os.getpid()}.ram"
    try:
        with Replica.open(tmp_path / "b", ram_path=shm) as r:
            assert not r.durable
            r.reset(vm.blocks, 1)
            data, snap = vm.epoch_bytes(full=True)
            feed(r, data)
            assert_holds(r, snap)
        with Replica.open(tmp_path / "c", ram_path=shm.with_suffix(".x"), durable=True) as r:
            assert r.durable
    finally:
        shm.unlink(missing_ok=True)
        shm.with_suffix(".x").unlink(missing_ok=True)
