"""Failover with a disk: kill -9 of the primary at a random point, promote the shadow.

The test guest writes its disk (ATA PIO, slot-per-chunk rotation with a read-back check)
as well as its RAM. The primary and the shadow come from one VmSpec with ``[[disks]]``
(copy mode): the shadow QEMU has its own image, open but inactive until promotion; the
replica writes each epoch's disk blocks into it only when the epoch commits. After the
kill, the shadow's image must equal a copy of the primary's image taken while the
primary was held in the committed checkpoint, and the promoted guest must carry on with
memory and disk self-checks clean (mism=0, dmism=0, derr=0).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
from pathlib import Path

import pytest

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.agents.source import SourceAgent
from qmpshadow.disk.replicator import DiskReplicator, DiskSource
from qmpshadow.disk.spec import DiskSpec
from qmpshadow.errors import QmpShadowError
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qemu.testguest import (
    guest_kernel_path,
    kernel_args,
    parse_serial,
    resume_bound,
    wait_for_counter,
)
from qmpshadow.shadow.replica import Replica
from qmpshadow.shadow.standby import Standby, StandbyState
from qmpshadow.source.colo import ColoSource
from qmpshadow.source.epoch import CapturedEpoch
from qmpshadow.source.shared_ram import SharedRamSource
from qmpshadow.transport import local
from qmpshadow.transport.base import Listener
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MIB = 64
PS = 4096
DISK = 4 << 20
DSLOTS = 128  # 128 chunks of 4 KiB: a rotation every 128 loops (~0.15 s under TCG)


def _spec(tmp: Path, name: str, *, shared_ram: bool = True, dslots: int = DSLOTS) -> VmSpec:
    for f in ("p.disk", "s.disk"):
        with open(tmp / f, "wb") as fh:
            fh.truncate(DISK)
    return VmSpec(
        name=name,
        memory=(MemorySpec(size_mib=MIB, backend="file", backend_id="mem",
                           mem_path=tmp / "p.ram") if shared_ram
                else MemorySpec(size_mib=MIB)),
        kernel=guest_kernel_path(),
        kernel_args=kernel_args(pages=16, region_mib=8, delay_us=1000, pattern="text",
                                print_ms=100, dslots=dslots, dchunk=8),
        disks=(DiskSpec(id="disk0", path=tmp / "p.disk", shadow_path=tmp / "s.disk"),))


@pytest.mark.parametrize("seed", [1, 2])
async def test_kill_at_random_point_disk_and_ram_consistent(
        launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice, seed: int) -> None:
    rng = random.Random(seed)
    spec = _spec(short_tmp, f"df{seed}")
    vm = await launch_vm(spec, accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica, standby, listener, shadow, serve = await _shadow_side(spec, short_tmp, tcg)
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=(MIB << 20) // PS, wait_ack=True,
                        disks=True)
    src = SharedRamSource(vm.qmp, mem_path=spec.memory.mem_path or Path(), main_block="mem",
                          sock_path=short_tmp / "d.sock",
                          disks=DiskReplicator(vm.qmp, [DiskSource("disk0", DISK)], short_tmp))
    await src.open()
    copies: dict[int, Path] = {}
    counters: dict[int, int] = {}

    async def one(n: int) -> None:
        await agent.prepare()
        held, release = asyncio.Event(), asyncio.Event()

        async def note() -> None:
            await held.wait()
            # the primary is stopped in checkpoint n: its image and counter are n's
            copies[n] = short_tmp / f"c{n}.disk"
            shutil.copyfile(spec.disks[0].path, copies[n])
            counters[n] = parse_serial(vm.run.serial_log.read_text(errors="replace"))[-1].counter
            release.set()

        t = asyncio.create_task(note())
        try:
            ep = await src.checkpoint(full=agent.need_full, held=held, release=release)
        finally:
            release.set()
            t.cancel()
        await agent.ship(ep)

    try:
        epochs = rng.randint(3, 6)
        for n in range(1, epochs + 1):
            await one(n)
            await asyncio.sleep(rng.uniform(0.05, 0.4))
        await shadow.wait_committed(epochs)
        assert replica.committed_epoch == epochs
        # the kill lands at a random point: between checkpoints or inside the next one
        # (stopped, backup job running, or shipping)
        nxt = asyncio.create_task(one(epochs + 1))
        await asyncio.sleep(rng.uniform(0.0, 0.08))
        vm.kill()
        with contextlib.suppress(QmpShadowError):
            await nxt
        assert replica.committed_epoch in (epochs, epochs + 1)
        last_primary = resume_bound(parse_serial(vm.run.serial_log.read_text(errors="replace")))
        serve.cancel()
        await shadow.stop()
        await _promote_and_check(standby, replica, spec, copies, counters, last_primary,
                                 DSLOTS)
    finally:
        await agent.close()
        await src.close()
        serve.cancel()
        await listener.close()
        await _stop_all(standby)
        replica.close()


async def _shadow_side(spec: VmSpec, tmp: Path, accel: AccelChoice) -> tuple[
        Replica, Standby, Listener, ShadowAgent, asyncio.Task[None]]:
    """Replica with the shadow's disk images, warm standby, shadow agent serving."""
    replica = Replica.open(tmp / "replica", durable=False,
                           disks=[d.image("shadow") for d in spec.disks])
    standby = Standby(spec, RunPaths.create(tmp / "standby"), ram_path=replica.ram_path,
                      accel=accel, die_with_parent=True, start_timeout=30)
    await standby.start()
    await standby.wait_ready(60)
    listener = await local.listen(tmp / "link.sock")
    shadow = ShadowAgent(listener=listener, replica=replica,
                         machine_type=standby.machine_type)
    return replica, standby, listener, shadow, asyncio.create_task(shadow.serve())


async def _stop_all(standby: Standby) -> None:
    """The promoted QEMU outlives the standby object by design: stop it here."""
    proc = standby.process if standby.state is StandbyState.PROMOTED else None
    await standby.close()
    if proc is not None:
        await proc.stop(timeout=5)


async def _promote_and_check(standby: Standby, replica: Replica, spec: VmSpec,
                             copies: dict[int, Path], counters: dict[int, int],
                             last_primary: int, dslots: int) -> None:
    committed = replica.committed_epoch
    assert spec.disks[0].shadow_path is not None
    assert spec.disks[0].shadow_path.read_bytes() == copies[committed].read_bytes(), (
        f"shadow disk differs from the primary's at committed epoch {committed}")
    result = await standby.promote(replica)
    assert result.epoch == committed
    log = standby.run.serial_log
    await wait_for_counter(log, timeout=30)
    first = parse_serial(log.read_text(errors="replace"))[0]
    assert counters[committed] <= first.counter <= last_primary
    await asyncio.sleep(4)
    lines = parse_serial(log.read_text(errors="replace"))
    assert lines[-1].counter > first.counter + 2 * dslots  # every slot checked twice
    bad = [x for x in lines if x.mism or x.dmism or x.derr or x.dmism is None]
    assert not bad, bad[:3]


#: The nested KVM here runs the guest ~20 x slower than TCG: a smaller disk rotation.
COLO_DSLOTS = 16


@pytest.mark.parametrize("ack_mode", ["sync", "async"])
async def test_colo_kill_disk_and_ram_consistent(
        launch_vm: LaunchVm, short_tmp: Path, kvm: AccelChoice, ack_mode: str) -> None:
    """COLO keeps block nodes active: the transaction is issued while the primary waits
    for our answer (sync: the copy is inside that wait; async: after it)."""
    spec = _spec(short_tmp, f"dc{ack_mode[0]}", shared_ram=False, dslots=COLO_DSLOTS)
    vm = await launch_vm(spec, accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    replica, standby, listener, shadow, serve = await _shadow_side(spec, short_tmp, kvm)
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=(MIB << 20) // PS, keep_mirror=True,
                        wait_ack=ack_mode == "sync", disks=True)
    copies: dict[int, Path] = {}
    counters: dict[int, int] = {}
    enough = asyncio.Event()
    image = spec.disks[0].path

    async def sink(ep: CapturedEpoch) -> None:
        if ack_mode == "sync":  # the primary still waits in checkpoint ep: copy its disk
            copies[ep.number] = short_tmp / f"c{ep.number}.disk"
            shutil.copyfile(image, copies[ep.number])
        lines = parse_serial(vm.run.serial_log.read_text(errors="replace"))
        counters[ep.number] = lines[-1].counter if lines else 0
        await agent.ship(ep)
        if replica.committed_epoch >= 5:
            enough.set()

    disks = DiskReplicator(vm.qmp, [DiskSource("disk0", DISK)], short_tmp)
    src = ColoSource(vm.qmp, main_block="pc.ram", sock_path=short_tmp / "c.sock", sink=sink,
                     ack_mode=ack_mode, checkpoint_delay_ms=200, disks=disks,
                     disk_full=lambda: agent.need_full)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.wait_for(enough.wait(), 120)
        vm.kill()
        last_primary = resume_bound(parse_serial(vm.run.serial_log.read_text(errors="replace")))
        await asyncio.sleep(0.3)  # let an in-flight epoch land or be dropped
        serve.cancel()
        await shadow.stop()
        if ack_mode == "async":
            # no copy of the primary's image at the checkpoint here (it ran on): the
            # guest's own disk self-check is the test; byte equality is the sync case's
            copies[replica.committed_epoch] = spec.disks[0].shadow_path or Path()
        await _promote_and_check(standby, replica, spec, copies, counters, last_primary,
                                 COLO_DSLOTS)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()
        serve.cancel()
        await listener.close()
        await _stop_all(standby)
        replica.close()
