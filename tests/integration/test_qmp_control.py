"""QmpControl against real QEMU (marked qemu), plus its pure parts (HMP parser, events)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qmpshadow.errors import QmpCommandError, QmpError, QmpTimeoutError
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qmp import QmpControl, RamBlockInfo, parse_info_ramblock
from qmpshadow.qmp.events import EventHub

from .conftest import LaunchVm

MIB = 1 << 20

# Real output of QEMU 7.2.22 (`-m 128M`, pc machine), CRLF line ends included.
INFO_RAMBLOCK_72 = (
    "              Block Name    PSize              Offset               Used              Total\r\n"  # noqa: E501
    "                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000\r\n"  # noqa: E501
    "    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000\r\n"  # noqa: E501
    "                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000\r\n"  # noqa: E501
)  # fmt: skip


# ---------------------------------------------------------------- pure parts


def test_parse_info_ramblock_72() -> None:
    blocks = parse_info_ramblock(INFO_RAMBLOCK_72)
    assert blocks == [
        RamBlockInfo("pc.ram", 4096, 0, 128 * MIB, 128 * MIB),
        RamBlockInfo("/rom@etc/acpi/tables", 4096, 0x8080000, 0x20000, 0x200000),
        RamBlockInfo("pc.bios", 4096, 0x8000000, 0x40000, 0x40000),
    ]


def test_parse_info_ramblock_variants() -> None:
    text = (
        "Block Name PSize Used Total\n"
        "  my block  2 MiB  0x200000 0x400000\n"
        "0000:00:02.0/vga.vram 4 KiB 0x0 0x10 0x10\n"
    )
    blocks = parse_info_ramblock(text)
    assert blocks[0] == RamBlockInfo("my block", 2 * MIB, None, 0x200000, 0x400000)
    assert blocks[1].idstr == "0000:00:02.0/vga.vram" and blocks[1].offset == 0


@pytest.mark.parametrize(
    "text", ["", "unknown command: 'info ramblock'\r\n", "Block Name PSize\r\npc.ram 4 KiB x\r\n"]
)
def test_parse_info_ramblock_rejects_garbage(text: str) -> None:
    with pytest.raises(QmpError, match="info ramblock"):
        parse_info_ramblock(text)


def _ev(name: str, **data: object) -> dict[str, object]:
    return {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 500000}}


async def test_event_hub_backlog_predicate_since_and_close() -> None:
    hub = EventHub("test")
    hub.publish(_ev("STOP"))
    hub.publish(_ev("MIGRATION", status="setup"))
    hub.publish(_ev("MIGRATION", status="completed"))
    # An event published before the wait is found (no loss), and is consumed.
    stop = await hub.wait("STOP", timeout=1)
    assert (stop.name, stop.seq, stop.timestamp) == ("STOP", 1, 1.5)
    with pytest.raises(QmpTimeoutError, match="STOP"):
        await hub.wait("STOP", timeout=0.05)
    done = await hub.wait(
        "MIGRATION", timeout=1, predicate=lambda e: e.data.get("status") == "completed"
    )
    assert done.seq == 3
    # `since` ignores older events of the same name.
    mark = hub.last_seq
    hub.publish(_ev("RESUME"))
    waiter = asyncio.create_task(hub.wait("MIGRATION", timeout=1, since=mark))
    await asyncio.sleep(0)
    hub.publish(_ev("MIGRATION", status="active"))
    assert (await waiter).data == {"status": "active"}
    # Peer hang-up wakes waiters with an error, not a timeout.
    waiter = asyncio.create_task(hub.wait("SHUTDOWN", timeout=5))
    await asyncio.sleep(0)
    hub.close("QEMU went away", error=True)
    with pytest.raises(QmpError, match="QEMU went away") as info:
        await waiter
    assert not isinstance(info.value, QmpTimeoutError)


async def test_event_subscription_iterates_and_ends() -> None:
    hub = EventHub("test")
    hub.publish(_ev("BEFORE"))
    with hub.subscribe({"STOP", "RESUME"}, maxsize=2) as sub:
        for name in ("STOP", "X", "RESUME", "STOP"):
            hub.publish(_ev(name))
        assert sub.dropped == 1  # maxsize 2: the first STOP was dropped
        hub.close("closed locally", error=False)
        assert [e.name async for e in sub] == ["RESUME", "STOP"]
    hub2 = EventHub("test2")
    sub2 = hub2.subscribe(None, maxsize=10)
    hub2.publish(_ev("A"))
    hub2.close("peer gone", error=True)
    assert (await sub2.__anext__()).name == "A"
    with pytest.raises(QmpError, match="peer gone"):
        await sub2.__anext__()


# ---------------------------------------------------------------- real QEMU


@pytest.mark.qemu
async def test_status_stop_cont_events(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    qmp = vm.qmp
    status = await qmp.query_status()
    assert (status.status, status.running) == ("running", True)
    with qmp.subscribe(["STOP", "RESUME"]) as sub:
        await qmp.stop()
        # STOP precedes the reply to `stop`: it is in the backlog already.
        stop = await qmp.wait_event("STOP", timeout=2)
        assert stop.timestamp == pytest.approx(time.time(), abs=60)
        assert (await qmp.query_status()).status == "paused"
        await qmp.cont()
        await qmp.wait_event("RESUME", timeout=2)
        assert [(await sub.get(timeout=2)).name for _ in range(2)] == ["STOP", "RESUME"]
    assert (await qmp.query_status()).running


@pytest.mark.qemu
async def test_concurrent_commands_on_one_connection(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    results = await asyncio.gather(*(vm.qmp.query_status() for _ in range(20)))
    assert {r.status for r in results} == {"running"}


@pytest.mark.qemu
async def test_command_error_carries_qmp_class(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    with pytest.raises(QmpCommandError) as info:
        await vm.qmp.migrate_set_capabilities({"no-such-capability": True})
    err = info.value
    assert err.command == "migrate-set-capabilities"
    assert err.error_class == "GenericError"
    assert "no-such-capability" in err.desc
    with pytest.raises(QmpCommandError) as info2:
        await vm.qmp.execute("no-such-command")
    assert info2.value.error_class == "CommandNotFound"
    with pytest.raises(QmpCommandError, match="nonode"):
        await vm.qmp.block_dirty_bitmap_add("nonode", "bm0")
    # HMP errors are not QMP errors: they come back as text.
    assert "unknown command" in await vm.qmp.human_monitor_command("info bogus")
    # The connection is still usable.
    assert (await vm.qmp.query_status()).running


@pytest.mark.qemu
async def test_migration_parameters_and_capabilities_round_trip(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    await vm.qmp.migrate_set_capabilities({"x-ignore-shared": True, "events": True})
    caps = await vm.qmp.execute("query-migrate-capabilities")
    state = {c["capability"]: c["state"] for c in caps}
    assert state["x-ignore-shared"] and state["events"]
    await vm.qmp.migrate_set_parameters(downtime_limit=123, x_checkpoint_delay=50)
    params = await vm.qmp.execute("query-migrate-parameters")
    assert (params["downtime-limit"], params["x-checkpoint-delay"]) == (123, 50)
    assert await vm.qmp.query_migrate() == {}
    assert await vm.qmp.query_stats("vm") == []  # TCG: only KVM provides stats on 7.2


@pytest.mark.qemu
async def test_timeouts_and_disconnects_map_to_qmp_errors(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    with pytest.raises(QmpTimeoutError, match="query-status"):
        await vm.qmp.execute("query-status", timeout=0)
    with pytest.raises(QmpTimeoutError, match="SHUTDOWN"):
        await vm.qmp.wait_event("SHUTDOWN", timeout=0.1)
    waiter = asyncio.create_task(vm.qmp.wait_event("SHUTDOWN", timeout=10))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    vm.kill()
    with pytest.raises(QmpError, match="closed the QMP connection") as info:
        await waiter
    assert not isinstance(info.value, QmpTimeoutError)
    assert time.monotonic() - t0 < 2
    with pytest.raises(QmpError, match="closed the QMP connection"):
        await vm.qmp.query_status()
    await vm.wait()
    with pytest.raises(QmpError, match="not connected"):
        await vm.qmp.query_status()


@pytest.mark.qemu
async def test_quit_emits_shutdown(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    await vm.qmp.quit()
    event = await vm.qmp.wait_event("SHUTDOWN", timeout=2)
    assert event.data == {"guest": False, "reason": "host-qmp-quit"}
    assert await vm.wait() == 0


@pytest.mark.qemu
async def test_second_socket_serves_while_first_is_held(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    assert vm.qmp.connected  # holds qmp.sock
    async with await QmpControl.open(vm.run.qmp2_sock, timeout=5) as second:
        assert (await second.query_status()).running
        await vm.qmp.stop()
        # Events go to every monitor.
        await second.wait_event("STOP", timeout=2)
    # A third client on the held socket connects at the socket level but never gets a
    # greeting; the error says so and points at the second socket.
    third = QmpControl("third")
    with pytest.raises(QmpTimeoutError, match=r"qmp2\.sock"):
        await third.connect(vm.run.qmp_sock, timeout=0.5)
    assert not third.connected
    # Clean rollback: the same object connects fine elsewhere afterwards.
    await third.connect(vm.run.qmp2_sock, timeout=5)
    assert (await third.query_status()).status == "paused"
    await third.close()
    await third.close()  # idempotent


@pytest.mark.qemu
async def test_connect_waits_for_a_socket_that_appears_late(short_tmp: Path) -> None:
    path = short_tmp / "late.sock"
    qmp = QmpControl()
    with pytest.raises(QmpTimeoutError, match="socket not answering"):
        await qmp.connect(path, timeout=0.2, retry_interval=0.02)
    assert not qmp.connected


@pytest.mark.qemu
async def test_info_ramblock_primary_plain(launch_vm: LaunchVm) -> None:
    vm = await launch_vm()
    blocks = {b.idstr: b for b in await vm.qmp.info_ramblock()}
    assert blocks["pc.ram"].used_length == 64 * MIB
    assert blocks["pc.ram"].page_size == 4096
    assert "pc.bios" in blocks


@pytest.mark.qemu
async def test_info_ramblock_primary_file_backend(launch_vm: LaunchVm, short_tmp: Path) -> None:
    ram = short_tmp / "primary.ram"
    spec = VmSpec(name="f", memory=MemorySpec(64, "file", "mem", ram))
    vm = await launch_vm(spec)
    blocks = {b.idstr: b for b in await vm.qmp.info_ramblock()}
    assert "pc.ram" not in blocks
    assert blocks["mem"].used_length == 64 * MIB
    assert ram.stat().st_size == 64 * MIB


@pytest.mark.qemu
@pytest.mark.parametrize("backend", ["plain", "file"])
async def test_shadow_ramblock_matches_primary_and_waits_inmigrate(
    launch_vm: LaunchVm, short_tmp: Path, backend: str
) -> None:
    if backend == "plain":
        spec = VmSpec(name="p", memory=MemorySpec(size_mib=64))
    else:
        spec = VmSpec(name="p", memory=MemorySpec(64, "file", "mem", short_tmp / "p.ram"))
    primary = await launch_vm(spec)
    shadow_ram = short_tmp / "shadow.ram"
    shadow = await launch_vm(spec, role="shadow", mem_path=shadow_ram)
    prim = [(b.idstr, b.used_length) for b in await primary.qmp.info_ramblock()]
    shad = [(b.idstr, b.used_length) for b in await shadow.qmp.info_ramblock()]
    assert prim == shad
    assert prim[0] == (spec.memory.backend_id, 64 * MIB)
    assert shadow_ram.stat().st_size == 64 * MIB
    status = await shadow.qmp.query_status()
    assert (status.status, status.running) == ("inmigrate", False)
    # `cont` before an incoming migration is accepted but does nothing visible (QEMU
    # only sets autostart): the shadow stays inmigrate.
    await shadow.qmp.cont()
    assert (await shadow.qmp.query_status()).status == "inmigrate"


@pytest.mark.qemu
async def test_live_migration_into_shadow_argv(launch_vm: LaunchVm, short_tmp: Path) -> None:
    """The shadow command line is migration-compatible with the primary's: a plain
    migration (RAM pages in the stream) lands in the shadow's RAM file and it runs."""
    spec = VmSpec(name="m", memory=MemorySpec(size_mib=32))
    primary = await launch_vm(spec)
    shadow_ram = short_tmp / "m.shadow.ram"
    shadow = await launch_vm(spec, role="shadow", mem_path=shadow_ram)
    for vm in (primary, shadow):
        await vm.qmp.migrate_set_capabilities({"events": True})
    uri = f"unix:{short_tmp / 'mig.sock'}"
    await shadow.qmp.migrate_incoming(uri)
    await primary.qmp.migrate(uri)
    done = await primary.qmp.wait_event(
        "MIGRATION", timeout=30, predicate=lambda e: e.data["status"] in ("completed", "failed")
    )
    assert done.data["status"] == "completed", await primary.qmp.query_migrate()
    info = await primary.qmp.query_migrate()
    assert info["status"] == "completed"
    assert (await primary.qmp.query_status()).status == "postmigrate"
    await shadow.qmp.wait_event(
        "MIGRATION", timeout=10, predicate=lambda e: e.data["status"] == "completed"
    )
    # -S: the shadow waits paused after loading.
    assert (await shadow.qmp.query_status()).status == "paused"
    # The primary's low memory (BIOS data area etc.) is now in the shadow's RAM file;
    # compare before `cont`, after which the shadow's BIOS updates its tick counter.
    dump = short_tmp / "primary-low.bin"
    await primary.qmp.pmemsave(0, 64 * 1024, dump)
    with shadow_ram.open("rb") as f:
        assert f.read(64 * 1024) == dump.read_bytes()
    await shadow.qmp.cont()
    assert (await shadow.qmp.query_status()).running
