"""``qmpshadow demo``: run the end-to-end demonstration on real QEMU."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the ``demo`` command to ``sub``."""
    demo = sub.add_parser("demo", help="run the end-to-end demo on real QEMU")
    demo.add_argument("--out", default="build/demo", help="directory for the recording")
    demo.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    demo.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo (imports the machinery only now)."""
    from ..demo import main

    return main(args)
