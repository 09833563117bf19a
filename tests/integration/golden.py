"""Golden migration streams recorded from real QEMU 7.2 by the tests themselves.

Each recording boots the dirtier test guest, migrates it with ``exec:cat > FILE`` and keeps
what QEMU reported: its RAM blocks (HMP ``info ramblock``) and, once the source is paused
after completion, a ``pmemsave`` of guest RAM (the contents the stream must reproduce).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import MemorySpec, VmSpec
from qmpshadow.qemu.testguest import guest_kernel_path, kernel_args, wait_for_counter
from qmpshadow.qmp.control import QmpControl

MEM_MIB = 64


@dataclass(frozen=True)
class Golden:
    name: str
    accel: str
    stream: Path
    # pmemsave of guest RAM: of the paused source after completion, or, for XBZRLE, of a
    # destination QEMU that loaded the recording (see record()); None with ignore-shared
    ramdump: Path | None
    ramblocks: list[tuple[str, int]]
    status: dict[str, object]


async def _wait_migration(qmp: QmpControl, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.query_migrate()
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration did not finish in {timeout}s: {info}")
        await asyncio.sleep(0.05)


async def _receive_to_file(sock: Path, dest: Path) -> tuple[asyncio.AbstractServer,
                                                             asyncio.Future[int]]:
    """Listen on ``sock`` for one migration and write it to ``dest`` until EOF.

    (``exec:cat > FILE`` is not used: QEMU reports completed before cat has finished.)
    """
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        with dest.open("wb") as f:
            while chunk := await reader.read(1 << 20):
                f.write(chunk)
                n += len(chunk)
        writer.close()
        if not done.done():
            done.set_result(n)

    server = await asyncio.start_unix_server(handle, str(sock))
    return server, done


async def record(name: str, out: Path, *, accel: str, ignore_shared: bool = False,
                 xbzrle: bool = False) -> Golden:
    """Record one golden stream into ``out``."""
    run = RunPaths.create(out / f"run-{name}")
    mem = (MemorySpec(size_mib=MEM_MIB, backend="file", backend_id="mem",
                      mem_path=out / f"{name}.shm")
           if ignore_shared else MemorySpec(size_mib=MEM_MIB))
    spec = VmSpec(name=name, memory=mem, kernel=guest_kernel_path(),
                  kernel_args=kernel_args(pages=32, region_mib=4, delay_us=500,
                                          pattern="text", print_ms=100))
    stream = out / f"{name}.bin"
    async with QemuProcess(primary_argv(spec, run, accel=accel), run, name=name,
                           die_with_parent=True) as vm:
        qmp = vm.qmp
        await wait_for_counter(run.serial_log, timeout=90)
        caps = {"events": True}
        if ignore_shared:
            caps["x-ignore-shared"] = True
        if xbzrle:
            caps["xbzrle"] = True
        await qmp.migrate_set_capabilities(caps)
        if xbzrle:  # slow first passes so dirty pages are re-sent through the cache
            await qmp.migrate_set_parameters(max_bandwidth=1 << 20)
        blocks = [(b.idstr, b.used_length) for b in await qmp.info_ramblock()]
        server, received = await _receive_to_file(run.root / "mig.sock", stream)
        await qmp.migrate(f"unix:{run.root / 'mig.sock'}")
        if xbzrle:
            deadline = time.monotonic() + 60
            while True:
                info = await qmp.query_migrate()
                pages = info.get("xbzrle-cache", {}).get("pages", 0)
                if pages > 50 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            await qmp.migrate_set_parameters(max_bandwidth=1 << 40, downtime_limit=2000)
        status = await _wait_migration(qmp, 120)
        if status.get("status") != "completed":
            raise RuntimeError(f"recording {name} failed: {status}")
        await asyncio.wait_for(received, 60)
        server.close()
        dump = None
        if not ignore_shared:
            dump = out / f"{name}.ram"
            await qmp.pmemsave(0, MEM_MIB << 20, str(dump))
    if xbzrle:
        # Under TCG, QEMU 7.2 with XBZRLE was seen not to resend a few pages the guest
        # dirtied (its own destination then differs from the source), so the reference
        # for decoding is what QEMU's destination loads from the same bytes.
        dump = await _replay_dump(spec, stream, out / f"run-{name}-dst", accel,
                                  out / f"{name}.dst.ram")
    return Golden(name, accel, stream, dump, blocks, status)


async def _replay_dump(spec: VmSpec, stream: Path, root: Path, accel: str, dump: Path) -> Path:
    run = RunPaths.create(root)
    async with QemuProcess(primary_argv(spec, run, accel=accel, incoming=True), run,
                           name="replay", die_with_parent=True) as dst:
        await dst.qmp.migrate_set_capabilities({"xbzrle": True})
        await dst.qmp.migrate_incoming(f"exec:cat {stream}")
        status = await _wait_migration(dst.qmp, 120)
        if status.get("status") != "completed":
            raise RuntimeError(f"replay of {stream} failed: {status}")
        await dst.qmp.pmemsave(0, MEM_MIB << 20, str(dump))
    return dump
