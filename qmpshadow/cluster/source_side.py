"""The source agent's cluster participation: the asyncio shell around :class:`SourceLease`.

It renews the lease on both paths (MQTT ``hb/source`` and HEARTBEAT frames on the
replication link), feeds acks, the shadow's status and last will, newer generations and the
primary's exit to the machine, and carries out its actions:

- **self-fencing**: QMP ``stop`` of the primary, under the checkpoint lock (so that a
  checkpoint in flight, which ends with ``cont``, cannot undo it), confirmed by the run
  state; ``cont`` when the lease is re-acquired;
- **the fencer** process (:mod:`qmpshadow.cluster.fencer`) is armed with every extension
  of the lease and disarmed once the primary is stopped or unprotected;
- **the fast path**: the primary's pidfd becoming readable (QEMU exited or was killed), or
  QMP EOF (then the process is made sure gone), releases the lease at once on both paths,
  so that the shadow promotes without waiting for the lease to run out;
- **handover**: a primary fenced for ``reacquire`` is killed and the lease released;
- retained ``lease`` and ``state`` documents and ``events`` for every transition;
- **planned switchover** (:meth:`SourceCluster.switchover`): final epoch with the primary
  stopped, shipped and committed synchronously, lease released to the shadow, the shadow's
  ``promoted`` event awaited, the old primary killed.

:attr:`SourceCluster.running` is set while checkpoints may run; :attr:`SourceCluster.done`
resolves when protection ends: with :class:`PrimaryGoneError` (released),
:class:`DeposedError` (a newer generation exists) or normally (clean end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpshadow.cluster.errors import (
    ClusterError,
    DeposedError,
    PrimaryGoneError,
    SwitchoverError,
)
from qmpshadow.cluster.fencer import Fencer
from qmpshadow.cluster.lease import (
    AckReceived,
    Action,
    AnnounceRelease,
    ArmFencer,
    ClusterTiming,
    EndProtection,
    Event,
    FencerLost,
    FencerSafe,
    GenerationSeen,
    HandoverAborted,
    HandoverCommitted,
    HandoverStarted,
    KillPrimary,
    PathKind,
    PrimaryExited,
    ProtectionEnded,
    Refused,
    ResumePrimary,
    SendRenewal,
    ShadowOffline,
    ShadowOnline,
    SourceLease,
    SourceState,
    StopConfirmed,
    StopPrimary,
    Tick,
    Transition,
    link_seq,
    parse_link_seq,
)
from qmpshadow.cluster.messages import (
    EventDoc,
    LeaseDoc,
    Message,
    ShadowHeartbeat,
    SourceRenewal,
    StateDoc,
    Status,
    Topics,
)
from qmpshadow.cluster.mqtt import BrokerConfig, ClusterBus
from qmpshadow.cluster.primary import PrimaryProcess
from qmpshadow.errors import QmpError, QmpShadowError
from qmpshadow.frames.wire import Heartbeat, Hello
from qmpshadow.qmp.control import QmpControl

__all__ = ["ClusterOptions", "SourceCluster"]

log = logging.getLogger(__name__)
StatusFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """What ``--broker``/``--cluster``/``--heartbeat-ms``/``--lease-ms`` configure."""

    broker: BrokerConfig
    cluster: str
    timing: ClusterTiming
    connect_timeout: float = 5.0


class SourceCluster:
    """See the module docstring.

    ``agent`` is the :class:`~qmpshadow.agents.source.SourceAgent` (link heartbeats),
    ``qmp`` the primary's QMP control, ``primary`` its process, ``ckpt_lock`` the lock the
    checkpoint loop holds around each checkpoint, ``before_stop`` an optional coroutine run
    before fencing (the COLO source cancels its session there; with it set, a fenced
    primary is never resumed but handed over).
    """

    def __init__(self, opts: ClusterOptions, *, vm: str, holder: str, generation: int,
                 agent: Any, qmp: QmpControl, primary: PrimaryProcess,
                 ckpt_lock: asyncio.Lock, status: StatusFn,
                 fencer_log: Path | None = None,
                 before_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        self.opts = opts
        self.timing = opts.timing
        self.topics = Topics(opts.cluster, vm)
        self.holder = holder
        self.agent = agent
        self.qmp = qmp
        self.primary = primary
        self.ckpt_lock = ckpt_lock
        self.status = status
        self.before_stop = before_stop
        self.sm = SourceLease(self.timing, generation=generation, session=agent.session,
                              now=time.monotonic())
        self.bus = ClusterBus(opts.broker, self.topics, "source", holder=holder,
                              on_message=self._on_message, on_connected=self._connected,
                              generation=lambda: self.sm.generation)
        self.fencer = Fencer(primary.pid, on_lost=self._fencer_lost, log_path=fencer_log)
        self.running = asyncio.Event()
        self.running.set()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.released_at: float | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._qmp_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._startup = True
        self._early: list[Event] = []  # shadow status seen before we could act on it
        self._retained_lease: LeaseDoc | None = None
        self._deposed_by: int | None = None
        self._stop_pending = False
        self._epoch = 0
        self._committed = 0
        self.stats = {"renewals": 0, "acks_link": 0, "acks_broker": 0, "refused": 0}
        #: monotonic time of the latest ack from the shadow (either path), for metrics
        self.last_ack_at: float | None = None
        self._switching = False
        self._promoted_seen: asyncio.Future[EventDoc] | None = None
        #: how to resume a primary held at a switchover's final epoch (COLO: answer the
        #: held checkpoint), set from the final epoch until it is used or the lease released
        self._held_resume: Callable[[], Awaitable[bool]] | None = None
        #: the result of a completed switchover (then :attr:`done` resolves normally)
        self.switchover_result: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the broker (bounded wait), check that our generation is current,
        start the fencer, watch the primary, start renewing.

        Raises:
            DeposedError: the retained lease carries a newer generation.
            ClusterError: our generation was already released (the shadow may have taken
                over), or the primary is not running.
            BrokerError: the broker refused our credentials.
            FencerError: the fencer could not start.
        """
        self.bus.start()
        if not await self.bus.wait_connected(self.opts.connect_timeout):
            log.warning("broker %s:%d unreachable: running unprotected until it answers",
                        self.opts.broker.host, self.opts.broker.port)
        else:
            await asyncio.sleep(0.2)  # retained lease/state/status arrive right after
        lease = self._retained_lease
        if lease is not None:
            if lease.gen > self.sm.generation:
                raise DeposedError(self.sm.generation, lease.gen, seen="retained lease")
            if (lease.gen == self.sm.generation and lease.mode in ("released", "promoted")
                    and lease.session != self.sm.session):
                raise ClusterError(
                    f"generation {lease.gen} was {lease.mode} by {lease.holder} "
                    f"({lease.reason or 'no reason given'}): the shadow may have taken over. "
                    f"Check which copy runs, then protect with --generation {lease.gen + 1}")
        st = await self.qmp.query_status()
        if not st.running:
            raise ClusterError(f"the primary is {st.status!r}, expected running: a paused "
                               "primary may have been fenced; resume it by hand only after "
                               "checking the cluster state (qmpshadow/<cluster>/<vm>/lease)")
        await self.fencer.start()
        # Only now may the machine name the shadow: from then on renewals must go out
        # every heartbeat and the fencer must be there to arm.
        self.primary.watch(self._primary_exited)
        self.agent.on_heartbeat = self._link_heartbeat
        self.agent.on_hello = self._link_hello
        self._qmp_task = asyncio.create_task(self._watch_qmp(), name="qmp watch")
        self._startup = False
        self._loop_task = asyncio.create_task(self._loop(), name="lease loop")
        for event in self._early[-1:]:
            self._feed(event)
        self._early.clear()
        self._emit("cluster-joined", broker=f"{self.opts.broker.host}:{self.opts.broker.port}",
                   cluster=self.opts.cluster, generation=self.sm.generation,
                   lease_ms=self.timing.lease_ms, heartbeat_ms=self.timing.heartbeat_ms,
                   fencer_pid=self.fencer.pid, primary_pid=self.primary.pid)
        for note in self.timing.availability_notes():
            log.warning("%s", note)

    async def close(self, *, end: bool = True) -> None:
        """Leave the cluster. With ``end`` (a clean stop) first end protection: the shadow
        must acknowledge that it may not promote anymore (bounded by the lease; if it does
        not, the lease runs out and the primary is fenced as usual)."""
        if end and self.sm.state in (SourceState.UNPROTECTED, SourceState.PROTECTED,
                                     SourceState.FENCED, SourceState.FENCING):
            if self.primary.alive:
                self._feed(EndProtection(now=time.monotonic()))
            else:
                # gone, though its exit was not reported yet (the caller's error came
                # first): ending protection now would leave the shadow waiting for a
                # holder that never renews or releases (the shadow cannot promote)
                self._feed(PrimaryExited(now=time.monotonic(),
                                         reason="the primary QEMU exited"))
            await asyncio.wait({self.done}, timeout=self.timing.lease + 1)
        for task in (self._loop_task, self._qmp_task, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._loop_task, self._qmp_task, *self._tasks)
                               if t is not None), return_exceptions=True)
        # EXIT the fencer only when nothing needs guarding; else close its pipe: it kills
        # an armed primary (our lease is not renewed from now on).
        await self.fencer.close(release=self.fencer.armed_until is None)
        self.agent.on_heartbeat = None
        self.agent.on_hello = None
        await self.bus.close()
        self.primary.close()
        if not self.done.done():
            self.done.cancel()

    # ------------------------------------------------------------------ driving

    def _feed(self, event: Event) -> None:
        for action in self.sm.handle(event):
            self._do(action)
        self._wake.set()
        self._maybe_deposed()

    def _maybe_deposed(self) -> None:
        if (self.sm.state is SourceState.DEPOSED and not self._stop_pending
                and not self.done.done()):
            self.running.clear()
            self.done.set_exception(DeposedError(
                self.sm.generation, self._deposed_by or self.sm.generation + 1,
                seen="cluster message"))

    async def _loop(self) -> None:
        while True:
            self._feed(Tick(now=time.monotonic()))
            delay = min(self.sm.next_wakeup() - time.monotonic(), self.timing.heartbeat)
            if delay <= 0:
                delay = self.timing.heartbeat / 10
            self._wake.clear()
            if delay > 0:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _do(self, a: Action) -> None:
        if isinstance(a, SendRenewal):
            self.stats["renewals"] += 1
            now = time.time()
            self.bus.publish(self.topics.hb("source"), SourceRenewal(
                gen=a.generation, time=now, session=self.sm.session, seq=a.seq,
                named=a.named, conn=self.bus.conn or "", holder=self.holder,
                state=self.sm.state.value, epoch=self._epoch, committed=self._committed))
            self.agent.send_heartbeat(Heartbeat(
                generation=a.generation, epoch=self._committed,
                seq=link_seq(a.seq, named=a.named is not None), timestamp_ns=time.time_ns()))
        elif isinstance(a, ArmFencer):
            self.fencer.arm(a.deadline)
        elif isinstance(a, FencerSafe):
            self.fencer.safe()
        elif isinstance(a, StopPrimary):
            self.running.clear()
            self._stop_pending = True
            self._spawn(self._stop(a.reason))
        elif isinstance(a, ResumePrimary):
            self._spawn(self._resume(a.reason))
        elif isinstance(a, KillPrimary):
            self.running.clear()
            self._spawn(self._kill(a.reason))
        elif isinstance(a, AnnounceRelease):
            self.running.clear()
            self._spawn(self._release(a))
        elif isinstance(a, ProtectionEnded):
            self._emit("protection-ended")
            if not self.done.done():
                self.done.set_result(None)
        elif isinstance(a, Transition):
            self._transition(a)
        elif isinstance(a, Refused):
            self.stats["refused"] += 1
            if a.what.startswith("our own lease"):
                self._deposed_by = a.current
            log.warning("refused %s of generation %d (generation %d is current)", a.what,
                        a.generation, a.current)

    def _transition(self, a: Transition) -> None:
        log.info("lease: %s -> %s (%s)", a.old, a.new, a.reason)
        self._emit("lease-" + a.new, reason=a.reason, previous=a.old,
                   generation=self.sm.generation, named=self.sm.named)
        self._announce(a.reason)
        self.bus.publish(self.topics.events, EventDoc(
            gen=self.sm.generation, time=time.time(), event="lease", role="source",
            fields={"from": a.old, "to": a.new, "reason": a.reason}), qos=1)

    def _announce(self, reason: str) -> None:
        """Retained ``lease`` and ``state`` for the current state (on each transition and
        each broker connection: a restarted broker without persistence forgot them)."""
        state = self.sm.state
        if state in (SourceState.DEPOSED, SourceState.RELEASED):
            return  # not ours to describe anymore / announced by _release
        now = time.time()
        gen = self.sm.generation
        mode = {"fencing": "fenced"}.get(state.value, state.value)
        self.bus.publish(self.topics.lease, LeaseDoc(
            gen=gen, time=now, holder=self.holder, role="source", mode=mode,
            session=self.sm.session, named=self.sm.named, lease_ms=self.timing.lease_ms,
            epoch=self._committed, reason=reason), qos=1, retain=True)
        self.bus.publish(self.topics.state, StateDoc(
            gen=gen, time=now, primary=self.holder, role="source",
            status={"protected": "running", "unprotected": "running"}.get(state.value,
                                                                          state.value),
            epoch=self._committed), qos=1, retain=True)

    def _connected(self, _conn: str) -> None:
        if not self._startup:
            self._announce("broker connection (re)established")

    def _emit(self, event: str, **fields: Any) -> None:
        self.status({"event": event, "time": time.time(), **fields})

    def note_epoch(self, captured: int, committed: int) -> None:
        """The checkpoint loop's progress (goes into renewals and lease documents)."""
        self._epoch, self._committed = captured, committed

    # ------------------------------------------------------------------ inputs

    def _on_message(self, suffix: str, msg: Message, retained: bool) -> None:
        now = time.monotonic()
        if self._startup:
            self._early_message(suffix, msg, retained, now)
            return
        if suffix == "hb/shadow":
            if isinstance(msg, ShadowHeartbeat):
                if msg.ack_seq is not None and msg.ack_session == self.sm.session:
                    self.stats["acks_broker"] += 1
                    self.last_ack_at = now
                    self._feed(AckReceived(now=now, seq=msg.ack_seq, generation=msg.gen,
                                           path=PathKind.BROKER, session=self.sm.session))
                self._feed(ShadowOnline(now=now, conn=msg.conn, generation=msg.gen))
            elif isinstance(msg, Status) and msg.role == "shadow":
                if msg.online:
                    self._feed(ShadowOnline(now=now, conn=msg.conn, generation=msg.gen))
                else:
                    self._feed(ShadowOffline(now=now, conn=msg.conn, generation=msg.gen))
        elif suffix == "lease" and isinstance(msg, LeaseDoc):
            if msg.session != self.sm.session:
                self._feed(GenerationSeen(now=now, generation=msg.gen,
                                          what=f"lease of {msg.holder} ({msg.mode})"))
        elif suffix == "state" and isinstance(msg, StateDoc):
            self._feed(GenerationSeen(now=now, generation=msg.gen,
                                      what=f"state of {msg.primary}"))
        elif (suffix == "events" and isinstance(msg, EventDoc) and msg.role == "shadow"
              and msg.event == "promoted" and msg.gen > self.sm.generation and not retained):
            fut = self._promoted_seen
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _early_message(self, suffix: str, msg: Message, retained: bool, now: float) -> None:
        """Before start() is done: keep the retained lease and the shadow's latest status."""
        if suffix == "lease" and isinstance(msg, LeaseDoc) and retained:
            self._retained_lease = msg
        elif suffix == "hb/shadow" and isinstance(msg, (ShadowHeartbeat, Status)):
            online = msg.online if isinstance(msg, Status) else True
            if isinstance(msg, Status) and msg.role != "shadow":
                return
            self._early.append(ShadowOnline(now=now, conn=msg.conn, generation=msg.gen)
                               if online else ShadowOffline(now=now, conn=msg.conn,
                                                            generation=msg.gen))

    def _link_heartbeat(self, frame: Heartbeat) -> None:
        seq, _release, _named = parse_link_seq(frame.seq)
        self.stats["acks_link"] += 1
        self.last_ack_at = time.monotonic()
        self._feed(AckReceived(now=time.monotonic(), seq=seq, generation=frame.generation,
                               path=PathKind.LINK))

    def _link_hello(self, frame: Hello) -> None:
        self._feed(GenerationSeen(now=time.monotonic(), generation=frame.generation,
                                  what="the shadow agent's HELLO"))

    def _fencer_lost(self, reason: str) -> None:
        if not self.primary.alive or self.sm.state not in (
                SourceState.UNPROTECTED, SourceState.PROTECTED, SourceState.FENCING,
                SourceState.FENCED):
            return  # it exits by design once the primary is gone
        log.error("fencer lost: %s", reason)
        self._emit("fencer-lost", reason=reason)
        self._feed(FencerLost(now=time.monotonic(), reason=reason))

    def _primary_exited(self) -> None:
        self._feed(PrimaryExited(now=time.monotonic(), reason="the primary QEMU exited"))

    async def _watch_qmp(self) -> None:
        """QMP EOF is the other fast path: make sure the process is gone, then release."""
        try:
            with self.qmp.subscribe(None) as sub:
                async for _ev in sub:
                    pass
        except QmpError:
            pass
        if self._stopping or not self.primary.alive:
            return
        if not await self.primary.wait(0.2):
            log.warning("lost QMP to the primary (pid %d) while it runs: killing it, "
                        "a primary we cannot stop must not run", self.primary.pid)
            await self.primary.kill()

    # ------------------------------------------------------------------ effects

    async def _stop(self, reason: str) -> None:
        try:
            await self._stop_primary(reason)
        finally:
            self._stop_pending = False
            self._maybe_deposed()

    async def _stop_primary(self, reason: str) -> None:
        log.warning("self-fencing: stopping the primary (%s)", reason)
        self._emit("fencing", reason=reason)
        t0 = time.monotonic()
        async with self.ckpt_lock:
            if self.before_stop is not None:
                with contextlib.suppress(QmpShadowError):
                    await self.before_stop()
            while self.primary.alive:
                try:
                    await self.qmp.stop(timeout=1.0)
                    st = await self.qmp.query_status(timeout=1.0)
                    if not st.running:
                        break
                except QmpShadowError as exc:
                    log.warning("QMP stop failed (%s); the fencer kills the primary at its "
                                "deadline", exc)
                    if not await self.primary.wait(0.1):
                        continue
                    return
        if not self.primary.alive:
            return
        ms = (time.monotonic() - t0) * 1000
        self._emit("fenced", reason=reason, stop_ms=round(ms, 1))
        self._feed(StopConfirmed(now=time.monotonic()))

    async def _resume(self, reason: str) -> None:
        held, self._held_resume = self._held_resume, None
        if held is not None:
            # an aborted switchover's final checkpoint: answering it resumes the primary
            async with self.ckpt_lock:
                ok = await held()
            if not ok:
                await self._kill(f"the held final checkpoint could not be answered ({reason})")
                return
            self._emit("resumed", reason=reason)
            if self.sm.may_run():
                self.running.set()
            return
        if self.before_stop is not None:
            # COLO: its session was cancelled by the fence; hand over instead
            await self._kill("fenced COLO primary cannot resume protected: handing over")
            return
        async with self.ckpt_lock:
            try:
                await self.qmp.cont(timeout=2.0)
            except QmpShadowError as exc:
                log.error("could not resume the primary (%s): %s", reason, exc)
                return
        self._emit("resumed", reason=reason)
        if self.sm.may_run():
            self.running.set()

    async def _kill(self, reason: str) -> None:
        log.warning("killing the primary (pid %d): %s", self.primary.pid, reason)
        self._emit("handover", reason=reason)
        if not await self.primary.kill():
            log.error("primary pid %d did not die within 5 s", self.primary.pid)

    async def _release(self, a: AnnounceRelease) -> None:
        self.released_at = self.primary.exited_at or time.time()
        self._committed = max(self._committed, int(self.agent.stats.committed))
        # The retained state and lease go out before (not after) the link release: the
        # shadow promotes on the link within milliseconds and then publishes its own
        # state and lease of the next generation, which must be the ones that stay
        # retained (before, the old primary's "released" state landed last).
        self.bus.publish(self.topics.state, StateDoc(
            gen=a.generation, time=time.time(), primary=self.holder, role="source",
            status="released", epoch=self._committed), qos=1, retain=True)
        doc = LeaseDoc(gen=a.generation, time=self.released_at, holder=self.holder,
                       role="source", mode="released", session=self.sm.session,
                       epoch=self._committed, reason=a.reason)
        lease_sent = asyncio.ensure_future(
            self.bus.publish_wait(self.topics.lease, doc, retain=True, timeout=1.0))
        await asyncio.sleep(0)  # both publishes reach the broker's socket first
        # the link: it is the fastest path to the shadow
        await self.agent.send_now(Heartbeat(
            generation=a.generation, epoch=self._committed,
            seq=link_seq(self.sm.seq + 1, release=True, handover=self._switching),
            timestamp_ns=int(self.released_at * 1e9)), timeout=0.5)
        ok = await lease_sent
        self._emit("released", reason=a.reason, generation=a.generation, broker=ok,
                   exited_at=self.released_at, epoch=self._committed)
        await self.bus.flush()
        if not self.done.done() and not self._switching:
            self.done.set_exception(PrimaryGoneError(
                f"the primary (pid {self.primary.pid}) is gone ({a.reason}); the lease of "
                f"generation {a.generation} was released to the shadow"))

    # ------------------------------------------------------------------ switchover

    def _switchover_refusal(self, *, ours: bool = False) -> str:
        if self._switching and not ours:
            return "a switchover is already in progress"
        if self.sm.state is not SourceState.PROTECTED:
            why = {SourceState.UNPROTECTED: "no shadow is named (is the shadow agent "
                                            "running and on the broker?)",
                   SourceState.FENCING: "the primary is being fenced",
                   SourceState.FENCED: "the primary is fenced (its lease lapsed)"}
            return (f"the source lease is {self.sm.state.value}: "
                    f"{why.get(self.sm.state, 'protection is over')}")
        if not self.primary.alive:
            return "the primary QEMU is gone"
        if self.agent.stats.committed <= 0:
            return "the shadow has not committed any epoch yet"
        return ""

    async def switchover(self, final: Callable[[], Awaitable[tuple[Any, float | None]]], *,
                         commit_timeout: float = 10.0,
                         promote_timeout: float = 30.0,
                         resume: Callable[[], Awaitable[bool]] | None = None
                         ) -> dict[str, Any]:
        """Planned switchover; returns the result document (also :attr:`switchover_result`).

        ``final()`` is called under the checkpoint lock and must take the final epoch with
        the primary left stopped, returning it and the STOP event's wall-clock timestamp.
        Then: the final epoch is shipped and must be committed within ``commit_timeout``
        (else the switchover aborts: the primary resumes once the shadow acknowledges a
        fresh renewal); the lease is released (link + broker) and the primary never runs
        again; the shadow's ``promoted`` event is awaited (``promote_timeout``); the old
        primary is killed. :attr:`done` resolves when this returns.

        ``resume`` (COLO) is how an aborted switchover's primary resumes from its final
        epoch (answer the held checkpoint); without it the primary gets QMP ``cont``.

        Raises:
            SwitchoverError: refused (not protected, nothing committed, already running),
                or failed — the message says whether the primary runs, resumes, or stays
                stopped.
        """
        requested = time.time()
        t_req = time.monotonic()
        if why := self._switchover_refusal():
            raise SwitchoverError(f"switchover refused: {why}")
        self._switching = True
        try:
            return await self._switchover(final, requested, t_req, commit_timeout,
                                          promote_timeout, resume)
        finally:
            self._switching = False
            self._promoted_seen = None
            if self.sm.state is SourceState.RELEASED and not self.done.done():
                if self.switchover_result is not None:
                    self.done.set_result(None)
                else:
                    self.done.set_exception(PrimaryGoneError(
                        f"the lease of generation {self.sm.generation} was released for a "
                        "switchover; the old primary stays stopped"))

    async def _switchover(self, final: Callable[[], Awaitable[tuple[Any, float | None]]],
                          requested: float, t_req: float, commit_timeout: float,
                          promote_timeout: float,
                          resume: Callable[[], Awaitable[bool]] | None) -> dict[str, Any]:
        gen = self.sm.generation
        self._promoted_seen = asyncio.get_running_loop().create_future()
        async with self.ckpt_lock:
            if why := self._switchover_refusal(ours=True):
                raise SwitchoverError(f"switchover refused: {why}")
            self.running.clear()
            t_lock = time.monotonic()
            try:
                await self.agent.prepare()
                ep, stopped_at = await final()
            except BaseException:
                if self.sm.may_run():
                    self.running.set()
                raise
            t_stopped = time.monotonic()
            captured_at = time.time()
            self._held_resume = resume
            self._emit("switchover-stopped", epoch=ep.number, stopped_at=stopped_at,
                       full=ep.full)
            self._feed(HandoverStarted(now=time.monotonic()))
            if not self.sm.handover:
                # a newer generation or the primary's exit came first: it stays stopped
                raise SwitchoverError(
                    f"switchover aborted: the source lease became {self.sm.state.value} "
                    "while the final epoch was taken; the primary stays stopped")
            acked = await self.agent.ship(ep, wait=True, timeout=commit_timeout)
            if not acked or self.agent.stats.committed < ep.number:
                self._feed(HandoverAborted(now=time.monotonic(),
                                           reason="final epoch not committed"))
                raise SwitchoverError(
                    f"switchover aborted: the shadow did not commit the final epoch "
                    f"{ep.number} within {commit_timeout:g} s; the primary resumes as soon "
                    "as the shadow acknowledges a fresh renewal (else the ordinary handover "
                    "after the reacquire time applies)")
            t_committed = time.monotonic()
            committed_at = time.time()
            self.note_epoch(ep.number, self.agent.stats.committed)
            self._held_resume = None  # from the release on, the old primary never runs
            self._feed(HandoverCommitted(now=time.monotonic(), reason="planned switchover"))
        fut = self._promoted_seen
        try:
            async with asyncio.timeout(promote_timeout):
                doc = await fut
        except TimeoutError:
            raise SwitchoverError(
                f"the final epoch {ep.number} was committed and the lease of generation "
                f"{gen} released, but no promotion of the shadow was seen within "
                f"{promote_timeout:g} s: the old primary stays stopped (never resumed); "
                "check the shadow agent") from None
        t_promoted = time.monotonic()
        f = doc.fields
        killed = await self.primary.kill()
        resumed_at = f.get("resumed_at")
        result: dict[str, Any] = {
            "event": "switchover", "vm": self.topics.vm, "epoch": ep.number,
            "promoted_epoch": f.get("epoch"), "lost_epochs": ep.number - int(
                f.get("epoch") or 0),
            "generation": doc.gen, "previous_generation": gen,
            "reprotect_generation": doc.gen + 1,
            "requested_at": requested, "stopped_at": stopped_at, "resumed_at": resumed_at,
            "downtime_ms": (round((resumed_at - stopped_at) * 1000, 1)
                            if resumed_at and stopped_at else None),
            "move_ms": round((resumed_at - requested) * 1000, 1) if resumed_at else None,
            "wait_ms": round((t_lock - t_req) * 1000, 1),
            "final_epoch_ms": round((t_stopped - t_lock) * 1000, 1),
            "commit_ms": round((t_committed - t_stopped) * 1000, 1),
            "promote_ms": (round((resumed_at - committed_at) * 1000, 1) if resumed_at
                           else None),
            "confirmed_ms": round((t_promoted - t_committed) * 1000, 1),
            # where the downtime goes (wall clocks of one host; see docs/switchover.md)
            "stop_to_captured_ms": _ms_between(stopped_at, captured_at),
            "release_ms": _ms_between(committed_at, f.get("decided_at")),
            "shadow_promote_ms": _ms_between(f.get("decided_at"), resumed_at),
            "shadow_build_ms": f.get("build_ms"), "shadow_connect_ms": f.get("connect_ms"),
            # part of commit_ms: the shadow's prepare of the final epoch's stream
            "shadow_prepare_ms": f.get("prepare_ms"),
            "shadow_prepare_reused": f.get("prepare_reused"),
            "shadow_send_ms": f.get("send_ms"),
            "shadow_load_ms": f.get("load_ms"), "shadow_handoff_ms": f.get("handoff_ms"),
            "shadow_resume_ms": f.get("resume_ms"),
            "full": ep.full, "new_pid": f.get("pid"), "old_pid": self.primary.pid,
            "old_primary": "killed" if killed else "stopped (kill failed)",
            "shadow_running_ms": f.get("running_ms"),
        }
        self.switchover_result = result
        self._emit("switchover", **{k: v for k, v in result.items() if k != "event"})
        return result

    @property
    def state(self) -> SourceState:
        return self.sm.state


def _ms_between(a: Any, b: Any) -> float | None:
    """b - a in ms, rounded; None when either time is unknown."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    return round((float(b) - float(a)) * 1000, 1)

