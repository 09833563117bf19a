"""QemuProcess against real QEMU: readiness, start failures, stop, kill, no leftovers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qmpshadow.errors import QemuError, QemuExitedError
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import VmSpec

from .conftest import LaunchVm

pytestmark = pytest.mark.qemu


def proc_state(pid: int) -> str | None:
    """State letter from /proc/<pid>/stat, or None when the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def qemu_children() -> list[tuple[int, str]]:
    """(pid, state) of QEMU processes whose parent is this test process."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me and comm.startswith("qemu"):
            found.append((int(entry.name), fields[0]))
    return found


async def test_ready_means_qmp_answers_and_stop_cleans_up(launch_vm: LaunchVm) -> None:
    t0 = time.monotonic()
    vm = await launch_vm()
    ready = time.monotonic() - t0
    assert vm.running and vm.returncode is None
    assert proc_state(vm.pid) in ("R", "S")
    assert vm.qmp.connected
    assert vm.qmp.qemu_version >= (7, 2, 0)
    assert vm.run.qmp_sock.is_socket() and vm.run.qmp2_sock.is_socket()
    assert int(vm.run.pidfile.read_text()) == vm.pid
    assert ready < 5, f"start took {ready:.2f}s"

    rc = await vm.stop(timeout=5)
    assert rc == 0  # QMP quit
    assert not vm.running
    assert not vm.run.qmp_sock.exists() and not vm.run.qmp2_sock.exists()
    assert not vm.run.pidfile.exists()
    assert proc_state(vm.pid) is None
    assert "--- qmpshadow" in vm.run.stderr_log.read_text()


async def test_exit_during_start_carries_code_and_stderr(launch_vm: LaunchVm) -> None:
    with pytest.raises(QemuExitedError) as info:
        await launch_vm(extra_args=["-bogus-option"])
    err = info.value
    assert err.returncode == 1
    assert "-bogus-option: invalid option" in err.stderr_tail
    assert "-bogus-option: invalid option" in str(err)
    assert qemu_children() == []


async def test_exit_during_start_after_socket_creation(launch_vm: LaunchVm) -> None:
    # The memory size check happens after the QMP sockets exist: the probe must still
    # report QEMU's exit, not a QMP failure.
    with pytest.raises(QemuExitedError) as info:
        await launch_vm(extra_args=["-object", "memory-backend-ram,id=pc.ram,size=8M"])
    assert "reserved for the default RAM backend" in info.value.stderr_tail


async def test_missing_binary_is_a_qemu_error(run_dir: RunPaths, vm_spec: VmSpec) -> None:
    argv = primary_argv(vm_spec, run_dir, accel="tcg", binary="/nonexistent/qemu")
    with pytest.raises(QemuError, match="cannot execute"):
        await QemuProcess(argv, run_dir).start()


async def test_no_qmp_within_timeout_kills_the_process(run_dir: RunPaths) -> None:
    # Something that runs but never serves QMP.
    proc = QemuProcess(["sleep", "30"], run_dir, start_timeout=0.5, die_with_parent=True)
    t0 = time.monotonic()
    with pytest.raises(QemuError, match="did not answer QMP") as info:
        await proc.start()
    assert not isinstance(info.value, QemuExitedError)
    assert time.monotonic() - t0 < 3
    assert proc.returncode == -9
    assert proc_state(proc.pid) is None


async def test_kill_does_not_wait_and_leaves_no_zombie(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    pid = vm.pid
    t0 = time.monotonic()
    vm.kill()
    assert time.monotonic() - t0 < 0.05  # SIGKILL only, no reaping here
    rc = await vm.wait()
    assert rc == -9
    assert proc_state(pid) is None  # reaped: neither running nor zombie
    assert not vm.qmp.connected
    assert not vm.run.qmp_sock.exists()
    assert qemu_children() == []


async def test_context_manager_kills_on_error(run_dir: RunPaths, vm_spec: VmSpec) -> None:
    argv = primary_argv(vm_spec, run_dir, accel="tcg")
    pid = None
    with pytest.raises(RuntimeError, match="test failure"):
        async with QemuProcess(argv, run_dir, die_with_parent=True) as vm:
            pid = vm.pid
            raise RuntimeError("test failure")
    assert pid is not None and proc_state(pid) is None
    assert vm.returncode == -9
    assert qemu_children() == []


async def test_context_manager_kills_on_cancellation(run_dir: RunPaths, vm_spec: VmSpec) -> None:
    argv = primary_argv(vm_spec, run_dir, accel="tcg")
    started = asyncio.Event()
    box: list[QemuProcess] = []

    async def body() -> None:
        async with QemuProcess(argv, run_dir, die_with_parent=True) as vm:
            box.append(vm)
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(body())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert box[0].returncode == -9
    assert qemu_children() == []


async def test_stop_escalates_to_sigterm_without_qmp(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    await vm.qmp.close()
    rc = await vm.stop(timeout=5)
    # QEMU turns SIGTERM into a clean shutdown.
    assert rc == 0
    assert "terminating on signal 15" in vm.run.stderr_log.read_text()


async def test_die_with_parent(short_tmp: Path) -> None:
    """A QEMU launched with die_with_parent dies when its launcher dies abruptly."""
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from qmpshadow.qemu import *
        async def main():
            spec = VmSpec(name="orphan", memory=MemorySpec(size_mib=32))
            run = RunPaths.create({str(short_tmp / "run")!r})
            p = QemuProcess(primary_argv(spec, run, accel="tcg"), run, die_with_parent=True)
            await p.start()
            print(p.pid, flush=True)
            os._exit(0)
        asyncio.run(main())
        """
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=30,
        check=True,
    )
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 5
    while proc_state(pid) not in (None, "Z") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proc_state(pid) in (None, "Z"), "QEMU outlived its launcher"


@pytest.mark.kvm
async def test_launch_under_kvm(launch_vm: LaunchVm, kvm: AccelChoice) -> None:
    vm = await launch_vm(accel=kvm)
    assert await vm.qmp.execute("query-kvm") == {"enabled": True, "present": True}
    stats = await vm.qmp.query_stats("vm")
    assert stats and stats[0]["provider"] == "kvm"
    assert await vm.stop(timeout=5) == 0
