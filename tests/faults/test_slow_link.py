"""Fault injection: a slow and lossy link between the two hosts (network namespaces the test
creates, a veth pair between them, impaired on both ends; see tests/faults/twohosts.py).

The broker is on the shadow's side, so both of the holder's renewal paths (MQTT and the
replication link) cross the impaired link, and the epochs compete with them for it.

- while the link is slow and lossy (8 Mbit/s, a little below what the test guest dirties,
  so the lag grows; 5 % loss each way): replication goes on (epochs commit), no spurious
  failover, no fencing; the primary keeps running;
- then, still on the impaired link, kill -9 of the primary is failed over;
- the suite's invariants: never two running copies, the running copy's counter goes on
  with mism=0, the committed epoch never goes backwards.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.testing.netns import Netns, veth_between
from tests.faults.e2e import (
    RunStates,
    assert_committed_monotonic,
    assert_one_copy,
    carries_on,
    kill_pid,
    primary_carries_on,
    runs_soon,
)
from tests.faults.twohosts import (
    clear_impairment,
    dropped,
    impair_link,
    impairment_unavailable_reason,
    skip_without_netns,
    two_hosts,
)
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]
LEASE_MS = 4000
IMPAIRED_S = 10.0


async def test_slow_lossy_link_replication_goes_on_then_failover(
        launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice) -> None:
    skip_without_netns()
    reason = impairment_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Netns.create() as ns_p, Netns.create() as ns_s:
        veth = veth_between(ns_p, ns_s)
        broker = Mosquitto(short_tmp / "broker", host=veth.peer_addr,
                           prefix=ns_s.exec_argv([]))
        broker.start()
        vm, shadow, source, replica, _ = await two_hosts(
            launch_vm, short_tmp, tcg, ns_p, ns_s, veth.peer_addr, broker, LEASE_MS)
        promoted_pid = None
        try:
            async with RunStates({"primary": vm.qmp,
                                  "shadow": replica / "standby" / "qmp2.sock"}) as states:
                applied = impair_link(veth, rate_mbit=8, loss_pct=5, delay_ms=25,
                                      jitter_ms=10)
                print("impaired:", applied)
                impaired_at = time.time()
                await asyncio.sleep(IMPAIRED_S)
                commits = [e for e in shadow.events() if e.get("event") == "committed"
                           and e["time"] > impaired_at]
                lost = dropped(veth)
                epochs = [e for e in source.events() if e.get("event") == "epoch"
                          and e["time"] > impaired_at]
                wire = sum(e.get("wire_bytes", 0) for e in epochs)
                lags = sorted({e["lag"] for e in epochs})
                print(f"{len(commits)} epochs committed in {IMPAIRED_S:.0f} s on the impaired "
                      f"link ({len(epochs)} captured, {wire} wire bytes, lags {lags}, {lost} "
                      "packets dropped by the loss rules)")
                # the link really was hurt (the loss rules dropped packets: TCP resent them)
                assert lost > 0 or "netem" in applied, applied
                # replication goes on
                assert len(commits) >= 3, shadow.text()[-2000:]
                # no spurious failover and no fencing
                assert shadow.count("promoting") == 0 and shadow.count("failover") == 0
                assert source.count("fencing") == 0, source.text()[-3000:]
                assert await runs_soon(vm.qmp)
                await primary_carries_on(vm.run.serial_log)
                # a kill of the primary is still failed over, across the bad link
                killed_at = time.time()
                vm.kill()
                await vm.wait()
                ev = await shadow.wait_event(lambda e: e.get("event") == "failover",
                                             timeout=LEASE_MS / 1000 + 30, allow_exit=True)
                promoted_pid = ev["pid"]
                await asyncio.sleep(0.5)
            print("failover:", {k: ev[k] for k in ("reason", "detect_ms", "promote_ms",
                                                   "epoch")},
                  "after", round(ev["decided_at"] - killed_at, 3), "s")
            assert ev["generation"] == 2
            assert_one_copy(states)
            # the primary ran throughout the impairment: checkpoint pauses only
            runs = [r for r in states.ran("primary") if r[1] < killed_at]
            gaps = [b[0] - a[1] for a, b in itertools.pairwise(runs)]
            assert all(g < 1.5 for g in gaps), gaps
            committed = assert_committed_monotonic(shadow)
            assert ev["epoch"] == committed[-1]
            await carries_on(replica, vm.run.serial_log)
        finally:
            clear_impairment(veth)
            source.close()
            shadow.close()
            kill_pid(promoted_pid)
            broker.stop()
