"""`qmpshadow migrate` failures on real QEMU: each ends with the source running, the guest's
counter continuing with mism=0, the destination gone, and a message saying what happened.

Migrations are slowed with a low max-bandwidth so that there is a "mid-migration" to fail in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpshadow.migration.options import MigrateOptions
from qmpshadow.migration.orchestrator import MigrationFailedError, MigrationTarget, migrate
from qmpshadow.migration.progress import Progress
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.testing.guest import dirtier_spec, guest_continues, last_counter
from qmpshadow.testing.netns import Netns, netns_unavailable_reason, temporary_netns
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu]

SLOW = 512 << 10  # 512 KiB/s: the ~5 MiB of non-zero pages take seconds
DEFAULT_BANDWIDTH = 128 << 20  # QEMU 7.2's default max-bandwidth


async def _source(launch_vm: LaunchVm, accel: AccelChoice, name: str) -> QemuProcess:
    # random pages: nothing compresses to zero pages, so bytes keep flowing
    vm = await launch_vm(dirtier_spec(name, pattern="random"), accel=accel)
    await guest_continues(vm.run.serial_log, after=0, loops=5)
    return vm


async def _assert_source_runs_on(vm: QemuProcess) -> None:
    status = await vm.qmp.query_status()
    assert status.running, status
    before = last_counter(vm.run.serial_log)
    assert before is not None
    await guest_continues(vm.run.serial_log, after=before.counter, loops=30)
    params = await vm.qmp.execute("query-migrate-parameters")
    assert params["max-bandwidth"] == DEFAULT_BANDWIDTH  # restored
    caps = {c["capability"]: c["state"]
            for c in await vm.qmp.execute("query-migrate-capabilities")}
    assert not caps["events"] and not caps["multifd"]  # restored


def _pid(run: RunPaths) -> int:
    return int(run.pidfile.read_text().strip())


async def test_destination_killed_mid_migration(launch_vm: LaunchVm, short_tmp: Path,
                                               tcg: AccelChoice) -> None:
    vm = await _source(launch_vm, tcg, "killdst")
    dst_run = RunPaths.create(short_tmp / "dst")
    killed: list[int] = []

    def progress(p: Progress) -> None:
        if p.status == "active" and p.transferred > 256 << 10 and not killed:
            pid = _pid(dst_run)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with pytest.raises(MigrationFailedError) as info:
        await migrate(vm.run.qmp2_sock,
                      MigrationTarget(dirtier_spec("killdst", pattern="random"), dst_run),
                      MigrateOptions(bandwidth=SLOW), on_progress=progress)
    msg = str(info.value)
    assert killed
    assert "the destination QEMU was killed by signal 9 during the migration" in msg, msg
    assert "the source is running" in msg, msg
    assert info.value.source_status == "running"
    assert (await vm.qmp.query_migrate())["status"] in ("failed", "cancelled")
    await _assert_source_runs_on(vm)


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with temporary_netns() as ns:
        yield ns


async def test_link_cut(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
                        netns: Netns) -> None:
    link = netns.veth_to_host()
    vm = await _source(launch_vm, tcg, "linkcut")
    cut: list[bool] = []

    def progress(p: Progress) -> None:
        if p.status == "active" and p.transferred > 256 << 10 and not cut:
            link.set_up(False)
            cut.append(True)

    target = MigrationTarget(dirtier_spec("linkcut", pattern="random"),
                             RunPaths.create(short_tmp / "dst"), netns=netns.name)
    with pytest.raises(MigrationFailedError) as info:
        await migrate(vm.run.qmp2_sock, target,
                      MigrateOptions(bandwidth=SLOW, stall_timeout=3), on_progress=progress)
    msg = str(info.value)
    assert cut
    assert "no progress for 3 s" in msg and "link to the destination is cut" in msg, msg
    assert "cancelled the migration on the source" in msg, msg
    assert "killed the destination QEMU" in msg, msg
    assert info.value.source_status == "running"
    assert netns.pids() == []  # the destination inside the namespace is gone
    await _assert_source_runs_on(vm)


async def test_invalid_capability_combination(launch_vm: LaunchVm, short_tmp: Path,
                                              tcg: AccelChoice) -> None:
    vm = await _source(launch_vm, tcg, "badcaps")
    target = MigrationTarget(dirtier_spec("badcaps", pattern="random"),
                             RunPaths.create(short_tmp / "dst"))
    with pytest.raises(MigrationFailedError) as info:
        await migrate(vm.run.qmp2_sock, target,
                      MigrateOptions(multifd_channels=2, capabilities={"compress": True}))
    msg = str(info.value)
    assert ("the source refused the capabilities events=on, multifd=on, compress=on: "
            "Multifd is not compatible with compress") in msg, msg
    assert "the source is running" in msg, msg
    assert not (short_tmp / "dst" / "qmp.sock").exists()  # destination torn down
    await _assert_source_runs_on(vm)


async def test_timeout_when_the_guest_outruns_the_link(launch_vm: LaunchVm, short_tmp: Path,
                                                       tcg: AccelChoice) -> None:
    vm = await _source(launch_vm, tcg, "tmo")
    target = MigrationTarget(dirtier_spec("tmo", pattern="random"),
                             RunPaths.create(short_tmp / "dst"))
    with pytest.raises(MigrationFailedError) as info:
        await migrate(vm.run.qmp2_sock, target, MigrateOptions(bandwidth=SLOW, timeout=2))
    msg = str(info.value)
    assert "not completed within the timeout of 2 s" in msg, msg
    assert "the source is running" in msg, msg
    await _assert_source_runs_on(vm)


@pytest.mark.parametrize(("sig", "code", "last_words"), [
    (signal.SIGINT, 130, "qmpshadow: interrupted"),
    (signal.SIGTERM, 143, "qmpshadow: terminated"),
], ids=["ctrl-c", "sigterm"])
async def test_ctrl_c_rolls_back(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
                                 sig: signal.Signals, code: int, last_words: str) -> None:
    vm = await _source(launch_vm, tcg, "ctrlc")
    spec = short_tmp / "vm.toml"
    kernel = dirtier_spec("ctrlc", pattern="random")
    spec.write_text(
        f'name = "ctrlc"\nkernel = "{kernel.kernel}"\nkernel_args = "{kernel.kernel_args}"\n'
        "[memory]\nsize_mib = 64\n")
    dst = short_tmp / "dst"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpshadow.cli.main", "migrate", str(vm.run.qmp2_sock),
        str(spec), "--dest-run", str(dst), "--bandwidth", "512K",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(300):  # until the migration is under way
            info = await vm.qmp.query_migrate()
            if info.get("status") == "active" and info["ram"]["transferred"] > 128 << 10:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"migration did not start: {info}")
        proc.send_signal(sig)
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == code, text
    assert text.rstrip().endswith(last_words), text
    assert "interrupted: rolled back: cancelled the migration on the source" in text, text
    assert "the source is running" in text, text
    assert not (dst / "qmp.sock").exists()
    await _assert_source_runs_on(vm)
