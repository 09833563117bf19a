"""Helpers of the fault-injection suite: real QEMU, real mosquitto, the real CLI.

- :func:`write_spec`: a VM spec TOML for the test guest on a shared-RAM file (TCG).
- :class:`Agent`: a ``qmpshadow protect``/``shadow`` process with ``--json`` events in a file
  (optionally inside a network namespace); ``wait_event`` polls them.
- :class:`RunStates` (from :mod:`qmpshadow.testing.runstates`): polls the run state of
  several QEMUs over QMP every few ms; :meth:`RunStates.overlap` is the time both ran.
- :func:`shadow_agent` / :func:`source_agent`: the agents as the scenarios start them.
- The invariants every scenario checks: :func:`assert_one_copy` (never two running
  copies), :func:`assert_committed_monotonic` (the committed epoch never goes backwards),
  :func:`carries_on` / :func:`primary_carries_on` (the running copy's guest counter goes on
  with ``mism=0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.qemu.process import pid_alive
from qmpshadow.qemu.testguest import (
    guest_kernel_path,
    kernel_args,
    parse_serial,
    resume_bound,
    wait_for_counter,
)
from qmpshadow.testing.runstates import RunStates

__all__ = ["CLI", "Agent", "RunStates", "assert_committed_monotonic", "assert_one_copy",
           "carries_on", "cluster_args", "committed", "kill_pid", "kill_until_failover",
           "pid_alive", "primary_carries_on", "runs_soon", "shadow_agent", "source_agent",
           "write_spec"]

CLI = [sys.executable, "-m", "qmpshadow.cli.main"]
MIB = 64
GUEST_ARGS = kernel_args(pages=16, region_mib=8, delay_us=1000, pattern="text", print_ms=100)

Event = dict[str, Any]


def write_spec(path: Path, mem_path: Path | None, name: str = "fo", *, accel: str = "tcg",
               backend_id: str = "mem") -> Path:
    """The test guest's spec: RAM in the shared file ``mem_path`` named ``backend_id``, or
    plain RAM (``pc.ram``) when ``mem_path`` is None."""
    memory = (f'backend = "file"\nbackend_id = "{backend_id}"\nmem_path = "{mem_path}"'
              if mem_path is not None else "")
    path.write_text(f"""
name = "{name}"
kernel = "{guest_kernel_path()}"
kernel_args = "{GUEST_ARGS}"
accel = "{accel}"
[memory]
size_mib = {MIB}
{memory}
""")
    return path


def cluster_args(broker: Mosquitto, *, url: str | None = None, cluster: str = "t",
                 heartbeat_ms: int = 100, lease_ms: int = 4000) -> list[str]:
    return ["--broker", url or broker.url, "--cluster", cluster, "--mqtt-user",
            broker.username, "--mqtt-password-file", str(broker.password_file()),
            "--heartbeat-ms", str(heartbeat_ms), "--lease-ms", str(lease_ms)]


class Agent:
    """One CLI agent process; events are the JSON lines of its stdout."""

    def __init__(self, argv: Sequence[str], out: Path, *, prefix: Sequence[str] = ()) -> None:
        self.out = out
        self._f = out.open("w")
        self.proc = subprocess.Popen([*prefix, *argv], stdout=self._f,
                                     stderr=subprocess.STDOUT)
        self.killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[Event]:
        out = []
        for line in self.out.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    async def wait_event(self, pred: Callable[[Event], bool], timeout: float = 60.0,
                         *, allow_exit: bool = False, also: Sequence[Agent] = ()) -> Event:
        """The first event matching ``pred``; on failure the message carries this agent's
        output and the tails of ``also`` (the other agents)."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events():
                if pred(ev):
                    return ev
            others = "".join(f"\n--- {a.out.name}:\n{a.text()[-3000:]}" for a in also)
            if not allow_exit and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n"
                                     f"{self.text()[-3000:]}{others}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event within {timeout}s:\n"
                                     f"{self.text()[-3000:]}{others}")
            await asyncio.sleep(0.02)

    def count(self, name: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == name)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.killed_at = time.time()
            self.proc.send_signal(signal.SIGKILL)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent still runs after {timeout}s:\n{self.text()[-2000:]}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def close(self) -> None:
        """SIGKILL the agent, and the standby QEMUs it announced: a shadow agent's standby
        does not die with it (a promoted one must outlive its agent), so a test that ends
        before a promotion would leave a paused QEMU behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for ev in self.events():
            if ev.get("event") == "shadow-ready" and ev.get("standby_pid"):
                kill_pid(int(ev["standby_pid"]))
        self._f.close()


def kill_pid(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def shadow_agent(spec_path: Path, replica: Path, listen: str, out: Path, cargs: Sequence[str],
                 *, extra: Sequence[str] = (), prefix: Sequence[str] = ()) -> Agent:
    """``qmpshadow shadow`` with JSON events in ``out``."""
    return Agent([*CLI, "shadow", "--spec", str(spec_path), "--replica", str(replica),
                  "--listen", listen, "--accel", "tcg", "--json", *extra, *cargs], out,
                 prefix=prefix)


def source_agent(spec_path: Path, qmp: Path, to: str, out: Path, cargs: Sequence[str], *,
                 fencer_log: Path | None = None, extra: Sequence[str] = (),
                 prefix: Sequence[str] = ()) -> Agent:
    """``qmpshadow protect`` (checkpoints every 200 ms) with JSON events in ``out``."""
    fl = ["--fencer-log", str(fencer_log)] if fencer_log is not None else []
    return Agent([*CLI, "protect", "--spec", str(spec_path), "--qmp", str(qmp), "--to", to,
                  "--interval", "200", "--json", *fl, *extra, *cargs], out, prefix=prefix)


async def kill_until_failover(vm: Any, shadow: Agent, replica: Path
                              ) -> tuple[Event, RunStates]:
    """kill -9 the primary ``vm`` and wait for the shadow agent's ``failover`` event,
    with both QEMUs' run states polled throughout (for :func:`assert_one_copy`)."""
    async with RunStates({"primary": vm.qmp,
                          "shadow": replica / "standby" / "qmp2.sock"}) as states:
        vm.kill()
        await vm.wait()
        ev = await shadow.wait_event(lambda e: e.get("event") == "failover", timeout=30,
                                     allow_exit=True)
        await asyncio.sleep(0.3)
    return ev, states


# ---------------------------------------------------------------- invariants


async def runs_soon(qmp: Any, within: float = 3.0) -> bool:
    """Whether the QEMU behind ``qmp`` is running, or runs again ``within`` seconds: a
    primary is briefly stopped (``postmigrate``) by every checkpoint, longer on a loaded
    host; a fenced one stays stopped."""
    deadline = time.monotonic() + within
    while True:
        if (await qmp.query_status()).running:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


def committed(shadow: Agent) -> list[int]:
    """The epochs the shadow agent committed, in order."""
    return [e["epoch"] for e in shadow.events() if e.get("event") == "committed"]


def assert_committed_monotonic(*shadows: Agent) -> list[int]:
    """The committed epoch never goes backwards, across the given (successive) shadow
    agents of one replica; returns all committed epochs in order."""
    epochs = [n for a in shadows for n in committed(a)]
    back = [(a, b) for a, b in itertools.pairwise(epochs) if b <= a]
    assert not back, f"committed epoch went backwards: {back[:5]} in {epochs}"
    return epochs


def assert_one_copy(states: RunStates, a: str = "primary", b: str = "shadow") -> None:
    """Never two running copies: no time at which both QEMUs were seen running."""
    assert states.samples[a] and states.samples[b], "the run-state pollers took no samples"
    assert states.overlap(a, b) == 0.0, (states.ran(a), states.ran(b))
    pairs = states.both_seen_pairs(a, b)
    assert not pairs, {"both running (window pairs)": pairs[:5], a: states.ran(a),
                       b: states.ran(b)}


def _assert_clean(lines: list[Any], where: object) -> None:
    bad = [x for x in lines if x.mism]
    assert not bad, f"{where}: guest reports mismatches: {bad[:3]}"


async def carries_on(replica: Path, primary_serial: Path, seconds: float = 3.0) -> None:
    """The promoted copy goes on from no later than where the primary stopped, with
    ``mism=0`` throughout (on the primary's log too).

    The bound is :func:`resume_bound` of the primary's log (the guest prints at most every
    ``print_ms``).
    """
    primary = parse_serial(primary_serial.read_text(errors="replace"))
    _assert_clean(primary, primary_serial)
    bound = resume_bound(primary)
    serial = replica / "standby" / "serial.log"
    await wait_for_counter(serial, timeout=30)
    first = parse_serial(serial.read_text(errors="replace"))[0]
    assert first.counter <= bound, (first, primary[-1], bound)
    await asyncio.sleep(seconds)
    lines = parse_serial(serial.read_text(errors="replace"))
    assert lines[-1].counter > first.counter + 10, (first, lines[-1])
    _assert_clean(lines, serial)


async def primary_carries_on(serial: Path, loops: int = 20, timeout: float = 30.0) -> None:
    """The primary (still the running copy) goes on: its counter passes its current value
    by ``loops`` and no line of its log reports a mismatch."""
    now = parse_serial(serial.read_text(errors="replace"))[-1]
    await wait_for_counter(serial, min_counter=now.counter + loops, timeout=timeout)
    _assert_clean(parse_serial(serial.read_text(errors="replace")), serial)
