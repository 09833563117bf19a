"""Acceptance: planned switchover, re-protection and metrics on real QEMU (TCG, shared-RAM
source; KVM, COLO source), real mosquitto and the real CLI agents (`protect --control
--metrics`, `shadow --metrics`, `switchover --json`); the replication link is a unix socket.

- ``qmpshadow switchover``: the final epoch is committed and the promoted copy resumes from
  exactly it (lost_epochs == 0, the guest counter goes on from where the primary stopped,
  mism=0); the two QEMUs are never seen running at once; the old primary is killed; the
  committed epochs never go backwards; downtime comes from QEMU's STOP/RESUME timestamps.
- the agents' Prometheus endpoints, scraped over HTTP while protection runs.
- COLO (KVM): the final epoch is a COLO checkpoint QEMU takes on request and that the
  source agent holds unanswered: the same zero-loss outcome from exactly that checkpoint;
  and a switchover that cannot commit rolls back (the held checkpoint is answered and
  the primary runs on, protected).
- re-protection: the promoted VM is protected again by a fresh shadow (new replica,
  generation 3) and switched over a second time (generation 4).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qmpshadow.agents.metrics import AgentMetrics
from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import parse_serial, wait_for_counter
from tests.faults.e2e import (
    CLI,
    Agent,
    RunStates,
    cluster_args,
    kill_pid,
    pid_alive,
    runs_soon,
    write_spec,
)
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
LEASE_MS = 3000


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET a metrics endpoint; {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    hits = [v for (n, lab), v in samples.items()
            if n == name and all(dict(lab).get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, sorted(k[0] for k in samples))
    return hits[0]


class Pair:
    """A source and a shadow agent protecting one VM."""

    def __init__(self, tmp: Path, tag: str, spec_path: Path, qmp: Path, broker: Mosquitto,
                 generation: int, *, accel: str = "tcg",
                 source_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.replica = tmp / f"replica{tag}"
        self.control = tmp / f"src{tag}.sock"
        link = f"unix:{tmp / f'link{tag}.sock'}"
        cargs = cluster_args(broker, lease_ms=LEASE_MS)
        self.shadow = Agent([*CLI, "shadow", "--spec", str(spec_path), "--replica",
                             str(self.replica), "--listen", link, "--accel", accel, "--json",
                             "--metrics", "127.0.0.1:0", *cargs], tmp / f"shadow{tag}.out")
        self.source_argv = [*CLI, "protect", "--spec", str(spec_path), "--qmp", str(qmp),
                            "--to", link, "--interval", "200", "--json", "--generation",
                            str(generation), "--control", str(self.control),
                            "--metrics", "127.0.0.1:0", *source_args, *cargs]
        self.source: Agent | None = None
        self.tag = tag

    async def start(self, timeout: float = 60) -> None:
        await self.shadow.wait_event(lambda e: e.get("event") == "shadow-ready",
                                     timeout=timeout)
        self.source = Agent(self.source_argv, self.tmp / f"source{self.tag}.out")
        await self.source.wait_event(lambda e: e.get("event") == "lease-protected", timeout=30)
        await self.shadow.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
        await self.shadow.wait_event(lambda e: e.get("event") == "committed"
                                     and e["epoch"] >= 4, timeout=timeout)

    def committed(self) -> list[int]:
        return [e["epoch"] for e in self.shadow.events() if e.get("event") == "committed"]

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        self.shadow.close()


def close_all(pairs: list[Pair | None], pids: list[Any]) -> None:
    """Stop the agents of ``pairs`` and kill the promoted QEMUs: ``pids`` and any the
    shadows announced (a switchover that failed in the test left no answer to take it
    from)."""
    for pair in pairs:
        if pair is not None:
            pids = [*pids, *(e.get("pid") for e in pair.shadow.events()
                             if e.get("event") == "promoted")]
            pair.close()
    for pid in set(pids):
        kill_pid(pid)


async def switchover(pair: Pair, primary: Path | Any, primary_serial: Path,
                     generation: int, *, colo: bool = False) -> dict[str, Any]:
    """Run `qmpshadow switchover` while watching both run states; check the outcome."""
    assert pair.source is not None
    standby_qmp = pair.replica / "standby" / "qmp2.sock"
    async with RunStates({"primary": primary, "shadow": standby_qmp}) as states:
        t0 = time.time()
        proc = await asyncio.create_subprocess_exec(
            *CLI, "switchover", "--control", str(pair.control), "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        t1 = time.time()
        assert proc.returncode == 0, (out, err, pair.source.text()[-3000:])
        res: dict[str, Any] = json.loads(out)
        await asyncio.sleep(0.5)
    print("switchover:", {k: res.get(k) for k in (
        "epoch", "promoted_epoch", "downtime_ms", "move_ms", "final_epoch_ms", "commit_ms",
        "promote_ms", "generation")}, f"cli {1000 * (t1 - t0):.0f} ms")
    # zero loss: the promoted copy runs exactly the final epoch, which was committed
    assert res["lost_epochs"] == 0 and res["promoted_epoch"] == res["epoch"], res
    committed = pair.committed()
    assert committed == sorted(committed) and committed[-1] == res["epoch"], committed
    assert res["generation"] == generation + 1 and res["reprotect_generation"] == generation + 2
    # timings from QEMU's own STOP (primary) and RESUME (promoted copy) timestamps
    if colo:
        # the held checkpoint may be one QEMU had started before the request came
        assert t0 <= res["requested_at"] < res["resumed_at"] <= t1, res
        assert res["stopped_at"] < res["resumed_at"] and res["move_ms"] > 0, res
        assert res["requested_at"] - res["stopped_at"] < 5, res
    else:
        assert t0 <= res["requested_at"] <= res["stopped_at"] < res["resumed_at"] <= t1, res
        assert 0 < res["downtime_ms"] <= res["move_ms"], res
    assert res["old_primary"] == "killed" and not pid_alive(res["old_pid"])
    # never two running copies; both were seen running
    assert states.ran("primary") and states.ran("shadow")
    assert states.overlap("primary", "shadow") == 0.0, (states.ran("primary"),
                                                        states.ran("shadow"))
    assert states.ran("primary")[-1][1] < states.ran("shadow")[0][0]
    # the agents end by themselves
    assert await pair.source.wait_exit(30) == 0
    assert await pair.shadow.wait_exit(30) == 0
    ev = [e for e in pair.shadow.events() if e.get("event") == "failover"]
    assert ev and "switchover" in ev[0]["reason"] and ev[0]["generation"] == generation + 1
    # the guest carries on from where the primary stopped: nothing lost, nothing replayed
    before = parse_serial(primary_serial.read_text(errors="replace"))
    step = max(b.counter - a.counter for a, b in itertools.pairwise(before))
    serial = pair.replica / "standby" / "serial.log"
    await wait_for_counter(serial, timeout=30)
    first = parse_serial(serial.read_text(errors="replace"))[0]
    assert before[-1].counter <= first.counter <= before[-1].counter + 2 * step, (
        first, before[-1], step)
    await asyncio.sleep(2.0)
    lines = parse_serial(serial.read_text(errors="replace"))
    assert lines[-1].counter > first.counter + 10
    assert all(x.mism == 0 for x in lines), [x for x in lines if x.mism][:3]
    return res


async def test_switchover_moves_the_vm_with_zero_loss_and_metrics(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    spec_path = write_spec(short_tmp / "vm.toml", short_tmp / "primary.ram")
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    pair = Pair(short_tmp, "", spec_path, vm.run.qmp2_sock, broker, generation=1)
    res: dict[str, Any] = {}
    try:
        await pair.start()
        assert pair.source is not None
        # metrics: both endpoints answer over HTTP with live, sensible values
        src_url = (await pair.source.wait_event(
            lambda e: e.get("event") == "metrics-listening"))["url"]
        sh_url = (await pair.shadow.wait_event(
            lambda e: e.get("event") == "metrics-listening"))["url"]
        lab = {"vm": "fo", "role": "source"}
        # the shadow reports an epoch committed before its ack reaches the source: wait for
        # the source's side of epoch 4 too
        deadline = time.monotonic() + 30
        while True:
            src = await asyncio.to_thread(scrape, src_url)
            if (value(src, "qmpshadow_committed_epoch", **lab) >= 4
                    or time.monotonic() > deadline):
                break
            await asyncio.sleep(0.1)
        sh = await asyncio.to_thread(scrape, sh_url)
        assert value(src, "qmpshadow_pause_seconds_count", **lab) >= 4
        pause_sum = value(src, "qmpshadow_pause_seconds_sum", **lab)
        assert 0 < pause_sum < 60 * value(src, "qmpshadow_pause_seconds_count", **lab)
        assert value(src, "qmpshadow_bytes_shipped_total", **lab) > 1 << 20  # a full epoch
        assert 0 <= value(src, "qmpshadow_epoch_lag", **lab) <= 5
        assert value(src, "qmpshadow_committed_epoch", **lab) >= 4
        assert value(src, "qmpshadow_epochs_total", **lab) >= 4
        assert 0 <= value(src, "qmpshadow_heartbeat_age_seconds", **lab) < 2.0
        assert value(src, "qmpshadow_generation", **lab) == 1
        assert value(src, "qmpshadow_failovers_total", kind="switchover", **lab) == 0
        lab = {"vm": "fo", "role": "shadow"}
        assert value(sh, "qmpshadow_bytes_received_total", **lab) > 1 << 20
        assert value(sh, "qmpshadow_committed_epoch", **lab) >= 4
        assert 0 <= value(sh, "qmpshadow_epoch_lag", **lab) <= 1
        assert 0 <= value(sh, "qmpshadow_heartbeat_age_seconds", **lab) < 2.0
        assert value(sh, "qmpshadow_generation", **lab) == 1
        assert value(sh, "qmpshadow_failovers_total", kind="switchover", **lab) == 0
        # counters move between scrapes
        await asyncio.sleep(1.0)
        src2 = await asyncio.to_thread(scrape, src_url)
        lab = {"vm": "fo", "role": "source"}
        assert (value(src2, "qmpshadow_bytes_shipped_total", **lab)
                > value(src, "qmpshadow_bytes_shipped_total", **lab))

        res = await switchover(pair, vm.qmp, vm.run.serial_log, generation=1)
        await asyncio.wait_for(vm.wait(), 10)
        ended = [e for e in pair.source.events() if e.get("event") == "protect-finished"]
        assert ended and ended[0]["outcome"] == "switched-over"
    finally:
        pair.close()
        kill_pid(res.get("new_pid"))


async def test_switchover_refused_without_a_committed_shadow_and_primary_runs_on(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    """No shadow agent at all: the lease is unprotected, switchover is refused with a
    clear error and the primary keeps running."""
    spec_path = write_spec(short_tmp / "vm.toml", short_tmp / "primary.ram")
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    control = short_tmp / "src.sock"
    source = Agent([*CLI, "protect", "--spec", str(spec_path), "--qmp", str(vm.run.qmp2_sock),
                    "--to", f"unix:{short_tmp / 'nobody.sock'}", "--json", "--control",
                    str(control), *cluster_args(broker, lease_ms=LEASE_MS)],
                   short_tmp / "source.out")
    try:
        await source.wait_event(lambda e: e.get("event") == "control-listening", timeout=30)
        proc = await asyncio.create_subprocess_exec(
            *CLI, "switchover", "--control", str(control),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2, (out, err)
        assert b"switchover refused" in err and b"unprotected" in err, err
        assert await runs_soon(vm.qmp)  # a checkpoint may have it stopped for a moment
        assert source.proc.poll() is None
        # a wrong socket is a clear error too
        proc = await asyncio.create_subprocess_exec(
            *CLI, "switchover", "--control", str(short_tmp / "none.sock"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2 and b"no agent answers" in err, err
    finally:
        source.close()


async def test_reprotect_after_switchover_then_switch_over_again(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, tcg: AccelChoice) -> None:
    spec_path = write_spec(short_tmp / "vm.toml", short_tmp / "primary.ram")
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    first = Pair(short_tmp, "", spec_path, vm.run.qmp2_sock, broker, generation=1)
    pids: list[Any] = []
    second: Pair | None = None
    try:
        await first.start()
        res1 = await switchover(first, vm.qmp, vm.run.serial_log, generation=1)
        pids.append(res1["new_pid"])
        # re-protect the promoted VM: its RAM is the first replica's RAM file, its free QMP
        # socket the standby's second one; a fresh replica, generation 3
        run1 = first.replica / "standby"
        spec2 = write_spec(short_tmp / "vm2.toml", first.replica / "ram")
        second = Pair(short_tmp, "2", spec2, run1 / "qmp2.sock", broker,
                      generation=res1["reprotect_generation"])
        await second.start()
        res2 = await switchover(second, run1 / "qmp.sock", run1 / "serial.log",
                                generation=res1["reprotect_generation"])
        pids.append(res2["new_pid"])
        assert res2["generation"] == 4
        assert not pid_alive(res1["new_pid"])  # the first promoted copy was fenced
    finally:
        close_all([first, second], pids)


def write_colo_spec(path: Path, mem_path: Path | None = None) -> Path:
    """The test VM under KVM for the COLO source: plain RAM (``pc.ram``), or a promoted
    copy's RAM: its replica's file under the same RAMBlock name."""
    return write_spec(path, mem_path, accel="kvm", backend_id="pc.ram")


COLO_ARGS = ("--source", "colo", "--ack", "async")


async def test_colo_switchover_moves_the_vm_from_its_held_final_checkpoint(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, kvm: AccelChoice) -> None:
    """COLO under KVM: QEMU takes the final checkpoint on request and the source agent holds
    it unanswered (the primary stays stopped at it); committed, the shadow promotes from
    exactly it and the old primary is killed without ever resuming. The promoted copy is
    protected again over COLO (it still has the x-ignore-shared capability its promotion
    used: the COLO source must turn it off) and switched over a second time."""
    spec_path = write_colo_spec(short_tmp / "vm.toml")
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    pair = Pair(short_tmp, "", spec_path, vm.run.qmp2_sock, broker, generation=1,
                accel="kvm", source_args=COLO_ARGS)
    second: Pair | None = None
    pids: list[Any] = []
    try:
        await pair.start(timeout=120)
        assert pair.source is not None
        res = await switchover(pair, vm.qmp, vm.run.serial_log, generation=1, colo=True)
        pids.append(res["new_pid"])
        # only dirty pages + device state: the final epoch is a COLO checkpoint, not full
        assert res["full"] is False, res
        await asyncio.wait_for(vm.wait(), 10)
        ended = [e for e in pair.source.events() if e.get("event") == "protect-finished"]
        assert ended and ended[0]["outcome"] == "switched-over"
        run1 = pair.replica / "standby"
        spec2 = write_colo_spec(short_tmp / "vm2.toml", pair.replica / "ram")
        second = Pair(short_tmp, "2", spec2, run1 / "qmp2.sock", broker,
                      generation=res["reprotect_generation"], accel="kvm",
                      source_args=COLO_ARGS)
        await second.start(timeout=120)
        res2 = await switchover(second, run1 / "qmp.sock", run1 / "serial.log",
                                generation=res["reprotect_generation"], colo=True)
        pids.append(res2["new_pid"])
        assert res2["generation"] == 4 and not pid_alive(res["new_pid"])
    finally:
        close_all([pair, second], pids)


async def test_colo_switchover_that_cannot_commit_rolls_back_then_succeeds(
        launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto, kvm: AccelChoice) -> None:
    """A commit timeout no shadow can meet (1 ms): the switchover aborts, the held final
    checkpoint is answered and the primary resumes from it, still protected (the COLO
    session goes on); a second switchover then moves it with zero loss."""
    spec_path = write_colo_spec(short_tmp / "vm.toml")
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    pair = Pair(short_tmp, "", spec_path, vm.run.qmp2_sock, broker, generation=1,
                accel="kvm", source_args=(*COLO_ARGS[:-1], "sync"))
    res: dict[str, Any] = {}
    try:
        await pair.start(timeout=120)
        assert pair.source is not None
        proc = await asyncio.create_subprocess_exec(
            *CLI, "switchover", "--control", str(pair.control), "--commit-timeout", "0.001",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode != 0 and b"switchover aborted" in err, (out, err)
        held = (await pair.source.wait_event(
            lambda e: e.get("event") == "switchover-stopped"))["epoch"]
        await pair.source.wait_event(lambda e: e.get("event") == "resumed", timeout=30)
        assert await runs_soon(vm.qmp)
        # protection goes on past the held epoch: later checkpoints are committed
        await pair.shadow.wait_event(lambda e: e.get("event") == "committed"
                                     and e["epoch"] >= held + 2, timeout=60)
        assert pair.source.proc.poll() is None and pair.shadow.proc.poll() is None
        lines = parse_serial(vm.run.serial_log.read_text(errors="replace"))
        assert all(x.mism == 0 for x in lines), [x for x in lines if x.mism][:3]
        res = await switchover(pair, vm.qmp, vm.run.serial_log, generation=1, colo=True)
        assert res["epoch"] > held + 1
    finally:
        pair.close()
        kill_pid(res.get("new_pid"))


def test_metrics_endpoint_counts_failovers_over_http() -> None:
    """The status-event side of the metrics, on a real endpoint (no agent needed)."""
    m = AgentMetrics("shadow", "vm1", cluster=True)
    calls = {"n": 0}

    def committed() -> float:
        calls["n"] += 1
        return 7

    def broken() -> float:
        raise RuntimeError("a scrape must survive this")

    m.values.update(committed_epoch=committed, heartbeat_age_seconds=broken)
    host, port = m.serve("127.0.0.1:0")
    try:
        report = m.wrap(lambda doc: None)
        report({"event": "failover", "reason": "lease released by the holder: planned "
                "switchover"})
        report({"event": "failover", "reason": "lease expired and no heartbeat on either "
                "path"})
        report({"event": "promoted", "reason": "operator's promote command"})  # with cluster
        s = scrape(f"http://{host}:{port}/metrics")
        lab = {"vm": "vm1", "role": "shadow"}
        assert value(s, "qmpshadow_failovers_total", kind="switchover", **lab) == 1
        assert value(s, "qmpshadow_failovers_total", kind="timeout", **lab) == 1
        assert value(s, "qmpshadow_failovers_total", kind="manual", **lab) == 0
        assert value(s, "qmpshadow_committed_epoch", **lab) == 7 and calls["n"] == 1
        hb = value(s, "qmpshadow_heartbeat_age_seconds", **lab)
        assert hb != hb  # NaN: unknown, not a made-up number
    finally:
        m.close()
    with pytest.raises(Exception, match="HOST:PORT"):
        AgentMetrics("source", "x").serve("nonsense")
    assert sys.modules["prometheus_client"]
