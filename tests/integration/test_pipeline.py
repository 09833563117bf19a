"""Source agent → link → shadow agent → replica, on real QEMU and real sockets."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.agents.source import SourceAgent
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.testguest import wait_for_counter
from qmpshadow.shadow.replica import Replica
from qmpshadow.source.colo import ColoSource
from qmpshadow.source.epoch import CapturedEpoch
from qmpshadow.source.shared_ram import SharedRamSource
from qmpshadow.transport import local
from tests.integration.conftest import LaunchVm
from tests.integration.shadowkit import (
    MIB,
    PS,
    checkpoint_with_dump,
    differing_pages,
    dirtier_spec,
    read_file_ram,
)

pytestmark = [pytest.mark.qemu]


async def _wait(pred: object, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_shared_ram_replica_is_byte_exact(launch_vm: LaunchVm, short_tmp: Path,
                                                tcg: AccelChoice) -> None:
    mem_path = short_tmp / "p.ram"
    vm = await launch_vm(dirtier_spec("pl", mem_path=mem_path, pages=32, delay_us=500),
                         accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = Replica.open(short_tmp / "replica", durable=False)
    listener = await local.listen(short_tmp / "link.sock")
    shadow = ShadowAgent(listener=listener, replica=replica, machine_type="pc-i440fx-7.2")
    serve = asyncio.create_task(shadow.serve())
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=(MIB << 20) // PS, wait_ack=True)
    src = SharedRamSource(vm.qmp, mem_path=mem_path, main_block="mem",
                          sock_path=short_tmp / "d.sock")
    await src.open()
    try:
        for n in range(1, 5):
            await agent.prepare()
            dump = short_tmp / f"d{n}.ram"
            ep = await checkpoint_with_dump(src, vm, dump, full=agent.need_full)
            await agent.ship(ep)
            assert agent.stats.committed == n, agent.stats
            await shadow.wait_committed(n)  # acked when durable, applied after
            assert replica.committed_epoch == n
            bad = differing_pages(read_file_ram(replica.ram_path), dump)
            assert not bad, (n, len(bad), bad[:8])
            assert replica.device_state is not None
            await asyncio.sleep(0.2)
        last = agent.stats.last
        assert last is not None and last.wire_bytes < last.raw_bytes
    finally:
        await agent.close()
        await src.close()
        serve.cancel()
        await shadow.stop()
        await listener.close()
        replica.close()
    assert os.path.getsize(replica.ram_path) >= MIB << 20


async def test_colo_replica_is_byte_exact(launch_vm: LaunchVm, short_tmp: Path,
                                          kvm: AccelChoice) -> None:
    """COLO sync mode: the primary waits for our answer, so while the sink holds an epoch
    (after the shadow committed it) the primary is still in that checkpoint."""
    vm = await launch_vm(dirtier_spec("cp", region_mib=2), accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    replica = Replica.open(short_tmp / "replica", durable=False)
    listener = await local.listen(short_tmp / "link.sock")
    shadow = ShadowAgent(listener=listener, replica=replica, machine_type="pc-i440fx-7.2")
    serve = asyncio.create_task(shadow.serve())
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=(MIB << 20) // PS, keep_mirror=True,
                        wait_ack=True)
    checked: list[int] = []
    done = asyncio.Event()

    async def sink(ep: CapturedEpoch) -> None:
        await agent.ship(ep)
        await shadow.wait_committed(ep.number)
        assert replica.committed_epoch == ep.number
        if ep.number > 1 and len(checked) < 3:
            dump = short_tmp / f"c{ep.number}.ram"
            await vm.qmp.pmemsave(0, MIB << 20, str(dump))
            bad = differing_pages(read_file_ram(replica.ram_path), dump)
            assert not bad, (ep.number, len(bad))
            checked.append(ep.number)
        if len(checked) >= 3:
            done.set()

    src = ColoSource(vm.qmp, main_block="pc.ram", sock_path=short_tmp / "c.sock", sink=sink,
                     ack_mode="sync", checkpoint_delay_ms=200)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.wait_for(done.wait(), 120)
        assert task.done() is False
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()
        serve.cancel()
        await shadow.stop()
        await listener.close()
        replica.close()
    await vm.qmp.execute("x-colo-lost-heartbeat")
