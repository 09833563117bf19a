"""Disk replication per epoch on real QEMU: bitmaps + blockdev-backup into the source
agent's NBD target → DISK_BLOCK frames → the shadow's replica, applied only at commit.

The disk is written by ``qemu-io`` in the primary's monitor between checkpoints (so the
device needs ``share-rw=on`` here); the shadow's image must equal a copy of the primary's
image taken while the primary is held in the same checkpoint.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path

import pytest

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.agents.source import SourceAgent
from qmpshadow.disk.replicator import DiskReplicator, DiskSource
from qmpshadow.disk.spec import DiskSpec, disks_from_list
from qmpshadow.errors import ConfigError, DiskError
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.testguest import wait_for_counter
from qmpshadow.shadow.errors import ReplicaError
from qmpshadow.shadow.replica import Replica
from qmpshadow.source.shared_ram import SharedRamSource
from qmpshadow.transport import local
from tests.integration.conftest import LaunchVm
from tests.integration.shadowkit import MIB, PS, dirtier_spec

pytestmark = [pytest.mark.qemu]

DISK = 8 << 20


def _disk_args(image: Path) -> tuple[str, ...]:
    return ("-blockdev", f"file,node-name=d0-file,filename={image}",
            "-blockdev", "raw,node-name=d0,file=d0-file",
            "-device", "ide-hd,drive=d0,bus=ide.0,unit=0,share-rw=on")


async def test_shadow_disk_equals_primary_at_each_commit(
        launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice) -> None:
    image, shadow_image = short_tmp / "p.disk", short_tmp / "s.disk"
    rng = random.Random(7)
    image.write_bytes(rng.randbytes(DISK))  # the initial full sync must carry this
    with open(shadow_image, "wb") as f:
        f.truncate(DISK)
    mem_path = short_tmp / "p.ram"
    spec = dirtier_spec("dk", mem_path=mem_path).replace(extra_args=_disk_args(image))
    vm = await launch_vm(spec, accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = Replica.open(short_tmp / "replica", durable=False, disks=[shadow_image])
    listener = await local.listen(short_tmp / "link.sock")
    shadow = ShadowAgent(listener=listener, replica=replica, machine_type="pc-i440fx-7.2")
    serve = asyncio.create_task(shadow.serve())
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=(MIB << 20) // PS, wait_ack=True,
                        disks=True)
    disks = DiskReplicator(vm.qmp, [DiskSource("d0", DISK)], short_tmp)
    src = SharedRamSource(vm.qmp, mem_path=mem_path, main_block="mem",
                          sock_path=short_tmp / "d.sock", disks=disks)
    await src.open()
    failed = 0
    try:
        for n in range(1, 7):
            if n > 1:  # guest-visible writes between checkpoints, some overlapping
                for _ in range(3):
                    off = rng.randrange(0, DISK // 512 - 256) * 512
                    size = rng.choice((512, 4096, 70000 // 512 * 512, 1 << 20))
                    await vm.qmp.human_monitor_command(
                        f'qemu-io d0 "write -P {rng.randrange(1, 255)} {off} {size}"')
            await agent.prepare()
            copy = short_tmp / f"c{n}.disk"
            held, release = asyncio.Event(), asyncio.Event()

            async def snapshot(copy: Path = copy, held: asyncio.Event = held,
                               release: asyncio.Event = release) -> None:
                await held.wait()
                shutil.copyfile(image, copy)
                release.set()

            task = asyncio.create_task(snapshot())
            if n == 4:  # a job that does not finish in time: the epoch is lost, not wrong
                disks.job_timeout = 0.0
                with pytest.raises(DiskError, match="did not finish"):
                    await src.checkpoint(full=agent.need_full, held=held, release=release)
                await task
                disks.job_timeout = 60.0
                failed += 1
                continue
            ep = await src.checkpoint(full=agent.need_full, held=held, release=release)
            await task
            # the guest runs again: these writes belong to the next epoch, not this one
            await vm.qmp.human_monitor_command('qemu-io d0 "write -P 0xee 0 65536"')
            await agent.ship(ep)
            await shadow.wait_committed(n - failed)  # acked when durable, applied after
            assert replica.committed_epoch == n - failed
            assert shadow_image.read_bytes() == copy.read_bytes(), f"epoch {n}"
            copy.unlink()
            if n in (1, 5):  # the first, and the one after the failed capture: full
                assert ep.full and sum(len(d) for _, _, d in ep.disk) == DISK
            else:
                assert 0 < sum(len(d) for _, _, d in ep.disk) < DISK
    finally:
        await agent.close()
        await src.close()
        serve.cancel()
        await shadow.stop()
        await listener.close()
        replica.close()
    assert os.path.getsize(shadow_image) == DISK


def test_missing_shadow_disk_and_bad_spec_are_refused(short_tmp: Path) -> None:
    with pytest.raises(ReplicaError, match="cannot open the shadow's disk image"):
        Replica.open(short_tmp / "r", durable=False, disks=[short_tmp / "missing.raw"])
    with pytest.raises(ConfigError, match="shadow_path"):
        DiskSpec(id="d0", path=short_tmp / "x.raw")
    with pytest.raises(ConfigError, match="unknown key"):
        disks_from_list([{"id": "d0", "path": "a", "shadow_path": "b", "sise": 1}], None)
    with pytest.raises(ConfigError, match="primary's image"):
        DiskSpec(id="d0", path=short_tmp / "x.raw", shadow_path=short_tmp / "x.raw")


async def test_shadow_without_disks_refuses_a_disk_replicating_source(short_tmp: Path) -> None:
    """HELLO carries Feature.DISK: a shadow without [[disks]] ends the link at once (an
    older shadow refuses the unknown feature bit the same way) instead of resyncing
    forever on DISK_BLOCK frames it cannot apply."""
    replica = Replica.open(short_tmp / "replica", durable=False)
    listener = await local.listen(short_tmp / "link.sock")
    events: list[dict[str, object]] = []
    shadow = ShadowAgent(listener=listener, replica=replica, machine_type="pc-i440fx-7.2",
                         on_status=events.append)
    serve = asyncio.create_task(shadow.serve())
    agent = SourceAgent(connect=lambda: local.connect(short_tmp / "link.sock"),
                        page_size=PS, main_pages=16, disks=True)
    try:
        await agent.prepare()
        for _ in range(200):
            if any(e.get("event") == "source-lost" for e in events):
                break
            await asyncio.sleep(0.01)
        lost = [e for e in events if e.get("event") == "source-lost"]
        assert lost and "this shadow has none" in str(lost[0]["reason"]), events
    finally:
        await agent.close()
        serve.cancel()
        await shadow.stop()
        await listener.close()
        replica.close()
