"""Acceptance: automatic failover on real QEMU (TCG, shared-RAM source), real mosquitto and
the real CLI agents; the replication link is a unix socket.

- kill -9 of the primary QEMU: the source agent releases the lease at once, the shadow
  promotes by itself; the guest counter carries on from the committed epoch with mism=0;
  the two QEMUs are never seen running at once; committed epochs never go backwards.
- kill -9 of the source agent: its fencer kills the primary at once; the shadow promotes
  only after the lease expired.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import parse_serial, wait_for_counter
from tests.cluster.e2e import CLI, Agent, RunStates, cluster_args, kill_pid, write_spec
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
LEASE_MS = 3000


async def _setup(launch_vm: LaunchVm, tmp: Path, broker: Mosquitto,
                 tcg: AccelChoice) -> tuple[object, Agent, Agent, Path]:
    spec_path = write_spec(tmp / "vm.toml", tmp / "primary.ram")
    spec = VmSpec.from_toml(spec_path)
    vm = await launch_vm(spec, accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = tmp / "replica"
    link = f"unix:{tmp / 'link.sock'}"
    cargs = cluster_args(broker, lease_ms=LEASE_MS)
    shadow = Agent([*CLI, "shadow", "--spec", str(spec_path), "--replica", str(replica),
                    "--listen", link, "--accel", "tcg", "--json", *cargs], tmp / "shadow.out")
    await shadow.wait_event(lambda e: e.get("event") == "shadow-ready")
    source = Agent([*CLI, "protect", "--spec", str(spec_path), "--qmp",
                    str(vm.run.qmp2_sock), "--to", link, "--interval", "200", "--json",
                    "--fencer-log", str(tmp / "fencer.log"), *cargs], tmp / "source.out")
    await source.wait_event(lambda e: e.get("event") == "lease-protected", timeout=30)
    await shadow.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
    await shadow.wait_event(lambda e: e.get("event") == "committed" and e["epoch"] >= 4,
                            timeout=60)
    return vm, shadow, source, replica


def _committed(shadow: Agent) -> list[int]:
    return [e["epoch"] for e in shadow.events() if e.get("event") == "committed"]


async def _carries_on(replica: Path, primary_serial: Path, seconds: float = 3.0) -> None:
    """The promoted copy goes on from no later than where the primary stopped.

    The guest prints at most every ``print_ms``, so both the primary's last line and the
    promoted copy's first line can each be up to one print interval of loops away from the
    counter at the committed epoch: the bound is two of the primary's largest steps.
    """
    primary = parse_serial(primary_serial.read_text(errors="replace"))
    step = max(b.counter - a.counter for a, b in itertools.pairwise(primary))
    serial = replica / "standby" / "serial.log"
    await wait_for_counter(serial, timeout=30)
    first = parse_serial(serial.read_text(errors="replace"))[0]
    assert first.counter <= primary[-1].counter + 2 * step, (first, primary[-1], step)
    await asyncio.sleep(seconds)
    lines = parse_serial(serial.read_text(errors="replace"))
    assert lines[-1].counter > first.counter + 10
    assert all(x.mism == 0 for x in lines), [x for x in lines if x.mism][:3]


async def test_primary_killed_shadow_promotes_by_itself(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    vm, shadow, source, replica = await _setup(launch_vm, short_tmp, broker, tcg)
    promoted_pid = None
    try:
        standby_qmp = replica / "standby" / "qmp2.sock"
        async with RunStates({"primary": vm.qmp, "shadow": standby_qmp}) as states:
            killed_at = time.time()
            vm.kill()
            await vm.wait()
            ev = await shadow.wait_event(lambda e: e.get("event") == "failover", timeout=30,
                                         allow_exit=True)
            await asyncio.sleep(0.5)
        promoted_pid = ev["pid"]
        print("failover:", {k: ev[k] for k in ("reason", "detect_ms", "promote_ms", "epoch")})
        assert "released" in ev["reason"], ev
        assert ev["generation"] == 2
        # detection and promotion are measured; the shadow took over well within a second
        assert ev["decided_at"] - killed_at < 1.0, ev
        assert ev["resumed_at"] > killed_at
        assert states.ran("shadow") and states.ran("primary")
        assert states.overlap("primary", "shadow") == 0.0, (states.ran("primary"),
                                                            states.ran("shadow"))
        committed = _committed(shadow)
        assert committed == sorted(committed) and ev["epoch"] == committed[-1]
        assert await shadow.wait_exit(30) == 0
        assert await source.wait_exit(30) == 0
        released = [e for e in source.events() if e.get("event") == "released"]
        assert released and released[0]["generation"] == 1
        await _carries_on(replica, vm.run.serial_log)
    finally:
        source.close()
        shadow.close()
        kill_pid(promoted_pid)


async def test_source_agent_killed_fencer_stops_primary_then_promotion(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    vm, shadow, source, replica = await _setup(launch_vm, short_tmp, broker, tcg)
    promoted_pid = None
    try:
        standby_qmp = replica / "standby" / "qmp2.sock"
        async with RunStates({"primary": vm.qmp, "shadow": standby_qmp}) as states:
            source.kill()
            killed_at = source.killed_at or time.time()
            # the fencer kills the primary at once (the lease will not be renewed)
            await asyncio.wait_for(vm.wait(), 5)
            primary_gone = time.time()
            ev = await shadow.wait_event(lambda e: e.get("event") == "failover", timeout=30,
                                         allow_exit=True)
            await asyncio.sleep(0.5)
        promoted_pid = ev["pid"]
        print("failover:", {k: ev[k] for k in ("reason", "detect_ms", "promote_ms", "epoch")})
        assert primary_gone - killed_at < 2.0
        assert "lease expired" in ev["reason"], ev
        # only after the lease: the last renewal was at most a heartbeat before the kill
        assert ev["decided_at"] >= killed_at + LEASE_MS / 1000 - 0.2, (ev, killed_at)
        assert ev["resumed_at"] > primary_gone
        assert states.overlap("primary", "shadow") == 0.0
        assert "agent died" in (short_tmp / "fencer.log").read_text()
        committed = _committed(shadow)
        assert committed == sorted(committed) and ev["epoch"] == committed[-1]
        await _carries_on(replica, vm.run.serial_log, seconds=2.0)
    finally:
        source.close()
        shadow.close()
        kill_pid(promoted_pid)
