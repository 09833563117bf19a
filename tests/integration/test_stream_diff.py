"""`qmpshadow stream diff` on streams recorded here from real QEMU 7.2: two precopy streams of
one VM (TCG), a plain vs an x-ignore-shared stream, and COLO checkpoints of a session
recorded through the relay (KVM: COLO under TCG deadlocks on 7.2)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from qmpshadow.migstream.colo import ReturnPathParser
from qmpshadow.migstream.constants import ColoMessage
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import MemorySpec
from qmpshadow.qemu.testguest import REGION_BASE
from qmpshadow.streamtools.diff import diff_refs, format_human, parse_ref
from qmpshadow.streamtools.inspect import inspect_unix
from qmpshadow.streamtools.record import Endpoint, Relay
from qmpshadow.testing.guest import dirtier_spec, guest_continues, last_counter
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu]

REGION = 4 << 20  # dirtier_spec's default region


async def _record(vm: QemuProcess, out: Path) -> None:
    await vm.qmp.migrate(f"exec:cat > {out}")
    deadline = time.monotonic() + 60
    while (status := (await vm.qmp.query_migrate()).get("status")) not in (
            "completed", "failed"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert status == "completed"


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpshadow.cli.main", "stream", "diff", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_two_precopy_streams_of_one_vm(launch_vm: LaunchVm, short_tmp: Path,
                                             tcg: AccelChoice) -> None:
    vm = await launch_vm(dirtier_spec("pre"), accel=tcg)
    await guest_continues(vm.run.serial_log, after=0, loops=20)
    a, b = short_tmp / "a.bin", short_tmp / "b.bin"
    await _record(vm, a)
    await vm.qmp.cont()  # postmigrate -> running: the guest moves on
    before = last_counter(vm.run.serial_log)
    assert before is not None
    await guest_continues(vm.run.serial_log, after=before.counter, loops=20)
    await _record(vm, b)

    rc, out, err = await _cli(str(a), str(b), "--json")
    assert rc == 1, err  # different
    doc = json.loads(out)
    assert not doc["identical"] and doc["a"]["vmdesc"] and doc["b"]["vmdesc"]
    ram = {r["block"]: r for r in doc["ram"]}
    main = ram["pc.ram"]
    assert main["changed_pages"] > 0 and main["only_in_a"] == main["only_in_b"] == 0
    # what changed is the dirtier's region (plus a few pages of its .bss/stack)
    in_region = sum(min(e, REGION_BASE + REGION) - max(s, REGION_BASE)
                    for s, e in main["ranges"] if e > REGION_BASE and s < REGION_BASE + REGION)
    assert in_region >= (main["changed_pages"] - 16) * 4096
    assert ram["pc.bios"]["changed_pages"] == 0
    devices = {d["device"]: d for d in doc["devices"]}
    cpu = devices["cpu"]["changes"]  # the vCPU moved on (which registers differs per run)
    assert cpu and all(c["old"] != c["new"] and c["path"].startswith("env.") for c in cpu)
    assert "serial" not in devices  # unchanged devices are not listed
    assert doc["devices_compared"] == 31

    rc, out, _ = await _cli(str(a), str(a))
    assert rc == 0 and out.rstrip().endswith("identical")
    rc, out, _ = await _cli(str(a), str(b))
    assert rc == 1 and "  cpu/0: " in out and " → " in out and "pc.ram" in out


async def test_plain_versus_ignore_shared(launch_vm: LaunchVm, short_tmp: Path,
                                          tcg: AccelChoice) -> None:
    base = dirtier_spec("shr")
    spec = base.replace(memory=MemorySpec(size_mib=64, backend="file", backend_id="mem",
                                          mem_path=short_tmp / "shr.ram"))
    vm = await launch_vm(spec, accel=tcg)
    await guest_continues(vm.run.serial_log, after=0, loops=5)
    plain, shared = short_tmp / "plain.bin", short_tmp / "shared.bin"
    await _record(vm, plain)
    # QEMU 7.2 refuses to migrate a VM paused by a previous migration ("Can't migrate the
    # vm that was paused due to previous migration"): run it again first
    await vm.qmp.cont()
    await vm.qmp.migrate_set_capabilities({"x-ignore-shared": True})
    await _record(vm, shared)
    diff = diff_refs(parse_ref(str(plain)), parse_ref(str(shared)))
    blocks = {b.idstr: b for b in diff.blocks}
    # the shared RAM block's pages are in the plain stream only
    assert blocks["mem"].only_a == 64 * 256 and blocks["mem"].changed == 0
    assert blocks["mem"].only_b == 0
    assert all(b.changed == 0 for b in diff.blocks), format_human(diff)  # firmware blocks
    assert "x-ignore-shared" in diff.b.capabilities
    assert not diff.identical


async def test_colo_checkpoints_of_a_recorded_session(launch_vm: LaunchVm, short_tmp: Path,
                                                      kvm: AccelChoice) -> None:
    vm = await launch_vm(dirtier_spec("colo"), accel=kvm, start_timeout=60)
    await guest_continues(vm.run.serial_log, after=0, loops=5, timeout=120)
    rec = short_tmp / "colo.bin"
    relay = Relay(Endpoint("unix", path=str(short_tmp / "relay.sock")),
                  Endpoint("unix", path=str(short_tmp / "sec.sock")), rec)
    uri = await relay.start()
    listening = asyncio.get_running_loop().create_future()
    # the COLO secondary: qmpshadow's inspector answers for 3 checkpoints, then hangs up
    secondary = asyncio.create_task(inspect_unix(
        str(short_tmp / "sec.sock"), max_checkpoints=3, timeout=120,
        on_listen=lambda: listening.set_result(None)))
    await listening
    try:
        await vm.qmp.migrate_set_capabilities({"x-colo": True})
        await vm.qmp.migrate_set_parameters(x_checkpoint_delay=200, max_bandwidth=1 << 40)
        await vm.qmp.migrate(uri)
        summary = await asyncio.wait_for(secondary, 150)
    finally:
        stats = await relay.close(grace=1.0)
    assert len(summary.checkpoints) == 3
    main = stats.channels[0]
    assert main.kind == "main" and main.forward_bytes == rec.stat().st_size

    # the return path was recorded: READY, then REPLY, RECEIVED, LOADED per checkpoint
    rp = ReturnPathParser()
    rp.receive_data(Path(f"{rec}.return").read_bytes())
    msgs = []
    while (m := rp.next_message()) is not None:
        msgs.append(m)
    assert msgs[0] == ColoMessage.CHECKPOINT_READY
    assert msgs[1:10] == [ColoMessage.CHECKPOINT_REPLY, ColoMessage.VMSTATE_RECEIVED,
                          ColoMessage.VMSTATE_LOADED] * 3

    # the primary runs on once COLO is told the secondary is gone
    await vm.qmp.execute("x-colo-lost-heartbeat")
    line = last_counter(vm.run.serial_log)
    assert line is not None
    await guest_continues(vm.run.serial_log, after=line.counter, loops=10, timeout=60)

    diff = diff_refs(parse_ref(f"{rec}@checkpoint1"), parse_ref(f"{rec}@checkpoint2"))
    assert diff.a.checkpoint == 1 and diff.b.checkpoint == 2 and diff.b.colo
    ram = {b.idstr: b for b in diff.blocks}["pc.ram"]
    assert ram.changed > 0  # the guest dirtied pages between the two checkpoints
    # checkpoints carry no vmdesc: the session's initial one decodes them
    statuses = {d.name: d.status for d in diff.devices}
    assert "raw" not in statuses.values(), format_human(diff)
    assert statuses["cpu"] == "changed"
    text = format_human(diff)
    assert f"A: {rec}@checkpoint1" in text and "  cpu/0: " in text

    rc, out, err = await _cli(f"{rec}@checkpoint0", f"{rec}@checkpoint3", "--json")
    assert rc == 1, err
    doc = json.loads(out)
    assert doc["a"]["checkpoints_applied"] == 0 and doc["b"]["checkpoints_applied"] == 3
    assert doc["changed_pages"] > 0
    rc, _, err = await _cli(f"{rec}@checkpoint9", str(rec))
    assert rc == 2 and "checkpoint 9 asked for, but the recording holds 3" in err


ANALYZE = Path(os.environ.get("QMPSHADOW_QEMU_SRC", "/work/qemu-src/qemu-7.2.0")
               ) / "scripts" / "analyze-migration.py"


def _flatten(prefix: str, value: object, out: dict[str, object]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}{k}.", v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(f"{prefix[:-1]}[{i}].", v, out)
    else:
        out[prefix[:-1]] = value


@pytest.mark.skipif(not ANALYZE.is_file(), reason=f"QEMU's {ANALYZE} not found (set "
                    "QMPSHADOW_QEMU_SRC to an extracted QEMU 7.2 source tree)")
async def test_decoder_agrees_with_qemus_analyze_migration(
        launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice) -> None:
    from qmpshadow.migstream import StreamParser
    from qmpshadow.migstream.events import DeviceSection, VmDescription
    from qmpshadow.migstream.vmstate import decode_device, device_descriptions

    vm = await launch_vm(dirtier_spec("ana"), accel=tcg)
    await guest_continues(vm.run.serial_log, after=0, loops=5)
    stream = short_tmp / "ana.bin"
    await _record(vm, stream)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ANALYZE), "-f", str(stream), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    theirs = json.loads(out)

    parser = StreamParser()
    parser.receive_data(stream.read_bytes())
    parser.receive_data(b"")
    events = parser.events()
    descs = device_descriptions(next(e for e in events if isinstance(e, VmDescription)).parsed())
    compared = 0
    for sec in (e for e in events if isinstance(e, DeviceSection)):
        ours = decode_device(descs[(sec.idstr, sec.instance_id)], sec.payload)
        flat: dict[str, object] = {}
        _flatten("", theirs[f"{sec.idstr} ({sec.section_id})"], flat)
        for f in ours.fields:
            if f.path not in flat:
                continue  # e.g. tmp fields, which analyze-migration.py leaves undecoded
            their = flat[f.path]
            if isinstance(f.value, bool):
                assert their is f.value, (sec.idstr, f.path, their, f.value)
            elif isinstance(f.value, int):
                assert isinstance(their, str)
                mask = (1 << (8 * f.size)) - 1
                # ints print as 0x..; types it leaves generic (timer) as spaced hex bytes
                got = (int(their.split()[0], 16) if their.startswith("0x")
                       else int.from_bytes(bytes.fromhex(their.replace(" ", "")), "big"))
                assert got == f.value & mask, (sec.idstr, f.path, their)
            else:
                assert isinstance(their, str)
                assert bytes.fromhex(their.replace(" ", "")) == f.value, (sec.idstr, f.path)
            compared += 1
    assert compared > 2000
