#!/usr/bin/env python3
"""Automatic failover: N times kill -9 of the primary QEMU under protection, measured.

Each run: a fresh primary (TCG, test guest on a shared-RAM file), `qmpshadow shadow` and
`qmpshadow protect` as separate processes on a unix link, a private mosquitto broker
(credentials), heartbeats every --heartbeat-ms, checkpoints every --interval ms; once the
shadow committed --epochs epochs, kill -9 of the primary QEMU. Measured per run:

  detect  = kill -9  →  the shadow decides to promote (its decision time, wall clock,
            same host)
  promote = decision →  the promoted QEMU's RESUME event (QEMU's own timestamp)
  split brain: the promoted QEMU's RESUME came before the primary was gone (pidfd), or a
            poller saw both QEMUs running (query-status every 5 ms on each)
  lost epochs: epochs the source agent saw acknowledged (committed) but the promotion did
            not start from (promoted epoch < last acknowledged epoch)

and that the promoted guest runs on (its counter moves, mism=0). Last line:
  RESULT detect_ms=<median> promote_ms=<median> split_brain=<count> lost_epochs=<sum>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.cluster.primary import PrimaryProcess
from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import parse_serial, wait_for_counter
from tests.cluster.e2e import (
    CLI,
    Agent,
    RunStates,
    cluster_args,
    kill_pid,
    write_spec,
)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one(i: int, root: Path, broker: Mosquitto, args: argparse.Namespace
              ) -> dict[str, Any]:
    tmp = root / f"r{i}"
    tmp.mkdir()
    spec_path = write_spec(tmp / "vm.toml", tmp / "primary.ram", name=f"b{i}")
    spec = VmSpec.from_toml(spec_path)
    run = RunPaths.create(tmp / "primary")
    vm = QemuProcess(primary_argv(spec, run, accel="tcg"), run, name=f"primary{i}",
                     die_with_parent=True)
    await vm.start()
    replica = tmp / "replica"
    link = f"unix:{tmp / 'link.sock'}"
    cargs = cluster_args(broker, cluster="bench", heartbeat_ms=args.heartbeat_ms,
                         lease_ms=args.lease_ms)
    shadow = source = None
    promoted_pid = None
    try:
        await wait_for_counter(run.serial_log, timeout=30)
        shadow = Agent([*CLI, "shadow", "--spec", str(spec_path), "--replica", str(replica),
                        "--listen", link, "--accel", "tcg", "--json", *cargs],
                       tmp / "shadow.out")
        await shadow.wait_event(lambda e: e.get("event") == "shadow-ready")
        source = Agent([*CLI, "protect", "--spec", str(spec_path), "--qmp",
                        str(run.qmp2_sock), "--to", link, "--interval", str(args.interval),
                        "--json", *cargs], tmp / "source.out")
        await shadow.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
        await shadow.wait_event(lambda e: e.get("event") == "committed"
                                and e["epoch"] >= args.epochs, timeout=60)
        await asyncio.sleep(args.interval / 1000 * 0.37 * (i % 3))  # vary the kill phase
        primary = PrimaryProcess(vm.pid)
        async with RunStates({"primary": vm.qmp,
                              "shadow": replica / "standby" / "qmp2.sock"}) as states:
            killed_at = time.time()
            vm.kill()
            assert await primary.wait(5)
            gone_at = primary.exited_at or time.time()
            ev = await shadow.wait_event(lambda e: e.get("event") == "failover", timeout=30,
                                         allow_exit=True)
            await asyncio.sleep(0.3)
        primary.close()
        promoted_pid = ev["pid"]
        await source.wait_exit(30)
        acked = max([e.get("committed", 0) for e in source.events()
                     if e.get("event") == "epoch"] or [0])
        committed = [e["epoch"] for e in shadow.events() if e.get("event") == "committed"]
        serial = replica / "standby" / "serial.log"
        await wait_for_counter(serial, timeout=30)
        first = parse_serial(serial.read_text(errors="replace"))[0]
        await asyncio.sleep(1.0)
        lines = parse_serial(serial.read_text(errors="replace"))
        guest_ok = lines[-1].counter > first.counter and all(x.mism == 0 for x in lines)
        released = next((e for e in source.events() if e.get("event") == "released"), {})
        acked = max(acked, int(released.get("epoch", 0)))
        split = int(ev["resumed_at"] < gone_at or states.overlap("primary", "shadow") > 0)
        return {
            "detect_ms": (ev["decided_at"] - killed_at) * 1000,
            "promote_ms": (ev["resumed_at"] - ev["decided_at"]) * 1000,
            "gone_ms": (gone_at - killed_at) * 1000,
            "release_ms": (released.get("time", float("nan")) - killed_at) * 1000,
            "split_brain": split,
            "lost_epochs": max(0, acked - ev["epoch"]),
            "backwards": int(committed != sorted(committed)),
            "epoch": ev["epoch"], "acked": acked, "reason": ev["reason"],
            "guest_ok": guest_ok,
        }
    finally:
        for agent in (source, shadow):
            if agent is not None:
                agent.close()
        kill_pid(promoted_pid)
        vm.kill()
        await vm.wait()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--heartbeat-ms", type=int, default=100)
    ap.add_argument("--lease-ms", type=int, default=4000)
    ap.add_argument("--interval", type=int, default=200, help="checkpoint interval (ms)")
    ap.add_argument("--epochs", type=int, default=3, help="committed epochs before the kill")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qs-fo-", dir="/tmp"))
    broker = Mosquitto(root / "broker")
    broker.start()
    results: list[dict[str, Any]] = []
    print(f"{args.runs} failovers: kill -9 of the primary QEMU (TCG, 64 MiB, shared-RAM "
          f"source, checkpoints every {args.interval} ms), heartbeats {args.heartbeat_ms} ms, "
          f"lease {args.lease_ms} ms, unix link, mosquitto on 127.0.0.1")
    try:
        for i in range(args.runs):
            r = await one(i, root, broker, args)
            results.append(r)
            print(f"  run {i + 1:2d}  detect {r['detect_ms']:6.1f} ms  promote "
                  f"{r['promote_ms']:5.1f} ms  (primary gone {r['gone_ms']:5.1f} ms, lease "
                  f"released {r['release_ms']:6.1f} ms)  epoch {r['epoch']} acked "
                  f"{r['acked']}  split_brain {r['split_brain']}  guest "
                  f"{'ok' if r['guest_ok'] else 'BAD'}", flush=True)
    finally:
        broker.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    det = [r["detect_ms"] for r in results]
    pro = [r["promote_ms"] for r in results]
    tot = [a + b for a, b in zip(det, pro, strict=True)]
    print(f"detect   median {statistics.median(det):6.1f} ms  p90 {pct(det, 0.9):6.1f} ms")
    print(f"promote  median {statistics.median(pro):6.1f} ms  p90 {pct(pro, 0.9):6.1f} ms")
    print(f"total    median {statistics.median(tot):6.1f} ms  p90 {pct(tot, 0.9):6.1f} ms")
    bad_guest = sum(not r["guest_ok"] for r in results)
    backwards = sum(r["backwards"] for r in results)
    if bad_guest or backwards:
        print(f"WARNING: guest not running cleanly after {bad_guest} promotions, committed "
              f"epochs went backwards in {backwards} runs")
    print(json.dumps({"runs": results}) if os.environ.get("QMPSHADOW_BENCH_JSON") else "",
          end="")
    print(f"RESULT detect_ms={statistics.median(det):.1f} "
          f"promote_ms={statistics.median(pro):.1f} "
          f"split_brain={sum(r['split_brain'] for r in results)} "
          f"lost_epochs={sum(r['lost_epochs'] for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
