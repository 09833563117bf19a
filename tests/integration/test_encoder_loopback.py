"""Source epochs → frames → decoder → assembler → applied image == the primary's RAM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmpshadow.frames.codec import apply_pages
from qmpshadow.frames.epoch import EpochAssembler, EpochComplete
from qmpshadow.frames.wire import DecoderState, DeviceState, FrameDecoder, Pages, SmallBlock
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.testguest import wait_for_counter
from qmpshadow.source.encoder import EpochEncoder
from qmpshadow.source.shared_ram import SharedRamSource
from tests.integration.conftest import LaunchVm
from tests.integration.shadowkit import MIB, PS, checkpoint_with_dump, differing_pages, dirtier_spec

pytestmark = [pytest.mark.qemu]


async def test_shared_ram_frames_rebuild_ram(launch_vm: LaunchVm, short_tmp: Path,
                                             tcg: AccelChoice) -> None:
    mem_path = short_tmp / "p.ram"
    vm = await launch_vm(dirtier_spec("lb", mem_path=mem_path, pages=32, delay_us=500),
                         accel=tcg)
    # the guest's first pass over its 8 MiB region writes pages that were zero, which can
    # only go FULL: begin once it went round twice (64 loops of 32 pages each), so that
    # the epochs below re-dirty pages their predecessor holds (under load, epoch 1 caught
    # the first pass half done and epoch 2 was half FULL pages)
    await wait_for_counter(vm.run.serial_log, min_counter=2 * (8 << 20) // PS // 32,
                           timeout=60)
    src = SharedRamSource(vm.qmp, mem_path=mem_path, main_block="mem",
                          sock_path=short_tmp / "d.sock")
    await src.open()
    enc = EpochEncoder(page_size=PS, main_pages=(MIB << 20) // PS)
    dec = FrameDecoder()
    asm = EpochAssembler(generation=1)
    image = bytearray(MIB << 20)
    small: dict[tuple[int, int], bytes] = {}
    try:
        for n in range(1, 5):
            dump = short_tmp / f"d{n}.ram"
            ep = await checkpoint_with_dump(src, vm, dump)
            bufs, stats = enc.encode(ep)
            wire = b"".join(bytes(b) for frame in bufs for b in frame)
            assert len(wire) == stats.wire_bytes
            dec.receive_data(wire)
            done: EpochComplete | None = None
            device = b""
            while not isinstance(fr := dec.next_event(), DecoderState):
                if isinstance(fr, Pages):
                    apply_pages(fr.records, image, PS, fr.count)
                elif isinstance(fr, SmallBlock):
                    small[(fr.block, fr.offset)] = bytes(fr.data)
                elif isinstance(fr, DeviceState):
                    device = bytes(fr.data)
                done = asm.feed(fr) or done
            assert done is not None and done.epoch == n
            assert device == ep.device_state
            assert not differing_pages(image, dump)
            if n > 1:
                assert stats.delta > 0 and stats.wire_bytes < stats.raw_bytes / 2, stats
            await asyncio.sleep(0.2)
    finally:
        await src.close()
