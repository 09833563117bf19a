"""Helpers of the failover acceptance tests: real QEMU, real mosquitto, the real CLI.

- :func:`write_spec`: a VM spec TOML for the test guest on a shared-RAM file (TCG).
- :class:`Agent`: a ``qmpshadow protect``/``shadow`` process with ``--json`` events in a file
  (optionally inside a network namespace); ``wait_event`` polls them.
- :class:`RunStates`: polls the run state of several QEMUs over QMP every few ms and keeps
  the intervals each ran in; :meth:`RunStates.overlap` is the time both ran at once.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from qmpshadow.errors import QmpShadowError
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args
from qmpshadow.qmp.control import QmpControl

CLI = [sys.executable, "-m", "qmpshadow.cli.main"]
MIB = 64
GUEST_ARGS = kernel_args(pages=16, region_mib=8, delay_us=1000, pattern="text", print_ms=100)

Event = dict[str, Any]


def write_spec(path: Path, mem_path: Path, name: str = "fo") -> Path:
    path.write_text(f"""
name = "{name}"
kernel = "{guest_kernel_path()}"
kernel_args = "{GUEST_ARGS}"
accel = "tcg"
[memory]
size_mib = {MIB}
backend = "file"
backend_id = "mem"
mem_path = "{mem_path}"
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
                         *, allow_exit: bool = False) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events():
                if pred(ev):
                    return ev
            if not allow_exit and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n"
                                     f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event within {timeout}s:\n"
                                     f"{self.text()[-3000:]}")
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
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._f.close()


class RunStates:
    """Polls ``query-status`` of named QEMUs (QMP socket paths) every ``period`` s."""

    def __init__(self, socks: dict[str, Path | QmpControl], period: float = 0.005) -> None:
        self.socks = socks
        self.period = period
        self.samples: dict[str, list[tuple[float, bool]]] = {n: [] for n in socks}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RunStates:
        for name, sock in self.socks.items():
            self._tasks.append(asyncio.create_task(self._poll(name, sock)))
        await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _poll(self, name: str, sock: Path | QmpControl) -> None:
        qmp: QmpControl | None = None
        if isinstance(sock, QmpControl):
            while True:
                try:
                    running = (await sock.query_status(timeout=0.5)).running
                except QmpShadowError:
                    running = False
                self.samples[name].append((time.time(), running))
                await asyncio.sleep(self.period)
        try:
            while True:
                running = False
                try:
                    if qmp is None:
                        qmp = await QmpControl.open(sock, timeout=0.5)
                    st = await qmp.query_status(timeout=0.5)
                    running = st.running
                except QmpShadowError:
                    if qmp is not None:
                        await qmp.close()
                    qmp = None
                self.samples[name].append((time.time(), running))
                await asyncio.sleep(self.period)
        finally:
            if qmp is not None:
                await qmp.close()

    def ran(self, name: str) -> list[tuple[float, float]]:
        """Intervals (first, last sample) in which ``name`` was seen running."""
        out: list[tuple[float, float]] = []
        start = last = None
        for t, running in self.samples[name]:
            if running:
                if start is None:
                    start = t
                last = t
            elif start is not None and last is not None:
                out.append((start, last))
                start = last = None
        if start is not None and last is not None:
            out.append((start, last))
        return out

    def overlap(self, a: str, b: str) -> float:
        """Seconds during which both were *seen* running (0.0: never both)."""
        total = 0.0
        for s1, e1 in self.ran(a):
            for s2, e2 in self.ran(b):
                total += max(0.0, min(e1, e2) - max(s1, s2))
        return total

    def both_seen(self, a: str, b: str) -> int:
        """Sample pairs (same poll round, ±period) where both reported running."""
        runs_b = [t for t, r in self.samples[b] if r]
        n = 0
        for t, r in self.samples[a]:
            if r and any(abs(t - tb) <= self.period * 2 for tb in runs_b):
                n += 1
        return n


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    return True


def kill_pid(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
