"""Record the delta frames of real epochs on the host, for replay inside the soft-RoCE guest.

A dirtier primary (TCG, RAM in a shared file) runs on the HOST; a shared-RAM source takes
checkpoints, each with a pmemsave of the primary held in it, and an EpochEncoder turns them
into frames. Written to ``OUT/``:

- ``frames.bin``: every frame's bytes, as encoded (epochs 1..4 in a row, 1 full, then
  deltas; epoch 5 a full epoch taken after the encoder was reset, i.e. what a source sends
  after a reconnect/resync);
- ``index.json``: per epoch its number, whether full, its frames' lengths (to cut
  frames.bin), the EPOCH_END digest, and ``ram_sha256``: SHA-256 of the primary's RAM in
  the checkpoint (pmemsave) with the VGA/ROM hole 0xa0000-0xfffff zeroed (a pmemsave reads
  guest-physical addresses there, not the RAM block).

Usage: ``python -m tests.rdma.record OUT`` (the test guest must be built: ``make guest``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.testguest import wait_for_counter
from qmpshadow.source.encoder import EpochEncoder
from qmpshadow.source.shared_ram import SharedRamSource
from tests.integration.shadowkit import HOLE, MIB, PS, checkpoint_with_dump, dirtier_spec

EPOCHS = 4  # then one full epoch (number EPOCHS + 1)


def ram_digest(ram: bytes | bytearray | memoryview) -> str:
    """SHA-256 of the first MIB MiB of ``ram`` with the VGA/ROM hole zeroed."""
    buf = bytearray(memoryview(ram)[: MIB << 20])
    buf[HOLE.start : HOLE.stop] = bytes(len(HOLE))
    return hashlib.sha256(buf).hexdigest()


async def record(out: Path) -> dict[str, Any]:
    """Record the epochs into ``out`` (created); returns the index. Raises QemuError,
    ConfigError (no test guest kernel) and QmpError."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qs-rec-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        mem_path = tmp / "p.ram"
        spec = dirtier_spec("rdmarec", mem_path=mem_path, pages=32, delay_us=500)
        run = RunPaths.create(tmp / "primary")
        vm = QemuProcess(primary_argv(spec, run, accel="tcg"), run, name="rdma-recorder",
                         start_timeout=20, die_with_parent=True)
        await vm.start()
        try:
            await wait_for_counter(run.serial_log, timeout=60)
            src = SharedRamSource(vm.qmp, mem_path=mem_path, main_block="mem",
                                  sock_path=tmp / "d.sock")
            await src.open()
            enc = EpochEncoder(page_size=PS, main_pages=(MIB << 20) // PS)
            epochs: list[dict[str, Any]] = []
            try:
                with open(out / "frames.bin", "wb") as f:
                    for n in range(1, EPOCHS + 2):
                        full = n == EPOCHS + 1
                        dump = tmp / f"d{n}.ram"
                        ep = await checkpoint_with_dump(src, vm, dump, full=full)
                        frames, stats = enc.encode(ep)
                        lengths = []
                        for parts in frames:
                            raw = b"".join(bytes(p) for p in parts)
                            f.write(raw)
                            lengths.append(len(raw))
                        epochs.append({"epoch": ep.number, "full": ep.full, "frames": lengths,
                                       "digest": stats.digest, "pages": stats.sent_pages,
                                       "wire_bytes": stats.wire_bytes,
                                       "ram_sha256": ram_digest(dump.read_bytes())})
                        dump.unlink()
                        await asyncio.sleep(0.2)  # let the guest dirty pages in between
            finally:
                await src.close()
        finally:
            await vm.stop(timeout=5)
    index = {"page_size": PS, "ram_mib": MIB, "epochs": epochs}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


if __name__ == "__main__":
    idx = asyncio.run(record(Path(sys.argv[1])))
    for e in idx["epochs"]:
        print(e["epoch"], "full" if e["full"] else "delta", len(e["frames"]), "frames",
              e["wire_bytes"], "bytes", e["ram_sha256"][:16])
