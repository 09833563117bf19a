"""The fencer process and the primary's pidfd, on real processes (a ``sleep`` stands in for
QEMU here; the failover tests use real QEMU)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpshadow.cluster.errors import ClusterError
from qmpshadow.cluster.fencer import Fencer
from qmpshadow.cluster.primary import PrimaryProcess, pid_of_socket


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    # Popen returns once the exec has begun (the close-on-exec pipe closed), which is
    # before the kernel has set up the new argv: /proc/PID/cmdline reads empty until then
    deadline = time.monotonic() + 5
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


async def _wait_gone(proc: subprocess.Popen[bytes], timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(proc):
            return time.monotonic()
        await asyncio.sleep(0.005)
    return None


async def test_kills_at_the_deadline_not_before(victim: subprocess.Popen[bytes],
                                                tmp_path: Path) -> None:
    lost: list[str] = []
    f = Fencer(victim.pid, on_lost=lost.append, log_path=tmp_path / "fencer.log")
    await f.start()
    deadline = time.monotonic() + 0.4
    f.arm(deadline)
    f.arm(deadline)  # re-arming is idempotent
    gone = await _wait_gone(victim, 5)
    assert gone is not None and gone >= deadline
    assert victim.returncode == -signal.SIGKILL
    await f.close()
    assert "lease deadline passed" in (tmp_path / "fencer.log").read_text()
    assert lost == []


async def test_safe_rearm_and_exit_do_not_kill(victim: subprocess.Popen[bytes]) -> None:
    f = Fencer(victim.pid, on_lost=lambda r: None)
    await f.start()
    f.arm(time.monotonic() + 0.2)
    f.safe()
    f.arm(time.monotonic() + 0.3)
    f.arm(time.monotonic() + 60)  # renewed before the first deadline
    await asyncio.sleep(0.6)
    assert not _gone(victim)
    await f.close(release=True)
    assert f.proc is not None and f.proc.returncode == 0
    assert not _gone(victim)


async def test_closing_the_pipe_while_armed_kills(victim: subprocess.Popen[bytes]) -> None:
    f = Fencer(victim.pid, on_lost=lambda r: None)
    await f.start()
    f.arm(time.monotonic() + 60)
    t0 = time.monotonic()
    await f.close(release=False)
    gone = await _wait_gone(victim, 5)
    assert gone is not None and gone - t0 < 2.0


_AGENT = """
import asyncio, sys, time
from qmpshadow.cluster.fencer import Fencer
async def main():
    f = Fencer(int(sys.argv[1]), on_lost=lambda r: None)
    await f.start()
    f.arm(time.monotonic() + float(sys.argv[2]))
    print("armed", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_agent_killed_with_sigkill(victim: subprocess.Popen[bytes]) -> None:
    """A kill -9 of the source agent leaves the fencer, which kills the primary at once
    when armed (the lease would not be renewed anymore)."""
    agent = subprocess.Popen([sys.executable, "-c", _AGENT, str(victim.pid), "60"],
                             stdout=subprocess.PIPE)
    try:
        assert agent.stdout is not None
        assert (await asyncio.to_thread(agent.stdout.readline)).startswith(b"armed")
        assert not _gone(victim)
        t0 = time.monotonic()
        os.kill(agent.pid, signal.SIGKILL)
        gone = await _wait_gone(victim, 5)
        assert gone is not None and gone - t0 < 2.0
    finally:
        agent.kill()
        agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()


async def test_fencer_death_is_reported(victim: subprocess.Popen[bytes]) -> None:
    lost: list[str] = []
    f = Fencer(victim.pid, on_lost=lost.append)
    await f.start()
    assert f.pid is not None
    os.kill(f.pid, signal.SIGKILL)
    for _ in range(200):
        if lost:
            break
        await asyncio.sleep(0.01)
    assert lost and "exited" in lost[0]
    assert not _gone(victim)
    await f.close()


async def test_primary_process_pidfd(victim: subprocess.Popen[bytes], tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    try:
        assert pid_of_socket(path) == os.getpid()
    finally:
        srv.close()
    with pytest.raises(ClusterError, match="QMP socket"):
        pid_of_socket(path)
    p = PrimaryProcess(victim.pid)
    seen: list[float] = []
    p.watch(lambda: seen.append(time.monotonic()))
    assert p.alive and "sleep" in p.cmdline
    t0 = time.monotonic()
    assert await p.kill(5)
    assert not p.alive
    for _ in range(100):  # the reader callback runs on a later loop iteration
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen and seen[0] - t0 < 1.0
    p.close()
    with pytest.raises(ClusterError):
        PrimaryProcess(2**22 + 12345)
