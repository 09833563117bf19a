#!/usr/bin/env python3
"""Page codec and page-hash scan throughput, compiled vs Python twin, against their anchors.

In one run, for 4 KiB pages:
  * encode (with a warm previous-version cache covering every page; batches of --batch
    pages into one reused output buffer, as the agent sends them) and apply, for
    - "text": text-like pages, each with a few small edits since the cached version;
    - "random": pages replaced by unrelated random bytes (DELTA loses, FULL is sent);
    next to a memcpy of the same number of page bytes (bytearray slice assignment);
  * zstd (levels 1, 3) over one PAGES payload of each workload (the frames' optional flag);
  * the keyed xxh3 scan (``scan_changed`` over a buffer where nothing changed, so every page
    is hashed and compared) next to a plain read of the same buffer (``memread``, C).
GB/s are page bytes processed per second (10**9 bytes), best of --repeat; destination
buffers are pre-touched. The versions alternate A→B, B→A so each timed run does the same work.
The Python twin runs on a smaller slice (--py-mib) to keep the run short. Last line:
  RESULT scan_c_gbps=.. scan_py_gbps=.. memread_gbps=.. encode_c_gbps=.. apply_c_gbps=..
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from array import array
from collections.abc import Callable
from types import ModuleType

import zstandard

from qmpshadow.frames import _pagecodec_py, _pagehash_py
from qmpshadow.frames.limits import EMPTY_TAG, ENCODE_SLACK

PS = 4096


def _compiled(name: str) -> ModuleType:
    try:
        return __import__(f"qmpshadow.frames.{name}_c", fromlist=["x"])
    except ImportError:
        sys.exit(f"the compiled twin {name}_c is not built: run setup.py build_ext --inplace")


def best(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return min(times) / 1e9


def interleaved(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Best wall time of each function over ``repeat`` rounds that call each once in turn."""
    times = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter_ns()
            fn()
            times[k] = min(times[k], (time.perf_counter_ns() - t0) / 1e9)
    return times


def touched(n: int) -> bytearray:
    buf = bytearray(n)
    buf[::4096] = b"\x01" * len(range(0, n, 4096))  # fault every page in
    return buf


def text_pages(npages: int, rng: random.Random) -> bytearray:
    words = (
        b"the quick brown fox jumps over the lazy dog while kernel pages hold "
        b"struct task_struct, dentries, inodes and buffers of log lines 0123456789 "
    )
    block = words * (2 * PS // len(words) + 2)
    out = bytearray(npages * PS)
    for i in range(npages):
        off = (i * 37) % len(words)
        out[i * PS : (i + 1) * PS] = block[off : off + PS]
        out[i * PS : i * PS + 8] = i.to_bytes(8, "little")
    return out


def edited(src: bytearray, rng: random.Random, edits: int) -> bytearray:
    out = bytearray(src)
    for i in range(len(src) // PS):
        for _ in range(edits):
            pos = i * PS + rng.randrange(PS - 8)
            n = rng.randrange(1, 9)
            out[pos : pos + n] = rng.randbytes(n)
    return out


def codec_case(
    twin: ModuleType, a: bytearray, b: bytearray, batch: int, repeat: int
) -> tuple[float, float, float]:
    """(encode GB/s, apply GB/s, record bytes per page byte), alternating A→B, B→A.

    Encodes in batches of ``batch`` pages (one PAGES frame each) into one reused,
    pre-touched output buffer, as the source agent does.
    """
    n = len(a) // PS
    batches = [array("Q", range(lo, min(n, lo + batch))) for lo in range(0, n, batch)]
    cache_data = bytearray(len(a))
    cache_tags = array("Q", [EMPTY_TAG]) * n
    out = touched(batch * (PS + ENCODE_SLACK))
    for ix in batches:  # warm: the cache holds A, as after a first full epoch
        twin.encode_pages_into(out, ix, a, PS, cache_data, cache_tags, False, None)
    order = [b, a]  # each run moves the cache to the other version

    def enc() -> None:
        src = order[0]
        for ix in batches:
            twin.encode_pages_into(out, ix, src, PS, cache_data, cache_tags, False, None)
        order.reverse()

    t_enc = best(enc, 2 * repeat)  # even: the cache holds A again
    recs = {
        name: [
            twin.encode_pages(ix, src, PS, cache_data, cache_tags, False, None) for ix in batches
        ]
        for name, src in (("ab", b), ("ba", a))
    }
    replica = touched(len(a))
    replica[:] = a
    todo = ["ab", "ba"] * repeat

    def app() -> None:
        for ix, rec in zip(batches, recs[todo.pop(0)], strict=True):
            twin.apply_pages(rec, replica, PS, len(ix))

    t_app = best(app, len(todo))
    if replica != a:
        sys.exit(f"{twin.__name__}: replica differs from the source after apply")
    ratio = sum(len(r) for r in recs["ab"]) / len(a)
    return len(a) / t_enc / 1e9, len(a) / t_app / 1e9, ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--codec-mib", type=int, default=64, help="RAM size for the codec runs")
    ap.add_argument("--scan-mib", type=int, default=256, help="buffer size for the scan")
    ap.add_argument("--py-mib", type=int, default=8, help="slice for the Python codec twin")
    ap.add_argument("--edits", type=int, default=3, help="small edits per page (text case)")
    ap.add_argument("--batch", type=int, default=1024, help="pages per PAGES frame")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(2024)
    c_codec, c_hash = _compiled("_pagecodec"), _compiled("_pagehash")
    print(
        f"page size {PS}; codec {args.codec_mib} MiB (py {args.py_mib} MiB) in frames of "
        f"{args.batch} pages; scan {args.scan_mib} MiB; best of {args.repeat}"
    )

    npages = (args.codec_mib << 20) // PS
    text_a = text_pages(npages, rng)
    text_b = edited(text_a, rng, args.edits)
    rand_a = bytearray(os.urandom(npages * PS))
    rand_b = bytearray(os.urandom(npages * PS))
    dst = touched(len(text_a))

    def memcpy() -> None:
        dst[:] = text_a

    t_memcpy = best(memcpy, args.repeat)
    pyn = (args.py_mib << 20) // PS * PS
    results: dict[str, tuple[float, float, float]] = {}
    for label, a, b in (("text", text_a, text_b), ("random", rand_a, rand_b)):
        results[f"{label}_c"] = codec_case(c_codec, a, b, args.batch, args.repeat)
        results[f"{label}_py"] = codec_case(
            _pagecodec_py, a[:pyn], b[:pyn], args.batch, max(1, args.repeat // 2)
        )
    t_memcpy = min(t_memcpy, best(memcpy, args.repeat))  # before and after the codec runs
    memcpy_gbps = len(text_a) / t_memcpy / 1e9
    print(f"{'workload':<12}{'twin':<6}{'encode GB/s':>13}{'apply GB/s':>12}{'wire/page':>11}")
    for key, (enc, app, ratio) in results.items():
        label, twin = key.rsplit("_", 1)
        print(f"{label:<12}{twin:<6}{enc:>13.2f}{app:>12.2f}{ratio:>11.4f}")
    print(f"{'memcpy':<18}{memcpy_gbps:>13.2f}   (anchor: same page bytes, bytearray copy)")
    # The frames' optional zstd, over one frame of records of each workload.
    frame = array("Q", range(min(args.batch, npages)))
    for label, a, b in (("text", text_a, text_b), ("random", rand_a, rand_b)):
        cache = (bytearray(len(a)), array("Q", [EMPTY_TAG]) * npages)
        c_codec.encode_pages(frame, a, PS, *cache, False, None)
        rec = c_codec.encode_pages(frame, b, PS, *cache, False, None)
        for level in (1, 3):
            z = zstandard.ZstdCompressor(level=level)
            t = best(lambda z=z, rec=rec: z.compress(rec), args.repeat)
            size = len(z.compress(rec))
            print(
                f"zstd-{level} over a {label} PAGES payload: {len(rec)} -> {size} bytes "
                f"({size / len(rec):.3f}), {len(rec) / t / 1e9:.2f} GB/s of payload, "
                f"{len(frame) * PS / t / 1e9:.2f} GB/s of pages"
            )

    scan_buf = text_pages((args.scan_mib << 20) // PS, rng)
    nscan = len(scan_buf) // PS
    seed = rng.getrandbits(64)
    table = array("Q", bytes(8 * nscan))
    c_hash.hash_pages(scan_buf, PS, seed, table)

    def scan_c() -> None:
        if len(c_hash.scan_changed(scan_buf, PS, seed, table)):
            sys.exit("scan found changes in an unchanged buffer")

    def scan_py() -> None:
        if len(_pagehash_py.scan_changed(scan_buf, PS, seed, table)):
            sys.exit("scan found changes in an unchanged buffer")

    def read() -> None:
        c_hash.memread(scan_buf)

    def scan_c_default() -> None:
        c_hash._select_kernel(False)
        try:
            scan_c()
        finally:
            c_hash._select_kernel(c_hash.KERNEL == "avx2")

    size = len(scan_buf)
    # Interleaved so that a noisy neighbour hits all of them alike; best of each.
    t_read, t_c, t_def, t_py = interleaved([read, scan_c, scan_c_default, scan_py], args.repeat)
    read_gbps = size / t_read / 1e9
    scan_c_gbps = size / t_c / 1e9
    scan_def_gbps = size / t_def / 1e9
    scan_py_gbps = size / t_py / 1e9
    ms_c = size / scan_c_gbps / 1e6
    print(
        f"scan c  {scan_c_gbps:6.2f} GB/s ({ms_c:.1f} ms for {args.scan_mib} MiB, "
        f"xxh3 kernel {c_hash.KERNEL})"
    )
    print(f"scan c  {scan_def_gbps:6.2f} GB/s with the default (SSE2) kernel")
    print(f"scan py {scan_py_gbps:6.2f} GB/s")
    print(f"memread {read_gbps:6.2f} GB/s (anchor: plain read of the same buffer)")
    enc_c, app_c, _ = results["text_c"]
    print(
        f"RESULT scan_c_gbps={scan_c_gbps:.2f} scan_py_gbps={scan_py_gbps:.2f} "
        f"memread_gbps={read_gbps:.2f} encode_c_gbps={enc_c:.2f} apply_c_gbps={app_c:.2f}"
    )


if __name__ == "__main__":
    main()
