#!/usr/bin/env python3
"""Replication links: frame throughput and small-frame latency, rdma against tcp.

Boots the soft-RoCE guest (qemu-scripts/rdma-guest/run.py: TCG, -smp 2, rxe0 on lo) and
runs the measurement INSIDE it, where both transports use the same device (lo) and the same
two vCPUs: a receiver process (``--serve KIND``) and the measuring sender, one link each:

* throughput: ``--mib`` MiB of DEVICE_STATE frames of ``--frame-kib`` KiB each, sent as fast
  as the link takes them, then a HEARTBEAT the receiver echoes (so every byte was received,
  decoded and checksum-verified); GB/s = 10^9 bytes of frames per second;
* latency: ``--pings`` HEARTBEAT frames (64 bytes on the wire) echoed one at a time; the
  median round trip in microseconds (p99 printed too).

Links: rdma = RC queue pair, plain-TCP control link on loopback (``insecure_loopback``);
tcp = plain TCP on loopback. Both with 4 MiB read/write buffers. Rounds alternate
tcp, rdma, ... and each figure is the best of ``--rounds``. Under TCG these are figures of
the emulation (soft-RoCE and the TCP stack both run on emulated CPUs), not of hardware.
Last line:

  RESULT rdma_gbps=X tcp_gbps=Y rdma_lat_us=Z tcp_lat_us=W
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpshadow.transport import LinkOptions

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "qemu-scripts" / "rdma-guest" / "run.py"
RESULT_RE = re.compile(r"^RESULT rdma_gbps=\S+ tcp_gbps=\S+ rdma_lat_us=\S+ tcp_lat_us=\S+$")
KINDS = ("tcp", "rdma")
BUF = 4 << 20


def _options() -> LinkOptions:
    from qmpshadow.transport import LinkOptions

    return LinkOptions(read_buffer=BUF, write_buffer=BUF)


# -- receiver process (inside the guest) ------------------------------------------------------

async def serve(kind: str) -> None:
    from qmpshadow.errors import TransportError
    from qmpshadow.frames.wire import Heartbeat
    from qmpshadow.transport import rdma, tcp

    mod = rdma if kind == "rdma" else tcp
    lst = await mod.listen("127.0.0.1", 0, insecure_loopback=True, options=_options())
    print(f"PORT {lst.port}", flush=True)
    link = await lst.accept()
    try:
        while True:
            frame = await link.receive()
            if isinstance(frame, Heartbeat):
                await link.send_frame(Heartbeat(generation=0, epoch=0, seq=frame.seq,
                                                timestamp_ns=frame.timestamp_ns))
    except TransportError:
        pass
    finally:
        link.abort()
        await lst.close()


# -- sender / measurement (inside the guest) --------------------------------------------------

async def measure(kind: str, mib: int, frame_kib: int, pings: int) -> tuple[float, float, float]:
    """(GB/s, median round trip µs, p99 round trip µs) over one link of ``kind``."""
    from qmpshadow.frames import EpochWriter, RamBlock
    from qmpshadow.frames.wire import DeviceStateFormat, Heartbeat
    from qmpshadow.transport import rdma, tcp

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--serve", kind,
        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{kind} receiver did not start: {line!r}")
        port = int(line.split()[1])
        mod = rdma if kind == "rdma" else tcp
        link = await mod.connect("127.0.0.1", port, insecure_loopback=True, options=_options())
        w = EpochWriter(generation=0, epoch=1, blocks=(RamBlock(idstr="mem", length=4096),))
        w.begin()
        payload = (os.urandom(1 << 16) * (frame_kib // 64 + 1))[: frame_kib << 10]
        frame = b"".join(bytes(p) for p in w.device_state(DeviceStateFormat.QEMU_SECTIONS,
                                                           payload))
        count = max(1, (mib << 20) // len(frame))

        async def ping(seq: int) -> int:
            t = time.perf_counter_ns()
            await link.send_frame(Heartbeat(generation=0, epoch=0, seq=seq, timestamp_ns=t))
            while True:
                got = await link.receive()
                if isinstance(got, Heartbeat) and got.seq == seq:
                    return time.perf_counter_ns() - t

        await ping(0)  # warm the path
        t0 = time.perf_counter()
        for _ in range(count):
            await link.send(frame)
        await ping(1)
        gbps = count * len(frame) / (time.perf_counter() - t0) / 1e9
        for seq in range(2, 22):  # warm-up
            await ping(seq)
        rtts = sorted([await ping(seq) for seq in range(100, 100 + pings)])
        link.abort()
        med = statistics.median(rtts) / 1000
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] / 1000
        return gbps, med, p99
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def inside(args: argparse.Namespace) -> int:
    from qmpshadow.transport import rdma

    reason = rdma.available()
    if reason:
        print(f"no RDMA device here: {reason} (run without --inside: the bench boots the "
              "soft-RoCE guest)", file=sys.stderr)
        return 2
    best: dict[str, tuple[float, float, float]] = {}
    for r in range(args.rounds):
        for kind in KINDS:
            gbps, med, p99 = await measure(kind, args.mib, args.frame_kib, args.pings)
            print(f"round {r + 1} {kind:4}  {gbps:6.3f} GB/s  rtt median {med:8.1f} us  "
                  f"p99 {p99:8.1f} us", flush=True)
            old = best.get(kind)
            best[kind] = ((max(old[0], gbps), min(old[1], med), min(old[2], p99)) if old
                          else (gbps, med, p99))
    print(f"\n{args.mib} MiB in {args.frame_kib} KiB DEVICE_STATE frames, {args.pings} "
          f"HEARTBEAT round trips, best of {args.rounds}; lo, 2 vCPUs under TCG")
    print(f"{'':6}{'throughput':>22}{'small-frame round trip':>30}")
    for kind in KINDS:
        g, med, p99 = best[kind]
        print(f"{kind:6}{g:9.3f} GB/s {g * 8:6.2f} Gbit/s   median {med:8.1f} us  "
              f"p99 {p99:8.1f} us")
    (rg, rl, _), (tg, tl, _) = best["rdma"], best["tcp"]
    print(f"rdma / tcp: throughput {rg / tg:.2f} x, round trip {rl / tl:.2f} x")
    print(f"RESULT rdma_gbps={rg:.3f} tcp_gbps={tg:.3f} rdma_lat_us={rl:.1f} "
          f"tcp_lat_us={tl:.1f}", flush=True)
    return 0


# -- host: boot the guest, run inside ---------------------------------------------------------

def host(args: argparse.Namespace) -> int:
    cmd = [sys.executable, str(RUN), "--timeout", str(args.timeout), "--",
           "python3", "bench/transport.py", "--inside", "--mib", str(args.mib),
           "--frame-kib", str(args.frame_kib), "--pings", str(args.pings),
           "--rounds", str(args.rounds)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    result = None
    for line in proc.stdout:
        sys.stdout.write(line)
        if RESULT_RE.match(line.strip()):
            result = line.strip()
    rc = proc.wait()
    print(f"bench/transport.py: guest exit {rc}, {time.monotonic() - t0:.0f} s in all "
          "(image check, boot, bench, power-off)")
    if rc != 0 or result is None:
        print("bench/transport.py: no RESULT from the guest", file=sys.stderr)
        return rc or 1
    print(result)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB per throughput run")
    ap.add_argument("--frame-kib", type=int, default=1024, help="KiB per frame")
    ap.add_argument("--pings", type=int, default=500, help="round trips per latency run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200, help="guest budget, seconds")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    if args.inside:
        return asyncio.run(inside(args))
    return host(args)


if __name__ == "__main__":
    sys.exit(main())
