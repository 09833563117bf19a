"""Fault injection by kill -9, on real QEMU (TCG, shared-RAM source), real mosquitto and the
real CLI agents; the replication link is a unix socket.

- kill -9 of the primary QEMU: the source agent releases the lease at once, the shadow
  promotes by itself; the guest counter carries on from the committed epoch with mism=0.
- kill -9 of the source agent: its fencer kills the primary at once; the shadow promotes
  only after the lease expired.
- kill -9 of the shadow agent: the primary keeps running (unprotected: the broker reports
  the shadow gone); a shadow agent started again on the same replica reaps the dead agent's
  paused standby QEMU, is named again, epochs commit on from where they were, and a kill of
  the primary is then failed over.

Every scenario checks the suite's invariants: never two running copies, the running
copy's counter goes on with mism=0, the committed epoch never goes backwards.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import wait_for_counter
from tests.faults.e2e import (
    Agent,
    RunStates,
    assert_committed_monotonic,
    assert_one_copy,
    carries_on,
    cluster_args,
    kill_pid,
    pid_alive,
    primary_carries_on,
    runs_soon,
    shadow_agent,
    source_agent,
    write_spec,
)
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
LEASE_MS = 3000


async def _setup(launch_vm: LaunchVm, tmp: Path, broker: Mosquitto, tcg: AccelChoice
                 ) -> tuple[Any, Agent, Agent, Path, Path]:
    spec_path = write_spec(tmp / "vm.toml", tmp / "primary.ram")
    spec = VmSpec.from_toml(spec_path)
    vm = await launch_vm(spec, accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = tmp / "replica"
    link = f"unix:{tmp / 'link.sock'}"
    cargs = cluster_args(broker, lease_ms=LEASE_MS)
    shadow = shadow_agent(spec_path, replica, link, tmp / "shadow.out", cargs)
    await shadow.wait_event(lambda e: e.get("event") == "shadow-ready")
    source = source_agent(spec_path, vm.run.qmp2_sock, link, tmp / "source.out", cargs,
                          fencer_log=tmp / "fencer.log")
    await source.wait_event(lambda e: e.get("event") == "lease-protected", timeout=30)
    await shadow.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
    await shadow.wait_event(lambda e: e.get("event") == "committed" and e["epoch"] >= 4,
                            timeout=60)
    return vm, shadow, source, replica, spec_path


async def test_primary_killed_shadow_promotes_by_itself(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    vm, shadow, source, replica, _ = await _setup(launch_vm, short_tmp, broker, tcg)
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
        assert_one_copy(states)
        epochs = assert_committed_monotonic(shadow)
        assert ev["epoch"] == epochs[-1]
        assert await shadow.wait_exit(30) == 0
        assert await source.wait_exit(30) == 0
        released = [e for e in source.events() if e.get("event") == "released"]
        assert released and released[0]["generation"] == 1
        await carries_on(replica, vm.run.serial_log)
    finally:
        source.close()
        shadow.close()
        kill_pid(promoted_pid)


async def test_source_agent_killed_fencer_stops_primary_then_promotion(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    vm, shadow, source, replica, _ = await _setup(launch_vm, short_tmp, broker, tcg)
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
        assert_one_copy(states)
        assert "agent died" in (short_tmp / "fencer.log").read_text()
        epochs = assert_committed_monotonic(shadow)
        assert ev["epoch"] == epochs[-1]
        await carries_on(replica, vm.run.serial_log, seconds=2.0)
    finally:
        source.close()
        shadow.close()
        kill_pid(promoted_pid)


def _standby_pid(shadow: Agent) -> int:
    ready = [e for e in shadow.events() if e.get("event") == "shadow-ready"]
    assert ready, shadow.text()[-2000:]
    return int(ready[-1]["standby_pid"])


async def test_shadow_agent_killed_primary_runs_on_then_protection_resumes(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    vm, shadow, source, replica, spec_path = await _setup(launch_vm, short_tmp, broker, tcg)
    link = f"unix:{short_tmp / 'link.sock'}"
    cargs = cluster_args(broker, lease_ms=LEASE_MS)
    old_standby = _standby_pid(shadow)
    shadow2: Agent | None = None
    promoted_pid = None
    try:
        standby_qmp = replica / "standby" / "qmp2.sock"
        async with RunStates({"primary": vm.qmp, "shadow": standby_qmp}) as states:
            n_protected = source.count("lease-protected")
            shadow.kill()
            killed_at = shadow.killed_at or time.time()
            # the primary runs on, unprotected: the broker publishes the dead agent's will
            unprotected = await source.wait_event(
                lambda e: e.get("event") == "lease-unprotected" and e["time"] > killed_at,
                timeout=LEASE_MS / 1000 + 10)
            print("unprotected after", round(unprotected["time"] - killed_at, 3), "s:",
                  unprotected["reason"])
            await asyncio.sleep(LEASE_MS / 1000 + 1)  # longer than the lease
            assert source.proc.poll() is None, source.text()[-2000:]
            assert source.count("handover") == 0, source.text()[-2000:]
            assert await runs_soon(vm.qmp)
            await primary_carries_on(vm.run.serial_log)
            # a shadow agent started again on the same replica: protection resumes
            restarted_at = time.time()
            shadow2 = shadow_agent(spec_path, replica, link, short_tmp / "shadow2.out", cargs)
            await shadow2.wait_event(lambda e: e.get("event") == "shadow-ready", timeout=60)
            # the killed agent's standby (paused, never run) was reaped by the new agent
            assert not pid_alive(old_standby), f"old standby pid {old_standby} lingers"
            await source.wait_event(lambda e: e.get("event") == "lease-protected"
                                    and e["time"] > restarted_at, timeout=30)
            assert source.count("lease-protected") > n_protected
            await shadow2.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
            ev2 = await shadow2.wait_event(lambda e: e.get("event") == "committed", timeout=60)
            first = ev2["epoch"]
            committed_after = await shadow2.wait_event(
                lambda e: e.get("event") == "committed" and e["epoch"] >= first + 3,
                timeout=60)
            # and a failure of the primary is failed over by the new agent
            vm.kill()
            await vm.wait()
            ev = await shadow2.wait_event(lambda e: e.get("event") == "failover", timeout=30,
                                          allow_exit=True)
            promoted_pid = ev["pid"]
            await asyncio.sleep(0.5)
        print("resumed at epoch", first, "then", committed_after["epoch"], "; failover:",
              {k: ev[k] for k in ("reason", "detect_ms", "promote_ms", "epoch")})
        assert ev["generation"] == 2
        assert_one_copy(states)
        # the primary ran throughout the shadow's absence: checkpoint pauses only
        runs = [r for r in states.ran("primary") if r[1] < ev["decided_at"]]
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(runs)]
        assert all(g < 1.5 for g in gaps), gaps
        epochs = assert_committed_monotonic(shadow, shadow2)
        assert ev["epoch"] == epochs[-1]
        await carries_on(replica, vm.run.serial_log)
    finally:
        source.close()
        shadow.close()
        if shadow2 is not None:
            shadow2.close()
        kill_pid(promoted_pid)
        kill_pid(old_standby)
