#!/usr/bin/env python3
"""Ingest of a RAM migration stream: parse + apply into a RAM image, vs memcpy.

Builds a precopy stream of one RAM block (default 256 MiB, every page a PAGE record with
text-like contents), then, in one run, times:
  * the parser with the compiled (Cython) twin, applying every page into a bytearray image;
  * the same with the pure-Python twin;
  * a plain memcpy of the same stream bytes into a bytearray, chunk by chunk.
Destination buffers are pre-touched (a replica's RAM file is mapped already), runs are
interleaved and each figure is the best of --repeat runs. Last line:
  RESULT ingest_c_gbps=X ingest_py_gbps=Y memcpy_gbps=Z
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from qmpshadow.migstream import StreamParser, StreamWriter
from qmpshadow.migstream.constants import RamFlag
from qmpshadow.migstream.events import (
    Configuration,
    Eof,
    Header,
    RamBlockDecl,
    RamEos,
    RamMemSize,
    RamRecords,
    SectionEnd,
    SectionFooter,
    SectionStart,
)
from qmpshadow.migstream.image import RamImage

PS = 4096
CHUNK = 4 << 20


def build_stream(mib: int) -> bytes:
    length = mib << 20
    w = StreamWriter()
    out = bytearray()
    out += w.write_all([Header(3), Configuration("pc-i440fx-7.2"), SectionStart(2, "ram", 0, 4),
                        RamMemSize(length, (RamBlockDecl("pc.ram", length),)), RamEos(2),
                        SectionFooter(2), SectionEnd(2, "ram")])
    base = bytearray(b"the quick brown fox jumps over the lazy dog; " * 92)[:PS]
    for i in range(length // PS):
        base[:8] = i.to_bytes(8, "little")
        flags = RamFlag.PAGE | (RamFlag.CONTINUE if i else 0)
        out += (i * PS | flags).to_bytes(8, "big")
        if not i:
            out += b"\x06pc.ram"
        out += base
    out += w.write_all([RamEos(2), SectionFooter(2), Eof()])
    return bytes(out)


def touched(n: int) -> bytearray:
    """A buffer whose pages are already mapped, like a replica's RAM file."""
    buf = bytearray(n)
    buf[:] = b"\x01" * n
    return buf


def ingest(stream: bytes, impl: object, ram: bytearray) -> float:
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    t0 = time.perf_counter()
    parser = StreamParser(impl=impl)  # type: ignore[arg-type]
    image = RamImage(impl=impl)  # type: ignore[arg-type]
    image.adopt({"pc.ram": ram})
    pages = 0
    for c in chunks:
        parser.receive_data(c)
        for ev in parser.events():
            image.apply(ev)
            if isinstance(ev, RamRecords):
                pages += len(ev.records)
    parser.receive_data(b"")
    parser.events()
    dt = time.perf_counter() - t0
    expect = (len(stream) - 200) // (PS + 8)
    if abs(pages - expect) > 1:
        sys.exit(f"ingest applied {pages} pages, expected about {expect}")
    return dt


def memcpy(stream: bytes, dst: bytearray) -> float:
    view = memoryview(dst)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    t0 = time.perf_counter()
    pos = 0
    for c in chunks:
        view[pos : pos + len(c)] = c
        pos += len(c)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="RAM block size (default 256)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.mib < 256:
        print("note: the issue's figure needs --mib 256 or more", file=sys.stderr)
    stream = build_stream(args.mib)
    c_twin = importlib.import_module("qmpshadow.migstream._ramscan_c")
    py_twin = importlib.import_module("qmpshadow.migstream._ramscan_py")
    gb = len(stream) / 1e9
    ram = touched(args.mib << 20)
    dst = touched(len(stream))
    t_c = t_py = t_m = float("inf")
    for _ in range(args.repeat):  # interleaved, so a noisy moment hits all three alike
        t_c = min(t_c, ingest(stream, c_twin, ram))
        t_py = min(t_py, ingest(stream, py_twin, ram))
        t_m = min(t_m, memcpy(stream, dst))
    c, p, m = gb / t_c, gb / t_py, gb / t_m
    print(f"stream: {len(stream) / 2**20:.1f} MiB, {args.mib << 20 >> 12} page records, "
          f"chunks of {CHUNK >> 20} MiB, best of {args.repeat}")
    print(f"{'ingest (Cython twin)':<24}{c:8.2f} GB/s   {c / m:6.2f} x memcpy")
    print(f"{'ingest (Python twin)':<24}{p:8.2f} GB/s   {p / m:6.2f} x memcpy")
    print(f"{'memcpy anchor':<24}{m:8.2f} GB/s")
    print(f"RESULT ingest_c_gbps={c:.2f} ingest_py_gbps={p:.2f} memcpy_gbps={m:.2f}")


if __name__ == "__main__":
    main()
