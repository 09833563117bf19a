"""``qmpshadow demo --foundation``: the first demo, end to end on real QEMU.

Boot the test guest, receive a live migration of it through qmpshadow's stream inspector
while recording it, show what the stream held, then replay the recording into a fresh
destination QEMU and show the guest carrying on with its memory self-check intact
(``mism=0``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import QmpShadowError
from .qemu.accel import detect_accel
from .qemu.argv import RunPaths, primary_argv
from .qemu.process import QemuProcess
from .qemu.spec import MemorySpec, VmSpec
from .qemu.testguest import guest_kernel_path, kernel_args, parse_serial, wait_for_counter
from .streamtools.inspect import format_human, inspect_unix


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def run_demo(*, out_dir: Path, mem_mib: int = 256, accel_pref: str = "auto",
                   json_out: bool = False) -> dict[str, Any]:
    """Run the demo; returns its summary. Raises QmpShadowError when a step fails."""
    accel = detect_accel(accel_pref)
    _say(f"accelerator: {accel}")
    spec = VmSpec(name="demo", memory=MemorySpec(size_mib=mem_mib),
                  kernel=guest_kernel_path(),
                  kernel_args=kernel_args(pages=64, region_mib=32, delay_us=2000,
                                          pattern="text", print_ms=200))
    out_dir.mkdir(parents=True, exist_ok=True)
    recording = out_dir / "demo-stream.bin"
    with tempfile.TemporaryDirectory(prefix="qmpshadow-demo-") as tmp:
        src_run = RunPaths.create(Path(tmp) / "src")
        dst_run = RunPaths.create(Path(tmp) / "dst")
        async with QemuProcess(primary_argv(spec, src_run, accel=accel), src_run,
                                name="primary") as src:
            first = await wait_for_counter(src_run.serial_log, timeout=60)
            _say(f"primary running: {first}")
            await asyncio.sleep(1.0)
            sock = str(Path(tmp) / "mig.sock")
            listening = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(inspect_unix(
                sock, record_to=str(recording), timeout=120,
                on_listen=lambda: listening.set_result(None)))
            await listening
            t0 = time.monotonic()
            await src.qmp.migrate(f"unix:{sock}")
            summary = await task
            mig = await src.qmp.query_migrate()
            _say(f"live migration received in {time.monotonic() - t0:.2f} s, recorded to "
                 f"{recording} ({recording.stat().st_size} bytes); QEMU says: "
                 f"{mig.get('status')}, downtime {mig.get('downtime')} ms")
            before = parse_serial(src_run.serial_log.read_text(errors="replace"))
        doc = summary.as_dict()
        if not json_out:
            print(format_human(doc))
        last = before[-1]
        _say(f"source stopped at {last}; replaying the recording into a fresh destination")
        async with QemuProcess(primary_argv(spec, dst_run, accel=accel, incoming=True),
                                dst_run, name="destination") as dst:
            await dst.qmp.migrate_incoming(f"exec:cat {recording}")
            deadline = time.monotonic() + 60
            while True:
                status = (await dst.qmp.query_migrate()).get("status")
                if status in ("completed", "failed") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            if status != "completed":
                raise QmpShadowError(f"replay into the destination ended {status!r}; "
                                     f"see {dst_run.stderr_log}")
            await dst.qmp.cont()
            line = await wait_for_counter(dst_run.serial_log, min_counter=last.counter + 20,
                                          timeout=60)
            after = parse_serial(dst_run.serial_log.read_text(errors="replace"))
        bad = [c for c in after if c.mism]
        ok = not bad and line.counter > last.counter
        _say(f"destination running from the recording: {line} "
             f"({'self-check clean' if ok else 'SELF-CHECK FAILED'})")
    result = {"stream": doc, "source_last": last.counter, "destination_counter": line.counter,
              "mismatches": sum(c.mism for c in after), "ok": ok,
              "recording": str(recording)}
    if not ok:
        raise QmpShadowError(f"demo failed: destination lines with mismatches: {bad[:3]}")
    return result


def main(args: Any) -> int:
    """CLI entry for ``qmpshadow demo``."""
    result = asyncio.run(run_demo(out_dir=Path(args.out), mem_mib=args.mem or 256,
                                  accel_pref=args.accel, json_out=args.json))
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        _say("demo finished: exit 0")
    return 0
