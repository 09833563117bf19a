"""``qmpshadow migrate``: live-migrate a running VM to a destination qmpshadow starts."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Live-migrate the running VM behind SOURCE_QMP (its QMP socket; when another client holds
it, the VM's second socket qmp2.sock next to it is used) to a destination QEMU started
here from SPEC (the VM's spec TOML), paused with -incoming, on this host or inside the
network namespace --dest-netns (migrating over tcp to the namespace's address).

On success the destination is continued and the source left paused (or quit with
--source-after quit); the destination keeps running after qmpshadow exits. On an error,
timeout, stalled link, dead destination or Ctrl-C, the migration is cancelled on the
source, the destination killed, the source's capabilities/parameters restored, and the
source runs again. After a switch to postcopy (--postcopy-after) nothing can be rolled
back: see docs/migration.md.
"""


def register(sub: Any) -> None:
    """Add the ``migrate`` command to ``sub``."""
    p = sub.add_parser("migrate", help="live-migrate a running VM (with rollback)",
                       description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE_QMP", help="the source VM's QMP unix socket")
    p.add_argument("spec", metavar="SPEC", help="the VM's spec (TOML)")
    d = p.add_argument_group("destination")
    d.add_argument("--dest-run", metavar="DIR",
                   help="run directory of the destination QEMU (QMP sockets, logs); default "
                   "/run/qmpshadow/<name>-<time>")
    d.add_argument("--dest-netns", metavar="NAME",
                   help="start the destination inside this network namespace")
    d.add_argument("--dest-addr", metavar="ADDR",
                   help="address the destination listens on (default: 127.0.0.1, or the "
                   "namespace's first IPv4 address)")
    d.add_argument("--dest-mem-path", metavar="FILE",
                   help="RAM file of the destination (specs with memory.backend = 'file')")
    d.add_argument("--transport", choices=["tcp", "unix"], default="tcp",
                   help="migration channel (default tcp; unix only without --dest-netns)")
    m = p.add_argument_group("migration settings")
    m.add_argument("--multifd", type=int, metavar="N", help="multifd with N channels")
    m.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest's vCPUs when it dirties memory too fast")
    m.add_argument("--downtime-limit", type=int, metavar="MS",
                   help="maximum pause at completion in ms (QEMU default 300)")
    m.add_argument("--bandwidth", metavar="RATE",
                   help="max bandwidth, e.g. 200M (MiB/s), 1G, or bytes/s (QEMU 7.2 "
                   "default 128M)")
    m.add_argument("--postcopy-after", type=int, metavar="N",
                   help="switch to postcopy after N passes over RAM (no rollback after that)")
    m.add_argument("--cap", action="append", default=[], metavar="NAME[=on|off]",
                   help="another migration capability (repeatable), e.g. --cap xbzrle")
    m.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="another migration parameter (repeatable), e.g. "
                   "--param max-cpu-throttle=50")
    c = p.add_argument_group("control")
    c.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="give up and roll back after S seconds (default 600)")
    c.add_argument("--stall-timeout", type=float, default=20.0, metavar="S",
                   help="give up when no byte moved for S seconds (default 20)")
    c.add_argument("--source-after", choices=["pause", "quit"], default="pause",
                   help="on success leave the source paused (default) or quit it")
    c.add_argument("--record", metavar="FILE",
                   help="relay the migration through qmpshadow and record the stream to FILE "
                   "(the return path to FILE.return)")
    c.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> Any:
    from ..migration.options import (
        MigrateOptions,
        parse_assignment,
        parse_bandwidth,
        parse_param_value,
        parse_switch,
    )

    caps: dict[str, bool] = {}
    for text in args.cap:
        name, value = parse_assignment(text, "--cap")
        caps[name] = parse_switch(value, f"--cap {name}")
    params: dict[str, Any] = {}
    for text in args.param:
        name, value = parse_assignment(text, "--param")
        if "=" not in text:
            from ..errors import ConfigError

            raise ConfigError(f"--param {text}: expected NAME=VALUE")
        params[name] = parse_param_value(value)
    return MigrateOptions(
        multifd_channels=args.multifd, auto_converge=args.auto_converge,
        downtime_limit_ms=args.downtime_limit,
        bandwidth=parse_bandwidth(args.bandwidth) if args.bandwidth else None,
        postcopy_after=args.postcopy_after, capabilities=caps, parameters=params,
        timeout=args.timeout, stall_timeout=args.stall_timeout,
        source_after=args.source_after, transport=args.transport)


def _default_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("/run/qmpshadow")
    if not os.access("/run", os.W_OK) and not base.is_dir():
        base = Path(f"/tmp/qmpshadow-{os.getuid()}")
    return base / f"{name}-{stamp}"


class _Display:
    """Progress on stderr: a rich bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0

    def __enter__(self) -> _Display:
        if not self.quiet and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description:<15}"), BarColumn(bar_width=12),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                console=Console(file=sys.stderr), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("setup", total=1000, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"[dim]{text}[/dim]", highlight=False)
        elif not self.quiet:
            print(f"qmpshadow: {text}", file=sys.stderr, flush=True)

    def progress(self, p: Any) -> None:
        from ..migration.progress import describe

        if self._bar is not None:
            mib = 1 << 20
            info = (f"sent {p.transferred / mib:.1f}M left {p.remaining / mib:.1f}M "
                    f"dirty {p.dirty_rate / mib:.1f}M/s pass {p.passes}")
            if p.expected_downtime_ms is not None:
                info += f" exp.dt {p.expected_downtime_ms}ms"
            if p.throttle_percent:
                info += f" thr {p.throttle_percent}%"
            self._bar.update(self._task, completed=int(p.fraction * 1000),
                             description=p.status, info=info)
        elif not self.quiet:
            now = time.monotonic()
            if now - self._last_line >= 2.0:
                self._last_line = now
                print(f"qmpshadow: {describe(p)}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run ``migrate``; QmpShadowError subclasses are reported by the CLI."""
    import asyncio

    from ..migration.orchestrator import MigrationTarget, migrate
    from ..qemu.argv import RunPaths
    from ..qemu.spec import VmSpec

    options = _options(args)
    spec = VmSpec.from_toml(args.spec)
    run_dir = Path(args.dest_run) if args.dest_run else _default_run_dir(spec.name)
    target = MigrationTarget(
        spec=spec, run=RunPaths.create(run_dir), netns=args.dest_netns,
        address=args.dest_addr,
        mem_path=Path(args.dest_mem_path) if args.dest_mem_path else None)
    via = None
    if args.record:
        from ..streamtools.record import relay_via

        via = relay_via(Path(args.record), run_dir)
    async def main(display: _Display) -> Any:
        # SIGTERM rolls back like Ctrl-C (a SIGKILL cannot: see docs/migration.md)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await migrate(args.source, target, options, on_progress=display.progress,
                                 on_note=display.note, via=via)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    with _Display(args.quiet or (args.json and not sys.stderr.isatty())) as display:
        try:
            result = asyncio.run(main(display))
        except asyncio.CancelledError:
            print("qmpshadow: terminated", file=sys.stderr)
            return 143
    if args.json:
        json.dump(result.stats.as_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(result.stats.format())
    return 0
