"""The shadow agent's cluster participation: the asyncio shell around :class:`ShadowWatch`.

It publishes the shadow's heartbeats on MQTT ``hb/shadow`` (their echo proves the broker
connection alive), acknowledges every renewal on the path it came by (MQTT, or a HEARTBEAT
frame on the replication link), counts every frame of the link as a sign of life, and when
the machine says so promotes the warm standby (``promote(reason)``, e.g.
:meth:`Standby.promote <qmpshadow.shadow.standby.Standby.promote>` behind the agent), then
publishes the new generation as the retained ``lease`` and ``state`` and a ``promoted``
event with the detection and promotion times.

A release (the primary is gone) is accepted only when the replica holds a committed epoch
of the released generation: an old retained release must not start a stale replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qmpshadow.cluster.lease import (
    Action,
    BrokerConnected,
    BrokerDisconnected,
    EchoReceived,
    Event,
    GenerationSeen,
    Heard,
    ManualPromote,
    PathKind,
    Promote,
    PromotionFinished,
    Refused,
    ReleaseReceived,
    RenewalReceived,
    SendAck,
    ShadowState,
    ShadowWatch,
    Tick,
    Transition,
    link_handover,
    parse_link_seq,
)
from qmpshadow.cluster.messages import (
    EventDoc,
    LeaseDoc,
    Message,
    ShadowHeartbeat,
    SourceRenewal,
    StateDoc,
    Topics,
)
from qmpshadow.cluster.mqtt import ClusterBus
from qmpshadow.cluster.source_side import ClusterOptions
from qmpshadow.errors import QmpShadowError
from qmpshadow.frames.wire import Frame, Heartbeat, Hello

__all__ = ["ShadowCluster"]

log = logging.getLogger(__name__)
StatusFn = Callable[[dict[str, Any]], None]
PromoteFn = Callable[[str], Awaitable[dict[str, Any]]]


class ShadowCluster:
    """See the module docstring. ``agent`` is the
    :class:`~qmpshadow.agents.shadow.ShadowAgent`, ``replica`` its replica."""

    def __init__(self, opts: ClusterOptions, *, vm: str, holder: str, agent: Any,
                 replica: Any, promote: PromoteFn, status: StatusFn) -> None:
        self.opts = opts
        self.timing = opts.timing
        self.topics = Topics(opts.cluster, vm)
        self.holder = holder
        self.agent = agent
        self.replica = replica
        self.promote_fn = promote
        self.status = status
        self.sm = ShadowWatch(self.timing, generation=replica.generation,
                              now=time.monotonic())
        self.bus = ClusterBus(opts.broker, self.topics, "shadow", holder=holder,
                              on_message=self._on_message, on_connected=self._connected,
                              on_disconnected=self._disconnected,
                              generation=lambda: self.sm.generation)
        self.promoted: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self._last_frame = 0.0
        self._failure_at: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._promoting: asyncio.Task[None] | None = None
        self._last_failure = ""
        self.stats = {"renewals_link": 0, "renewals_broker": 0, "acks": 0, "refused": 0}

    async def start(self) -> None:
        """Connect to the broker (bounded wait) and start watching.

        Raises:
            BrokerError: the broker refused our credentials.
        """
        self.bus.start()
        if not await self.bus.wait_connected(self.opts.connect_timeout):
            log.warning("broker %s:%d unreachable: no automatic failover on a timeout until "
                        "it answers (a release still promotes)", self.opts.broker.host,
                        self.opts.broker.port)
        self.agent.on_frame = self._link_frame
        self._task = asyncio.create_task(self._loop(), name="failover watch")
        self._emit("cluster-joined", broker=f"{self.opts.broker.host}:{self.opts.broker.port}",
                   cluster=self.opts.cluster, generation=self.sm.generation,
                   lease_ms=self.timing.lease_ms, heartbeat_ms=self.timing.heartbeat_ms)

    async def close(self) -> None:
        """Stop watching and leave the broker (a promotion in progress completes first)."""
        if self._promoting is not None and not self._promoting.done():
            await asyncio.wait({self._promoting}, timeout=15)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        self.agent.on_frame = None
        await self.bus.close()

    # ------------------------------------------------------------------ driving

    def _feed(self, event: Event) -> None:
        for action in self.sm.handle(event):
            self._do(action)
        self._wake.set()

    async def _loop(self) -> None:
        next_hb = time.monotonic()
        while True:
            now = time.monotonic()
            conn = self.bus.conn
            if now >= next_hb:
                next_hb = now + self.timing.heartbeat
                if conn is not None:
                    self.bus.publish(self.topics.hb("shadow"), ShadowHeartbeat(
                        gen=self.sm.generation, time=time.time(), conn=conn, sent_mono=now,
                        state=self.sm.state.value, epoch=self.replica.committed_epoch))
            self._poll_link(now)
            if self.replica.committed_epoch > 0 and not self.replica.retired:
                self._feed(Tick(now=now))  # nothing to promote before the first commit
            now = time.monotonic()
            wake = self.sm.next_wakeup()
            target = min(next_hb, wake) if wake > now else next_hb
            self._wake.clear()
            if target > now:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(target - now):
                        await self._wake.wait()

    def _poll_link(self, now: float) -> None:
        at = self.agent.last_frame_at
        if at > self._last_frame:
            self._last_frame = at
            self._feed(Heard(now=at))

    def _do(self, a: Action) -> None:
        if isinstance(a, SendAck):
            self.stats["acks"] += 1
            if a.path is PathKind.LINK:
                self.agent.send_heartbeat(Heartbeat(
                    generation=a.generation, epoch=self.replica.committed_epoch, seq=a.seq,
                    timestamp_ns=time.time_ns()))
            elif self.bus.conn is not None:
                self.bus.publish(self.topics.hb("shadow"), ShadowHeartbeat(
                    gen=a.generation, time=time.time(), conn=self.bus.conn,
                    sent_mono=time.monotonic(), state=self.sm.state.value,
                    epoch=self.replica.committed_epoch, ack_seq=a.seq,
                    ack_session=a.session))
        elif isinstance(a, Promote):
            self._promoting = asyncio.create_task(self._promote(a), name="promotion")
        elif isinstance(a, Transition):
            log.info("failover watch: %s -> %s (%s)", a.old, a.new, a.reason)
            self._emit("watch-" + a.new, reason=a.reason, previous=a.old,
                       generation=self.sm.generation)
            self.bus.publish(self.topics.events, EventDoc(
                gen=self.sm.generation, time=time.time(), event="watch", role="shadow",
                fields={"from": a.old, "to": a.new, "reason": a.reason}), qos=1)
        elif isinstance(a, Refused):
            self.stats["refused"] += 1
            log.warning("refused %s of generation %d (generation %d is current)", a.what,
                        a.generation, a.current)
            self._emit("refused", what=a.what, generation=a.generation, current=a.current)

    def _emit(self, event: str, **fields: Any) -> None:
        self.status({"event": event, "time": time.time(), **fields})

    # ------------------------------------------------------------------ inputs

    def _connected(self, conn: str) -> None:
        self._feed(BrokerConnected(now=time.monotonic(), conn=conn))

    def _disconnected(self, _conn: str) -> None:
        self._feed(BrokerDisconnected(now=time.monotonic()))

    def _on_message(self, suffix: str, msg: Message, retained: bool) -> None:
        now = time.monotonic()
        if suffix == "hb/source" and isinstance(msg, SourceRenewal):
            self.stats["renewals_broker"] += 1
            self._feed(RenewalReceived(now=now, path=PathKind.BROKER, seq=msg.seq,
                                       generation=msg.gen, session=msg.session,
                                       named=msg.named, named_any=msg.named is not None))
        elif suffix == "hb/shadow" and isinstance(msg, ShadowHeartbeat):
            if msg.conn == self.bus.conn:
                self._feed(EchoReceived(now=now, conn=msg.conn, sent_at=msg.sent_mono))
        elif suffix == "lease" and isinstance(msg, LeaseDoc):
            if msg.role == "source" and msg.mode == "released":
                self._release(msg.gen, PathKind.BROKER, msg.session,
                              msg.reason or "released", msg.time)
            elif msg.role == "source" and msg.holder and not retained:
                self._feed(Heard(now=now))
                self._feed(GenerationSeen(now=now, generation=msg.gen, what="lease"))
            elif msg.role == "shadow" and msg.holder != self.holder:
                self._feed(GenerationSeen(now=now, generation=msg.gen,
                                          what=f"lease of {msg.holder}"))
        elif (suffix == "state" and isinstance(msg, StateDoc) and msg.role == "shadow"
              and msg.primary != self.holder):
            self._feed(GenerationSeen(now=now, generation=msg.gen, what="state"))

    def _release(self, generation: int, path: PathKind, session: str, reason: str,
                 failed_at: float) -> None:
        rep = self.replica
        if rep.generation != generation or rep.committed_epoch <= 0 or rep.retired:
            log.warning("release of generation %d ignored: the replica holds generation %d "
                        "epoch %d%s", generation, rep.generation, rep.committed_epoch,
                        " (retired)" if rep.retired else "")
            return
        if self._failure_at is None:
            self._failure_at = failed_at
        self._feed(ReleaseReceived(now=time.monotonic(), path=path, generation=generation,
                                   session=session, reason=reason))

    def _link_frame(self, frame: Frame) -> None:
        now = time.monotonic()
        if isinstance(frame, Heartbeat):
            seq, release, named = parse_link_seq(frame.seq)
            if release:
                why = ("planned switchover (link)" if link_handover(frame.seq)
                       else "released (link)")
                self._release(frame.generation, PathKind.LINK, self.agent.session, why,
                              frame.timestamp_ns / 1e9)
                return
            self.stats["renewals_link"] += 1
            self._feed(RenewalReceived(now=now, path=PathKind.LINK, seq=seq,
                                       generation=frame.generation, session=self.agent.session,
                                       named_any=named))
        elif isinstance(frame, Hello):
            self._feed(Heard(now=now))
        # other frames: _poll_link (cheap: no per-frame work on the epoch path)

    # ------------------------------------------------------------------ promotion

    async def manual_promote(self) -> dict[str, Any]:
        """The operator's promote: through the machine (generation bumped and published).

        Raises:
            QmpShadowError: the promotion failed or was refused.
        """
        if self.sm.state is ShadowState.PROMOTED and self.promoted.done():
            return self.promoted.result()
        self._feed(ManualPromote(now=time.monotonic(), generation=self.sm.generation))
        if self._promoting is None:
            raise QmpShadowError(f"promotion refused in state {self.sm.state.value}")
        await asyncio.wait({self._promoting})
        if self.promoted.done():
            return self.promoted.result()
        raise QmpShadowError(self._last_failure or "promotion failed")

    async def _promote(self, a: Promote) -> None:
        decided_wall = time.time() - (time.monotonic() - a.decided_at)
        self._emit("promoting", reason=a.reason, generation=a.generation)
        self.agent.min_generation = a.generation
        try:
            result = await self.promote_fn(a.reason)
        except QmpShadowError as exc:
            self._last_failure = str(exc)
            self.agent.min_generation = 0
            log.error("promotion failed: %s", exc)
            self._emit("promotion-failed", reason=str(exc))
            self._feed(PromotionFinished(now=time.monotonic(), ok=False, detail=str(exc)))
            return
        self._feed(PromotionFinished(now=time.monotonic(), ok=True))
        resumed = float(result.get("resumed_at") or time.time())
        if self._failure_at is not None:
            failure = self._failure_at
        else:
            failure = decided_wall - (a.decided_at - a.last_heard)
        doc = {**result, "reason": a.reason, "generation": a.generation,
               "decided_at": decided_wall, "failure_at": failure,
               "detect_ms": round((decided_wall - failure) * 1000, 1),
               "promote_ms": round((resumed - decided_wall) * 1000, 1)}
        self._emit("failover", **{k: v for k, v in doc.items() if k not in ("event", "time")})
        now = time.time()
        self.bus.publish(self.topics.lease, LeaseDoc(
            gen=a.generation, time=now, holder=self.holder, role="shadow", mode="promoted",
            epoch=int(result.get("epoch", 0)), reason=a.reason), qos=1, retain=True)
        self.bus.publish(self.topics.state, StateDoc(
            gen=a.generation, time=now, primary=self.holder, role="shadow", status="running",
            epoch=int(result.get("epoch", 0))), qos=1, retain=True)
        self.bus.publish(self.topics.events, EventDoc(
            gen=a.generation, time=now, event="promoted", role="shadow",
            fields={k: v for k, v in doc.items() if isinstance(v, (int, float, str, bool))}),
            qos=1)
        await self.bus.flush()
        if not self.promoted.done():
            self.promoted.set_result(doc)
