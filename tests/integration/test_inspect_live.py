"""`qmpshadow stream inspect unix:PATH` on live migrations: plain precopy and a COLO primary."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args, wait_for_counter
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu]


def _spec(name: str) -> VmSpec:
    return VmSpec(name=name, memory=MemorySpec(size_mib=64), kernel=guest_kernel_path(),
                  kernel_args=kernel_args(pages=8, region_mib=4, delay_us=1000,
                                          pattern="text", print_ms=100))


async def _start_inspector(sock: Path, *extra: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpshadow.cli.main", "stream", "inspect", f"unix:{sock}",
        "--json", "--timeout", "90", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    for _ in range(200):
        if sock.exists():
            return proc
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("inspector did not listen")


async def test_live_precopy(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice) -> None:
    vm = await launch_vm(_spec("live"), accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    blocks = await vm.qmp.info_ramblock()
    sock = short_tmp / "mig.sock"
    insp = await _start_inspector(sock)
    await vm.qmp.migrate_set_parameters(max_bandwidth=1 << 40)
    await vm.qmp.migrate(f"unix:{sock}")
    out, err = await asyncio.wait_for(insp.communicate(), 90)
    assert insp.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["complete"] and doc["version"] == 3
    assert [(b["id"], b["length"]) for b in doc["ram_blocks"]] == [
        (b.idstr, b.used_length) for b in blocks]
    for b in doc["ram_blocks"]:
        assert b["pages"] + b["zero_pages"] == b["length"] // 4096
    assert (await vm.qmp.query_migrate())["status"] == "completed"


async def test_live_colo_primary(launch_vm: LaunchVm, short_tmp: Path, kvm: AccelChoice
                                 ) -> None:
    vm = await launch_vm(_spec("colo"), accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    sock = short_tmp / "colo.sock"
    insp = await _start_inspector(sock, "--checkpoints", "3")
    await vm.qmp.migrate_set_capabilities({"x-colo": True})
    await vm.qmp.migrate_set_parameters(x_checkpoint_delay=200, max_bandwidth=1 << 40)
    await vm.qmp.migrate(f"unix:{sock}")
    out, err = await asyncio.wait_for(insp.communicate(), 120)
    assert insp.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["colo"] and doc["colo_checkpoints"] == 3
    assert {"command": "ENABLE_COLO", "length": 0} in doc["commands"]
    for cp in doc["checkpoints"]:
        assert cp["devices"] > 10 and cp["device_state_size"] > 1000
    assert sum(cp["page_records"] for cp in doc["checkpoints"]) > 0
    # the inspector hung up between checkpoints: the primary keeps running
    status = await vm.qmp.query_status()
    assert status.running, status
    await vm.qmp.execute("x-colo-lost-heartbeat")
    line = await wait_for_counter(vm.run.serial_log, timeout=30)
    again = await wait_for_counter(vm.run.serial_log, min_counter=line.counter, timeout=30)
    assert again.mism == 0
