"""The RDMA transport on real verbs: the soft-RoCE guest runs the rdma tests, from the host.

One module-scoped run does, in order:

1. records 5 epochs from a real primary on THIS host (tests/rdma/record.py: the dirtier
   guest under TCG, shared-RAM source, EpochEncoder; a pmemsave digest per checkpoint);
2. builds the soft-RoCE guest image if needed (qemu-scripts/rdma-guest/build.sh, cached in
   build/rdma-guest: ~0.1 s when up to date, ~1.5 min from scratch with network);
3. boots it (qemu-scripts/rdma-guest/run.py: TCG, host's Debian kernel, rxe0 on lo, the
   project over 9p) and runs in it two pytest runs: the transport conformance suite for the
   ``rdma`` case (tests/transport/test_conformance.py -k rdma: 1 MiB and 64 MiB epochs byte
   for byte, backpressure, peer killed mid-epoch...), then tests/rdma/guest/ (link tests,
   replication test); each writes a JUnit report to the share.

The tests below then check what happened inside: both pytest exit statuses 0, every in-guest
test passed (the only skips allowed are the bit-flip cases, for which no relay can sit
between two RDMA NICs), the named conformance and replication cases really ran, the summary
lines agree with the reports, and the replicas built over rdma and over tcp equal the
primary's RAM as the HOST recorded it.

Skips (with the reason) only when the guest cannot run here: QEMU missing, no Debian kernel
with rdma_rxe, no debootstrap/not root, or no network for the first image build. With
``QMPSHADOW_REQUIRE_RDMA_GUEST=1`` (CI) those are failures instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "qemu-scripts" / "rdma-guest" / "run.py"
#: Whole boot-test-poweroff budget (the run takes 2-3 min on a 2-core host).
GUEST_TIMEOUT = 1200
REQUIRE = os.environ.get("QMPSHADOW_REQUIRE_RDMA_GUEST") == "1"

#: The in-guest pytest runs (relative to /project): the conformance suite's rdma case, then
#: everything in tests/rdma/guest (two runs: ``-k rdma`` cannot select a directory). The guest
#: has Debian's pytest 7.2, which does not know pytest-asyncio 0.23's ini option
#: asyncio_default_fixture_loop_scope: with filterwarnings=error that config warning would
#: stop the run, so it is ignored.
PYTEST = ("python3 -m pytest -q -rA --durations=5 -p no:cacheprovider "
          "-W ignore::pytest.PytestConfigWarning")
GUEST_SCRIPT = (
    f"{PYTEST} --junitxml=/share/junit-conformance.xml tests/transport/test_conformance.py "
    "-k rdma; a=$?; "
    f"{PYTEST} --junitxml=/share/junit-guest.xml tests/rdma/guest; b=$?; "
    'echo "RDMA-GUEST-PYTEST conformance=$a guest=$b"; '
    '[ $a = 0 ] && exit $b; exit $a'
)

#: In-guest tests that must have run and passed (a subset; every other collected test must
#: pass too).
MUST_PASS = {
    "tests.transport.test_conformance::test_same_frames_both_ways[rdma]",
    "tests.transport.test_conformance::test_ram_byte_for_byte[rdma-1MiB]",
    "tests.transport.test_conformance::test_ram_byte_for_byte[rdma-64MiB]",
    "tests.transport.test_conformance::test_slow_receiver_throttles_sender[rdma]",
    "tests.transport.test_conformance::test_peer_killed_mid_epoch[rdma-mid-frame]",
    "tests.transport.test_conformance::test_peer_killed_mid_epoch[rdma-between-frames]",
    "tests.rdma.guest.test_link::test_runs_inside_the_guest",
    "tests.rdma.guest.test_link::test_frames_cut_at_every_slot_boundary",
    "tests.rdma.guest.test_link::test_sender_killed_mid_epoch[mid-frame]",
    "tests.rdma.guest.test_replication::test_replica_over_rdma_equals_replica_over_tcp",
}
#: The only skips allowed: RDMA writes go NIC to NIC, no byte relay can flip bits between.
ALLOWED_SKIP = re.compile(r"test_bit_flip_on_the_wire_is_refused\[rdma-")
SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s")


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"QMPSHADOW_REQUIRE_RDMA_GUEST=1 but: {reason}")
    pytest.skip(reason)


@dataclass
class GuestRun:
    rc: int
    console: str
    stderr: str
    share: Path
    index: dict[str, Any]
    seconds: float
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> passed/failed/skipped
    skip_reasons: dict[str, str] = field(default_factory=dict)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:]) + "\n--- stderr\n" + self.stderr[-3000:]


def _parse_junit(path: Path, run: GuestRun) -> None:
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        if case.find("skipped") is not None:
            node = case.find("skipped")
            assert node is not None
            run.outcomes[tid] = "skipped"
            run.skip_reasons[tid] = node.get("message", "")
        elif case.find("failure") is not None or case.find("error") is not None:
            run.outcomes[tid] = "failed"
        else:
            run.outcomes[tid] = "passed"


def _record(out: Path) -> dict[str, Any]:
    """Record the epochs on the host (a real primary), in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "tests.rdma.record", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        if "test guest kernel not found" in proc.stderr:
            _unavailable("the dirtier test guest is not built (make guest): " +
                         proc.stderr.strip().splitlines()[-1])
        pytest.fail(f"recording epochs on the host failed:\n{proc.stdout}\n{proc.stderr}")
    index: dict[str, Any] = json.loads((out / "index.json").read_text())
    return index


@pytest.fixture(scope="module")
def guest_run() -> Iterator[GuestRun]:
    if shutil.which("qemu-system-x86_64") is None:
        _unavailable("qemu-system-x86_64 not installed (Debian: apt-get install "
                     "qemu-system-x86)")
    share = Path(tempfile.mkdtemp(prefix="qs-rdma-share-", dir="/tmp"))
    try:
        index = _record(share / "epochs")
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(RUN), "--share", str(share), "--timeout", str(GUEST_TIMEOUT),
             "--env", "QMPSHADOW_RDMA_EPOCHS=/share/epochs",
             "--env", "QMPSHADOW_RDMA_RESULTS=/share/results.json",
             "--", "sh", "-c", GUEST_SCRIPT],
            cwd=REPO, capture_output=True, text=True, timeout=GUEST_TIMEOUT + 600, check=False,
        )
        seconds = time.monotonic() - t0
        if proc.returncode == 77:
            skip = [ln for ln in proc.stderr.splitlines() if ln.startswith("SKIP:")]
            _unavailable("soft-RoCE guest unavailable: " + " / ".join(
                [ln.removeprefix("SKIP: ") for ln in skip] or [proc.stderr.strip()[-500:]]))
        run = GuestRun(rc=proc.returncode, console=proc.stdout, stderr=proc.stderr,
                       share=share, index=index, seconds=seconds)
        for part in ("conformance", "guest"):
            report = share / f"junit-{part}.xml"
            if report.exists():
                _parse_junit(report, run)
        # where the time went (shown with pytest -s): build.sh/run.py timings and the
        # in-guest pytest's slowest tests and summary lines
        keep = re.compile(r"rdma-guest|RDMA-GUEST ready|^\d+\.\d+s (call|setup|teardown)|"
                          r"^\d+ passed")
        for line in (proc.stderr + proc.stdout).splitlines():
            if keep.search(line.strip()):
                print("  " + line.strip())
        print(f"rdma guest: exit {run.rc} after {seconds:.1f} s, "
              f"{sum(v == 'passed' for v in run.outcomes.values())} passed inside")
        yield run
    finally:
        shutil.rmtree(share, ignore_errors=True)


def test_guest_pytest_exit_status_is_zero(guest_run: GuestRun) -> None:
    assert guest_run.rc == 0, f"in-guest pytest exited {guest_run.rc}:\n{guest_run.tail()}"


def test_every_guest_test_passed_none_skipped_unexpectedly(guest_run: GuestRun) -> None:
    assert guest_run.outcomes, f"no JUnit report from the guest:\n{guest_run.tail()}"
    failed = sorted(t for t, o in guest_run.outcomes.items() if o == "failed")
    assert not failed, f"failed inside the guest: {failed}\n{guest_run.tail()}"
    bad_skips = {t: r for t, r in guest_run.skip_reasons.items() if not ALLOWED_SKIP.search(t)}
    assert not bad_skips, f"skipped inside the guest: {bad_skips}"


def test_rdma_cases_really_ran(guest_run: GuestRun) -> None:
    missing = {t: guest_run.outcomes.get(t, "not collected") for t in MUST_PASS
               if guest_run.outcomes.get(t) != "passed"}
    assert not missing, f"{missing}\n{guest_run.tail()}"
    conformance = [t for t in guest_run.outcomes if "test_conformance" in t]
    assert all("[rdma" in t for t in conformance), conformance  # only the rdma case ran


def test_summary_lines_agree(guest_run: GuestRun) -> None:
    """pytest's own summary lines in the console (not only our JUnit reading) say the same:
    two runs, no failures or errors, the counts of the reports."""
    lines = [m.group(1) for ln in guest_run.console.splitlines()
             if (m := SUMMARY.match(ln.strip()))]
    assert len(lines) == 2, f"expected 2 pytest summary lines:\n{guest_run.tail()}"
    counts: dict[str, int] = {}
    for text in lines:
        for n, word in re.findall(r"(\d+) (\w+)", text):
            counts[word] = counts.get(word, 0) + int(n)
    outcomes = list(guest_run.outcomes.values())
    assert counts.get("passed", 0) == outcomes.count("passed") >= len(MUST_PASS), counts
    assert counts.get("skipped", 0) == outcomes.count("skipped"), counts
    assert not {"failed", "error", "errors"} & counts.keys(), counts
    assert "RDMA-GUEST-PYTEST conformance=0 guest=0" in guest_run.console


def test_replicas_over_rdma_and_tcp_equal_the_primary_recorded_on_the_host(
        guest_run: GuestRun) -> None:
    path = guest_run.share / "results.json"
    assert path.exists(), f"the replication test wrote no results:\n{guest_run.tail()}"
    results = json.loads(path.read_text())
    epochs = guest_run.index["epochs"]
    want = {str(e["epoch"]): e["ram_sha256"] for e in epochs}
    cut = epochs[3]["epoch"]  # epoch 4 is sent halfway only, then the link is dropped
    for name in ("rdma", "tcp"):
        got = results[name]
        assert got["transport"] == name
        assert got["committed"] == {k: v for k, v in want.items() if k != str(cut)}, name
        assert got["after_cut"] == cut - 1, name
    for key in ("ram_sha256_full", "device_sha256", "small_sha256"):
        assert results["rdma"][key] == results["tcp"][key], key
