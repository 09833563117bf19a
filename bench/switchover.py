#!/usr/bin/env python3
"""Planned switchover vs plain QEMU live migration: time to move and service downtime.

One run, two chains of moves of a test VM (default 1 GiB, TCG, the dirtier guest writing
--pages pages per ~1 ms loop in a --region MiB region: steady dirtying), on this host:

* **switchover** (--moves times): the VM is protected by real `qmpshadow protect` /
  `qmpshadow shadow` agents (unix link, private mosquitto, checkpoints every --interval ms)
  and moved by the real `qmpshadow switchover --json`. --source: ``shared-ram`` (the
  default under TCG; RAM in a shared file in /dev/shm, the final epoch hashes all of it)
  or ``colo`` (the default under --accel kvm; plain RAM, QEMU's COLO checkpoints, the final
  epoch is a checkpoint QEMU takes on request: dirty pages + device state).
  The promoted copy is then protected again by a fresh shadow (re-protection, generation
  +2) and moved again, and so on.
* **migration** (--moves times): the same guest (plain RAM by default, see --migrate-ram)
  migrated by plain QEMU, default migration settings (only the destination's ``events``
  capability is set, to be told of completion): a fresh source warmed up like the
  protected one, a destination started beforehand with the same command line (``-S
  -incoming defer``), ``migrate-incoming unix:...``, ``migrate``, ``cont`` on the
  destination's MIGRATION ``completed`` event.

Per move:
  move     = request → the destination's RESUME event (QEMU's timestamp). Request:
             switchover — the source agent received the command (the CLI's Python start-up,
             also printed, is not counted); migration — the ``migrate`` command was sent.
             Neither counts starting the destination QEMU (the standby is warm; the
             migration destination is pre-started, which favours migration).
  downtime = the source's STOP event → the destination's RESUME event (QEMU timestamps,
             same host clock).
After each move (untimed) the guest must carry on at the destination with mism=0 and, for
the switchover, from exactly the final epoch (lost_epochs=0).

Last line: RESULT switchover_move_ms=X migrate_move_ms=Y switchover_downtime_ms=Z
migrate_downtime_ms=W (medians). Targets: X <= 0.1*Y, Z <= 1.5*W. The switchover's
downtime is also split into its consecutive pieces (stop+capture, ship+commit, release,
the shadow's stream build, connect, send, load, handoff, cont), per move and as medians,
with the standby's promotion-stream prepare that ship+commit includes (and in how many
moves it reused the previous epoch's checked small-block part).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.migration.destination import Destination, destination_argv
from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args
from qmpshadow.qmp.control import QmpControl
from qmpshadow.testing.guest import guest_continues, last_counter
from tests.faults.e2e import CLI, Agent, cluster_args, kill_pid


def write_spec(path: Path, mem_path: Path | None, args: argparse.Namespace,
               backend_id: str = "mem") -> Path:
    """The test VM's spec; RAM in the shared file ``mem_path``, or plain RAM (None)."""
    guest = kernel_args(pages=args.pages, region_mib=args.region, delay_us=args.delay,
                        pattern="text", print_ms=100)
    memory = (f'backend = "file"\nbackend_id = "{backend_id}"\nmem_path = "{mem_path}"'
              if mem_path is not None else 'backend = "ram"')
    path.write_text(f"""
name = "sw"
kernel = "{guest_kernel_path()}"
kernel_args = "{guest}"
accel = "{args.accel}"
[memory]
size_mib = {args.mem}
{memory}
""")
    return path


def committed_at_least(n: int, e: dict[str, Any]) -> bool:
    return e.get("event") == "committed" and int(e["epoch"]) >= n


async def warm_up(serial: Path, args: argparse.Namespace) -> None:
    """One full rotation of the dirty region: every page of it is written (non-zero)."""
    loops = args.region * 256 // args.pages
    await guest_continues(serial, after=0, loops=loops + 20, timeout=600)


async def carries_on(old_serial: Path, new_serial: Path) -> bool:
    last = last_counter(old_serial)
    try:
        await guest_continues(new_serial, after=last.counter if last else 0, loops=20,
                              timeout=60)
    except Exception as exc:  # reported, not hidden, and the bench goes on
        print(f"    guest check FAILED: {exc}", flush=True)
        return False
    return True


async def switchover_chain(root: Path, broker: Mosquitto, args: argparse.Namespace
                           ) -> list[dict[str, Any]]:
    colo = args.source == "colo"
    # COLO: the primary has plain RAM (QEMU sends its dirty pages); a promoted copy's RAM
    # is its replica's file, under the primary's RAMBlock name (pc.ram)
    spec = write_spec(root / "s0.toml", None if colo else root / "s0.ram", args)
    source_args = ["--source", "colo", "--ack", args.ack] if colo else []
    run = RunPaths.create(root / "s0")
    vm = QemuProcess(primary_argv(VmSpec.from_toml(spec), run, accel=args.accel), run,
                     name="primary", die_with_parent=True)
    await vm.start()
    await warm_up(run.serial_log, args)
    qmp, serial, gen = run.qmp2_sock, run.serial_log, 1
    cargs = cluster_args(broker, cluster="bench", heartbeat_ms=100, lease_ms=args.lease_ms)
    results: list[dict[str, Any]] = []
    pids: list[int] = []
    prev_dir: Path | None = None
    try:
        for i in range(args.moves):
            rep = root / f"rep{i}"
            link = f"unix:{root / f'l{i}.sock'}"
            control = root / f"c{i}.sock"
            shadow = Agent([*CLI, "shadow", "--spec", str(spec), "--replica", str(rep),
                            "--listen", link, "--accel", args.accel, "--json", *cargs],
                           root / f"shadow{i}.out")
            source = None
            try:
                await shadow.wait_event(lambda e: e.get("event") == "shadow-ready", 120)
                source = Agent([*CLI, "protect", "--spec", str(spec), "--qmp", str(qmp),
                                "--to", link, "--interval", str(args.interval), "--json",
                                "--generation", str(gen), "--control", str(control),
                                *source_args, *cargs], root / f"source{i}.out")
                await source.wait_event(lambda e: e.get("event") == "lease-protected", 60)
                await shadow.wait_event(lambda e: e.get("event") == "watch-armed", 60)
                first = (await shadow.wait_event(lambda e: e.get("event") == "committed",
                                                 300))["epoch"]
                await shadow.wait_event(functools.partial(committed_at_least, first + 3),
                                        120)
                await asyncio.sleep(args.settle)
                t0 = time.time()
                proc = await asyncio.create_subprocess_exec(
                    *CLI, "switchover", "--control", str(control), "--json",
                    *([] if args.prefinal else ["--no-prefinal"]),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 120)
                cli_ms = (time.time() - t0) * 1000
                if proc.returncode != 0:
                    raise RuntimeError(f"switchover failed: {err.decode()[-2000:]}")
                res = json.loads(out)
                pids.append(int(res["new_pid"]))
                await source.wait_exit(60)
                await shadow.wait_exit(60)
            finally:
                if source is not None:
                    source.close()
                if shadow.proc.poll() is not None and pids and shadow.events() and any(
                        e.get("event") == "failover" for e in shadow.events()):
                    # promoted: Agent.close() would kill the standby QEMU it announced,
                    # which is now the running VM
                    shadow._f.close()
                else:
                    shadow.close()
            new_serial = rep / "standby" / "serial.log"
            res["guest_ok"] = await carries_on(serial, new_serial)
            res["cli_ms"] = cli_ms
            results.append(res)
            print(f"  switchover {i + 1:2d}  move {res['move_ms']:7.1f} ms  downtime "
                  f"{res['downtime_ms']:6.1f} ms  (final epoch {res['final_epoch_ms']:.1f}, "
                  f"commit {res['commit_ms']:.1f}, promote {res['promote_ms']:.1f} ms; "
                  f"epoch {res['epoch']}, lost {res['lost_epochs']}, "
                  f"{'full' if res['full'] else 'delta'}; CLI wall {cli_ms:.0f} ms)  guest "
                  f"{'ok' if res['guest_ok'] else 'BAD'}", flush=True)
            print(f"      downtime: {breakdown(res)}", flush=True)
            # the old primary was killed by the switchover: its RAM can go
            if prev_dir is not None:
                shutil.rmtree(prev_dir, ignore_errors=True)
            else:
                (root / "s0.ram").unlink(missing_ok=True)
            prev_dir = rep
            spec = write_spec(root / f"s{i + 1}.toml", rep / "ram", args,
                              backend_id="pc.ram" if colo else "mem")
            qmp, serial = rep / "standby" / "qmp2.sock", new_serial
            gen = int(res["reprotect_generation"])
    finally:
        vm.kill()
        await vm.wait()
        for pid in pids:
            kill_pid(pid)
    return results


async def migration_chain(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """--moves plain QEMU migrations, each of a fresh, warmed-up source: a migration that
    corrupts its guest (QEMU 7.2 under TCG does, see below) must not spoil the next."""
    file = args.migrate_ram == "file"
    results: list[dict[str, Any]] = []
    for i in range(args.moves):
        spec = VmSpec.from_toml(write_spec(root / f"ms{i}.toml",
                                           root / f"ms{i}.ram" if file else None, args))
        run = RunPaths.create(root / f"ms{i}")
        src = QemuProcess(primary_argv(spec, run, accel=args.accel), run,
                          name=f"mig-source{i}", die_with_parent=True)
        await src.start()
        dest: Destination | None = None
        try:
            await warm_up(run.serial_log, args)
            if i == 0:
                params = await src.qmp.execute("query-migrate-parameters")
                caps = await src.qmp.execute("query-migrate-capabilities")
                on = ([c["capability"] for c in caps if c.get("state")]
                      if isinstance(caps, list) else [])
                print(f"  QEMU migration defaults: max-bandwidth "
                      f"{params.get('max-bandwidth', 0) / 2**20:.0f} MiB/s, downtime-limit "
                      f"{params.get('downtime-limit')} ms, capabilities on: {on or 'none'}",
                      flush=True)
            spec_d = VmSpec.from_toml(write_spec(
                root / f"md{i}.toml", root / f"md{i}.ram" if file else None, args))
            drun = RunPaths.create(root / f"md{i}")
            dest = Destination(destination_argv(spec_d, drun, accel=args.accel), drun,
                               name=f"dest{i}")
            await dest.start()
            sock = root / f"mig{i}.sock"
            await dest.qmp.migrate_set_capabilities({"events": True})
            await dest.qmp.migrate_incoming(f"unix:{sock}")
            sq: QmpControl = src.qmp
            since_src, since_dst = sq.last_event_seq, dest.qmp.last_event_seq
            await asyncio.sleep(args.settle)
            t_req = time.time()
            await sq.migrate(f"unix:{sock}")
            await dest.qmp.wait_event(
                "MIGRATION", since=since_dst, timeout=args.migrate_timeout,
                predicate=lambda e: e.data.get("status") in ("completed", "failed"))
            await dest.qmp.cont()
            resume = await dest.qmp.wait_event("RESUME", since=since_dst, timeout=30)
            stop = await sq.wait_event("STOP", since=since_src, timeout=30)
            info = await sq.query_migrate()
            res = {"move_ms": (resume.timestamp - t_req) * 1000,
                   "downtime_ms": (resume.timestamp - stop.timestamp) * 1000,
                   "qemu_downtime_ms": info.get("downtime"),
                   "qemu_total_ms": info.get("total-time"),
                   "passes": info.get("ram", {}).get("dirty-sync-count"),
                   "mib": info.get("ram", {}).get("transferred", 0) / 2**20}
            res["guest_ok"] = await carries_on(run.serial_log, drun.serial_log)
            results.append(res)
            print(f"  migration  {i + 1:2d}  move {res['move_ms']:7.1f} ms  downtime "
                  f"{res['downtime_ms']:6.1f} ms  (QEMU: downtime {res['qemu_downtime_ms']} "
                  f"ms, total {res['qemu_total_ms']} ms, {res['passes']} passes, "
                  f"{res['mib']:.1f} MiB)  guest {'ok' if res['guest_ok'] else 'BAD'}",
                  flush=True)
        finally:
            if dest is not None:
                await dest.kill()
            src.kill()
            await src.wait()
            for p in (root / f"ms{i}.ram", root / f"md{i}.ram"):
                p.unlink(missing_ok=True)
    return results


def med(rs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rs)


#: the switchover's downtime in consecutive pieces (STOP → ... → RESUME), from its answer
PIECES = (("stop_to_captured_ms", "stop+capture"), ("commit_ms", "ship+commit"),
          ("release_ms", "release"), ("shadow_build_ms", "build"),
          ("shadow_connect_ms", "connect"), ("shadow_send_ms", "send"), ("shadow_load_ms", "load"),
          ("shadow_handoff_ms", "handoff"), ("shadow_resume_ms", "cont"))


def breakdown(res: dict[str, Any]) -> str:
    """The downtime pieces of one switchover; unknown ones say so; ``other`` is the rest
    (event/status bookkeeping between the pieces, the shadow stopping its link)."""
    known = [float(res[k]) for k, _ in PIECES if isinstance(res.get(k), (int, float))]
    return (", ".join(f"{label} {res[key]:.1f}" if isinstance(res.get(key), (int, float))
                      else f"{label} ?" for key, label in PIECES)
            + f", other {float(res['downtime_ms']) - sum(known):.1f} ms"
            + _prepare_note([res]))


def _prepare_note(rs: list[dict[str, Any]]) -> str:
    # the standby's prepare runs right after its ack, on the loop that then takes the
    # release: it lands in release/send, inside the downtime; shown, not summed
    vals = [float(r["shadow_prepare_ms"]) for r in rs
            if isinstance(r.get("shadow_prepare_ms"), (int, float))]
    reused = sum(1 for r in rs if r.get("shadow_prepare_reused") is True)
    return (f" (the standby's prepare after the ack {statistics.median(vals):.1f} ms, RAM part "
            f"reused {reused}/{len(rs)})" if vals else "")


def median_breakdown(rs: list[dict[str, Any]]) -> str:
    out = []
    for key, label in PIECES:
        vals = [float(r[key]) for r in rs if isinstance(r.get(key), (int, float))]
        out.append(f"{label} {statistics.median(vals):.1f}" if vals else f"{label} ?")
    return ", ".join(out) + " ms" + _prepare_note(rs)


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="qs-sw-", dir=args.dir))
    broker = Mosquitto(root / "broker")
    broker.start()
    ack = (f" (ack {args.ack}, {'pre-final checkpoint' if args.prefinal else 'no pre-final'})"
           if args.source == "colo" else "")
    print(f"VM: {args.mem} MiB, {args.accel}, {args.source} source{ack}, dirtier "
          f"pages={args.pages} region="
          f"{args.region} MiB delay={args.delay} us (steady dirtying), RAM files in "
          f"{args.dir}; {args.moves} moves each way; switchover: checkpoints every "
          f"{args.interval} ms, heartbeats 100 ms, lease {args.lease_ms} ms, unix link, "
          "mosquitto on 127.0.0.1",
          flush=True)
    try:
        sw = await switchover_chain(root, broker, args)
        mig = await migration_chain(root, args)
    finally:
        broker.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    x, y = med(sw, "move_ms"), med(mig, "move_ms")
    z, w = med(sw, "downtime_ms"), med(mig, "downtime_ms")
    print()
    print(f"{'median':<32}{'switchover':>12}{'migration':>12}{'ratio':>8}")
    print(f"{'time to move (request → running)':<32}{x:>9.1f} ms{y:>9.1f} ms{x / y:>8.3f}")
    print(f"{'downtime (STOP → RESUME)':<32}{z:>9.1f} ms{w:>9.1f} ms{z / w:>8.3f}")
    print(f"switchover CLI wall clock (incl. Python start-up): median "
          f"{med(sw, 'cli_ms'):.0f} ms; final epoch {med(sw, 'final_epoch_ms'):.1f} ms, "
          f"commit {med(sw, 'commit_ms'):.1f} ms, promote {med(sw, 'promote_ms'):.1f} ms")
    print(f"switchover downtime pieces (medians): {median_breakdown(sw)}")
    lost = sum(int(r["lost_epochs"]) for r in sw)
    bad = sum(not r["guest_ok"] for r in sw + mig)
    print(f"lost epochs {lost}; guest checks failed {bad} of {len(sw) + len(mig)}")
    print(f"targets: move {x / y:.3f} <= 0.1 {'met' if x <= 0.1 * y else 'NOT met'}; "
          f"downtime {z / w:.2f} <= 1.5 {'met' if z <= 1.5 * w else 'NOT met'}")
    print(f"RESULT switchover_move_ms={x:.1f} migrate_move_ms={y:.1f} "
          f"switchover_downtime_ms={z:.1f} migrate_downtime_ms={w:.1f}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moves", type=int, default=10, help="moves each way (default 10)")
    p.add_argument("--quick", action="store_true", help="3 moves each way, 256 MiB VM")
    p.add_argument("--mem", type=int, default=1024, help="guest MiB (default 1024)")
    p.add_argument("--accel", choices=["tcg", "kvm"], default="tcg")
    p.add_argument("--source", choices=["auto", "shared-ram", "colo"], default="auto",
                   help="the switchover's checkpoint source (auto: colo under kvm, "
                   "shared-ram under tcg; QEMU 7.2's COLO deadlocks under TCG)")
    p.add_argument("--no-prefinal", dest="prefinal", action="store_false",
                   help="COLO: switchover --no-prefinal (no checkpoint right before the final)")
    p.add_argument("--ack", choices=["async", "sync"], default="async",
                   help="COLO ack mode of the protection before the move (default async)")
    p.add_argument("--pages", type=int, default=4, help="pages dirtied per loop (default 4)")
    p.add_argument("--region", type=int, default=64, help="dirty region MiB (default 64)")
    p.add_argument("--delay", type=int, default=1000, help="guest delay per loop in us")
    p.add_argument("--interval", type=int, default=500, help="checkpoint interval ms")
    p.add_argument("--lease-ms", type=int, default=30000,
                   help="lease (default 30000: on a loaded 2-core TCG host the first full "
                   "1 GiB epoch took ~40 s and the default 4 s lease lapsed during it; the "
                   "switchover itself does not wait for the lease)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds before each move")
    p.add_argument("--migrate-timeout", type=float, default=600.0)
    p.add_argument("--dir", default="/dev/shm", help="where RAM files and run dirs go")
    p.add_argument("--migrate-ram", choices=["ram", "file"], default="ram",
                   help="RAM of the migrated VM: plain (default) or a shared file like "
                   "the protected one")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    args = p.parse_args(argv)
    if args.source == "auto":
        args.source = "colo" if args.accel == "kvm" else "shared-ram"
    if args.source == "colo" and args.accel != "kvm":
        p.error("--source colo needs --accel kvm (QEMU 7.2's COLO deadlocks under TCG)")
    if args.quick:
        args.moves = min(args.moves, 3)
        args.mem = min(args.mem, 256)
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
