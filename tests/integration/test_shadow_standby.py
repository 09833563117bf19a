"""Warm standby lifecycle on real QEMU: readiness, respawn, refusing bad streams unsent."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from qmpshadow.errors import QemuError
from qmpshadow.frames.epoch import EpochWriter
from qmpshadow.frames.wire import DeviceStateFormat, RamBlock
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.shadow.errors import PromotionStreamError
from qmpshadow.shadow.replica import Replica
from qmpshadow.shadow.standby import Standby, StandbyState
from tests.unit.test_promotion import sections_blob
from tests.unit.test_replica import feed

pytestmark = [pytest.mark.qemu]

MEM_MIB = 64
SPEC = VmSpec(name="sb", memory=MemorySpec(size_mib=MEM_MIB, backend="file", backend_id="mem",
                                           mem_path=Path("/nonexistent/primary.ram")))


def replica_in(tmp: Path) -> Replica:
    r = Replica.open(tmp / "replica")
    r.reset((RamBlock(idstr="mem", length=MEM_MIB << 20),), 1)
    return r


def standby(tmp: Path, replica: Replica, **kw: object) -> Standby:
    return Standby(SPEC, RunPaths.create(tmp / "standby"), ram_path=replica.ram_path,
                   accel="tcg", die_with_parent=True, respawn_delay=0.05,
                   **kw)  # type: ignore[arg-type]


def state_of(sb: Standby) -> StandbyState:
    """(A call, so that type checkers do not carry an earlier narrowing over.)"""
    return sb.state


async def _until(pred: object, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_ready_and_respawn(short_tmp: Path) -> None:
    with replica_in(short_tmp) as replica:
        sb = standby(short_tmp, replica)
        async with sb:
            assert sb.state is StandbyState.READY
            assert sb.machine_type == "pc-i440fx-7.2"
            mem = {b.idstr: b for b in sb.ramblocks}["mem"]
            assert mem.used_length == MEM_MIB << 20
            assert sb.incoming_socket.is_socket()
            assert (await sb.process.qmp.query_status()).status == "inmigrate"
            for n in (1, 2):
                pid = sb.process.pid
                os.kill(pid, signal.SIGKILL)
                await _until(lambda n=n: sb.respawns == n)
                await sb.wait_ready(timeout=15)
                assert sb.process.pid != pid and sb.state is StandbyState.READY
                assert sb.last_exit is not None and "status -9" in sb.last_exit
                assert (await sb.process.qmp.query_status()).status == "inmigrate"
                assert sb.incoming_socket.is_socket()
            last = sb.process
        assert state_of(sb) is StandbyState.CLOSED and last.returncode is not None
        await asyncio.sleep(0.2)
        assert sb.respawns == 2  # closing did not respawn


async def test_no_respawn_when_disabled(short_tmp: Path) -> None:
    with replica_in(short_tmp) as replica:
        async with standby(short_tmp, replica, respawn=False) as sb:
            sb.process.kill()
            await _until(lambda: sb.state is StandbyState.CLOSED)
            with pytest.raises(QemuError, match="closed"):
                await sb.wait_ready(timeout=1)


async def test_bad_promotions_are_refused_before_sending(short_tmp: Path) -> None:
    with replica_in(short_tmp) as replica:
        async with standby(short_tmp, replica) as sb:
            pid = sb.process.pid
            with pytest.raises(PromotionStreamError, match="no committed epoch"):
                await sb.promote(replica)
            # an epoch whose device state is not QEMU sections at all
            w = EpochWriter(generation=1, epoch=1, blocks=replica.blocks)
            parts = [*w.begin(), *w.device_state(DeviceStateFormat.QEMU_SECTIONS,
                                                 b"\x04not a device section"), *w.end()]
            feed(replica, b"".join(bytes(p) for p in parts))
            with pytest.raises(PromotionStreamError, match="do not parse"):
                await sb.promote(replica)
            # untouched: same QEMU, still waiting, replica still live
            assert sb.state is StandbyState.READY and sb.process.pid == pid
            assert (await sb.process.qmp.query_status()).status == "inmigrate"
            info = await sb.process.qmp.query_migrate()
            # "active": the standby's pre-opened incoming connection; nothing came on it
            # (QEMU would have loaded or exited)
            assert info.get("status") == "active", info
            assert not replica.retired
            # device sections that parse, but the shadow has blocks (ROMs) the table lacks
            w = EpochWriter(generation=1, epoch=2, blocks=replica.blocks)
            parts = [*w.begin(), *w.device_state(DeviceStateFormat.QEMU_SECTIONS,
                                                 sections_blob()), *w.end()]
            feed(replica, b"".join(bytes(p) for p in parts))
            with pytest.raises(PromotionStreamError, match="the primary's block table lacks"):
                sb.prepare(replica)
            with pytest.raises(PromotionStreamError, match="the primary's block table lacks"):
                await sb.promote(replica)
            assert sb.respawns == 0 and sb.process.pid == pid


async def test_machine_type_mismatch_is_refused(short_tmp: Path) -> None:
    """A replica whose primary ran another machine type never reaches QEMU."""
    replica = Replica.open(short_tmp / "replica")
    with replica:
        replica.reset((RamBlock(idstr="mem", length=MEM_MIB << 20),), 1,
                      machine_type="pc-q35-7.2")
        w = EpochWriter(generation=1, epoch=1, blocks=replica.blocks)
        sections = b"\x00"  # no device sections: refused anyway, after the machine check
        parts = [*w.begin(), *w.device_state(DeviceStateFormat.QEMU_SECTIONS, sections),
                 *w.end()]
        feed(replica, b"".join(bytes(p) for p in parts))
        async with standby(short_tmp, replica) as sb:
            with pytest.raises(PromotionStreamError, match=r"pc-q35-7\.2"):
                await sb.promote(replica)
            assert sb.state is StandbyState.READY and not replica.retired
