"""Output commit under the COLO source, on real QEMU (KVM), real mosquitto, the real CLI.

The freestanding dirtier guest (no network) prints a ``COUNTER`` line every 100 ms on its
serial console; the primary runs COLO with the source agent as its secondary, and the
adaptive epoch policy asks QEMU for checkpoints (the x-checkpoint-delay notify) while
output waits. The primary QEMU is killed (kill -9) mid-epoch; the shadow promotes by itself.

- ``on`` (async and sync acks): the serial log the source agent released, followed by the
  promoted shadow's, never shows a COUNTER twice (a repeat, or the same counter said
  again with another value), and the shadow's goes on after it;
- ``off``: the same run shows the repeat — the promoted shadow prints COUNTER lines the
  primary had already printed (QEMU writes the log itself; the kill comes on the first line
  after an epoch was shipped, so the primary has said something after that checkpoint).

Skipped without KVM (QEMU 7.2's COLO deadlocks under TCG).
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
from qmpshadow.qemu.testguest import (
    guest_kernel_path,
    kernel_args,
    parse_serial,
    wait_for_counter,
)
from tests.faults.e2e import (
    MIB,
    assert_one_copy,
    cluster_args,
    committed,
    kill_pid,
    kill_until_failover,
    shadow_agent,
    source_agent,
)
from tests.integration.conftest import LaunchVm, kvm  # noqa: F401  (fixture)

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MIN_MS, MAX_MS = 100, 400
#: a line every 20 ms: several per epoch, so that output released one ack too early (or
#: before its checkpoint) is all but surely said again by the promoted shadow
GUEST_ARGS = kernel_args(pages=16, region_mib=8, delay_us=1000, pattern="text", print_ms=20)


def write_colo_spec(path: Path, *, output_commit: bool) -> Path:
    """The dirtier guest under KVM on plain RAM (``pc.ram``, the COLO source's)."""
    path.write_text(f"""
name = "oco"
kernel = "{guest_kernel_path()}"
kernel_args = "{GUEST_ARGS}"
accel = "kvm"
output_commit = "{'on' if output_commit else 'off'}"
[memory]
size_mib = {MIB}
backend_id = "pc.ram"
""")
    return path


def counters(path: Path) -> list[int]:
    return [x.counter for x in parse_serial(path.read_text(errors="replace"))] \
        if path.exists() else []


@pytest.mark.parametrize(("output_commit", "ack"), [(True, "async"), (True, "sync"),
                                                    (False, "async")],
                         ids=["on-async", "on-sync", "off"])
async def test_colo_failover_serial(launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto,
                                    kvm: AccelChoice, output_commit: bool,  # noqa: F811
                                    ack: str) -> None:
    spec_path = write_colo_spec(short_tmp / "vm.toml", output_commit=output_commit)
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=kvm, start_timeout=30)
    log = vm.run.serial_log  # with output commit: what the source agent released
    replica = short_tmp / "replica"
    link = f"unix:{short_tmp / 'link.sock'}"
    cargs = cluster_args(broker, lease_ms=3000)
    shadow = source = None
    promoted_pid = None
    try:
        shadow = shadow_agent(spec_path, replica, link, short_tmp / "shadow.out", cargs,
                              extra=["--accel", "kvm"])
        await shadow.wait_event(lambda e: e.get("event") == "shadow-ready", timeout=60)
        source = source_agent(spec_path, vm.run.qmp2_sock, link, short_tmp / "source.out",
                              cargs, extra=["--source", "colo", "--ack", ack,
                                            "--epoch-min-ms", str(MIN_MS),
                                            "--epoch-max-ms", str(MAX_MS)])
        await source.wait_event(lambda e: e.get("event") == "lease-protected", timeout=60)
        await shadow.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
        await wait_for_counter(log, min_counter=counters(log)[-1] + 10 if counters(log)
                               else 10, timeout=60)
        n = source.count("epoch")
        await source.wait_event(lambda e: e.get("event") == "epoch" and e["epoch"] > n + 1,
                                timeout=30)
        if output_commit:
            # kill as the shadow commits an epoch: its ack reaches the source agent after
            # the kill (the agent keeps its link a moment for acks in flight), when the
            # primary has resumed from that checkpoint and printed more (async acks). Had
            # the agent released output of after the checkpoint with that ack, the shadow,
            # resuming from it, would print it again: checked, releasing all held output
            # on each ack fails here (async; in sync mode the primary resumes only after
            # the commit, so that mistake cannot show)
            k = max(committed(shadow), default=0)
            deadline = time.monotonic() + 10
            while max(committed(shadow), default=0) <= k and time.monotonic() < deadline:
                await asyncio.sleep(0.003)
        else:
            # kill on the first line after an epoch was shipped: the primary has then
            # said something its last checkpoint does not cover
            n = source.count("epoch")
            await source.wait_event(lambda e: e.get("event") == "epoch" and e["epoch"] > n,
                                    timeout=30)
            seen = len(counters(log))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and len(counters(log)) == seen:
                await asyncio.sleep(0.005)
        ev, states = await kill_until_failover(vm, shadow, replica)
        promoted_pid = ev["pid"]
        assert_one_copy(states)
        await source.wait_exit(10)
        shadow_log = replica / "standby" / "serial.log"
        await wait_for_counter(shadow_log, timeout=30)
        first = counters(shadow_log)[0]
        await wait_for_counter(shadow_log, min_counter=first + 10, timeout=30)
        primary = parse_serial(log.read_text(errors="replace"))
        promoted = parse_serial(shadow_log.read_text(errors="replace"))
        pc = [x.counter for x in primary]
        repeats = [c for c in (x.counter for x in promoted) if pc and c <= pc[-1]]
        epochs = [e for e in source.events() if e.get("event") == "epoch"]
        lengths = [e["epoch_ms"] for e in epochs if "epoch_ms" in e]
        gaps = sorted(round((b["time"] - a["time"]) * 1000)
                      for a, b in itertools.pairwise(epochs[2:]))
        report: dict[str, Any] = {
            "output_commit": output_commit, "ack": ack, "epoch": ev["epoch"],
            "primary_last": pc[-1:], "shadow_first": first, "repeats": repeats[:5],
            "epochs": len(epochs), "epoch_ms_seen": sorted(set(lengths)),
            "epoch_gap_ms_median": gaps[len(gaps) // 2] if gaps else None,
            "commit_lag_ms": [e.get("commit_lag_ms") for e in epochs[-3:]]}
        print("colo output-commit failover:", report)
        assert pc and promoted, report
        assert not [x for x in primary + promoted if x.mism], report
        if output_commit:
            # the released log never repeats nor goes back, and the shadow goes on after it
            assert all(b > a for a, b in itertools.pairwise(pc)), report
            assert not repeats and first > pc[-1], report
            # the policy drove COLO: output waiting made the epochs the short bound, and
            # the agent's checkpoint requests made them short (QEMU's own timer stays at
            # MAX_MS: without the requests the epochs are MAX_MS apart, as in "off")
            assert MIN_MS in lengths, report
            assert report["epoch_gap_ms_median"] < MAX_MS * 3 / 4, report
        else:
            assert repeats, report
    finally:
        for a in (source, shadow):
            if a is not None:
                a.close()
        kill_pid(promoted_pid)
