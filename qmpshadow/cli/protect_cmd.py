"""``qmpshadow protect`` (source agent), ``shadow`` (shadow agent), ``promote``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _security(p: argparse.ArgumentParser, name: str, peer: str) -> None:
    p.add_argument("--tls", metavar="DIR", type=Path,
                   help="TLS material as written by `qmpshadow certs init` (tcp links)")
    p.add_argument("--name", default=name, help=f"this agent's certificate name ({name})")
    p.add_argument("--peer", default=peer, help=f"the peer's certificate name ({peer})")
    p.add_argument("--insecure-loopback", action="store_true",
                   help="plain TCP without TLS, allowed on 127.0.0.1 only")
    p.add_argument("--json", action="store_true", help="JSON event lines on stdout")


def _cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("automatic failover (MQTT)", "heartbeats, lease and fencing "
                             "through an MQTT broker; see docs/failover.md")
    g.add_argument("--broker", metavar="mqtt://HOST:PORT",
                   help="MQTT broker; enables leases, self-fencing and automatic failover")
    g.add_argument("--cluster", default="default", metavar="NAME",
                   help="cluster name in the topic tree qmpshadow/NAME/VM/... (default "
                   "'default')")
    g.add_argument("--mqtt-user", metavar="U", help="MQTT user name")
    g.add_argument("--mqtt-password-file", metavar="F", type=Path,
                   help="file holding the MQTT password (first line)")
    g.add_argument("--heartbeat-ms", type=int, default=100, metavar="MS",
                   help="heartbeat / lease renewal period (default 100)")
    g.add_argument("--lease-ms", type=int, default=4000, metavar="MS",
                   help="lease length (default 4000); the shadow promotes on a timeout "
                   "only after it")
    g.add_argument("--detect-ms", type=int, default=500, metavar="MS",
                   help="no heartbeat on either path for this long before a promotion "
                   "(default 500)")
    g.add_argument("--keepalive", type=int, default=1, metavar="S",
                   help="MQTT keepalive in seconds (default 1)")


def register(sub: Any) -> None:
    """Add protect, shadow and promote to ``sub``."""
    p = sub.add_parser("protect", help="source agent: checkpoint a running primary to a shadow",
                       description="Protect a running primary VM: take consistent epochs "
                       "(COLO under KVM, or a shared-RAM scan) and ship them to the shadow "
                       "agent.")
    p.add_argument("--spec", required=True, type=Path, help="VM spec (TOML)")
    p.add_argument("--qmp", required=True, help="the primary's QMP unix socket (use its "
                   "second socket if another client owns the first)")
    p.add_argument("--to", required=True, help="shadow agent: unix:PATH or tcp:HOST:PORT")
    p.add_argument("--transport", default="tcp", choices=["tcp", "rdma"],
                   help="for a tcp: endpoint: frames over TCP (default) or an RDMA queue "
                   "pair (control channel on the same address; needs pyverbs and a device)")
    p.add_argument("--source", default="auto", choices=["auto", "colo", "shared-ram"])
    p.add_argument("--ack", default="async", choices=["async", "sync"],
                   help="COLO ack mode (default async)")
    p.add_argument("--interval", type=int, default=200, metavar="MS",
                   help="checkpoint interval in ms (default 200)")
    p.add_argument("--epoch-min-ms", type=int, metavar="MS",
                   help="adaptive epoch length: the shortest, used while the guest's output "
                   "waits (default --interval; docs/output-commit.md)")
    p.add_argument("--epoch-max-ms", type=int, metavar="MS",
                   help="adaptive epoch length: the longest, reached when idle (default "
                   "--interval, or --epoch-min-ms if larger)")
    p.add_argument("--ack-thinning", default="on", choices=["on", "off"],
                   help="output commit: of the pure TCP ACKs one flow has in a release, "
                   "send only the newest (default on; off for peers whose slow start "
                   "counts ACKs rather than bytes; docs/output-commit.md)")
    p.add_argument("--epochs", type=int, default=0, help="stop after N epochs (0: never)")
    p.add_argument("--generation", type=int, default=1, metavar="N",
                   help="fencing token of this primary (default 1; after a failover, "
                   "protect the new primary with a higher one)")
    p.add_argument("--fencer-log", type=Path, metavar="FILE",
                   help="append the fencer process's log to FILE")
    p.add_argument("--control", type=Path, metavar="SOCK",
                   help="control socket (status, switchover) for `qmpshadow switchover`")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics")
    _security(p, "source", "shadow")
    _cluster(p)
    p.set_defaults(func=run_protect)

    s = sub.add_parser("shadow", help="shadow agent: keep a replica and a warm standby",
                       description="Receive epochs into a replica and keep a paused shadow "
                       "QEMU ready; promote it on `qmpshadow promote`.")
    s.add_argument("--spec", required=True, type=Path, help="VM spec (TOML)")
    s.add_argument("--replica", required=True, type=Path, help="replica directory")
    s.add_argument("--listen", required=True, help="unix:PATH or tcp:HOST:PORT")
    s.add_argument("--transport", default="tcp", choices=["tcp", "rdma"],
                   help="for a tcp: endpoint: frames over TCP (default) or RDMA")
    s.add_argument("--control", type=Path, help="control socket (default REPLICA/control.sock)")
    s.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics")
    _security(s, "shadow", "source")
    _cluster(s)
    s.set_defaults(func=run_shadow)

    m = sub.add_parser("promote", help="promote a shadow now (manual failover)")
    m.add_argument("--control", required=True, type=Path, help="the shadow agent's control "
                   "socket")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_promote)


def _sec(args: argparse.Namespace) -> Any:
    from ..agents.run import LinkSecurity

    return LinkSecurity(tls_dir=args.tls, name=args.name, peer=args.peer,
                        insecure_loopback=args.insecure_loopback)


def _cluster_options(args: argparse.Namespace) -> Any:
    """ClusterOptions from the options, or None without --broker. Raises ConfigError."""
    if not args.broker:
        return None
    from ..cluster.lease import ClusterTiming
    from ..cluster.mqtt import BrokerConfig
    from ..cluster.source_side import ClusterOptions
    from ..errors import ConfigError

    password = None
    if args.mqtt_password_file is not None:
        try:
            password = args.mqtt_password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise ConfigError(f"--mqtt-password-file {args.mqtt_password_file}: expected a "
                              f"readable file with the password on its first line ({exc})"
                              ) from None
    broker = BrokerConfig.from_url(args.broker, username=args.mqtt_user, password=password,
                                   keepalive_s=args.keepalive)
    lease = args.lease_ms
    timing = ClusterTiming(heartbeat_ms=args.heartbeat_ms, lease_ms=lease,
                           detect_ms=args.detect_ms, keepalive_s=args.keepalive,
                           reacquire_ms=lease)
    return ClusterOptions(broker=broker, cluster=args.cluster, timing=timing)


def run_protect(args: argparse.Namespace) -> int:
    """Run the source agent. Raises QmpShadowError subclasses for the CLI to report."""
    import asyncio

    from ..agents.run import Endpoint
    from ..agents.run import run_protect as main
    from ..qemu.spec import VmSpec
    from .live import StatusLine

    spec = VmSpec.from_toml(args.spec)
    to = Endpoint.parse(args.to).over(args.transport)
    outcome = asyncio.run(main(spec=spec, qmp_path=args.qmp, to=to,
                               sec=_sec(args), source=args.source, ack=args.ack,
                               interval_ms=args.interval,
                               status=StatusLine(json_mode=args.json),
                               max_epochs=args.epochs, generation=args.generation,
                               cluster=_cluster_options(args), fencer_log=args.fencer_log,
                               control=args.control, metrics=args.metrics,
                               epoch_min_ms=args.epoch_min_ms,
                               epoch_max_ms=args.epoch_max_ms,
                               thin_acks=args.ack_thinning == "on"))
    if outcome == "released" and not args.json:
        print("the primary exited; its lease was released to the shadow", file=sys.stderr)
    elif outcome == "switched-over" and not args.json:
        print("switched over: the VM runs on the shadow's host; this primary was killed",
              file=sys.stderr)
    return 0


def run_shadow(args: argparse.Namespace) -> int:
    """Run the shadow agent until promoted."""
    import asyncio

    from ..agents.run import Endpoint
    from ..agents.run import run_shadow as main
    from ..qemu.spec import VmSpec
    from .live import StatusLine

    spec = VmSpec.from_toml(args.spec)
    control = args.control or args.replica / "control.sock"
    listen = Endpoint.parse(args.listen).over(args.transport)
    result = asyncio.run(main(spec=spec, replica_dir=args.replica,
                              listen=listen, sec=_sec(args),
                              control=control, accel=args.accel,
                              status=StatusLine(json_mode=args.json),
                              cluster=_cluster_options(args), metrics=args.metrics))
    if not args.json:
        print(f"promoted: epoch {result['epoch']} running in {result['total_ms']:.1f} ms "
              f"(QEMU pid {result['pid']})")
    return 0


def run_promote(args: argparse.Namespace) -> int:
    """Ask a shadow agent to promote now."""
    import asyncio

    from ..agents.control import request

    answer = asyncio.run(request(args.control, "promote"))
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"promoted epoch {answer['epoch']}: running in {answer['total_ms']:.1f} ms "
              f"(load {answer['load_ms']:.1f} ms, QEMU pid {answer['pid']})", file=sys.stdout)
    return 0
