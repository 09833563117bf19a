"""``qmpshadow switchover``: planned, zero-loss move of a protected VM to its shadow."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add ``switchover`` to ``sub``."""
    p = sub.add_parser(
        "switchover", help="move a protected VM to its shadow's host (planned, no loss)",
        description="Ask the source agent (`qmpshadow protect --control SOCK --broker ...`) "
        "to stop the primary at an epoch boundary, ship and commit the final epoch "
        "synchronously, release its lease to the shadow (which promotes at once, generation "
        "+1) and kill the old primary. Prints the downtime (QEMU's STOP event on the "
        "primary to the RESUME event of the promoted copy) and the time to move.")
    p.add_argument("--control", required=True, type=Path,
                   help="the source agent's control socket (protect --control)")
    p.add_argument("--commit-timeout", type=float, default=10.0, metavar="S",
                   help="abort (the primary resumes) when the shadow has not committed the "
                   "final epoch within S seconds of starting to ship it (default 10)")
    p.add_argument("--promote-timeout", type=float, default=30.0, metavar="S",
                   help="after the release, wait S seconds for the shadow's promotion "
                   "(default 30)")
    p.add_argument("--no-prefinal", dest="prefinal", action="store_false",
                   help="COLO source: skip the checkpoint taken (and committed) right before "
                   "the final one; the final epoch then holds up to one checkpoint interval "
                   "of dirty pages, all of it in the downtime")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run_switchover)


def run_switchover(args: argparse.Namespace) -> int:
    """Raises QmpShadowError (refused or failed: the message says what state it left)."""
    import asyncio

    from ..agents.control import request

    answer = asyncio.run(request(
        args.control, "switchover", timeout=args.commit_timeout + args.promote_timeout + 60,
        args={"commit_timeout": args.commit_timeout,
              "promote_timeout": args.promote_timeout, "prefinal": args.prefinal}))
    answer.pop("ok", None)
    if args.json:
        print(json.dumps(answer))
        return 0
    down = answer.get("downtime_ms")
    move = answer.get("move_ms")
    print(f"switched over {answer.get('vm')}: epoch {answer.get('epoch')} committed and "
          f"running on the shadow (QEMU pid {answer.get('new_pid')}), generation "
          f"{answer.get('generation')}", file=sys.stdout)
    print(f"  downtime {_ms(down)} (primary STOP -> shadow RESUME), time to move {_ms(move)} "
          f"(request -> running); final epoch {_ms(answer.get('final_epoch_ms'))}, commit "
          f"{_ms(answer.get('commit_ms'))}, promotion {_ms(answer.get('promote_ms'))}")
    print(f"  old primary (pid {answer.get('old_pid')}): {answer.get('old_primary')}; "
          f"protect the new primary with --generation {answer.get('reprotect_generation')}")
    return 0


def _ms(v: object) -> str:
    return f"{v:.1f} ms" if isinstance(v, (int, float)) else "n/a"
