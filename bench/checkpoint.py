#!/usr/bin/env python3
"""Checkpoint cost: stock QEMU as COLO secondary vs qmpshadow (async and sync ack).

One run, the same test guest and workload (text-like pages), x-checkpoint-delay 200 ms,
--checkpoints (default 50) checkpoints per contender, all under KVM (QEMU 7.2's COLO needs
it). Measured:
  * the primary's pause per checkpoint, from its own STOP/RESUME event timestamps;
  * for qmpshadow, bytes on the wire per epoch (frames incl. device state) against the raw
    bytes of the dirty pages QEMU sent;
  * promotion: kill -9 of the primary, then the warm standby promoted from the replica
    (promote() entry → guest running, and kill → running).
Last line:
  RESULT pause_ratio_async=X pause_ratio_sync=Y wire_ratio=Z promote_ms=W
(ratios are qmpshadow / stock and wire / raw).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.agents.source import SourceAgent
from qmpshadow.qemu.accel import detect_accel
from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args, wait_for_counter
from qmpshadow.qmp.control import QmpControl
from qmpshadow.shadow.replica import Replica
from qmpshadow.shadow.standby import Standby, StandbyState
from qmpshadow.source.colo import ColoSource
from qmpshadow.source.epoch import CapturedEpoch
from qmpshadow.transport import local

MIB = 128
PS = 4096


WARMUP = 5.0


def spec(args: argparse.Namespace) -> VmSpec:
    return VmSpec(name="bench", memory=MemorySpec(size_mib=MIB), kernel=guest_kernel_path(),
                  kernel_args=kernel_args(pages=args.pages, region_mib=args.region,
                                          delay_us=1000,
                                          pattern="text", print_ms=500))


def pauses(events: list[Any], skip: int) -> list[float]:
    """STOP→RESUME durations (ms) from QEMU's event timestamps, after ``skip`` pairs."""
    out, stop = [], None
    for ev in events:
        if ev.name == "STOP":
            stop = ev.timestamp
        elif ev.name == "RESUME" and stop is not None:
            out.append((ev.timestamp - stop) * 1000)
            stop = None
    return out[skip:]


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else xs[0]


async def boot(tmp: Path, name: str, s: VmSpec, accel: Any, **kw: Any) -> QemuProcess:
    run = RunPaths.create(tmp / name)
    proc = QemuProcess(primary_argv(s, run, accel=accel, **kw), run, name=name,
                       start_timeout=60, die_with_parent=True)
    await proc.start()
    return proc


async def collect(qmp: QmpControl, n: int, timeout: float) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + timeout
    with qmp.subscribe(["STOP", "RESUME"]) as sub:
        while sum(e.name == "RESUME" for e in events) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(events)} events in {timeout} s")
            events.append(await sub.get(timeout=max(0.1, deadline - time.monotonic())))
    return events


async def stock(tmp: Path, s: VmSpec, accel: Any, n: int) -> list[float]:
    sec = await boot(tmp, "stock-secondary", s, accel, incoming=True)
    pri = await boot(tmp, "stock-primary", s, accel)
    try:
        await wait_for_counter(pri.run.serial_log, timeout=120)
        await asyncio.sleep(WARMUP)
        await sec.qmp.migrate_set_capabilities({"x-colo": True})
        await sec.qmp.migrate_incoming(f"unix:{tmp}/stock.sock")
        # as qmpshadow's COLO source sets it: no migration events (MIGRATION_PASS at
        # every checkpoint is a monitor write from inside the pause)
        await pri.qmp.migrate_set_capabilities({"x-colo": True, "events": False})
        await pri.qmp.migrate_set_parameters(x_checkpoint_delay=200, max_bandwidth=1 << 40)
        task = asyncio.create_task(collect(pri.qmp, n + 2, 60 + n))
        await pri.qmp.migrate(f"unix:{tmp}/stock.sock")
        events = await task
        return pauses(events, 2)  # migration's own stop, COLO's first (cache setup)
    finally:
        for p in (pri, sec):
            p.kill()
        for p in (pri, sec):
            await p.wait()


async def ours(tmp: Path, s: VmSpec, accel: Any, n: int, ack: str, promote: bool
               ) -> dict[str, Any]:
    work = tmp / f"ours-{ack}"
    replica = Replica.open(work / "replica")
    standby = Standby(s, RunPaths.create(work / "standby"), ram_path=replica.ram_path,
                      accel=accel, die_with_parent=True, start_timeout=60)
    await standby.start()
    await standby.wait_ready(120)
    listener = await local.listen(work / "link.sock")
    shadow = ShadowAgent(listener=listener, replica=replica, machine_type=standby.machine_type,
                         on_commit=lambda: standby.prepare(replica))
    serve = asyncio.create_task(shadow.serve())
    agent = SourceAgent(connect=lambda: local.connect(work / "link.sock"), page_size=PS,
                        main_pages=(MIB << 20) // PS, keep_mirror=True,
                        wait_ack=ack == "sync")
    pri = await boot(tmp, f"primary-{ack}", s, accel)
    wire: list[tuple[int, int]] = []

    async def sink(ep: CapturedEpoch) -> None:
        await agent.ship(ep)
        if ep.number > 1 and agent.stats.last is not None:
            wire.append((agent.stats.last.wire_bytes, agent.stats.last.raw_bytes))

    src = ColoSource(pri.qmp, main_block="pc.ram", sock_path=work / "colo.sock", sink=sink,
                     ack_mode=ack, checkpoint_delay_ms=200)
    result: dict[str, Any] = {}
    try:
        await wait_for_counter(pri.run.serial_log, timeout=120)
        await asyncio.sleep(WARMUP)
        events_task = asyncio.create_task(collect(pri.qmp, n + 2, 60 + n))
        task = asyncio.create_task(src.run())
        events = await events_task
        result["pauses"] = pauses(events, 2)
        result["wire"] = wire
        if promote:
            await asyncio.sleep(0.3)
            t_kill = time.monotonic()
            pri.kill()
            serve.cancel()
            await shadow.stop()
            res = await standby.promote(replica)
            result["promote_ms"] = res.total_ms
            result["promote_parts"] = (f"build {res.build_ms:.1f}, connect {res.connect_ms:.1f},"
                                       f" send {res.send_ms:.1f}, load {res.load_ms:.1f}, "
                                       f"cont {res.cont_ms:.1f} ms; {res.stream_bytes} bytes")
            result["kill_to_running_ms"] = (time.monotonic() - t_kill) * 1000
            result["promoted_epoch"] = res.epoch
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        pri.kill()
        await pri.wait()
        await agent.close()
        serve.cancel()
        await listener.close()
        proc = standby.process if standby.state is StandbyState.PROMOTED else None
        await standby.close()
        if proc is not None:
            await proc.stop(timeout=5)
        replica.close()
    return result


def line(name: str, xs: list[float], anchor: list[float] | None = None) -> str:
    med = statistics.median(xs)
    rel = f"  {med / statistics.median(anchor):5.2f} x stock" if anchor else ""
    return f"{name:<22} median {med:7.2f} ms   p90 {p90(xs):7.2f} ms   n={len(xs)}{rel}"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=50)
    ap.add_argument("--pages", type=int, default=16, help="guest pages dirtied per loop")
    ap.add_argument("--region", type=int, default=2, metavar="MIB",
                    help="guest's rotating region (default 2 MiB: a few seconds per rotation "
                    "under this host's slow KVM, so pages are re-dirtied, not first writes)")
    ap.add_argument("--warmup", type=float, default=5.0, metavar="S",
                    help="seconds the guest runs before checkpoints start (default 5)")
    args = ap.parse_args()
    global WARMUP
    WARMUP = args.warmup
    accel = detect_accel("auto")
    if accel.name != "kvm":
        print(f"needs KVM (COLO deadlocks under TCG on QEMU 7.2): {accel.reason}",
              file=sys.stderr)
        return 2
    s = spec(args)
    n = args.checkpoints
    with tempfile.TemporaryDirectory(prefix="qs-bench-", dir="/dev/shm") as d:
        tmp = Path(d)
        st = await stock(tmp, s, accel, n)
        a = await ours(tmp, s, accel, n, "async", promote=False)
        y = await ours(tmp, s, accel, n, "sync", promote=True)
    print(f"guest: {MIB} MiB, text pattern, {args.pages} pages/loop in {args.region} MiB, "
          f"{args.warmup:g} s warm-up; x-checkpoint-delay "
          f"200 ms; KVM; pauses from the primary's STOP/RESUME events")
    print(line("stock COLO secondary", st))
    print(line("qmpshadow async", a["pauses"], st))
    print(line("qmpshadow sync", y["pauses"], st))
    wires = a["wire"] + y["wire"]
    wire_b = sum(w for w, _ in wires)
    raw_b = sum(r for _, r in wires)
    print(f"wire per epoch: {wire_b / len(wires) / 1e3:.1f} KB vs raw dirty pages "
          f"{raw_b / len(wires) / 1e3:.1f} KB (ratio {wire_b / raw_b:.3f}; incl. ~13 KB "
          "device state per epoch)")
    print(f"promotion: promote() → running {y['promote_ms']:.1f} ms; kill -9 → running "
          f"{y['kill_to_running_ms']:.1f} ms (epoch {y['promoted_epoch']}; "
          f"{y['promote_parts']})")
    ra = statistics.median(a["pauses"]) / statistics.median(st)
    ry = statistics.median(y["pauses"]) / statistics.median(st)
    print(f"RESULT pause_ratio_async={ra:.2f} pause_ratio_sync={ry:.2f} "
          f"wire_ratio={wire_b / raw_b:.3f} promote_ms={y['promote_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
