"""Live migration of a running QEMU to a destination qmpshadow starts, with rollback.

:func:`migrate` connects to the source's QMP socket, starts the destination from the VM
spec (``-S -incoming defer``; on this host or in a network namespace), sets capabilities and
parameters on both ends, issues ``migrate`` and supervises it with the decisions of
:class:`~qmpshadow.migration.supervisor.Supervisor`. On success the destination is
continued and the source left paused or quit. On any failure before the destination runs
the guest — QEMU error, timeout, stall (cut link), dead destination, Ctrl-C — the migration is
cancelled on the source, the destination killed and reaped *before* the source may be
continued, the source's capabilities and parameters are restored, and the source is left
running (as it was before: a source the user had paused stays paused).

After a switch to postcopy there is no rollback: the destination runs the guest and the
source holds the pages not sent yet; a failure then raises :class:`MigrationLostError`
and touches neither side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpshadow.errors import (
    ConfigError,
    MigrationError,
    QemuError,
    QmpCommandError,
    QmpError,
    QmpShadowError,
    QmpTimeoutError,
)
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qmp.control import QmpControl
from qmpshadow.qmp.events import EventSubscription, QmpEvent

from .destination import Destination, destination_argv, destination_spec
from .options import MigrateOptions, Settings, changed_settings, plan_settings
from .progress import POSTCOPY_STATES, PRECOPY_STATES, SETTLED_STATES, MigrationStats, Progress
from .supervisor import Action, Step, Supervisor, plan_rollback

ProgressFn = Callable[[Progress], None]
NoteFn = Callable[[str], None]

_QMP_TIMEOUT = 10.0
_OWNED_TIMEOUT = 2.0


class MigrationFailedError(MigrationError):
    """The migration did not complete and was rolled back.

    ``reason`` says what happened, ``rollback`` lists what was done to undo it,
    ``problems`` what could not be done, ``source_status`` is the source's run state after
    the rollback (e.g. "running"; None when unknown).
    """

    def __init__(self, reason: str, *, rollback: list[str], problems: list[str],
                 source_status: str | None) -> None:
        state = (f"the source is {source_status}" if source_status
                 else "the source's state is unknown")
        msg = f"migration failed: {reason}. Rolled back: " + (
            "; ".join(rollback) if rollback else "nothing to undo") + f"; {state}."
        if problems:
            msg += " Rollback problems: " + "; ".join(problems) + "."
        super().__init__(msg)
        self.reason = reason
        self.rollback = rollback
        self.problems = problems
        self.source_status = source_status


class MigrationLostError(QmpShadowError):
    """A failure after the switch to postcopy: the guest's memory is split between source
    and destination, so qmpshadow neither continues the source nor kills the destination.
    QEMU 7.2 can resume a paused postcopy (``migrate-recover`` on the destination, then
    ``migrate`` with ``resume: true`` on the source) while both processes live."""


class _Abort(Exception):
    """Internal: a decision to give up, with the reason in words."""

    def __init__(self, reason: str, *, lost: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lost = lost


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where to migrate: the VM spec the destination is started from, its run directory,
    optionally a network namespace (the destination runs inside it and listens on its
    first IPv4 address, or ``address``), and a RAM file for specs with a file backend."""

    spec: VmSpec
    run: RunPaths
    netns: str | None = None
    address: str | None = None
    mem_path: Path | None = None
    start_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """A completed migration: statistics and the (running, detached) destination."""

    stats: MigrationStats
    destination: Destination
    source_socket: str


async def netns_address(name: str) -> str:
    """First global IPv4 address inside network namespace ``name``.

    Raises:
        ConfigError: the namespace does not exist, ``ip`` fails, or it has no IPv4 address.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip", "-n", name, "-j", "-4", "addr", "show", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        raise ConfigError(f"--dest-netns needs iproute2's `ip`: {err}") from err
    out, errout = await proc.communicate()
    if proc.returncode != 0:
        raise ConfigError(
            f"--dest-netns {name}: `ip -n {name} addr` failed: {errout.decode().strip()}; "
            "expected an existing network namespace (ip netns add NAME) with an address")
    try:
        doc = json.loads(out or b"[]")
    except ValueError as exc:
        raise ConfigError(f"--dest-netns {name}: unreadable `ip -j` output") from exc
    for link in doc if isinstance(doc, list) else []:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            if info.get("family") == "inet" and info.get("scope") == "global":
                return str(info["local"])
    raise ConfigError(
        f"--dest-netns {name}: the namespace has no global IPv4 address; give it one (e.g. a "
        "veth pair to the host) or pass --dest-addr")


async def connect_source(path: str | os.PathLike[str], *, timeout: float = _OWNED_TIMEOUT
                         ) -> QmpControl:
    """Connect to the source's QMP socket; when another client holds it, use the VM's
    second socket ``qmp2.sock`` next to it.

    Raises:
        QmpError: neither socket gives a QMP session (the message says why).
    """
    path = Path(path)
    try:
        return await QmpControl.open(path, timeout=timeout, name="source")
    except QmpTimeoutError as first:
        alt = path.with_name("qmp2.sock")
        if alt == path or not alt.exists():
            raise
        held = first
    try:
        return await QmpControl.open(alt, timeout=timeout, name="source")
    except QmpError as err2:
        raise QmpError(
            f"source QMP: {path} is held by another client and the second socket {alt} "
            f"failed too: {err2}; close the other client") from held


def _incoming_uri(transport: str, host: str, run: RunPaths) -> str:
    if transport == "unix":
        return f"unix:{run.root / 'incoming.sock'}"
    if ":" in host:
        return f"tcp:[{host}]:0"
    return f"tcp:{host}:0"


def _actual_uri(listen_uri: str, info: dict[str, Any]) -> str:
    """The URI the source connects to, with the port the destination got for port 0."""
    if not listen_uri.startswith("tcp:"):
        return listen_uri
    for addr in info.get("socket-address", []) or []:
        if isinstance(addr, dict) and addr.get("type") == "inet" and addr.get("port"):
            host = str(addr.get("host"))
            host = f"[{host}]" if ":" in host else host
            return f"tcp:{host}:{addr['port']}"
    raise QemuError(
        f"destination: migrate-incoming {listen_uri} gave no listening address in "
        f"query-migrate (got {info!r}); expected socket-address with the port")


class _Migration:
    def __init__(self, source_qmp: str | os.PathLike[str], target: MigrationTarget,
                 options: MigrateOptions, on_progress: ProgressFn | None,
                 on_note: NoteFn | None, via: Callable[[str], Any] | None) -> None:
        self.source_path = source_qmp
        self.target = target
        self.options = options
        self.on_progress = on_progress
        self.on_note = on_note
        self.via = via
        self.src: QmpControl | None = None
        self.dest: Destination | None = None
        self.phase = "connecting to the source"
        self.was_running = True
        self.restore = Settings({}, {})
        self.committed = False  # the destination runs the guest
        self.postcopy = False
        self.uri = ""
        self.src_events: EventSubscription | None = None
        self.relay: Any = None
        self.stop_ts: float | None = None
        self.dest_events: EventSubscription | None = None
        self.dest_contd = False
        self.applied_caps = False
        self.applied_params = False
        self.current_caps: dict[str, bool] = {}
        self.current_params: dict[str, Any] = {}

    def note(self, text: str) -> None:
        if self.on_note is not None:
            self.on_note(text)

    # ------------------------------------------------------------------ phases

    async def run(self) -> MigrationResult:
        self.src = await connect_source(self.source_path)
        self.note(f"source: {self.src.socket_path}")
        try:
            self.phase = "checking the source"
            accel = await self._preflight(self.src)
            self.phase = "starting the destination"
            dest = await self._start_destination(accel)
            self.phase = "configuring capabilities and parameters"
            await self._configure(self.src, dest)
            self.phase = "migrating"
            t0 = time.monotonic()
            self.src_events = self.src.subscribe(("MIGRATION", "STOP"))
            await self.src.migrate(self.uri)
            final = await self._supervise(self.src, dest, t0)
            self.phase = "starting the guest on the destination"
            stats = await self._finish(self.src, dest, final, t0)
            return MigrationResult(stats, dest, str(self.src.socket_path))
        except BaseException as exc:
            await self._fail(exc)
            raise  # _fail raises; this is for the type checker
        finally:
            if self.src_events is not None:
                self.src_events.close()
            if self.relay is not None:
                with contextlib.suppress(QmpShadowError, OSError):
                    await self.relay.close()
            await self.src.close()

    async def _preflight(self, src: QmpControl) -> str:
        # one round trip's worth of waiting, not seven: QMP answers in-flight commands by id
        status, mig, kvm, mem, caps_list, params, cpus = await asyncio.gather(
            src.query_status(timeout=_QMP_TIMEOUT), src.query_migrate(timeout=_QMP_TIMEOUT),
            *(src.execute(cmd, timeout=_QMP_TIMEOUT) for cmd in (
                "query-kvm", "query-memory-size-summary", "query-migrate-capabilities",
                "query-migrate-parameters", "query-cpus-fast")))
        if status.status not in ("running", "paused"):
            raise ConfigError(
                f"source: expected a running (or paused) VM, got run state {status.status!r}; "
                "a VM that is itself an incoming destination or already migrated cannot "
                "be migrated")
        self.was_running = status.running
        info = Progress.from_query(mig)
        if info.status in PRECOPY_STATES or info.status in POSTCOPY_STATES or (
                info.status in ("cancelling", "colo")):
            raise ConfigError(
                f"source: a migration is already in progress (status {info.status}); wait "
                "for it or cancel it (migrate_cancel) first")
        accel = "kvm" if isinstance(kvm, dict) and kvm.get("enabled") else "tcg"
        spec = self.target.spec
        if spec.accel != "auto" and spec.accel != accel:
            raise ConfigError(
                f"VM spec {spec.name!r} says accel {spec.accel!r} but the source runs with "
                f"{accel}; the destination must use the source's accelerator (fix the spec)")
        base = mem.get("base-memory") if isinstance(mem, dict) else None
        if isinstance(base, int) and base != spec.memory.size_mib << 20:
            raise ConfigError(
                f"VM spec {spec.name!r}: memory.size_mib = {spec.memory.size_mib} but the "
                f"source has {base >> 20} MiB of RAM; the spec must describe the running VM")
        self.current_caps = {c["capability"]: bool(c.get("state"))
                             for c in (caps_list if isinstance(caps_list, list) else [])
                             if isinstance(c, dict) and isinstance(c.get("capability"), str)}
        self.current_params = params if isinstance(params, dict) else {}
        wanted, _ = plan_settings(self.options)
        unknown = sorted(set(wanted.capabilities) - set(self.current_caps))
        if unknown:
            raise ConfigError(
                f"capability {', '.join(unknown)}: not known to this QEMU; expected one of "
                f"{', '.join(sorted(self.current_caps))}")
        if isinstance(cpus, list) and len(cpus) != spec.vcpus:
            raise ConfigError(
                f"VM spec {spec.name!r}: vcpus = {spec.vcpus} but the source has {len(cpus)} "
                "vCPUs; the spec must describe the running VM")
        return accel

    async def _start_destination(self, accel: str) -> Destination:
        t = self.target
        if t.netns is not None and self.options.transport != "tcp":
            raise ConfigError("--dest-netns: migrate over tcp (the namespace stands in for "
                              "another host); drop --transport unix")
        spec = destination_spec(t.spec, mem_path=t.mem_path)
        argv = destination_argv(spec, t.run, accel=accel, netns=t.netns)
        dest = Destination(argv, t.run, netns=t.netns)
        self.dest = dest
        await dest.start(timeout=t.start_timeout)
        where = f" in netns {t.netns}" if t.netns else ""
        self.note(f"destination: pid {dest.pid}{where}, {accel}, run directory {t.run.root}")
        return dest

    async def _configure(self, src: QmpControl, dest: Destination) -> None:
        src_set, dst_set = plan_settings(self.options)
        self.restore = changed_settings(src_set, self.current_caps, self.current_params)
        # the source first: it is the side whose refusal explains the most
        try:
            await src.migrate_set_capabilities(src_set.capabilities)
        except QmpCommandError as err:
            raise _Abort(
                f"the source refused the capabilities {_fmt_caps(src_set.capabilities)}: "
                f"{err.desc}") from err
        self.applied_caps = True
        if src_set.parameters:
            try:
                await src.execute("migrate-set-parameters", src_set.parameters)
            except QmpCommandError as err:
                raise _Abort(f"the source refused the parameters {src_set.parameters}: "
                             f"{err.desc}") from err
            self.applied_params = True
        try:
            if dst_set.capabilities:
                await dest.qmp.migrate_set_capabilities(dst_set.capabilities)
            if dst_set.parameters:
                await dest.qmp.execute("migrate-set-parameters", dst_set.parameters)
        except QmpCommandError as err:
            raise _Abort(
                f"the destination refused {_fmt_caps(dst_set.capabilities)} / "
                f"{dst_set.parameters}: {err.desc}") from err
        self.dest_events = dest.qmp.subscribe(("RESUME", "MIGRATION"))
        host = self.target.address or "127.0.0.1"
        if self.target.netns is not None and self.target.address is None:
            host = await netns_address(self.target.netns)
        listen = _incoming_uri(self.options.transport, host, self.target.run)
        await dest.qmp.migrate_incoming(listen)
        self.uri = _actual_uri(listen, await dest.qmp.query_migrate())
        if self.via is not None:
            self.relay, self.uri = await self.via(self.uri)
        self.note(f"capabilities {_fmt_caps(src_set.capabilities)}; parameters "
                  f"{src_set.parameters or 'unchanged'}; migrating to {self.uri}")

    async def _supervise(self, src: QmpControl, dest: Destination, t0: float) -> Progress:
        sup = Supervisor(self.options, t0)
        dest_started = False
        events = self.src_events
        while True:
            progress = Progress.from_query(await src.query_migrate(timeout=_QMP_TIMEOUT))
            if self.on_progress is not None:
                self.on_progress(progress)
            decision = sup.observe(time.monotonic(), progress, dest_exit=dest.poll())
            if decision.action is Action.FAILED and dest.poll() is None:
                # a destination that died makes the source fail: the failure can be seen
                # before the dead process is reaped; give it a moment to name the cause
                for _ in range(10):
                    await asyncio.sleep(0.02)
                    if dest.poll() is not None:
                        decision = sup.observe(time.monotonic(), progress,
                                               dest_exit=dest.poll())
                        break
            if decision.action is Action.SUCCEEDED:
                self.postcopy = self.postcopy or sup.postcopy_requested
                return progress
            if decision.action in (Action.ABORT, Action.FAILED):
                raise _Abort(decision.reason)
            if decision.action is Action.LOST:
                raise _Abort(decision.reason, lost=True)
            if decision.action is Action.START_POSTCOPY:
                self.note(f"switching to postcopy: {decision.reason}")
                await src.execute("migrate-start-postcopy", timeout=_QMP_TIMEOUT)
                self.postcopy = True
            if sup.in_postcopy and not dest_started:
                # -S: the destination stays paused after POSTCOPY_RUN until told to run
                st = await dest.qmp.query_status(timeout=_QMP_TIMEOUT)
                if st.status == "paused":
                    await dest.qmp.cont(timeout=_QMP_TIMEOUT)
                    self.dest_contd = True
                    dest_started = True
                    self.committed = True
                    self.note("destination running (postcopy: pages still arrive on demand)")
            if events is not None:
                with contextlib.suppress(QmpTimeoutError, QmpError):
                    self._saw(await events.get(timeout=self.options.poll_interval))
            else:
                await asyncio.sleep(self.options.poll_interval)

    def _saw(self, ev: QmpEvent) -> None:
        if ev.name == "STOP":
            self.stop_ts = ev.timestamp

    async def _finish(self, src: QmpControl, dest: Destination, final: Progress,
                      t0: float) -> MigrationStats:
        qmp = dest.qmp
        dsub = self.dest_events
        if dsub is None:
            raise QemuError("internal: destination events not subscribed")
        with dsub:
            deadline = time.monotonic() + 60.0
            while True:
                if not dest.alive:
                    raise _Abort("the destination QEMU exited after the source completed "
                                 f"(status {dest.poll()}): it failed to load the state. "
                                 f"stderr tail:\n{dest.stderr_tail()}")
                st = await qmp.query_status(timeout=_QMP_TIMEOUT)
                if st.status in ("paused", "running"):
                    break
                if st.status != "inmigrate":
                    raise _Abort(f"the destination is in run state {st.status!r} after the "
                                 "source completed; expected paused")
                if time.monotonic() > deadline:
                    raise _Abort("the destination did not finish loading within 60 s after "
                                 "the source completed")
                with contextlib.suppress(QmpTimeoutError):
                    await dsub.get(timeout=0.01)
            if not st.running and self.was_running:
                await qmp.cont(timeout=_QMP_TIMEOUT)
                self.dest_contd = True
            elif not st.running:
                self.note("destination left paused: the source was paused when the "
                          "migration started (cont it to run the guest)")
            self.committed = True
            resume = await self._resume_time(dsub, qmp) if self.dest_contd else None
        wall_ms = (time.monotonic() - t0) * 1000
        stop = await self._stop_time()
        pause = (resume - stop) * 1000 if resume is not None and stop is not None else None
        # the final counters: query again, the poll that saw "completed" may be early
        with contextlib.suppress(QmpError):
            final = Progress.from_query(await src.query_migrate(timeout=_QMP_TIMEOUT))
        after = self.options.source_after
        if after == "quit":
            try:
                await src.quit(timeout=_QMP_TIMEOUT)
                self.note("source: quit")
            except QmpError as err:
                self.note(f"warning: the source did not quit: {err}; it is paused "
                          "(postmigrate): quit it yourself")
        else:
            self.note("source: left paused (postmigrate)")
        t = self.target
        run = t.run
        dest_info = {"pid": dest.pid, "qmp": str(run.qmp_sock), "qmp2": str(run.qmp2_sock),
                     "run_dir": str(run.root), "netns": t.netns,
                     "serial_log": str(run.serial_log)}
        await dest.detach()
        recording = None
        if self.relay is not None:
            rstats = await self.relay.close()
            self.relay = None
            main = next((c for c in rstats.channels if c.kind == "main"), None)
            recording = {"file": main.forward_file if main else None,
                         "return_file": main.return_file if main else None,
                         "forward_bytes": rstats.forward_bytes,
                         "return_bytes": rstats.return_bytes, "errors": rstats.errors}
        return MigrationStats.build(final, guest_pause_ms=pause, wall_time_ms=wall_ms,
                                    postcopy=self.postcopy, uri=self.uri, source_after=after,
                                    destination=dest_info, recording=recording,
                                    resumed_at=resume)

    async def _resume_time(self, dsub: EventSubscription, qmp: QmpControl) -> float | None:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                ev: QmpEvent = await dsub.get(timeout=max(0.01, deadline - time.monotonic()))
            except QmpTimeoutError:
                break
            if ev.name == "RESUME":
                return ev.timestamp
        st = await qmp.query_status(timeout=_QMP_TIMEOUT)
        if not st.running:
            raise _Abort(f"the destination did not run after cont (run state {st.status})")
        return None

    async def _stop_time(self) -> float | None:
        events = self.src_events
        if events is not None:
            while True:
                try:
                    self._saw(await events.get(timeout=0.001))
                except (QmpTimeoutError, QmpError):
                    break
        return self.stop_ts

    # ------------------------------------------------------------------ failure

    async def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, _Abort) and exc.lost:
            dest = self.dest
            if dest is not None and dest.alive:
                await dest.detach()
            raise MigrationLostError(
                f"migration failed after the switch to postcopy: {exc.reason}. The guest's "
                "memory is split between source and destination, so nothing was rolled back: "
                "the source was not continued (it would run stale memory) and the destination "
                f"(pid {dest.pid if dest else None}) was not killed. If both QEMUs live, "
                "recover with migrate-recover on the destination and migrate with resume=true "
                "on the source; otherwise the guest is lost") from exc
        if self.committed:
            # the destination took over: never undo that
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                self.note("interrupted after the destination took over: the guest runs on "
                          f"the destination (QMP {self.target.run.qmp_sock}); the source is "
                          "paused (postmigrate)")
                return
            raise exc
        if self.dest is None and not isinstance(exc, _Abort) and isinstance(
                exc, ConfigError):
            raise exc  # nothing was changed yet
        done, problems, source_state = await self._rollback()
        interrupted = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
        if interrupted:
            self.note("interrupted: rolled back: " + ("; ".join(done) or "nothing to undo")
                      + f"; the source is {source_state or 'in an unknown state'}"
                      + (". Problems: " + "; ".join(problems) if problems else ""))
            raise exc
        if isinstance(exc, _Abort):
            reason = exc.reason
            dest = self.dest
            if dest is not None and not dest.killed and dest.poll() is not None:
                tail = dest.stderr_tail(3).replace("\n", " | ")
                if tail:
                    reason += f" (its log {dest.run.stderr_log} ends: {tail})"
        elif isinstance(exc, QmpShadowError):
            reason = f"while {self.phase}: {exc}"
        else:
            raise exc  # a bug: do not disguise it
        raise MigrationFailedError(reason, rollback=done, problems=problems,
                                   source_status=source_state) from exc

    async def _rollback(self) -> tuple[list[str], list[str], str | None]:
        src, dest = self.src, self.dest
        done: list[str] = []
        problems: list[str] = []
        status: str | None = None
        if src is not None and src.connected:
            try:
                status = Progress.from_query(await src.query_migrate(timeout=5)).status
            except QmpShadowError as err:
                problems.append(f"could not query the source's migration status: {err}")
        else:
            problems.append("the source's QMP connection is gone (did the source QEMU exit?)")
        steps = plan_rollback(source_status=status,
                              destination_alive=dest is not None and dest.alive)
        for step in steps:
            try:
                await self._step(step, done, problems)
            except QmpShadowError as err:
                problems.append(f"{step.value}: {err}")
        if dest is not None:
            await dest.kill()
        state = None
        if src is not None and src.connected:
            with contextlib.suppress(QmpShadowError):
                state = (await src.query_status(timeout=5)).status
        return done, problems, state

    async def _step(self, step: Step, done: list[str], problems: list[str]) -> None:
        src, dest = self.src, self.dest
        if step is Step.KILL_DESTINATION:
            if dest is not None:
                was_alive = dest.alive
                rc = await dest.kill()
                if was_alive and rc is not None and rc < 0:
                    done.append(f"killed the destination QEMU (pid {dest.pid})")
                else:
                    done.append(f"the destination QEMU (pid {dest.pid}) exited by itself "
                                f"(status {rc}; it exits when its incoming migration fails)")
            return
        if src is None or not src.connected:
            return
        if step is Step.CANCEL:
            await src.migrate_cancel(timeout=5)
            done.append("cancelled the migration on the source (migrate_cancel)")
        elif step is Step.WAIT_SETTLED:
            deadline = time.monotonic() + 15
            while True:
                status = Progress.from_query(await src.query_migrate(timeout=5)).status
                if status in SETTLED_STATES or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            if status not in SETTLED_STATES:
                problems.append(f"the source's migration is still {status} after 15 s")
        elif step is Step.CONT_SOURCE:
            st = await src.query_status(timeout=5)
            if self.was_running and not st.running:
                if st.status in ("postmigrate", "paused", "finish-migrate"):
                    await src.cont(timeout=5)
                    done.append(f"continued the source (it was {st.status})")
                else:
                    problems.append(f"the source is {st.status!r}; not continuing it")
            elif not self.was_running:
                done.append("left the source paused as it was before")
        elif step is Step.RESTORE_SETTINGS:
            r = self.restore
            what = []
            if r.capabilities and self.applied_caps:
                await src.migrate_set_capabilities(r.capabilities)
                what.append("capabilities")
            if r.parameters and self.applied_params:
                await src.execute("migrate-set-parameters", r.parameters, timeout=5)
                what.append("parameters")
            if what:
                done.append(f"restored the source's {' and '.join(what)}")


def _fmt_caps(caps: dict[str, bool]) -> str:
    return ", ".join(f"{k}={'on' if v else 'off'}" for k, v in caps.items())


async def migrate(
    source_qmp: str | os.PathLike[str],
    target: MigrationTarget,
    options: MigrateOptions | None = None,
    *,
    on_progress: ProgressFn | None = None,
    on_note: NoteFn | None = None,
    via: Callable[[str], Any] | None = None,
) -> MigrationResult:
    """Migrate the VM behind ``source_qmp`` to a destination started from ``target``.

    ``on_progress`` receives every polled :class:`~qmpshadow.migration.progress.Progress`,
    ``on_note`` one-line notes (destination started, postcopy switch, rollback steps).
    ``via`` (advanced) is an async callable given the destination's URI that returns
    ``(closeable, uri_for_the_source)``; it is how a recording relay is inserted.

    Raises:
        MigrationFailedError: the migration failed and was rolled back (the source runs
            again, or stays paused if it was paused; the message lists what was done).
        MigrationLostError: failure after the switch to postcopy (nothing rolled back).
        ConfigError: the spec does not match the source, or bad options; nothing was changed.
        QmpError: the source's QMP socket gives no session.
        asyncio.CancelledError: cancelled (Ctrl-C): rolled back first, then re-raised.
    """
    job = _Migration(source_qmp, target, options or MigrateOptions(), on_progress, on_note,
                     via)
    return await job.run()
