"""`qmpshadow stream record` and `migrate --record` on real QEMU: the relay forwards a live
migration unchanged (the guest carries on at the destination), records both directions, and
the recording replays into a fresh destination where the guest runs on with mism=0."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from qmpshadow.migration.orchestrator import MigrationTarget, migrate
from qmpshadow.migstream import StreamParser
from qmpshadow.migstream.events import EndOfStream, VmDescription
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.streamtools.inspect import inspect_file
from qmpshadow.streamtools.record import Endpoint, Relay, relay_via
from qmpshadow.testing.guest import dirtier_spec, guest_continues, last_counter
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu]


async def _wait_status(vm: QemuProcess, wanted: tuple[str, ...], timeout: float = 60
                       ) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = await vm.qmp.query_migrate()
        if info.get("status") in wanted:
            return info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.02)


async def test_migrate_record_then_replay(launch_vm: LaunchVm, short_tmp: Path,
                                          tcg: AccelChoice) -> None:
    spec = dirtier_spec("rec")
    vm = await launch_vm(spec, accel=tcg)
    await guest_continues(vm.run.serial_log, after=0, loops=5)
    blocks = await vm.qmp.info_ramblock()
    out = short_tmp / "rec.bin"
    run = RunPaths.create(short_tmp / "dst")
    result = await migrate(vm.run.qmp2_sock, MigrationTarget(spec, run),
                           via=relay_via(out, run.root))
    try:
        rec = result.stats.recording
        assert rec is not None and rec["file"] == str(out) and not rec["errors"]
        assert rec["forward_bytes"] == out.stat().st_size > 1 << 20
        assert Path(rec["return_file"]).stat().st_size == rec["return_bytes"]
        src_last = last_counter(vm.run.serial_log)
        assert src_last is not None
        # the relayed migration worked: the guest runs on at the destination
        await guest_continues(run.serial_log, after=src_last.counter, loops=20)
    finally:
        await result.destination.kill()

    # the recording is a complete stream of this VM
    summary = inspect_file(str(out))
    doc = summary.as_dict()
    assert doc["complete"] and doc["vmdesc_size"]
    assert [(b["id"], b["length"]) for b in doc["ram_blocks"]] == [
        (b.idstr, b.used_length) for b in blocks]

    # ... and replays into a fresh destination, where the guest runs on from the source's
    # last state with its memory self-check clean
    fresh = await launch_vm(spec, accel=tcg, incoming=True)
    await fresh.qmp.migrate_incoming(f"exec:cat {out}")
    info = await _wait_status(fresh, ("completed", "failed"))
    assert info["status"] == "completed", info
    await fresh.qmp.cont()
    await guest_continues(fresh.run.serial_log, after=src_last.counter, loops=20)


async def test_cli_record_with_return_path(launch_vm: LaunchVm, short_tmp: Path,
                                           tcg: AccelChoice) -> None:
    spec = dirtier_spec("cli")
    vm = await launch_vm(spec, accel=tcg)
    await guest_continues(vm.run.serial_log, after=0, loops=5)
    dst = await launch_vm(spec, accel=tcg, incoming=True)
    # return-path: the destination answers on the reverse direction of the socket
    for qmp in (vm.qmp, dst.qmp):
        await qmp.migrate_set_capabilities({"return-path": True})
    dst_sock, relay_sock = short_tmp / "dst.sock", short_tmp / "relay.sock"
    await dst.qmp.migrate_incoming(f"unix:{dst_sock}")
    out = short_tmp / "cli.bin"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpshadow.cli.main", "stream", "record", "--listen",
        f"unix:{relay_sock}", "--to", f"unix:{dst_sock}", "-o", str(out), "--json",
        "--timeout", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(200):
            if relay_sock.exists():
                break
            await asyncio.sleep(0.05)
        await vm.qmp.migrate(f"unix:{relay_sock}")
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert f"listening on unix:{relay_sock}" in stderr.decode()
    doc = json.loads(stdout)
    main = doc["channels"][0]
    assert main["kind"] == "main" and not doc["errors"]
    assert main["forward_bytes"] == out.stat().st_size
    ret = Path(main["return_file"])
    assert ret == Path(f"{out}.return") and main["return_bytes"] == ret.stat().st_size > 0
    assert (await _wait_status(vm, ("completed", "failed")))["status"] == "completed"
    assert (await _wait_status(dst, ("completed", "failed")))["status"] == "completed"
    await dst.qmp.cont()
    src_last = last_counter(vm.run.serial_log)
    assert src_last is not None
    await guest_continues(dst.run.serial_log, after=src_last.counter, loops=20)
    # the forward recording parses to the end, vmdesc included
    parser = StreamParser()
    parser.receive_data(out.read_bytes())
    parser.receive_data(b"")
    events = parser.events()
    assert isinstance(events[-1], EndOfStream)
    assert any(isinstance(e, VmDescription) for e in events)


async def test_unreachable_destination_fails_the_source_cleanly(
        launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice) -> None:
    vm = await launch_vm(dirtier_spec("unr"), accel=tcg)
    await guest_continues(vm.run.serial_log, after=0, loops=5)
    relay = Relay(Endpoint("unix", path=str(short_tmp / "relay.sock")),
                  Endpoint("unix", path=str(short_tmp / "nobody.sock")), short_tmp / "u.bin")
    uri = await relay.start()
    try:
        await vm.qmp.migrate(uri)
        stats = await relay.wait(30)
    finally:
        await relay.close()
    assert "cannot connect to the destination" in (stats.channels[0].error or "")
    info = await _wait_status(vm, ("failed", "completed"))
    assert info["status"] == "failed", info
    assert (await vm.qmp.query_status()).running
    before = last_counter(vm.run.serial_log)
    assert before is not None
    await guest_continues(vm.run.serial_log, after=before.counter, loops=20)


async def test_multifd_channels_are_relayed_and_recorded(launch_vm: LaunchVm, short_tmp: Path,
                                                         tcg: AccelChoice) -> None:
    from qmpshadow.migration.options import MigrateOptions

    spec = dirtier_spec("mfd")
    vm = await launch_vm(spec, accel=tcg)
    await guest_continues(vm.run.serial_log, after=0, loops=5)
    out = short_tmp / "mfd.bin"
    run = RunPaths.create(short_tmp / "dst")
    result = await migrate(vm.run.qmp2_sock, MigrationTarget(spec, run),
                           MigrateOptions(multifd_channels=2), via=relay_via(out, run.root))
    try:
        rec = result.stats.recording
        assert rec is not None and not rec["errors"]
        channels = sorted(short_tmp.glob("mfd.bin.ch*[0-9]"))
        assert len(channels) == 2, channels  # the two multifd channels, besides the main one
        assert sum(p.stat().st_size for p in channels) > result.stats.multifd_bytes // 2
        src_last = last_counter(vm.run.serial_log)
        assert src_last is not None
        await guest_continues(run.serial_log, after=src_last.counter, loops=20)
    finally:
        await result.destination.kill()
