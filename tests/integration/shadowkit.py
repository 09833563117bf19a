"""Shared pieces of the shadowing tests: the dirtier VM spec, a checkpoint taken together
with a pmemsave of the primary while it is held in that checkpoint, and RAM comparison."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args
from qmpshadow.source.epoch import CapturedEpoch
from qmpshadow.source.shared_ram import SharedRamSource

MIB = 64
PS = 4096
# Guest-physical 0xa0000-0xfffff is VGA/ROM space in a pmemsave, not the RAM block.
HOLE = range(0xA0000, 0x100000)


def dirtier_spec(name: str, *, mem_path: Path | None = None, mib: int = MIB, pages: int = 16,
                 region_mib: int = 8, delay_us: int = 1000) -> VmSpec:
    """The test guest; RAM is a shared file (shared-RAM source) when ``mem_path`` is set."""
    mem = (MemorySpec(size_mib=mib, backend="file", backend_id="mem", mem_path=mem_path)
           if mem_path is not None else MemorySpec(size_mib=mib))
    return VmSpec(name=name, memory=mem, kernel=guest_kernel_path(),
                  kernel_args=kernel_args(pages=pages, region_mib=region_mib,
                                          delay_us=delay_us, pattern="text", print_ms=100))


async def checkpoint_with_dump(src: SharedRamSource, vm: QemuProcess, dump: Path, *,
                               full: bool = False, mib: int = MIB) -> CapturedEpoch:
    """Take a checkpoint and, while the primary is held in it, pmemsave its RAM."""
    held, release = asyncio.Event(), asyncio.Event()

    async def snapshot() -> None:
        await held.wait()
        await vm.qmp.pmemsave(0, mib << 20, str(dump))
        release.set()

    task = asyncio.create_task(snapshot())
    try:
        ep = await src.checkpoint(full=full, held=held, release=release)
    finally:
        release.set()
    await task
    return ep


def differing_pages(ram: bytes | bytearray | memoryview, dump: Path, *, mib: int = MIB
                    ) -> list[int]:
    """Offsets of pages (outside the VGA/ROM hole) where ``ram`` and the dump differ."""
    raw = dump.read_bytes()
    assert len(raw) == mib << 20, len(raw)
    mv = memoryview(ram)
    return [o for o in range(0, mib << 20, PS)
            if o not in HOLE and mv[o : o + PS] != raw[o : o + PS]]


def read_file_ram(path: Path, *, mib: int = MIB) -> bytes:
    """The first ``mib`` MiB of a RAM file (a replica's may carry a trailer)."""
    with open(path, "rb") as f:
        return f.read(mib << 20)
