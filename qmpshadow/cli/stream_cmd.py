"""``qmpshadow stream ...``: inspect, record (relay a live migration) and diff streams."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: Any) -> None:
    """Add the ``stream`` command group to ``sub``."""
    stream = sub.add_parser("stream", help="inspect QEMU migration streams")
    ssub = stream.add_subparsers(dest="stream_command", metavar="SUBCOMMAND", required=True)
    insp = ssub.add_parser(
        "inspect",
        help="summarise a migration stream from a file or a live unix socket",
        description="Summarise a QEMU migration stream. SOURCE is a file recorded with "
        "migrate exec:cat>FILE, or unix:PATH to listen on and receive a live migration "
        "(a COLO primary is answered as its secondary for --checkpoints checkpoints).",
    )
    insp.add_argument("source", metavar="SOURCE", help="FILE or unix:PATH")
    insp.add_argument("--json", action="store_true", help="print one JSON object")
    insp.add_argument("--pages", action="store_true", help="list every page record")
    insp.add_argument("--checkpoints", type=int, default=3, metavar="N",
                      help="COLO checkpoints to receive before closing (default 3)")
    insp.add_argument("--timeout", type=float, default=120.0, metavar="S",
                      help="seconds to wait for a live stream (default 120)")
    insp.set_defaults(func=run_inspect)

    rec = ssub.add_parser(
        "record",
        help="relay a live migration through qmpshadow and record it",
        description="Listen on --listen for a migration, forward every connection to --to "
        "unchanged in both directions and record it: the source -> destination bytes of the "
        "main channel to FILE, the return path (COLO acks, postcopy requests) to "
        "FILE.return, other channels (multifd) to FILE.chN. Start the destination with "
        "migrate-incoming on --to, then migrate the source to the address printed. Ends "
        "when the migration's connections have closed (or on Ctrl-C, keeping what was "
        "recorded). A recording of a plain precopy migration replays with migrate-incoming "
        "exec:cat FILE.")
    rec.add_argument("--listen", required=True, metavar="ADDR",
                     help="unix:PATH or tcp:HOST:PORT (port 0: any) for the source")
    rec.add_argument("--to", required=True, metavar="ADDR",
                     help="the destination's incoming address, unix:PATH or tcp:HOST:PORT")
    rec.add_argument("-o", "--out", required=True, metavar="FILE", help="recording file")
    rec.add_argument("--return-out", metavar="FILE",
                     help="return-path recording (default FILE.return)")
    rec.add_argument("--timeout", type=float, default=None, metavar="S",
                     help="give up when the migration did not end within S seconds")
    rec.add_argument("--json", action="store_true", help="print the result as JSON")
    rec.set_defaults(func=run_record)

    dif = ssub.add_parser(
        "diff",
        help="compare two streams, or two COLO checkpoints of one recording",
        description="Compare two migration streams: RAM pages whose contents differ, per "
        "RAM block, and device fields whose values differ (decoded with the vmdesc: field "
        "name, old -> new). A side is FILE (the state the stream leaves) or "
        "FILE@checkpointN (a recorded COLO session after checkpoint N; 0 = after the "
        "initial stream; checkpoints are decoded with the session's initial vmdesc). Exit "
        "status: 0 identical, 1 different, 2 error.")
    dif.add_argument("a", metavar="A", help="FILE or FILE@checkpointN")
    dif.add_argument("b", metavar="B", help="FILE or FILE@checkpointN")
    dif.add_argument("--json", action="store_true", help="print one JSON object")
    dif.add_argument("--max-ranges", type=int, default=8, metavar="N",
                     help="changed page ranges shown per block (default 8; --json: all)")
    dif.set_defaults(func=run_diff)


def _progress_printer() -> Any:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int | None) -> None:
        of = f" of {total / 1e6:.1f}" if total else ""
        print(f"\r  {done / 1e6:.1f}{of} MB read", end="", file=sys.stderr, flush=True)

    return show


def run_inspect(args: argparse.Namespace) -> int:
    """Run ``stream inspect``; raises QmpShadowError subclasses for the CLI to report."""
    import asyncio

    from ..streamtools.inspect import format_human, inspect_file, inspect_unix, parse_source

    kind, path = parse_source(args.source)
    progress = _progress_printer()
    if kind == "file":
        summary = inspect_file(path, keep_pages=args.pages, progress=progress)
    else:
        def listening() -> None:
            print(f"listening on unix:{path} (migrate uri=unix:{path})", file=sys.stderr)

        summary = asyncio.run(inspect_unix(
            path, keep_pages=args.pages, max_checkpoints=args.checkpoints,
            timeout=args.timeout, on_listen=listening, progress=progress))
    if progress:
        print(file=sys.stderr)
    doc = summary.as_dict()
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_human(doc))
    return 0


def run_record(args: argparse.Namespace) -> int:
    """Run ``stream record``; raises QmpShadowError subclasses for the CLI to report."""
    import asyncio

    from ..errors import TransportError
    from ..streamtools.record import Relay, parse_endpoint

    listen = parse_endpoint(args.listen, what="--listen")
    target = parse_endpoint(args.to, what="--to")
    progress = _progress_printer()

    def on_bytes(fwd: int, ret: int) -> None:
        if progress is not None:
            progress(fwd + ret, None)

    async def main() -> Any:
        relay = Relay(listen, target, args.out, return_out=args.return_out,
                      on_bytes=on_bytes)
        uri = await relay.start()
        print(f"listening on {uri} (migrate the source with uri={uri}); forwarding to "
              f"{target.uri}", file=sys.stderr, flush=True)
        try:
            return await relay.wait(args.timeout)
        finally:
            await relay.close()

    stats = asyncio.run(main())
    if progress:
        print(file=sys.stderr)
    doc = stats.as_dict()
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        for ch in doc["channels"]:
            print(f"channel {ch['index']} ({ch['kind']}): {ch['forward_bytes']} bytes -> "
                  f"{ch['forward_file']}, return path {ch['return_bytes']} bytes -> "
                  f"{ch['return_file']}" + (f"  ERROR: {ch['error']}" if ch["error"] else ""))
    if stats.errors:
        raise TransportError("relay failed: " + "; ".join(stats.errors)
                             + " (the recording holds what was relayed before)")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """Run ``stream diff``; returns 0 when identical, 1 when different."""
    from ..streamtools.diff import diff_refs, format_human, parse_ref

    progress = _progress_printer()
    diff = diff_refs(parse_ref(args.a), parse_ref(args.b), progress=progress)
    if progress:
        print(file=sys.stderr)
    if args.json:
        json.dump(diff.as_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_human(diff, max_ranges=args.max_ranges))
    return 0 if diff.identical else 1
