"""Disks through the real CLI (``protect``/``shadow`` with ``[[disks]]``), real mosquitto:
kill -9 of the primary at a random point, the shadow promotes itself.

- ``mode = "copy"``: the initial full sync is reported (``disk-sync``); the promoted
  guest's memory and disk self-checks stay clean.
- ``mode = "shared"``: nothing is copied and the promotion works, but the promoted guest
  sees disk writes the primary made after the committed checkpoint (its disk self-check
  reports them): the documented limit of that mode (docs/disks.md). To be sure there were
  such writes, the primary is killed only after it has run on with no checkpoint able to
  start (a kill that lands inside a checkpoint's pause leaves none).
- A bad ``[[disks]]`` table stops ``protect`` before it touches the primary.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args, parse_serial, wait_for_counter
from tests.faults.e2e import (
    CLI,
    Agent,
    assert_committed_monotonic,
    cluster_args,
    kill_pid,
    shadow_agent,
    source_agent,
)
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
LEASE_MS = 3000
DISK = 4 << 20
DSLOTS = 128


def _write_spec(tmp: Path, mode: str) -> Path:
    for f in ("p.disk", "s.disk"):
        with open(tmp / f, "wb") as fh:
            fh.truncate(DISK)
    shadow = f'shadow_path = "{tmp / "s.disk"}"\n' if mode == "copy" else ""
    args = kernel_args(pages=16, region_mib=8, delay_us=1000, pattern="text", print_ms=100,
                       dslots=DSLOTS, dchunk=8)
    path = tmp / "vm.toml"
    path.write_text(f"""
name = "dk{mode[0]}"
kernel = "{guest_kernel_path()}"
kernel_args = "{args}"
accel = "tcg"
[memory]
size_mib = 64
backend = "file"
backend_id = "mem"
mem_path = "{tmp / "p.ram"}"
[[disks]]
id = "disk0"
path = "{tmp / "p.disk"}"
mode = "{mode}"
{shadow}""")
    return path


@pytest.mark.parametrize("mode", ["copy", "shared"])
async def test_cli_kill_primary_with_disk(launch_vm: LaunchVm, short_tmp: Path,
                                          broker: Mosquitto, tcg: AccelChoice,
                                          mode: str) -> None:
    spec_path = _write_spec(short_tmp, mode)
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = short_tmp / "replica"
    link = f"unix:{short_tmp / 'link.sock'}"
    cargs = cluster_args(broker, lease_ms=LEASE_MS)
    shadow = shadow_agent(spec_path, replica, link, short_tmp / "shadow.out", cargs)
    source = source_agent(spec_path, vm.run.qmp2_sock, link, short_tmp / "source.out", cargs)
    promoted_pid = None
    try:
        await shadow.wait_event(lambda e: e.get("event") == "shadow-ready", also=[source])
        await shadow.wait_event(lambda e: e.get("event") == "committed" and e["epoch"] >= 4,
                                timeout=60, also=[source])
        await asyncio.sleep(random.uniform(0.05, 0.4))  # a random point of the cycle
        if mode == "shared":
            await _hold_source_while_primary_runs(source, vm.run.serial_log)
        vm.kill()
        await vm.wait()
        os.kill(source.pid, signal.SIGCONT)  # held in "shared" mode; a no-op otherwise
        ev = await shadow.wait_event(lambda e: e.get("event") == "failover", timeout=30,
                                     allow_exit=True)
        promoted_pid = ev["pid"]
        assert_committed_monotonic(shadow)
        serial = replica / "standby" / "serial.log"
        await wait_for_counter(serial, timeout=30)
        first = parse_serial(serial.read_text(errors="replace"))[0]
        await asyncio.sleep(3)
        lines = parse_serial(serial.read_text(errors="replace"))
        assert lines[-1].counter > first.counter + 2 * DSLOTS, (first, lines[-1])
        assert all(x.mism == 0 and x.derr == 0 for x in lines), lines[:3]
        if mode == "copy":
            assert all(x.dmism == 0 for x in lines), [x for x in lines if x.dmism][:3]
            sync = [e for e in source.events() if e.get("event") == "disk-sync"]
            assert sync and sync[0]["complete"] and sync[0]["total"] == DISK, sync[:2]
        else:
            # writes from the future: slots the primary rewrote after the checkpoint
            assert (lines[-1].dmism or 0) > 0, lines[-1]
    finally:
        source.close()
        shadow.close()
        kill_pid(promoted_pid)


async def _hold_source_while_primary_runs(source: Agent, serial: Path) -> None:
    """SIGSTOP the source agent, and return once the primary has printed two more counter
    lines: it then ran after any checkpoint that can still commit, and rewrote disk slots
    the shadow's copy of memory knows older contents of. If the agent was stopped inside a
    checkpoint's pause (the primary does not move on), let it go and try again."""
    loop = asyncio.get_running_loop()
    for _ in range(20):
        os.kill(source.pid, signal.SIGSTOP)
        before = parse_serial(serial.read_text(errors="replace"))[-1].counter
        deadline = loop.time() + 1.0
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            lines = parse_serial(serial.read_text(errors="replace"))
            if sum(x.counter > before for x in lines) >= 2:
                return
        os.kill(source.pid, signal.SIGCONT)
        await asyncio.sleep(random.uniform(0.05, 0.2))
    raise AssertionError("the primary never ran on while its source agent was held")


def test_cli_bad_disk_spec_is_refused(short_tmp: Path) -> None:
    spec = _write_spec(short_tmp, "copy")
    spec.write_text(spec.read_text().replace('mode = "copy"', 'mode = "mirror"'))
    proc = subprocess.run([*CLI, "protect", "--spec", str(spec), "--qmp",
                           str(short_tmp / "none.sock"), "--to", "unix:/nonexistent",
                           "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "disks.mode" in proc.stdout + proc.stderr, (proc.stdout, proc.stderr)
