"""`qmpshadow migrate` on real QEMU: migrations complete and the guest carries on at the
destination with its memory self-check clean (mism=0)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qmpshadow.errors import ConfigError
from qmpshadow.migration.options import MigrateOptions
from qmpshadow.migration.orchestrator import MigrationResult, MigrationTarget, migrate
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.testing.guest import dirtier_spec, guest_continues, last_counter
from qmpshadow.testing.netns import Netns, netns_unavailable_reason, temporary_netns
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu]


@pytest.fixture
async def results() -> AsyncIterator[list[MigrationResult]]:
    """Destinations of successful migrations live on (detached): kill them afterwards."""
    done: list[MigrationResult] = []
    try:
        yield done
    finally:
        for r in done:
            await r.destination.kill()


async def _boot(launch_vm: LaunchVm, spec: VmSpec, accel: AccelChoice, *,
                timeout: float = 30) -> QemuProcess:
    vm = await launch_vm(spec, accel=accel, start_timeout=timeout)
    await guest_continues(vm.run.serial_log, after=0, loops=5, timeout=timeout * 3)
    return vm


async def _check_moved(vm: QemuProcess, result: MigrationResult, *, timeout: float = 30
                       ) -> None:
    stats = result.stats
    assert stats.status == "completed"
    assert (await vm.qmp.query_status()).status == "postmigrate"
    src_last = last_counter(vm.run.serial_log)
    assert src_last is not None and src_last.mism == 0
    dst_log = Path(stats.destination["serial_log"])
    line = await guest_continues(dst_log, after=src_last.counter, loops=30, timeout=timeout)
    first = last_counter(dst_log)
    assert first is not None and line.counter > src_last.counter
    assert stats.transferred > 0 and stats.passes >= 1
    assert stats.downtime_ms is not None and stats.total_time_ms is not None
    assert stats.guest_pause_ms is not None and stats.guest_pause_ms >= 0
    # the destination's RESUME, within the move's wall time of now
    assert stats.resumed_at is not None
    assert 0 <= time.time() - stats.resumed_at < 60


async def test_migrate_tcg(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
                           results: list[MigrationResult]) -> None:
    spec = dirtier_spec("tcg")
    vm = await _boot(launch_vm, spec, tcg)
    notes: list[str] = []
    # qmp.sock is held by the test's QemuProcess: migrate falls back to qmp2.sock
    result = await migrate(vm.run.qmp_sock, MigrationTarget(spec, RunPaths.create(
        short_tmp / "dst")), on_note=notes.append)
    results.append(result)
    assert result.source_socket.endswith("qmp2.sock")
    assert any(n.startswith("destination: pid") for n in notes), notes
    assert result.stats.uri.startswith("tcp:127.0.0.1:")
    await _check_moved(vm, result)


async def test_migrate_tcg_settings(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
                                    results: list[MigrationResult]) -> None:
    spec = dirtier_spec("set")
    vm = await _boot(launch_vm, spec, tcg)
    options = MigrateOptions(multifd_channels=2, auto_converge=True, downtime_limit_ms=50,
                             bandwidth=256 << 20, parameters={"max-cpu-throttle": 50},
                             transport="unix")
    result = await migrate(vm.run.qmp2_sock, MigrationTarget(spec, RunPaths.create(
        short_tmp / "dst")), options)
    results.append(result)
    assert result.stats.uri.startswith("unix:")
    assert result.stats.multifd_bytes > 0
    params = await vm.qmp.execute("query-migrate-parameters")
    assert params["multifd-channels"] == 2 and params["downtime-limit"] == 50
    assert params["max-bandwidth"] == 256 << 20 and params["max-cpu-throttle"] == 50
    await _check_moved(vm, result)


async def test_migrate_postcopy_tcg(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
                                    results: list[MigrationResult]) -> None:
    spec = dirtier_spec("post", pattern="random")
    vm = await _boot(launch_vm, spec, tcg)
    notes: list[str] = []
    result = await migrate(vm.run.qmp2_sock, MigrationTarget(spec, RunPaths.create(
        short_tmp / "dst")), MigrateOptions(postcopy_after=1, bandwidth=4 << 20),
        on_note=notes.append)
    results.append(result)
    assert result.stats.postcopy
    assert any(n.startswith("switching to postcopy") for n in notes), notes
    await _check_moved(vm, result)


async def test_migrate_kvm(launch_vm: LaunchVm, short_tmp: Path, kvm: AccelChoice,
                           results: list[MigrationResult]) -> None:
    spec = dirtier_spec("kvm")
    vm = await _boot(launch_vm, spec, kvm, timeout=60)
    result = await migrate(vm.run.qmp2_sock, MigrationTarget(
        spec, RunPaths.create(short_tmp / "dst"), start_timeout=60))
    results.append(result)
    await _check_moved(vm, result, timeout=90)


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with temporary_netns() as ns:
        yield ns


async def test_migrate_into_netns(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
                                  netns: Netns, results: list[MigrationResult]) -> None:
    link = netns.veth_to_host()
    spec = dirtier_spec("ns")
    vm = await _boot(launch_vm, spec, tcg)
    result = await migrate(vm.run.qmp2_sock, MigrationTarget(
        spec, RunPaths.create(short_tmp / "dst"), netns=netns.name))
    results.append(result)
    assert result.stats.uri.startswith(f"tcp:{link.peer_addr}:")
    assert result.stats.destination["netns"] == netns.name
    assert result.destination.pid in netns.pids()
    await _check_moved(vm, result)


async def test_spec_must_match_the_source(launch_vm: LaunchVm, short_tmp: Path,
                                          tcg: AccelChoice) -> None:
    vm = await _boot(launch_vm, dirtier_spec("mm"), tcg)
    with pytest.raises(ConfigError, match=r"memory\.size_mib = 128 but the source has 64 MiB"):
        await migrate(vm.run.qmp2_sock, MigrationTarget(dirtier_spec("mm", mem_mib=128),
                                                        RunPaths.create(short_tmp / "dst")))
    assert not (short_tmp / "dst" / "qmp.sock").exists()  # nothing was started
    assert (await vm.qmp.query_status()).running


async def test_cli_json_and_quit(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice
                                 ) -> None:
    spec = dirtier_spec("cli")
    vm = await _boot(launch_vm, spec, tcg)
    toml = short_tmp / "vm.toml"
    toml.write_text(f'name = "cli"\nkernel = "{spec.kernel}"\n'
                    f'kernel_args = "{spec.kernel_args}"\n[memory]\nsize_mib = 64\n')
    dst = short_tmp / "dst"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpshadow.cli.main", "migrate", str(vm.run.qmp2_sock),
        str(toml), "--dest-run", str(dst), "--json", "--source-after", "quit",
        "--downtime-limit", "100", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    pid = doc["destination"]["pid"]
    try:
        assert doc["status"] == "completed" and doc["source_after"] == "quit"
        assert doc["transferred"] > 0 and doc["downtime_ms"] is not None
        assert await asyncio.wait_for(vm.wait(), 10) == 0  # the source quit
        # the destination outlived the CLI process and runs the guest
        src_last = last_counter(vm.run.serial_log)
        assert src_last is not None
        await guest_continues(dst / "serial.log", after=src_last.counter, loops=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_paused_source_stays_paused_at_the_destination(
        launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
        results: list[MigrationResult]) -> None:
    spec = dirtier_spec("paused")
    vm = await _boot(launch_vm, spec, tcg)
    await vm.qmp.stop()
    notes: list[str] = []
    run = RunPaths.create(short_tmp / "dst")
    result = await migrate(vm.run.qmp2_sock, MigrationTarget(spec, run), on_note=notes.append)
    results.append(result)
    assert any("destination left paused" in n for n in notes), notes
    assert result.stats.guest_pause_ms is None
    assert result.stats.resumed_at is None
    from qmpshadow.qmp.control import QmpControl

    async with await QmpControl.open(run.qmp2_sock) as dst:
        assert (await dst.query_status()).status == "paused"
        await dst.cont()
    src_last = last_counter(vm.run.serial_log)
    assert src_last is not None
    await guest_continues(run.serial_log, after=src_last.counter, loops=20)
