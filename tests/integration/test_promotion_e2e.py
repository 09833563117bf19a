"""Acceptance: protect a real primary, kill -9 it, promote the shadow: the guest carries on.

Both sources: shared-RAM (TCG) and COLO (KVM). The guest's COUNTER continues from the last
committed epoch and its memory self-check stays clean (mism=0) for 10 s.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.agents.source import SourceAgent
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
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MIB = 64
PS = 4096
ARGS = kernel_args(pages=16, region_mib=8, delay_us=1000, pattern="text", print_ms=100)


async def _stop_all(standby: Standby) -> None:
    """The promoted QEMU outlives the standby object by design: stop it here."""
    promoted = standby.state is StandbyState.PROMOTED
    proc = standby.process if promoted else None
    await standby.close()
    if proc is not None:
        await proc.stop(timeout=5)


async def _check_carries_on(standby: Standby, counter_at_commit: int, last_primary: int,
                            seconds: float = 10.0) -> None:
    log = standby.run.serial_log
    await wait_for_counter(log, timeout=30)
    first = parse_serial(log.read_text(errors="replace"))[0]
    # resumed from the committed checkpoint: not before it, not past where the primary
    # got to (last_primary is resume_bound of its serial log)
    assert counter_at_commit <= first.counter <= last_primary, (
        counter_at_commit, first, last_primary)
    await asyncio.sleep(seconds)
    lines = parse_serial(log.read_text(errors="replace"))
    assert lines[-1].counter > first.counter + 10
    assert all(line.mism == 0 for line in lines), [x for x in lines if x.mism][:3]


async def test_shared_ram_kill_and_promote(launch_vm: LaunchVm, short_tmp: Path,
                                           tcg: AccelChoice) -> None:
    mem_path = short_tmp / "p.ram"
    spec = VmSpec(name="sr", memory=MemorySpec(size_mib=MIB, backend="file", backend_id="mem",
                                               mem_path=mem_path),
                  kernel=guest_kernel_path(), kernel_args=ARGS)
    vm = await launch_vm(spec, accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = Replica.open(short_tmp / "replica", durable=False)
    standby = Standby(spec, RunPaths.create(short_tmp / "standby"), ram_path=replica.ram_path,
                      accel=tcg, die_with_parent=True)
    await standby.start()
    await standby.wait_ready(30)
    listener = await local.listen(short_tmp / "link.sock")
    shadow = ShadowAgent(listener=listener, replica=replica,
                         machine_type=standby.machine_type)
    serve = asyncio.create_task(shadow.serve())
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=(MIB << 20) // PS, wait_ack=True)
    src = SharedRamSource(vm.qmp, mem_path=mem_path, main_block="mem",
                          sock_path=short_tmp / "d.sock")
    await src.open()
    try:
        counter_at_commit = 0
        for _ in range(4):
            await agent.prepare()
            held, release = asyncio.Event(), asyncio.Event()
            seen: list[int] = []

            async def note(held: asyncio.Event = held, release: asyncio.Event = release,
                           seen: list[int] = seen) -> None:
                await held.wait()
                lines = parse_serial(vm.run.serial_log.read_text(errors="replace"))
                seen.append(lines[-1].counter)
                release.set()

            t = asyncio.create_task(note())
            ep = await src.checkpoint(full=agent.need_full, held=held, release=release)
            await t
            await agent.ship(ep)
            counter_at_commit = seen[0]
            await asyncio.sleep(0.3)
        await shadow.wait_committed(4)
        assert replica.committed_epoch == 4
        await asyncio.sleep(0.5)  # the primary runs past the checkpoint
        vm.kill()
        last_primary = resume_bound(parse_serial(vm.run.serial_log.read_text(errors="replace")))
        serve.cancel()
        await shadow.stop()
        result = await standby.promote(replica)
        assert result.epoch == 4 and result.total_ms < 1000
        await _check_carries_on(standby, counter_at_commit, last_primary)
    finally:
        await agent.close()
        await src.close()
        serve.cancel()
        await listener.close()
        await _stop_all(standby)
        replica.close()


@pytest.mark.parametrize("ack_mode", ["sync", "async"])
async def test_colo_kill_and_promote(launch_vm: LaunchVm, short_tmp: Path, kvm: AccelChoice,
                                     ack_mode: str) -> None:
    spec = VmSpec(name="co", memory=MemorySpec(size_mib=MIB), kernel=guest_kernel_path(),
                  kernel_args=ARGS)
    vm = await launch_vm(spec, accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    replica = Replica.open(short_tmp / "replica", durable=False)
    standby = Standby(spec, RunPaths.create(short_tmp / "standby"), ram_path=replica.ram_path,
                      accel=kvm, die_with_parent=True, start_timeout=30)
    await standby.start()
    await standby.wait_ready(60)
    listener = await local.listen(short_tmp / "link.sock")
    shadow = ShadowAgent(listener=listener, replica=replica,
                         machine_type=standby.machine_type)
    serve = asyncio.create_task(shadow.serve())
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=(MIB << 20) // PS, keep_mirror=True,
                        wait_ack=ack_mode == "sync")
    counters: dict[int, int] = {}
    enough = asyncio.Event()

    async def sink(ep: CapturedEpoch) -> None:
        lines = parse_serial(vm.run.serial_log.read_text(errors="replace"))
        counters[ep.number] = lines[-1].counter if lines else 0
        await agent.ship(ep)
        if replica.committed_epoch >= 5:
            enough.set()

    src = ColoSource(vm.qmp, main_block="pc.ram", sock_path=short_tmp / "c.sock", sink=sink,
                     ack_mode=ack_mode, checkpoint_delay_ms=200)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.wait_for(enough.wait(), 120)
        vm.kill()
        last_primary = resume_bound(parse_serial(vm.run.serial_log.read_text(errors="replace")))
        await asyncio.sleep(0.3)  # let an in-flight epoch land or be dropped
        serve.cancel()
        await shadow.stop()
        committed = replica.committed_epoch
        result = await standby.promote(replica)
        assert result.epoch == committed >= 5
        await _check_carries_on(standby, counters.get(committed, 0), last_primary)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()
        serve.cancel()
        await listener.close()
        await _stop_all(standby)
        replica.close()
