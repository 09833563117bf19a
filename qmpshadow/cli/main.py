"""``qmpshadow`` command line. Subcommands import their machinery only when run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import certs_cmd, demo_cmd, migrate_cmd, protect_cmd, stream_cmd, switchover_cmd


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="qmpshadow",
        description="Shadow replicas, failover and live migration for raw QEMU over QMP.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    stream_cmd.register(sub)
    demo_cmd.register(sub)
    certs_cmd.register(sub)
    migrate_cmd.register(sub)
    protect_cmd.register(sub)
    switchover_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..errors import QmpShadowError

    try:
        code: int = args.func(args)
    except QmpShadowError as exc:
        print(f"qmpshadow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qmpshadow: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
