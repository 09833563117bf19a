"""``qmpshadow demo`` for real (the project's main job, what ``make demo`` runs): a private
mosquitto, the primary test VM, both agents, a kill -9, and the measured summary.

The summary is checked against the logs the demo leaves, and every process the demo
started must be gone once it exits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpshadow.cluster.mosquitto import mosquitto_unavailable_reason
from tests.faults.e2e import pid_alive

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _demo(out: Path, *args: str) -> tuple[dict[str, Any], str]:
    reason = mosquitto_unavailable_reason()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run([sys.executable, "-m", "qmpshadow.cli.main", "demo", "--json",
                           "--seconds", "3", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stdout  # --json: stdout holds the summary only
    return json.loads(lines[0]), proc.stderr


def _committed_in_log(out: Path) -> list[int]:
    docs = [json.loads(x) for x in (out / "shadow-agent.jsonl").read_text().splitlines()
            if x.startswith("{")]
    return [d["epoch"] for d in docs if d.get("event") == "committed"]


def _check_common(s: dict[str, Any], out: Path) -> None:
    assert s["ok"] is True and s["problems"] == []
    assert s["failover_ms"] == pytest.approx(s["detect_ms"] + s["promote_ms"], abs=0.11)
    assert s["generation_before"] == 1 and s["generation_after"] == 2
    # data lost = 0 epochs, as measured against the shadow agent's own log
    committed = _committed_in_log(out)
    assert committed == sorted(committed) and len(committed) == s["epochs_committed"]
    assert s["epochs_committed"] >= 3
    assert s["promoted_epoch"] == committed[-1] == s["last_committed_epoch"]
    assert s["source_acked_epoch"] <= s["promoted_epoch"]
    assert s["lost_epochs"] == 0
    # never two running copies; the promoted guest goes on with its self-check clean
    assert s["both_running_s"] == 0.0 and s["both_running_samples"] == 0
    assert s["primary_samples"] > 10
    assert s["promoted_mism"] == 0
    assert s["promoted_last_counter"] > s["promoted_first_counter"] + 10
    assert s["primary_alive"] is False
    # what the broker keeps (retained) names the promoted copy, not the dead primary
    assert s["retained"]["lease"] == {"gen": 2, "mode": "promoted",
                                      "holder": "demo@shadow"}, s["retained"]
    assert s["retained"]["state"] == {"gen": 2, "status": "running",
                                      "primary": "demo@shadow"}, s["retained"]
    # everything it started is gone
    pids = {k: v for k, v in s["pids"].items() if v}
    assert {"primary", "promoted", "source_agent", "shadow_agent", "broker"} <= set(pids)
    assert not [k for k, pid in pids.items() if pid_alive(pid)], pids


def test_demo_kill_primary(short_tmp: Path) -> None:
    s, progress = _demo(short_tmp / "out")
    print({k: s[k] for k in ("failover_ms", "detect_ms", "promote_ms", "epochs_committed",
                             "lost_epochs", "duration_s")})
    _check_common(s, short_tmp / "out")
    assert s["fault"] == "primary" and "released" in s["reason"]
    # the release path: detected well within a second (generous: the host is shared)
    assert s["detect_ms"] < 1000
    # progress lines went to stderr (not a terminal: plain lines, no live view)
    assert "FAULT: kill -9 primary QEMU" in progress and "FAILOVER: detect" in progress
    assert "\x1b[" not in progress


def test_demo_kill_source_agent(short_tmp: Path) -> None:
    s, _ = _demo(short_tmp / "out", "--fault", "source-agent", "--lease-ms", "3000")
    _check_common(s, short_tmp / "out")
    assert "lease expired" in s["reason"]
    # no release: the shadow waited for the lease (3 s) before promoting
    assert s["detect_ms"] >= 3000 - 200
