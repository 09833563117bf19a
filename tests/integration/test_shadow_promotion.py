"""Shadowing end to end on real QEMU: a primary's checkpoints into a replica, then failover.

The primary is the dirtier test guest (TCG) with its RAM in a shared file. Each checkpoint
does what the shared-RAM source does, by hand (the test does not depend on the source
agent): ``stop``; device state by ``migrate`` with x-ignore-shared to a unix socket, read
to EOF; copy the RAM file's changed pages. The epoch goes through EpochWriter →
FrameDecoder → EpochAssembler → Replica.stage/commit. A warm standby launched before the
first epoch is promoted after the primary is SIGKILLed; the guest must continue from the
checkpoint with intact memory (its counter goes on from where it stopped; ``mism=0``:
every page it checks holds what it wrote before the checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qmpshadow.frames import codec
from qmpshadow.frames.epoch import EpochWriter
from qmpshadow.frames.wire import BlockFlags, DeviceStateFormat, RamBlock
from qmpshadow.migstream import StreamParser
from qmpshadow.migstream.events import Configuration, DeviceSection, RamMemSize
from qmpshadow.migstream.image import RamImage
from qmpshadow.migstream.writer import device_section_bytes
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qemu.testguest import (
    CounterLine,
    guest_kernel_path,
    kernel_args,
    parse_serial,
    wait_for_counter,
)
from qmpshadow.qmp.control import QmpControl
from qmpshadow.shadow.errors import PromotionError
from qmpshadow.shadow.replica import Replica
from qmpshadow.shadow.standby import PromotionResult, Standby, StandbyState
from tests.integration.conftest import LaunchVm
from tests.unit.test_replica import feed, ram_bytes

pytestmark = [pytest.mark.qemu]

log = logging.getLogger(__name__)

PS = 4096
MEM_MIB = 64
MAIN = "mem"
PRINT_MS = 50


@pytest.fixture
def shm() -> Iterator[Path]:
    """A unique /dev/shm prefix; every file under it is removed afterwards."""
    prefix = Path("/dev/shm") / f"qs-test-{uuid.uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        for p in Path("/dev/shm").glob(prefix.name + "*"):
            p.unlink(missing_ok=True)


def guest_spec(shm: Path) -> VmSpec:
    return VmSpec(
        name="prim",
        memory=MemorySpec(size_mib=MEM_MIB, backend="file", backend_id=MAIN,
                          mem_path=Path(f"{shm}-primary.ram")),
        kernel=guest_kernel_path(),
        kernel_args=kernel_args(pages=32, region_mib=4, delay_us=300, pattern="text",
                                print_ms=PRINT_MS),
    )


@dataclass
class Checkpoint:
    stream: bytes  # x-ignore-shared migration stream of the stopped primary
    ram: bytes  # the primary's RAM file while stopped
    counter: CounterLine  # last COUNTER line the primary printed before the stop
    pmem: bytes | None = None


@dataclass
class Source:
    """The shared-RAM source's checkpoint, done by hand against a live primary."""

    vm: QemuProcess
    spec: VmSpec
    out: Path
    generation: int = 1
    epoch: int = 0
    prev: bytes | None = None
    cache: codec.PageCache = field(default_factory=lambda: codec.PageCache(PS, MEM_MIB << 20))
    blocks: tuple[RamBlock, ...] = ()
    machine_type: str = ""

    @property
    def qmp(self) -> QmpControl:
        return self.vm.qmp

    async def checkpoint(self, *, pmem: bool = False) -> Checkpoint:
        qmp = self.qmp
        await qmp.stop()
        counter = parse_serial(self.vm.run.serial_log.read_text())[-1]
        # Into our own unix socket, read to EOF (with exec:cat > file, QEMU can report
        # "completed" before cat has written the last bytes: seen here as a truncated file).
        sock = self.out / "dev.sock"
        sock.unlink(missing_ok=True)
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()
            writer.close()
            if not got.done():
                got.set_result(data)

        server = await asyncio.start_unix_server(take, path=str(sock))
        try:
            since = qmp.last_event_seq
            await qmp.migrate(f"unix:{sock}")
            stream = await asyncio.wait_for(got, 30)
            ev = await qmp.wait_event("MIGRATION", since=since, timeout=30,
                                      predicate=lambda e: e.data.get("status") in
                                      ("completed", "failed"))
        finally:
            server.close()
            await server.wait_closed()
        assert ev.data["status"] == "completed", ev
        assert self.spec.memory.mem_path is not None
        cp = Checkpoint(stream, self.spec.memory.mem_path.read_bytes(), counter)
        if pmem:
            dump = self.out / f"pmem{self.epoch + 1}.bin"
            await qmp.pmemsave(0, MEM_MIB << 20, dump)
            cp.pmem = dump.read_bytes()
        return cp

    async def resume(self) -> None:
        await self.qmp.cont()

    def epoch_frames(self, cp: Checkpoint, fmt: DeviceStateFormat,
                     device_state: bytes | None = None) -> bytes:
        """Frames of the next epoch: changed main pages (all, the first time), every
        small-block page that changed, the device state in ``fmt``."""
        parser = StreamParser()
        parser.receive_data(cp.stream)
        parser.receive_data(b"")
        events = parser.events()
        mem = next(e for e in events if isinstance(e, RamMemSize))
        cfg = next(e for e in events if isinstance(e, Configuration))
        self.machine_type = cfg.machine_type
        self.blocks = tuple(
            RamBlock(idstr=b.idstr, length=b.used_length,
                     flags=BlockFlags.NONE if b.idstr == MAIN else BlockFlags.SMALL)
            for b in mem.blocks)
        image = RamImage()
        for e in events:
            image.apply(e)
        if device_state is None:
            if fmt is DeviceStateFormat.IGNORE_SHARED_STREAM:
                device_state = cp.stream
            else:
                device_state = b"".join(device_section_bytes(e) for e in events
                                        if isinstance(e, DeviceSection)) + b"\x00"
        self.epoch += 1
        full = self.prev is None
        if full:
            pages = list(range(len(cp.ram) // PS))
        else:
            assert self.prev is not None
            old, new = memoryview(self.prev), memoryview(cp.ram)
            pages = [i for i in range(len(cp.ram) // PS)
                     if old[i * PS : (i + 1) * PS] != new[i * PS : (i + 1) * PS]]
        self.prev = cp.ram
        w = EpochWriter(generation=self.generation, epoch=self.epoch, blocks=self.blocks)
        parts = list(w.begin())
        for k in range(0, len(pages), 1024):
            idx = pages[k : k + 1024]
            parts += w.pages(0, len(idx), codec.encode_pages(idx, cp.ram, PS, self.cache))
        for bi, b in enumerate(self.blocks):
            if b.flags & BlockFlags.SMALL:
                parts += w.small_block(bi, 0, bytes(image.blocks[b.idstr]))
        parts += w.device_state(fmt, device_state)
        parts += w.end()
        log.info("epoch %d: %d main pages", self.epoch, len(pages))
        return b"".join(bytes(p) for p in parts)


async def start_primary(launch_vm: LaunchVm, shm: Path, out: Path) -> Source:
    spec = guest_spec(shm)
    vm = await launch_vm(spec, accel="tcg", name="primary")
    await wait_for_counter(vm.run.serial_log, timeout=30)
    await vm.qmp.migrate_set_capabilities({"x-ignore-shared": True, "events": True})
    return Source(vm, spec, out)


def standby_for(spec: VmSpec, replica: Replica, root: Path) -> Standby:
    return Standby(spec, RunPaths.create(root / "standby"), ram_path=replica.ram_path,
                   accel="tcg", die_with_parent=True, respawn_delay=0.05)


async def watch_promoted(standby: Standby, stop: CounterLine, *, seconds: float) -> list[
        CounterLine]:
    """COUNTER lines of the promoted guest over ``seconds``; checks continuity."""
    serial = standby.run.serial_log
    await wait_for_counter(serial, timeout=10)
    await asyncio.sleep(seconds)
    lines = parse_serial(serial.read_text())
    assert lines, "the promoted guest printed nothing"
    first = lines[0]
    assert first.counter >= stop.counter, (first, stop)
    assert all(line.mism == 0 for line in lines), lines
    assert lines[-1].counter > first.counter + 10, "the promoted guest makes no progress"
    return lines


def mem_size(stream: bytes) -> RamMemSize:
    parser = StreamParser()
    parser.receive_data(stream)
    parser.receive_data(b"")
    return next(e for e in parser.events() if isinstance(e, RamMemSize))


def assert_replica_is_checkpoint(replica: Replica, cp: Checkpoint) -> None:
    ram = ram_bytes(replica)
    assert ram == cp.ram, "replica RAM differs from the primary's RAM file at the checkpoint"
    assert cp.pmem is not None and len(cp.pmem) == len(ram)
    # 0xa0000-0xfffff reads VGA/option-ROM space in a pmemsave, not RAM
    assert ram[:0xA0000] == cp.pmem[:0xA0000]
    assert ram[0x100000:] == cp.pmem[0x100000:]


def report(result: PromotionResult, t_kill: float | None) -> None:
    kill = "" if t_kill is None else f" kill_to_running={(result.resumed_at - t_kill) * 1000:.2f}"
    print(  # shown with -s
        f"\nPROMOTION format={result.format.name} replayed={result.replayed} "
        f"bytes={result.stream_bytes} build={result.build_ms:.2f} "
        f"connect={result.connect_ms:.2f} send={result.send_ms:.2f} load={result.load_ms:.2f} "
        f"handoff={result.handoff_ms:.2f} resume={result.resume_ms:.2f} "
        f"running={result.running_ms:.2f} "
        f"cont_reply={result.cont_ms:.2f} total={result.total_ms:.2f}{kill} ms"
    )


@pytest.mark.parametrize("fmt", list(DeviceStateFormat), ids=lambda f: f.name.lower())
async def test_failover_continues_the_guest(
    launch_vm: LaunchVm, short_tmp: Path, shm: Path, fmt: DeviceStateFormat
) -> None:
    src = await start_primary(launch_vm, shm, short_tmp)
    with Replica.open(short_tmp / "replica", ram_path=f"{shm}-replica.ram") as replica:
        cp1 = await src.checkpoint()
        data1 = src.epoch_frames(cp1, fmt)
        replica.reset(src.blocks, src.generation, machine_type=src.machine_type)
        standby = standby_for(src.spec, replica, short_tmp)
        await standby.start()  # warm: waits on its incoming socket from now on
        try:
            feed(replica, data1)
            assert replica.committed_epoch == 1
            if fmt is DeviceStateFormat.QEMU_SECTIONS:
                standby.prepare(replica)  # epoch 2's prepare reuses its small-block part
            await src.resume()
            await wait_for_counter(src.vm.run.serial_log, min_counter=cp1.counter.counter + 50,
                                   timeout=20)
            cp2 = await src.checkpoint(pmem=True)
            feed(replica, src.epoch_frames(cp2, fmt))
            assert replica.committed_epoch == 2
            assert_replica_is_checkpoint(replica, cp2)
            if fmt is DeviceStateFormat.QEMU_SECTIONS:
                prepared = standby.prepare(replica)  # build off the failover path
                # QEMU 7.2 compares the GPA only for ignored blocks: the composed stream
                # says 0 for pc.bios/pc.rom, whose real GPAs the primary's stream carries.
                assert {d.idstr: d.gpa for d in mem_size(prepared.data).blocks
                        } == {b.idstr: 0 for b in replica.blocks}
                real = {d.idstr: d.gpa for d in mem_size(cp2.stream).blocks}
                assert real["mem"] == 0 and real["pc.bios"] == 0xFFFC0000

            t_kill = time.time()
            src.vm.kill()  # SIGKILL; not waiting for it to be reaped
            result = await standby.promote(replica)
            report(result, t_kill)
            assert t_kill < result.resumed_at <= time.time()
            assert 0 <= result.running_ms <= result.total_ms
            assert standby.state is StandbyState.PROMOTED and replica.retired
            assert (result.epoch, result.generation, result.format) == (2, 1, fmt)
            assert result.replayed is (fmt is DeviceStateFormat.IGNORE_SHARED_STREAM)
            if fmt is DeviceStateFormat.QEMU_SECTIONS:
                assert result.build_ms == 0.0 and result.prepare_ms > 0.0
                assert result.prepare_reused
                # the QEMU loaded a stream whose RAM part came from the epoch-1 prepare
                assert (standby.builder.hits, standby.builder.misses) == (1, 1)
            status = await standby.process.qmp.query_status()
            assert status.running
            lines = await watch_promoted(standby, cp2.counter, seconds=1.0)
            # close to the checkpoint: within a few print periods' worth of loops
            rate = (cp2.counter.counter - cp1.counter.counter) / 1.0
            assert lines[0].counter - cp2.counter.counter < max(rate, 2000), lines[:3]
        finally:
            await standby.close()
            if standby.state is StandbyState.PROMOTED:
                standby.process.kill()
                await standby.process.wait()


async def test_refused_stream_respawns_and_retry_succeeds(
    launch_vm: LaunchVm, short_tmp: Path, shm: Path
) -> None:
    """A stream that passes our checks but QEMU cannot load (a device section one byte
    short): QEMU exits, promote() says so, a new standby comes up, and promoting a good
    epoch on it works."""
    fmt = DeviceStateFormat.QEMU_SECTIONS
    src = await start_primary(launch_vm, shm, short_tmp)
    with Replica.open(short_tmp / "replica", ram_path=f"{shm}-replica.ram") as replica:
        cp = await src.checkpoint()
        parser = StreamParser()
        parser.receive_data(cp.stream)
        parser.receive_data(b"")
        secs = [e for e in parser.events() if isinstance(e, DeviceSection)]
        broken = [DeviceSection(s.section_id, s.idstr, s.instance_id, s.version_id,
                                s.payload[:-1] if s.idstr == "timer" else s.payload)
                  for s in secs]
        bad = b"".join(device_section_bytes(s) for s in broken) + b"\x00"
        data = src.epoch_frames(cp, fmt, device_state=bad)
        replica.reset(src.blocks, src.generation, machine_type=src.machine_type)
        standby = standby_for(src.spec, replica, short_tmp)
        await standby.start()
        try:
            feed(replica, data)
            src.vm.kill()
            first_pid = standby.process.pid
            with pytest.raises(PromotionError, match="refused the promotion stream") as info:
                await standby.promote(replica)
            log.info("QEMU said: %s", info.value.stderr_tail)
            assert "timer" in info.value.stderr_tail or "load" in info.value.stderr_tail
            await standby.wait_ready(timeout=15)
            assert standby.process.pid != first_pid and standby.respawns == 1
            # the same RAM, a good device state: a new epoch (no page changed)
            replica2 = replica
            good = src.epoch_frames(cp, fmt)
            feed(replica2, good)
            result = await standby.promote(replica2)
            report(result, None)
            await watch_promoted(standby, cp.counter, seconds=0.5)
        finally:
            await standby.close()
            if standby.state is StandbyState.PROMOTED:
                standby.process.kill()
                await standby.process.wait()
