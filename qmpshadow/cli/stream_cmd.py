"""``qmpshadow stream ...``: inspect (record and diff come with the migration issue)."""

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
