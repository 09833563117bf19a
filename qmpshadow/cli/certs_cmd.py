"""``qmpshadow certs ...``: development certificates for mutual TLS between agents."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the ``certs`` command group to ``sub``."""
    certs = sub.add_parser("certs", help="development CA and agent certificates (mutual TLS)")
    csub = certs.add_subparsers(dest="certs_command", metavar="SUBCOMMAND", required=True)
    init = csub.add_parser(
        "init",
        help="create a development CA and one certificate per agent name",
        description="Create DIR/ca.pem, DIR/ca.key and DIR/NAME.pem, DIR/NAME.key for each "
        "agent name (ECDSA P-256, keys mode 0600). An existing CA and existing agent files "
        "are kept, missing ones are added; --force replaces everything. Agents then use "
        "TlsConfig.from_dir(DIR, name=NAME, peers=OTHER).",
    )
    init.add_argument("directory", metavar="DIR", help="directory to write (created 0700)")
    init.add_argument("--names", required=True, metavar="NAME[,NAME...]",
                      help="agent names, e.g. source,shadow (the certificate identities)")
    init.add_argument("--days", type=int, default=825, metavar="N",
                      help="agent certificate lifetime in days (default 825)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA and certificates")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    """Run ``certs init``; raises ConfigError for the CLI to report."""
    from ..transport.certs import init_dev_pki, parse_names

    pki = init_dev_pki(args.directory, parse_names(args.names), days=args.days,
                       overwrite=args.force)
    for name in ("ca", *pki.agents):
        pair = pki.ca if name == "ca" else pki.agents[name]
        what = "created" if name in pki.created else "kept"
        print(f"{what:8} {pair.cert}  {pair.key}")
    return 0
