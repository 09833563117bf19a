"""``qmpshadow demo``: the project's main job, automatic failover end to end on real parts.

One host plays both: a private mosquitto broker on 127.0.0.1 (unless ``--broker`` names
one), the primary test VM (the RAM-dirtying guest of docs/test-guest.md on a shared-RAM
file), the shadow agent (``qmpshadow shadow``: replica + warm standby QEMU) and the source
agent (``qmpshadow protect``: shared-RAM checkpoints, lease renewals) as separate processes
of the real CLI, joined by a unix-socket link and the broker. A live view shows epochs,
pauses, bytes, lag, heartbeat ages (seen by a passive MQTT observer) and the lease; then a
failure is injected (``--fault``: kill -9 of the primary QEMU by default, of the source
agent, or of both = loss of the primary's host) and the view shows the detection, the
promotion and the guest counter carrying on with ``mism=0`` on the promoted copy.

The summary is measured, not asserted: failover time = detect + promote (the shadow
agent's own figures), epochs committed, lost epochs = the newest epoch known committed
(by the shadow, and as acknowledged to the source) minus the epoch the promoted copy
resumed from, the time both QEMUs were seen running (polled every 5 ms), and the promoted
guest's self-check. The demo exits 1 when one of those is wrong, 2 when a step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, QmpShadowError
from .qemu.accel import AccelChoice, detect_accel
from .qemu.argv import RunPaths, primary_argv
from .qemu.process import QemuProcess, kill_and_wait
from .qemu.spec import VmSpec
from .qemu.testguest import CounterLine, guest_kernel_path, kernel_args, parse_serial
from .testing.runstates import RunStates

__all__ = ["DemoOptions", "main", "run_failover_demo"]

Fault = Literal["primary", "source-agent", "host"]
FAULTS: tuple[Fault, ...] = ("primary", "source-agent", "host")
FAULT_TEXT = {
    "primary": "kill -9 of the primary QEMU",
    "source-agent": "kill -9 of the source agent (its fencer kills the primary)",
    "host": "kill -9 of the primary QEMU and the source agent (the primary's host is lost)",
}
CLI = [sys.executable, "-m", "qmpshadow.cli.main"]
VM_NAME = "demo"


class DemoFailed(QmpShadowError):
    """A step of the demo did not happen (the message says which, and where the logs are)."""


@dataclass
class DemoOptions:
    """What ``qmpshadow demo`` takes (see ``qmpshadow demo --help``)."""

    fault: Fault = "primary"
    accel: str = "tcg"
    mem_mib: int = 128
    protect_s: float = 6.0
    carry_s: float = 4.0
    interval_ms: int = 200
    heartbeat_ms: int = 100
    lease_ms: int = 4000
    out_dir: Path = Path("build/demo")
    json_out: bool = False
    live: bool | None = None  # None: a rich live view when stdout is a terminal
    broker: str | None = None
    mqtt_user: str | None = None
    mqtt_password_file: Path | None = None


# ---------------------------------------------------------------------- agents


class AgentProc:
    """One CLI agent (``--json``): its event lines are kept, copied to ``out``, and handed
    to ``on_event``; stderr goes to ``err``."""

    def __init__(self, name: str, argv: Sequence[str], out: Path, err: Path,
                 on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.name = name
        self.argv = list(argv)
        self.out = out
        self.err = err
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        for path in (out, err):
            path.write_bytes(b"")

    async def start(self) -> None:
        with self.err.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=asyncio.subprocess.PIPE, stderr=err,
                stdin=asyncio.subprocess.DEVNULL)
        self._reader = asyncio.create_task(self._read(), name=f"{self.name} events")

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.out.open("a") as out:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                text = line.decode(errors="replace")
                out.write(text)
                out.flush()
                with contextlib.suppress(ValueError):
                    doc = json.loads(text)
                    if isinstance(doc, dict) and isinstance(doc.get("event"), str):
                        self.events.append(doc)
                        self.on_event(self.name, doc)
                self._changed.set()
        self._changed.set()

    def find(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        for ev in self.events:
            if pred(ev):
                return ev
        return None

    def tail(self, n: int = 15) -> str:
        lines: list[str] = []
        for path in (self.out, self.err):
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    async def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                         what: str, *, allow_exit: bool = False) -> dict[str, Any]:
        """The first event matching ``pred``.

        Raises:
            DemoFailed: the agent exited first (unless ``allow_exit``) or ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            ev = self.find(pred)
            if ev is not None:
                return ev
            done = self._reader is not None and self._reader.done()
            if done and (not allow_exit or self.proc is None
                         or self.proc.returncode is not None):
                raise DemoFailed(f"the {self.name} agent exited (status "
                                 f"{self.proc.returncode if self.proc else '?'}) before "
                                 f"{what}; its last lines:\n{self.tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoFailed(f"no {what} within {timeout:.0f} s from the {self.name} "
                                 f"agent; its last lines:\n{self.tail()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._changed.wait()

    def kill(self) -> None:
        if self.alive and self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGINT (the agent shuts down cleanly), SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(grace):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._reader


# ---------------------------------------------------------------------- MQTT observer


@dataclass
class BrokerView:
    """What a passive subscriber to the VM's topic tree sees."""

    connected: bool = False
    hb_at: dict[str, float] = field(default_factory=dict)  # role -> monotonic receipt
    lease: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    online: dict[str, bool] = field(default_factory=dict)
    messages: int = 0

    def age_ms(self, role: str) -> float | None:
        at = self.hb_at.get(role)
        return None if at is None else (time.monotonic() - at) * 1000


async def observe(url_host: str, port: int, user: str | None, password: str | None,
                  root: str, view: BrokerView) -> None:
    """Subscribe to ``root/#`` and keep ``view`` current until cancelled (reconnects)."""
    import aiomqtt

    from .cluster.errors import MessageError
    from .cluster.messages import (
        LeaseDoc,
        ShadowHeartbeat,
        SourceRenewal,
        StateDoc,
        Status,
        decode,
    )

    while True:
        try:
            async with aiomqtt.Client(url_host, port, username=user, password=password,
                                      identifier=f"qmpshadow-demo-{secrets.token_hex(4)}",
                                      keepalive=5) as client:
                await client.subscribe(f"{root}/#", qos=0)
                view.connected = True
                async for message in client.messages:
                    topic = str(message.topic)
                    suffix = topic[len(root) + 1:]
                    payload = message.payload
                    if not isinstance(payload, (bytes, bytearray)):
                        continue
                    try:
                        msg = decode(payload, where=topic)
                    except MessageError:
                        continue
                    view.messages += 1
                    now = time.monotonic()
                    if isinstance(msg, SourceRenewal):
                        view.hb_at["source"] = now
                    elif isinstance(msg, ShadowHeartbeat):
                        view.hb_at["shadow"] = now
                    elif isinstance(msg, Status):
                        view.online[msg.role] = msg.online
                    elif isinstance(msg, LeaseDoc) and suffix == "lease":
                        view.lease = {"gen": msg.gen, "mode": msg.mode, "holder": msg.holder}
                    elif isinstance(msg, StateDoc) and suffix == "state":
                        view.state = {"gen": msg.gen, "status": msg.status,
                                      "primary": msg.primary}
        except aiomqtt.MqttError:
            view.connected = False
            await asyncio.sleep(0.5)


# ---------------------------------------------------------------------- live view


def _fmt_ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f} ms"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _counter_text(line: CounterLine | None) -> str:
    return "—" if line is None else f"COUNTER {line.counter} mism={line.mism}"


class View:
    """The demo's state and its two renderings: a rich live table or plain lines."""

    def __init__(self, title: str, *, live: bool, stream: Any) -> None:
        self.title = title
        self.live_mode = live
        self.stream = stream
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.log: deque[str] = deque(maxlen=12)
        self.broker = BrokerView()
        self.primary_pid = 0
        self.primary_state = "—"
        self.primary_line: CounterLine | None = None
        self.standby_pid = 0
        self.standby_state = "—"
        self.standby_line: CounterLine | None = None
        self.lease_state = "—"
        self.watch_state = "—"
        self.generation = 1
        self.epoch = 0
        self.full_epochs = 0
        self.full_pause: float | None = None
        self.pauses: list[float] = []
        self.wire = 0
        self.raw = 0
        self.lag = 0
        self.src_committed = 0
        self.committed = 0
        self.n_committed = 0
        self.failover: dict[str, Any] | None = None
        self._live: Any = None
        self._last_plain = 0.0

    # -- events
    def note(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        line = f"{stamp}  {text}"
        self.log.append(line)
        if not self.live_mode:
            print(f"[demo] {line}", file=self.stream, flush=True)

    def agent_event(self, who: str, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if who == "source":
            if kind == "epoch":
                self.epoch = int(ev["epoch"])
                if ev.get("full"):
                    self.full_epochs += 1
                    self.full_pause = ev.get("pause_ms")
                elif ev.get("pause_ms") is not None:
                    self.pauses.append(float(ev["pause_ms"]))
                self.wire += int(ev.get("wire_bytes") or 0)
                self.raw += int(ev.get("raw_bytes") or 0)
                self.lag = int(ev.get("lag") or 0)
                self.src_committed = max(self.src_committed, int(ev.get("committed") or 0))
            elif kind.startswith("lease-"):
                self.lease_state = kind[6:]
                self.note(f"source agent: lease {self.lease_state} ({ev.get('reason', '')})")
            elif kind in ("fencing", "fenced", "resumed", "handover", "released",
                          "fencer-lost", "protection-ended"):
                extra = ev.get("reason", "")
                self.note(f"source agent: {kind}" + (f" ({extra})" if extra else ""))
            elif kind == "cluster-joined":
                self.note(f"source agent joined the cluster: generation {ev['generation']}, "
                          f"lease {ev['lease_ms']} ms, heartbeat {ev['heartbeat_ms']} ms, "
                          f"fencer pid {ev.get('fencer_pid')}")
        else:
            if kind == "committed":
                self.committed = int(ev["epoch"])
                self.n_committed += 1
            elif kind.startswith("watch-"):
                self.watch_state = kind[6:]
                self.note(f"shadow agent: watch {self.watch_state} ({ev.get('reason', '')})")
            elif kind == "shadow-ready":
                self.standby_pid = int(ev.get("standby_pid") or 0)
                self.standby_state = "paused (warm standby)"
                self.note(f"shadow agent ready: warm standby QEMU pid {self.standby_pid}")
            elif kind == "promoting":
                self.note(f"shadow agent: PROMOTING, generation {ev['generation']} "
                          f"({ev['reason']})")
            elif kind == "failover":
                self.failover = ev
                self.generation = int(ev["generation"])
                self.standby_pid = int(ev["pid"])
                self.standby_state = "running (promoted)"
                self.note(f"FAILOVER: detect {ev['detect_ms']:.1f} ms + promote "
                          f"{ev['promote_ms']:.1f} ms; the copy runs from epoch {ev['epoch']}")
            elif kind in ("refused", "promotion-failed", "source-connected", "source-lost",
                          "resync"):
                rest = {k: v for k, v in ev.items() if k not in ("event", "time")}
                self.note(f"shadow agent: {kind} {rest}")

    # -- rendering
    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        b = self.broker
        table = Table(title=self.title, title_justify="left", expand=False)
        table.add_column("", style="bold")
        table.add_column("primary host")
        table.add_column("shadow host")
        pause = (f"{self.pauses[-1]:.1f} ms (median {statistics.median(self.pauses):.1f}, "
                 f"max {max(self.pauses):.1f})") if self.pauses else "—"
        if self.full_pause is not None:
            pause += f"; full epoch {self.full_pause:.0f} ms"
        ratio = f" ({self.wire / self.raw:.2f} of raw)" if self.raw else ""
        table.add_row("QEMU", f"pid {self.primary_pid}  {self.primary_state}",
                      f"pid {self.standby_pid or '—'}  {self.standby_state}")
        table.add_row("guest", _counter_text(self.primary_line),
                      _counter_text(self.standby_line))
        table.add_row("agent", f"source: lease {self.lease_state}",
                      f"shadow: watch {self.watch_state}")
        table.add_row("epochs", f"captured {self.epoch}  acked {self.src_committed}  "
                      f"lag {self.lag}", f"committed {self.committed} ({self.n_committed} "
                      "commits)")
        table.add_row("pause", pause, "")
        table.add_row("bytes", f"wire {_mb(self.wire)}{ratio}", "")
        table.add_row("heartbeat age", f"hb/source {_fmt_ms(b.age_ms('source'))}",
                      f"hb/shadow {_fmt_ms(b.age_ms('shadow'))}")
        lease = (f"generation {b.lease.get('gen')} {b.lease.get('mode')} by "
                 f"{b.lease.get('holder')}") if b.lease else "—"
        state = (f"generation {b.state.get('gen')} {b.state.get('status')} "
                 f"({b.state.get('primary')})") if b.state else "—"
        broker = Text(f"broker: {'connected' if b.connected else 'not connected'}, "
                      f"{b.messages} messages   lease (retained): {lease}   state: {state}")
        phase = Text(f"[{time.monotonic() - self.t0:5.1f} s] {self.phase}", style="bold")
        return Group(table, broker, phase, Text("\n".join(self.log)))

    def plain_status(self) -> str:
        b = self.broker
        pause = f"{self.pauses[-1]:.1f}" if self.pauses else "-"
        return (f"epoch {self.epoch} committed {self.committed} lag {self.lag} pause "
                f"{pause} ms wire {_mb(self.wire)} | hb src "
                f"{_fmt_ms(b.age_ms('source'))} shd {_fmt_ms(b.age_ms('shadow'))} | lease "
                f"g{b.lease.get('gen', '-')} {b.lease.get('mode', '-')} | primary "
                f"{self.primary_state} {_counter_text(self.primary_line)} | standby "
                f"{self.standby_state} {_counter_text(self.standby_line)}")

    def tick(self) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
        elif not self.live_mode and time.monotonic() - self._last_plain >= 1.0:
            self._last_plain = time.monotonic()
            if self.phase not in ("starting", "done"):
                print(f"[demo] {self.plain_status()}", file=self.stream, flush=True)

    def __enter__(self) -> View:
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.render(), console=Console(file=self.stream),
                              auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.__exit__(None, None, None)
            self._live = None


# ---------------------------------------------------------------------- the demo


def _last_line(path: Path) -> CounterLine | None:
    try:
        lines = parse_serial(path.read_text(errors="replace"))
    except FileNotFoundError:
        return None
    return lines[-1] if lines else None


def _write_spec(path: Path, mem_path: Path, mem_mib: int, accel: str) -> Path:
    args = kernel_args(pages=16, region_mib=8, delay_us=1000, pattern="text", print_ms=100)
    path.write_text(f"""# written by qmpshadow demo
name = "{VM_NAME}"
kernel = "{guest_kernel_path()}"
kernel_args = "{args}"
accel = "{accel}"
[memory]
size_mib = {mem_mib}
backend = "file"
backend_id = "mem"
mem_path = "{mem_path}"
""")
    return path


def _broker_settings(opts: DemoOptions, tmp: Path) -> tuple[Any, str, str | None, Path | None]:
    """(private Mosquitto or None, URL, user, password file)."""
    if opts.broker:
        return None, opts.broker, opts.mqtt_user, opts.mqtt_password_file
    from .cluster.mosquitto import Mosquitto, mosquitto_unavailable_reason

    reason = mosquitto_unavailable_reason()
    if reason:
        raise ConfigError(f"the demo needs an MQTT broker: {reason}, or pass --broker "
                          "mqtt://HOST:PORT (with --mqtt-user/--mqtt-password-file)")
    mq = Mosquitto(tmp / "broker")
    return mq, mq.url, mq.username, None


async def run_failover_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the failover demo; returns the summary (``ok`` says whether every check held).

    Raises:
        ConfigError: nothing to run it with (no guest kernel, no broker, bad option).
        DemoFailed, QmpShadowError: a step did not happen; the message names it and the
            log directory.
    """
    if opts.fault not in FAULTS:
        raise ConfigError(f"--fault: expected one of {', '.join(FAULTS)}, got {opts.fault!r}")
    choice: AccelChoice = detect_accel(opts.accel)
    guest_kernel_path()  # ConfigError with the fix when the guest is not built
    out_dir = opts.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qsdemo-", dir="/tmp"))  # short: unix socket paths
    stream = sys.stderr if opts.json_out else sys.stdout
    live = opts.live if opts.live is not None else (stream.isatty() and not opts.json_out)
    title = (f"qmpshadow demo — VM {VM_NAME!r}, {opts.mem_mib} MiB, {choice.name.upper()}, "
             f"shared-RAM source, checkpoint every {opts.interval_ms} ms, lease "
             f"{opts.lease_ms} ms, fault: {FAULT_TEXT[opts.fault]}")
    view = View(title, live=live, stream=stream)
    mq, url, user, password_file = _broker_settings(opts, tmp)
    agents: list[AgentProc] = []
    vm: QemuProcess | None = None
    observer: asyncio.Task[None] | None = None
    ticker: asyncio.Task[None] | None = None
    promoted_pid = 0
    started = time.monotonic()
    summary: dict[str, Any] = {}
    try:
        with view:
            if not live:
                view.note(title)
            ticker = asyncio.create_task(_tick(view, tmp))
            if mq is not None:
                view.note(f"starting a private mosquitto on {mq.url} (no anonymous clients)")
                await asyncio.to_thread(mq.start)
                password_file = mq.password_file()
            else:
                view.note(f"using the broker at {url}")
            from .cluster.messages import Topics
            from .cluster.mqtt import BrokerConfig

            cfg = BrokerConfig.from_url(url, username=user, password=(
                password_file.read_text().splitlines()[0] if password_file else None))
            cluster = f"demo-{secrets.token_hex(3)}"
            topics = Topics(cluster, VM_NAME)
            observer = asyncio.create_task(observe(cfg.host, cfg.port, cfg.username,
                                                   cfg.password, topics.root, view.broker))
            cargs = ["--broker", url, "--cluster", cluster,
                     "--heartbeat-ms", str(opts.heartbeat_ms), "--lease-ms", str(opts.lease_ms)]
            if user:
                cargs += ["--mqtt-user", user]
            if password_file:
                cargs += ["--mqtt-password-file", str(password_file)]

            # the primary
            spec_path = _write_spec(tmp / "vm.toml", tmp / "primary.ram", opts.mem_mib,
                                    choice.name)
            shutil.copy(spec_path, out_dir / "vm.toml")
            spec = VmSpec.from_toml(spec_path)
            run = RunPaths.create(tmp / "primary")
            vm = QemuProcess(primary_argv(spec, run, accel=choice), run, name="primary",
                             die_with_parent=True)
            await vm.start()
            view.primary_pid = vm.pid
            view.primary_state = "running"
            view.note(f"primary QEMU pid {vm.pid} started ({choice.name}: {choice.reason})")
            view.phase = "booting the test guest"
            from .qemu.testguest import wait_for_counter

            first = await wait_for_counter(run.serial_log, timeout=60)
            view.note(f"guest runs: {_counter_text(first)}")

            # the shadow agent, then the source agent
            replica = tmp / "replica"
            link = f"unix:{tmp / 'link.sock'}"
            shadow = AgentProc("shadow", [
                *CLI, "shadow", "--spec", str(spec_path), "--replica", str(replica),
                "--listen", link, "--accel", choice.name, "--json", *cargs],
                out_dir / "shadow-agent.jsonl", out_dir / "shadow-agent.log", view.agent_event)
            agents.append(shadow)
            view.phase = "starting the shadow agent (replica + warm standby QEMU)"
            await shadow.start()
            await shadow.wait_event(lambda e: e["event"] == "shadow-ready", 60,
                                    "shadow-ready")
            source = AgentProc("source", [
                *CLI, "protect", "--spec", str(spec_path), "--qmp", str(run.qmp2_sock),
                "--to", link, "--interval", str(opts.interval_ms), "--json",
                "--fencer-log", str(out_dir / "fencer.log"), *cargs],
                out_dir / "source-agent.jsonl", out_dir / "source-agent.log", view.agent_event)
            agents.append(source)
            view.phase = "starting the source agent (first epoch is a full one)"
            await source.start()
            await source.wait_event(lambda e: e["event"] == "lease-protected", 60,
                                    "a protected lease")
            await shadow.wait_event(lambda e: e["event"] == "watch-armed", 60,
                                    "an armed failover watch")
            await shadow.wait_event(lambda e: e["event"] == "committed" and e["epoch"] >= 3,
                                    60, "three committed epochs")
            view.phase = f"protected: replicating for {opts.protect_s:.0f} s"
            await asyncio.sleep(opts.protect_s)

            standby_qmp = replica / "standby" / "qmp2.sock"
            standby_serial = replica / "standby" / "serial.log"
            async with RunStates({"primary": vm.qmp, "shadow": standby_qmp}) as states:
                view.phase = f"injecting the fault: {FAULT_TEXT[opts.fault]}"
                before = {"shadow_committed": view.committed,
                          "source_acked": view.src_committed, "epoch": view.epoch}
                fault_at = time.time()
                if opts.fault in ("source-agent", "host"):
                    source.kill()
                    view.lease_state += " (agent killed)"
                    view.note(f"FAULT: kill -9 source agent (pid {source.pid})")
                if opts.fault in ("primary", "host"):
                    vm.kill()
                    view.note(f"FAULT: kill -9 primary QEMU (pid {vm.pid})")
                await asyncio.wait_for(vm.wait(), 15)
                view.primary_state = "dead"
                view.note(f"primary QEMU gone after {(time.time() - fault_at) * 1000:.0f} ms")
                view.phase = "waiting for the shadow to detect and promote"
                ev = await shadow.wait_event(lambda e: e["event"] == "failover",
                                             opts.lease_ms / 1000 + 30, "a failover",
                                             allow_exit=True)
                promoted_pid = int(ev["pid"])
                await asyncio.sleep(0.5)
            overlap = states.overlap("primary", "shadow")
            both = states.both_seen("primary", "shadow")
            view.phase = f"the promoted copy runs: watching its guest for {opts.carry_s:.0f} s"
            resumed = await wait_for_counter(standby_serial, timeout=30)
            view.note(f"promoted guest: {_counter_text(resumed)}")
            await asyncio.sleep(opts.carry_s)
            after = parse_serial(standby_serial.read_text(errors="replace"))
            primary_lines = parse_serial(run.serial_log.read_text(errors="replace"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await asyncio.gather(*(a.proc.wait() for a in agents
                                           if a.proc is not None))
            src_committed = max([before["source_acked"], *(
                int(e.get("committed") or 0) for e in source.events if e["event"] == "epoch"),
                *(int(e.get("epoch") or 0) for e in source.events
                  if e["event"] == "released")])
            committed = [int(e["epoch"]) for e in shadow.events if e["event"] == "committed"]
            last_committed = max(committed) if committed else 0
            promoted_epoch = int(ev["epoch"])
            lost = max(last_committed, src_committed) - promoted_epoch
            mism = max((x.mism for x in after), default=-1)
            summary = {
                "fault": opts.fault,
                "accel": choice.name,
                "mem_mib": opts.mem_mib,
                "reason": ev["reason"],
                "detect_ms": float(ev["detect_ms"]),
                "promote_ms": float(ev["promote_ms"]),
                "failover_ms": round(float(ev["detect_ms"]) + float(ev["promote_ms"]), 1),
                "generation_before": 1,
                "generation_after": int(ev["generation"]),
                "epochs_committed": len(committed),
                "last_committed_epoch": last_committed,
                "source_acked_epoch": src_committed,
                "promoted_epoch": promoted_epoch,
                "lost_epochs": lost,
                "committed_monotonic": committed == sorted(committed),
                "pause_ms_median": round(statistics.median(view.pauses), 2)
                if view.pauses else None,
                "pause_ms_max": round(max(view.pauses), 2) if view.pauses else None,
                "full_epochs": view.full_epochs,
                "full_epoch_pause_ms": view.full_pause,
                "wire_bytes": view.wire,
                "raw_bytes": view.raw,
                "both_running_s": round(overlap, 4),
                "both_running_samples": both,
                "primary_samples": len(states.samples["primary"]),
                "primary_last_counter": primary_lines[-1].counter if primary_lines else None,
                "promoted_first_counter": after[0].counter if after else None,
                "promoted_last_counter": after[-1].counter if after else None,
                "promoted_mism": mism,
                "primary_alive": vm.running,
                "source_agent_exit": source.proc.returncode if source.proc else None,
                "shadow_agent_exit": shadow.proc.returncode if shadow.proc else None,
                "retained": {"lease": dict(view.broker.lease),
                             "state": dict(view.broker.state)},
                "logs": str(out_dir),
                "pids": {"primary": vm.pid, "promoted": promoted_pid,
                         "source_agent": source.pid, "shadow_agent": shadow.pid,
                         "fencer": next((int(e["fencer_pid"]) for e in source.events
                                         if e["event"] == "cluster-joined"), None),
                         "broker": mq.proc.pid if mq is not None and mq.proc else None},
            }
            problems = _check(summary)
            summary["problems"] = problems
            summary["ok"] = not problems
            view.phase = "done" if not problems else "FAILED: " + "; ".join(problems)
            view.note(view.phase)
    finally:
        for task in (ticker, observer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for a in reversed(agents):
            await a.stop()
        await kill_and_wait(promoted_pid)
        await kill_and_wait(view.standby_pid)  # a standby outlives a shadow agent killed hard
        if vm is not None:
            vm.kill()
            if vm.started:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await vm.wait()
        if mq is not None:
            mq.stop()
            with contextlib.suppress(OSError):
                shutil.copy(mq.log, out_dir / "mosquitto.log")
        for name, src in (("primary-serial.log", tmp / "primary" / "serial.log"),
                          ("promoted-serial.log", tmp / "replica" / "standby" / "serial.log")):
            with contextlib.suppress(OSError):
                shutil.copy(src, out_dir / name)
        shutil.rmtree(tmp, ignore_errors=True)
    summary["duration_s"] = round(time.monotonic() - started, 1)
    return summary


def _check(s: dict[str, Any]) -> list[str]:
    """What went wrong, measured (empty: the failover was clean)."""
    out = []
    if s["lost_epochs"] != 0:
        out.append(f"{s['lost_epochs']} committed epoch(s) lost: resumed from epoch "
                   f"{s['promoted_epoch']}, last committed {s['last_committed_epoch']}, "
                   f"acknowledged to the source {s['source_acked_epoch']}")
    if s["both_running_s"] > 0 or s["both_running_samples"]:
        out.append(f"both QEMUs were seen running for {s['both_running_s']} s")
    if s["promoted_mism"] != 0:
        out.append(f"the promoted guest reports mism={s['promoted_mism']} (expected 0)")
    first, last = s["promoted_first_counter"], s["promoted_last_counter"]
    if first is None or last is None or last <= first:
        out.append(f"the promoted guest's counter did not move ({first} -> {last})")
    if not s["committed_monotonic"]:
        out.append("committed epochs went backwards")
    if s["generation_after"] <= s["generation_before"]:
        out.append(f"the promotion did not bump the generation ({s['generation_after']})")
    if s["primary_alive"]:
        out.append("the old primary still runs")
    return out


async def _tick(view: View, tmp: Path) -> None:
    while True:
        view.primary_line = _last_line(tmp / "primary" / "serial.log") or view.primary_line
        view.standby_line = _last_line(tmp / "replica" / "standby" / "serial.log")
        view.tick()
        await asyncio.sleep(0.25)


def format_summary(s: dict[str, Any]) -> str:
    """The human summary."""
    lines = [
        "",
        f"summary — fault: {FAULT_TEXT[s['fault']]} ({s['accel']}, {s['mem_mib']} MiB)",
        f"  failover time      {s['failover_ms']:.1f} ms  = detect {s['detect_ms']:.1f} ms "
        f"+ promote {s['promote_ms']:.1f} ms  ({s['reason']})",
        f"  epochs committed   {s['epochs_committed']} (last {s['last_committed_epoch']}, "
        f"acknowledged to the source {s['source_acked_epoch']})",
        f"  resumed from       epoch {s['promoted_epoch']}, generation "
        f"{s['generation_before']} -> {s['generation_after']}",
        f"  data lost          {s['lost_epochs']} epochs (committed but not resumed)",
        f"  two copies running {s['both_running_s']:.3f} s ({s['primary_samples']} run-state "
        "samples of each QEMU every 5 ms)",
        f"  guest              primary's last COUNTER {s['primary_last_counter']}, promoted "
        f"copy {s['promoted_first_counter']} -> {s['promoted_last_counter']}, "
        f"mism={s['promoted_mism']}",
    ]
    if s.get("pause_ms_median") is not None:
        lines.append(f"  primary pause      median {s['pause_ms_median']} ms, max "
                     f"{s['pause_ms_max']} ms per incremental checkpoint (full epochs: "
                     f"{s['full_epochs']}); wire {_mb(s['wire_bytes'])} for "
                     f"{_mb(s['raw_bytes'])} of dirty pages")
    lines.append(f"  logs               {s['logs']}   ({s['duration_s']} s in all)")
    lines.append("demo OK" if s["ok"] else "demo FAILED: " + "; ".join(s["problems"]))
    return "\n".join(lines)


def main(args: Any) -> int:
    """CLI entry for ``qmpshadow demo``."""
    if args.foundation:
        from .demo_foundation import main as foundation

        return foundation(args)
    opts = DemoOptions(fault=args.fault, accel=args.accel, mem_mib=args.mem or 128,
                       protect_s=args.seconds, out_dir=Path(args.out), json_out=args.json,
                       live=False if args.plain else None, broker=args.broker,
                       mqtt_user=args.mqtt_user, mqtt_password_file=args.mqtt_password_file,
                       lease_ms=args.lease_ms, heartbeat_ms=args.heartbeat_ms,
                       interval_ms=args.interval)
    try:
        summary = asyncio.run(run_failover_demo(opts))
    except DemoFailed as exc:
        raise DemoFailed(f"{exc}\n(logs of every process in {opts.out_dir})") from None
    if args.json:
        json.dump(summary, sys.stdout)
        print()
    else:
        print(format_summary(summary), flush=True)
    if not summary["ok"]:
        print("qmpshadow demo: the failover was not clean: " + "; ".join(summary["problems"])
              + f" (logs in {summary['logs']})", file=sys.stderr)
        return 1
    return 0
