"""Checkpoint sources on real QEMU: every epoch reproduces the primary's RAM byte for byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmpshadow.errors import AccelError, ConfigError, QmpShadowError
from qmpshadow.migstream.colo import encode_colo
from qmpshadow.migstream.constants import ColoMessage
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.testguest import wait_for_counter
from qmpshadow.source import colo
from qmpshadow.source.colo import ColoSource
from qmpshadow.source.epoch import CapturedEpoch
from qmpshadow.source.shared_ram import SharedRamSource
from tests.faults.e2e import runs_soon
from tests.integration.conftest import LaunchVm
from tests.integration.shadowkit import (
    MIB,
    PS,
    checkpoint_with_dump,
    differing_pages,
    dirtier_spec,
)

pytestmark = [pytest.mark.qemu]


def _apply(image: bytearray, ep: CapturedEpoch) -> None:
    for idx, page in ep.main.items():
        image[idx * PS : (idx + 1) * PS] = page


def _same_as_dump(image: bytearray, dump: Path) -> None:
    assert not differing_pages(image, dump)


async def _shared_ram(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice, name: str,
                      **spec: int) -> tuple[QemuProcess, SharedRamSource]:
    """A running dirtier primary with its RAM in a file, and a shared-RAM source opened on
    it."""
    mem_path = short_tmp / "primary.ram"
    vm: QemuProcess = await launch_vm(dirtier_spec(name, mem_path=mem_path, **spec), accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    src = SharedRamSource(vm.qmp, mem_path=mem_path, main_block="mem",
                          sock_path=short_tmp / "dev.sock")
    await src.open()
    return vm, src


async def test_shared_ram_epochs_are_byte_exact(launch_vm: LaunchVm, short_tmp: Path,
                                                tcg: AccelChoice) -> None:
    vm, src = await _shared_ram(launch_vm, short_tmp, tcg, "sr")
    image = bytearray(MIB << 20)
    try:
        for n in range(1, 6):
            dump = short_tmp / f"dump{n}.ram"
            ep = await checkpoint_with_dump(src, vm, dump)
            _apply(image, ep)
            assert ep.number == n and ep.full == (n == 1)
            _same_as_dump(image, dump)
            assert ep.pause_ms is not None and ep.pause_ms > 0
            assert ep.device_state[:4] == b"QEVM" and "pc.bios" in ep.small
            if n > 1:
                assert 0 < len(ep.main) < (MIB << 20) // PS // 2, len(ep.main)
            await asyncio.sleep(0.2)
    finally:
        await src.close()
    status = await vm.qmp.query_status()
    assert status.running
    line = await wait_for_counter(vm.run.serial_log, timeout=10)
    assert line.mism == 0


async def test_shared_ram_epoch_after_a_failed_one_is_full(
        launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice) -> None:
    """A checkpoint that fails after its RAM scan ran (here: its device-state stream is
    given up on at once) leaves that scan's pages in the table; the next epoch must carry
    every page, or the pages that changed since the last captured epoch would be lost."""
    # a region the guest takes ~0.5 s to go round: pages it dirtied before the failed
    # attempt are not all dirtied again before the next epoch
    vm, src = await _shared_ram(launch_vm, short_tmp, tcg, "sf", region_mib=32)
    image = bytearray(MIB << 20)
    try:
        ep = await checkpoint_with_dump(src, vm, short_tmp / "d1.ram")
        _apply(image, ep)
        await asyncio.sleep(0.3)  # the guest dirties pages the failed attempt scans
        with pytest.raises(QmpShadowError, match="no device-state stream within"):
            await src.checkpoint(timeout=0.0)
        assert (await vm.qmp.query_status()).running  # resumed after the failure
        for _ in range(200):  # the abandoned migration finishes by itself
            if (await vm.qmp.query_migrate()).get("status") == "completed":
                break
            await asyncio.sleep(0.02)
        dump = short_tmp / "d2.ram"
        ep = await checkpoint_with_dump(src, vm, dump)
        _apply(image, ep)
        _same_as_dump(image, dump)
        assert ep.number == 2 and ep.full and ep.base == 0
        ep = await checkpoint_with_dump(src, vm, short_tmp / "d3.ram")
        assert ep.number == 3 and not ep.full and ep.base == 2
        _apply(image, ep)
        _same_as_dump(image, short_tmp / "d3.ram")
    finally:
        await src.close()


async def test_shared_ram_stream_refused_after_cont(launch_vm: LaunchVm, short_tmp: Path,
                                                   tcg: AccelChoice) -> None:
    """The device-state stream is parsed once the primary runs again: a stream it refuses
    still fails the checkpoint, the primary is left running (a switchover's final epoch,
    ``resume=False``, too), and the next epoch carries every page."""
    vm, src = await _shared_ram(launch_vm, short_tmp, tcg, "sp")
    image = bytearray(MIB << 20)
    try:
        _apply(image, await checkpoint_with_dump(src, vm, short_tmp / "d1.ram"))
        src.main_block = "pc.bios"  # every stream carries its pages: refused as the main's
        for resume in (True, False):
            with pytest.raises(ConfigError, match="carries pages of the main block"):
                await src.checkpoint(resume=resume)
            assert (await vm.qmp.query_status()).running, resume
        src.main_block = "mem"
        dump = short_tmp / "d2.ram"
        ep = await checkpoint_with_dump(src, vm, dump)
        _apply(image, ep)
        _same_as_dump(image, dump)
        assert ep.number == 2 and ep.full and ep.base == 0
    finally:
        await src.close()


async def test_colo_refuses_tcg(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice
                                ) -> None:
    vm = await launch_vm(dirtier_spec("ct"), accel=tcg)

    async def sink(ep: CapturedEpoch) -> None:
        raise AssertionError("no epoch expected")

    src = ColoSource(vm.qmp, main_block="pc.ram", sock_path=short_tmp / "c.sock", sink=sink)
    with pytest.raises(AccelError, match="TCG"):
        await src.run()
    assert (await vm.qmp.query_migrate()).get("status") is None


@pytest.mark.parametrize("ack_mode", ["sync", "async"])
async def test_colo_epochs_are_byte_exact(launch_vm: LaunchVm, short_tmp: Path,
                                          kvm: AccelChoice, ack_mode: str) -> None:
    vm = await launch_vm(dirtier_spec("co"), accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    image = bytearray(MIB << 20)
    checked: list[int] = []
    done = asyncio.Event()

    async def sink(ep: CapturedEpoch) -> None:
        _apply(image, ep)
        if ep.number > 1 and ack_mode == "sync" and len(checked) < 4:
            # sync: the primary waits for our answer, so it is held in this checkpoint
            dump = short_tmp / f"c{ep.number}.ram"
            await vm.qmp.pmemsave(0, MIB << 20, str(dump))
            _same_as_dump(image, dump)
            checked.append(ep.number)
        if ep.number >= 6:
            done.set()

    src = ColoSource(vm.qmp, main_block="pc.ram", sock_path=short_tmp / "c.sock",
                     sink=sink, ack_mode=ack_mode, checkpoint_delay_ms=200)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.wait_for(done.wait(), 120)
    finally:
        task.cancel()
        with pytest.raises((asyncio.CancelledError, Exception)):
            await task
    if ack_mode == "sync":
        assert len(checked) >= 3
    await vm.qmp.execute("x-colo-lost-heartbeat")
    line = await wait_for_counter(vm.run.serial_log, timeout=30)
    assert line.mism == 0


@pytest.mark.parametrize("hook", [False, True], ids=["plain", "on_stopped"])
async def test_colo_async_answers_ride_with_the_reply(
        launch_vm: LaunchVm, short_tmp: Path, kvm: AccelChoice, hook: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Async ack with nothing to do inside the pause: each checkpoint's RECEIVED and LOADED
    go out in the same write as its CHECKPOINT_REPLY (QEMU reads them only after sending
    the checkpoint). With an ``on_stopped`` hook (output commit seals there) they wait for
    the checkpoint, after the hook. Either way the epochs stay byte-exact: a final
    checkpoint held after them equals the primary's RAM."""
    writes: list[tuple[str, bytes]] = []
    real_write = colo._PrimaryLink.write

    def spy(link: colo._PrimaryLink, data: bytes) -> None:
        writes.append(("write", data))
        real_write(link, data)

    monkeypatch.setattr(colo._PrimaryLink, "write", spy)
    vm = await launch_vm(dirtier_spec("cp"), accel=kvm, start_timeout=30)
    await wait_for_counter(vm.run.serial_log, timeout=90)
    image = bytearray(MIB << 20)
    enough = asyncio.Event()

    async def sink(ep: CapturedEpoch) -> None:
        _apply(image, ep)
        if ep.number >= 5:
            enough.set()

    src = ColoSource(vm.qmp, main_block="pc.ram", sock_path=short_tmp / "c.sock",
                     sink=sink, ack_mode="async", checkpoint_delay_ms=100)
    if hook:
        src.on_stopped = lambda n: writes.append(("stopped", n.to_bytes(4, "big")))
    task = asyncio.create_task(src.run())
    try:
        await asyncio.wait_for(enough.wait(), 120)
        held = await src.final_checkpoint(timeout=30)
        _apply(image, held)
        dump = short_tmp / "held.ram"
        await vm.qmp.pmemsave(0, MIB << 20, str(dump))
        _same_as_dump(image, dump)
        before = len(writes)
        assert await src.release_held()
        # the primary resumes on the held answer, not before
        assert await runs_soon(vm.qmp, within=10)
    finally:
        task.cancel()
        with pytest.raises((asyncio.CancelledError, Exception)):
            await task
    reply, acks = (encode_colo(ColoMessage.CHECKPOINT_REPLY),
                   encode_colo(ColoMessage.VMSTATE_RECEIVED)
                   + encode_colo(ColoMessage.VMSTATE_LOADED))
    assert writes[before] == ("write", acks), writes[before:]
    kinds = [(k, d) for k, d in writes[:before] if k == "stopped" or d != encode_colo(
        ColoMessage.CHECKPOINT_READY)]
    # checkpoints answered before the hold: the ones whose reply went out before the last
    replies = [i for i, (k, d) in enumerate(kinds) if k == "write" and d.startswith(reply)]
    assert len(replies) >= 5, kinds
    for i in replies[:-1]:
        if hook:  # reply alone; the hook, then the answers, once the checkpoint is here
            assert kinds[i][1] == reply
            assert kinds[i + 1][0] == "stopped" and kinds[i + 2] == ("write", acks), kinds
        else:
            assert kinds[i][1] == reply + acks, kinds
    # the held checkpoint: reply alone, answered only by release_held (above)
    assert kinds[replies[-1]][1] == reply
    assert all(d != acks for _, d in kinds[replies[-1] + 1:]), kinds

