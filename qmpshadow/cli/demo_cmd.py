"""``qmpshadow demo``: run the end-to-end demonstration on real QEMU."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add the ``demo`` command to ``sub``."""
    demo = sub.add_parser(
        "demo", help="run the end-to-end failover demo on real QEMU and mosquitto",
        description="Protect the test VM with a shadow on this host (private mosquitto on "
        "127.0.0.1, source and shadow agents), inject a failure, show the detection, the "
        "promotion and the guest carrying on, and summarise (failover time, epochs "
        "committed, data lost). Exit 0 when the failover was clean, 1 when a measured "
        "check failed, 2 when a step failed. See docs/failover.md.")
    demo.add_argument("--fault", default="primary",
                      choices=["primary", "source-agent", "host"],
                      help="what to kill -9: the primary QEMU (default), the source agent "
                      "(its fencer kills the primary; the shadow waits for the lease), or "
                      "both (loss of the primary's host)")
    demo.add_argument("--accel", default="tcg", choices=["auto", "kvm", "tcg"],
                      help="accelerator of both QEMUs (default tcg; see docs/failover.md)")
    demo.add_argument("--mem", type=int, default=None,
                      help="guest RAM in MiB (default 128; 256 with --foundation)")
    demo.add_argument("--seconds", type=float, default=6.0,
                      help="how long to replicate before the fault (default 6)")
    demo.add_argument("--interval", type=int, default=200, metavar="MS",
                      help="checkpoint interval (default 200)")
    demo.add_argument("--heartbeat-ms", type=int, default=100, metavar="MS",
                      help="heartbeat / renewal period (default 100)")
    demo.add_argument("--lease-ms", type=int, default=4000, metavar="MS",
                      help="lease length (default 4000)")
    demo.add_argument("--broker", metavar="mqtt://HOST:PORT",
                      help="use this broker instead of starting a private mosquitto")
    demo.add_argument("--mqtt-user", metavar="U", help="user name for --broker")
    demo.add_argument("--mqtt-password-file", metavar="F", type=Path,
                      help="password file for --broker (first line)")
    demo.add_argument("--out", default="build/demo",
                      help="directory for the logs of every process (default build/demo)")
    demo.add_argument("--plain", action="store_true",
                      help="plain progress lines even on a terminal (no live view)")
    demo.add_argument("--json", action="store_true",
                      help="print the summary as one JSON object on stdout (progress lines "
                      "go to stderr)")
    demo.add_argument("--foundation", action="store_true",
                      help="the first demo instead: receive, record, inspect and replay a "
                      "live migration of the test guest")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo (imports the machinery only now)."""
    from ..demo import main

    return main(args)
