"""Disk replication cost per checkpoint: added pause and backup-job time vs dirty size.

One run, one primary (the test guest under TCG, shared-RAM source, a 128 MiB raw disk):
for each dirty size (1, 4, 16, 64 MiB written with qemu-io into the same region before
each checkpoint) it takes checkpoints with disk capture into the agent's NBD target (the
shipped path; job after ``cont``) and, as the anchor, the same checkpoint without disk
capture after the same writes (both pay QEMU's flush of the freshly written data at
``stop``). "local" is the same dirty size copied by a plain ``blockdev-backup`` into a
local raw node with the primary stopped until the job ends. Pauses are QEMU's
STOP→RESUME event times. Negative "added" means the disk checkpoint pauses less than the
plain one: with disks the device state comes from ``xen-save-devices-state`` (no vmdesc,
no small RAM blocks, no block inactivation) instead of ``migrate``.

    .venv/bin/python bench/disk_epoch.py [--reps 3]

Last line: ``RESULT disk_pause_ms=X`` = median added pause at 16 MiB dirty (NBD target).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qmpshadow.disk.replicator import DiskReplicator, DiskSource
from qmpshadow.qemu.accel import detect_accel
from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args, wait_for_counter
from qmpshadow.qmp.control import QmpControl
from qmpshadow.source.shared_ram import SharedRamSource

DISK = 128 << 20
SIZES = (1, 4, 16, 64)


async def dirty(qmp: QmpControl, mib: int, rng: random.Random, off: int) -> None:
    await qmp.human_monitor_command(
        f'qemu-io d0 "write -P {rng.randrange(1, 255)} {off} {mib}M"')


async def local_backup(qmp: QmpControl, bitmap: str, seq: int) -> tuple[float, float]:
    """Stop, one transaction (next bitmap + incremental backup into a local raw node),
    wait for the job, cont: (pause ms, job ms)."""
    t0 = time.monotonic()
    await qmp.stop()
    since = qmp.last_event_seq
    await qmp.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "d0", "name": f"l{seq}", "granularity": 65536}},
        {"type": "blockdev-backup",
         "data": {"device": "d0", "target": "loc", "sync": "incremental", "bitmap": bitmap,
                  "job-id": f"lj{seq}"}}]})
    await qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, since=since)
    t1 = time.monotonic()
    await qmp.cont()
    await qmp.execute("block-dirty-bitmap-remove", {"node": "d0", "name": bitmap})
    return (time.monotonic() - t0) * 1000, (t1 - t0) * 1000


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="qsde-") as d:
        tmp = Path(d)
        image, local = tmp / "p.disk", tmp / "local.disk"
        for f in (image, local):
            with open(f, "wb") as fh:
                fh.truncate(DISK)
        mem = tmp / "p.ram"
        spec = VmSpec(
            name="de", memory=MemorySpec(size_mib=64, backend="file", backend_id="mem",
                                         mem_path=mem),
            kernel=guest_kernel_path(), kernel_args=kernel_args(pages=16, region_mib=8),
            extra_args=("-blockdev", f"file,node-name=d0-file,filename={image}",
                        "-blockdev", "raw,node-name=d0,file=d0-file",
                        "-device", "ide-hd,drive=d0,bus=ide.0,unit=0,share-rw=on",
                        "-blockdev", f"file,node-name=loc-file,filename={local}",
                        "-blockdev", "raw,node-name=loc,file=loc-file"))
        run = RunPaths.create(tmp / "vm")
        proc = QemuProcess(primary_argv(spec, run, accel=detect_accel("tcg")), run, name="de",
                           start_timeout=60, die_with_parent=True)
        await proc.start()
        try:
            await wait_for_counter(run.serial_log, timeout=30)
            qmp = proc.qmp
            reps = DiskReplicator(qmp, [DiskSource("d0", DISK)], tmp)
            src = SharedRamSource(qmp, mem_path=mem, main_block="mem",
                                  sock_path=tmp / "s.sock", disks=reps)
            await src.open()
            first = await src.checkpoint(full=True)
            print(f"initial full sync: {sum(len(b[2]) for b in first.disk) >> 20} MiB, "
                  f"pause {first.pause_ms:.0f} ms")
            await src.checkpoint()
            print(f"{'dirty MiB':>9} {'anchor ms':>9} {'pause ms':>9} {'added ms':>9} "
                  f"{'job ms':>8} {'local pause':>11} {'local job':>9}")
            added16 = 0.0
            seq = 0
            for mib in SIZES:
                # the same region each time: an anchor epoch leaves the next capture's
                # dirty set unchanged, and both pay the same flush of the written data
                off = rng.randrange(0, (DISK - (mib << 20)) // 65536 + 1) * 65536
                pauses, anchor, jobs, lp, lj = [], [], [], [], []
                for _ in range(args.reps):
                    await dirty(qmp, mib, rng, off)
                    src.disks = None  # the anchor: the same checkpoint without disk capture
                    ep = await src.checkpoint()
                    anchor.append(ep.pause_ms or 0.0)
                    src.disks = reps
                    await dirty(qmp, mib, rng, off)
                    t0 = time.monotonic()
                    ep = await src.checkpoint()
                    assert sum(len(b[2]) for b in ep.disk) >= mib << 20
                    pauses.append(ep.pause_ms or (time.monotonic() - t0) * 1000)
                    jobs.append(reps.last_job_ms)
                # local reference: the same dirty size into a local raw node
                seq += 1
                await qmp.execute("block-dirty-bitmap-add",
                                  {"node": "d0", "name": f"l{seq - 1}", "granularity": 65536})
                for _ in range(args.reps):
                    await dirty(qmp, mib, rng, off)
                    seq += 1
                    p, j = await local_backup(qmp, f"l{seq - 2}", seq - 1)
                    lp.append(p)
                    lj.append(j)
                await qmp.execute("block-dirty-bitmap-remove",
                                  {"node": "d0", "name": f"l{seq - 1}"})
                med, base = statistics.median(pauses), statistics.median(anchor)
                added = med - base
                if mib == 16:
                    added16 = added
                print(f"{mib:>9} {base:>9.1f} {med:>9.1f} {added:>9.1f} "
                      f"{statistics.median(jobs):>8.1f} {statistics.median(lp):>11.1f} "
                      f"{statistics.median(lj):>9.1f}")
            await src.close()
        finally:
            await proc.stop()
    print(f"RESULT disk_pause_ms={added16:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
