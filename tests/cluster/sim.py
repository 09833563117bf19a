"""A discrete-event model of one primary and one shadow around the two lease machines.

Real time ``t`` (seconds) drives everything; each side sees its own monotonic clock
(rate within the configured drift bound). Messages travel on the replication link and
through the broker, each lost or delayed as the scenario says, and not at all while a path
is cut. The broker follows mosquitto's rules: a client's last will goes out only after more
than ``keepalive*3//2`` seconds of silence (or at once when the same client id reconnects);
retained status is delivered on (re)connect. The source agent can freeze (its messages and
timers wait) or die (the fencer sees EOF); the primary QEMU can crash; a QMP stop takes a
while; the fencer kills at its deadline plus its latency.

``run(scenario)`` returns a :class:`Trace`; ``Trace.overlap`` lists the times at which the
primary ran while the promoted shadow ran (the safety invariant says: none).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from qmpshadow.cluster.lease import (
    AckReceived,
    Action,
    AnnounceRelease,
    ArmFencer,
    BrokerConnected,
    BrokerDisconnected,
    ClusterTiming,
    EchoReceived,
    Event,
    FencerSafe,
    KillPrimary,
    PathKind,
    PrimaryExited,
    Promote,
    PromotionFinished,
    ReleaseReceived,
    RenewalReceived,
    ResumePrimary,
    SendAck,
    SendRenewal,
    ShadowOffline,
    ShadowOnline,
    ShadowState,
    ShadowWatch,
    SourceLease,
    SourceState,
    StopConfirmed,
    StopPrimary,
    Tick,
)

Window = tuple[float, float]


def _in(windows: list[Window], t: float) -> bool:
    return any(a <= t < b for a, b in windows)


@dataclass
class Scenario:
    """Everything the adversary chooses (times in real seconds)."""

    timing: ClusterTiming
    duration: float = 20.0
    rate_h: float = 1.0
    rate_s: float = 1.0
    link_cut: list[Window] = field(default_factory=list)
    hbroker_cut: list[Window] = field(default_factory=list)
    sbroker_cut: list[Window] = field(default_factory=list)
    loss: float = 0.0
    max_delay: float = 0.005
    h_freeze: list[Window] = field(default_factory=list)
    h_death: float | None = None
    qemu_crash: float | None = None
    stop_latency: float = 0.005
    lwt_extra: float = 0.0
    notice_delay: float = 1.0
    reconnect_delay: float = 0.05
    seed: int = 0


@dataclass
class Trace:
    """What happened: state histories, times of promotion and overlap (split brain)."""

    overlap: list[float] = field(default_factory=list)
    belief_overlap: list[float] = field(default_factory=list)
    promoted_at: float | None = None
    fenced_at: float | None = None
    primary_dead_at: float | None = None
    source_states: list[SourceState] = field(default_factory=list)
    shadow_states: list[ShadowState] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


class Sim:
    """One run of a :class:`Scenario` (see the module docstring)."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.t = 0.0
        self.rng = random.Random(sc.seed)
        self.q: list[tuple[float, int, Callable[[], None]]] = []
        self.n = itertools.count()
        self.trace = Trace()
        timing = sc.timing
        self.h = SourceLease(timing, generation=1, session="h1", now=self.hc(0.0))
        self.s = ShadowWatch(timing, generation=1, now=self.sc_(0.0))
        self.h_dead = False
        self.primary = "running"  # running | stopped | dead
        self.s_running = False
        self.fencer_deadline: float | None = None  # H clock
        self.fencer_gen = 0
        self.h_timer_gen = 0
        self.s_timer_gen = 0
        # broker's view of the shadow's connection
        self.s_conn_no = 1
        self.b_conn: str | None = "s1"  # broker: connected shadow conn
        self.s_client_conn: str | None = None  # shadow client's view
        self.s_last_packet = 0.0
        self.lwt_sent: set[str] = set()
        self.s_status: tuple[str, bool] = ("s1", True)  # retained hb/shadow
        self.h_broker_up = True
        self.s_noticing = False

    # -- clocks ----------------------------------------------------------------------
    def hc(self, t: float) -> float:
        return 100.0 + t * self.sc.rate_h

    def sc_(self, t: float) -> float:
        return 5000.0 + t * self.sc.rate_s

    def h_real(self, hc: float) -> float:
        return (hc - 100.0) / self.sc.rate_h

    def s_real(self, sc: float) -> float:
        return (sc - 5000.0) / self.sc.rate_s

    # -- queue -----------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None]) -> None:
        if t <= self.sc.duration:
            heapq.heappush(self.q, (max(t, self.t), next(self.n), fn))

    def delay(self) -> float:
        return self.rng.uniform(0.0, self.sc.max_delay)

    def lost(self) -> bool:
        return self.rng.random() < self.sc.loss

    # -- paths -----------------------------------------------------------------------
    def link_up(self, t: float) -> bool:
        return not _in(self.sc.link_cut, t)

    def hb_up(self, t: float) -> bool:
        return not _in(self.sc.hbroker_cut, t)

    def sb_up(self, t: float) -> bool:
        return not _in(self.sc.sbroker_cut, t)

    def via_link(self, deliver: Callable[[], None]) -> None:
        if not self.link_up(self.t) or self.lost():
            return
        t1 = self.t + self.delay()

        def arrive() -> None:
            if self.link_up(self.t):
                deliver()
        self.at(t1, arrive)

    def h_to_broker(self, fn: Callable[[], None]) -> None:
        if not self.hb_up(self.t) or self.lost():
            return
        t1 = self.t + self.delay()
        self.at(t1, lambda: fn() if self.hb_up(self.t) else None)

    def broker_to_h(self, fn: Callable[[], None]) -> None:
        if not self.hb_up(self.t) or self.lost():
            return
        t1 = self.t + self.delay()
        self.at(t1, lambda: fn() if self.hb_up(self.t) else None)

    def s_to_broker(self, conn: str, fn: Callable[[], None]) -> None:
        if not self.sb_up(self.t) or self.lost():
            return
        t1 = self.t + self.delay()

        def arrive() -> None:
            if self.sb_up(self.t) and self.b_conn == conn:
                self.s_last_packet = self.t
                fn()
        self.at(t1, arrive)

    def broker_to_s(self, fn: Callable[[str], None]) -> None:
        conn = self.b_conn
        if conn is None or not self.sb_up(self.t) or self.lost():
            return
        t1 = self.t + self.delay()

        def arrive() -> None:
            if self.sb_up(self.t) and self.s_client_conn == conn:
                fn(conn)
        self.at(t1, arrive)

    # -- the source side ---------------------------------------------------------------
    def h_frozen_until(self, t: float) -> float | None:
        for a, b in self.sc.h_freeze:
            if a <= t < b:
                return b
        return None

    def to_h(self, make: Callable[[float], Event]) -> None:
        if self.h_dead:
            return
        until = self.h_frozen_until(self.t)
        if until is not None:
            self.at(until, lambda: self.to_h(make))
            return
        self.h_handle(make(self.hc(self.t)))

    def h_handle(self, ev: Event) -> None:
        for action in self.h.handle(ev):
            self.h_do(action)
        self.h_schedule()
        self.check()

    def h_schedule(self) -> None:
        self.h_timer_gen += 1
        gen = self.h_timer_gen
        wake = self.h.next_wakeup()
        if math.isinf(wake):
            return

        def fire() -> None:
            if gen == self.h_timer_gen:
                self.to_h(lambda now: Tick(now=now))
        self.at(max(self.h_real(wake), self.t + 1e-4), fire)

    def h_do(self, a: Action) -> None:
        if isinstance(a, SendRenewal):
            seq, gen, named = a.seq, a.generation, a.named
            self.via_link(lambda: self.to_s(lambda now: RenewalReceived(
                now=now, path=PathKind.LINK, seq=seq, generation=gen, session="h1",
                named_any=named is not None)))

            def at_broker() -> None:
                self.broker_to_s(lambda _c: self.to_s(lambda now: RenewalReceived(
                    now=now, path=PathKind.BROKER, seq=seq, generation=gen, session="h1",
                    named=named, named_any=named is not None)))
            self.h_to_broker(at_broker)
        elif isinstance(a, ArmFencer):
            self.arm(a.deadline)
        elif isinstance(a, FencerSafe):
            self.fencer_deadline = None
            self.fencer_gen += 1
        elif isinstance(a, StopPrimary):
            if self.trace.fenced_at is None:
                self.trace.fenced_at = self.t

            def stopped() -> None:
                if self.primary == "running":
                    self.primary = "stopped"
                if self.primary == "stopped":
                    self.to_h(lambda now: StopConfirmed(now=now))
                self.check()
            self.at(self.t + self.sc.stop_latency, stopped)
        elif isinstance(a, ResumePrimary):
            if self.primary == "stopped":
                self.primary = "running"
        elif isinstance(a, KillPrimary):
            self.kill_primary(self.t + 0.001)
        elif isinstance(a, AnnounceRelease):
            gen = a.generation
            self.via_link(lambda: self.to_s(lambda now: ReleaseReceived(
                now=now, path=PathKind.LINK, generation=gen, session="h1")))

            def at_broker() -> None:
                self.broker_to_s(lambda _c: self.to_s(lambda now: ReleaseReceived(
                    now=now, path=PathKind.BROKER, generation=gen, session="h1")))
            self.h_to_broker(at_broker)

    def arm(self, deadline: float) -> None:
        self.fencer_deadline = deadline
        self.fencer_gen += 1
        gen = self.fencer_gen
        self.at(self.h_real(deadline) + self.sc.timing.fence_latency_ms / 1000,
                lambda: self.kill_primary(self.t) if gen == self.fencer_gen else None)

    def kill_primary(self, t: float) -> None:
        def die() -> None:
            if self.primary != "dead":
                self.primary = "dead"
                self.trace.primary_dead_at = self.t
                self.at(self.t + 0.003, lambda: self.to_h(
                    lambda now: PrimaryExited(now=now)))
        self.at(t, die)

    def h_die(self) -> None:
        self.h_dead = True
        if self.fencer_deadline is not None:  # EOF on the fencer's pipe while armed
            self.kill_primary(self.t + self.sc.timing.fence_latency_ms / 1000)

    # -- the shadow side ---------------------------------------------------------------
    def to_s(self, make: Callable[[float], Event]) -> None:
        ev = make(self.sc_(self.t))
        for action in self.s.handle(ev):
            self.s_do(action)
        self.s_schedule()
        self.check()

    def s_schedule(self) -> None:
        self.s_timer_gen += 1
        gen = self.s_timer_gen
        wake = self.s.next_wakeup()
        if math.isinf(wake) or self.s_real(wake) <= self.t:
            return  # the periodic heartbeat ticks
        self.at(self.s_real(wake), lambda: self.to_s(lambda now: Tick(now=now))
                if gen == self.s_timer_gen else None)

    def s_do(self, a: Action) -> None:
        if isinstance(a, SendAck):
            seq, gen = a.seq, a.generation
            ack = lambda now: AckReceived(now=now, seq=seq, generation=gen,  # noqa: E731
                                          path=a.path, session="h1")
            if a.path is PathKind.LINK:
                self.via_link(lambda: self.to_h(ack))
            elif self.s_client_conn is not None:
                self.s_to_broker(self.s_client_conn,
                                 lambda: self.broker_to_h(lambda: self.to_h(ack)))
        elif isinstance(a, Promote):
            self.s_running = True
            if self.trace.promoted_at is None:
                self.trace.promoted_at = self.t
            self.at(self.t, lambda: self.to_s(lambda now: PromotionFinished(now=now, ok=True)))

    def s_heartbeat(self) -> None:
        conn = self.s_client_conn
        if conn is not None:
            sent = self.sc_(self.t)
            gen = self.s.generation

            def at_broker() -> None:
                self.s_status = (conn, True)
                self.broker_to_s(lambda c: self.to_s(lambda now: EchoReceived(
                    now=now, conn=c, sent_at=sent)))
                self.broker_to_h(lambda: self.to_h(lambda now: ShadowOnline(
                    now=now, conn=conn, generation=gen)))
            self.s_to_broker(conn, at_broker)
        self.at(self.t + self.sc.timing.heartbeat / self.sc.rate_s, self.s_heartbeat)
        self.to_s(lambda now: Tick(now=now))

    def s_connect(self) -> None:
        """The shadow's client (re)connects: takeover publishes the old will first."""
        old = self.b_conn
        if old is not None:
            self.publish_will(old)
        conn = f"s{self.s_conn_no}"
        self.s_conn_no += 1
        self.b_conn = conn
        self.s_client_conn = conn
        self.s_last_packet = self.t
        self.s_status = (conn, True)
        self.to_s(lambda now: BrokerConnected(now=now, conn=conn))
        self.broker_to_h(lambda: self.to_h(lambda now: ShadowOnline(now=now, conn=conn)))

    def publish_will(self, conn: str) -> None:
        if conn in self.lwt_sent:
            return
        self.lwt_sent.add(conn)
        if self.b_conn == conn:
            self.b_conn = None
        self.s_status = (conn, False)
        self.broker_to_h(lambda: self.to_h(lambda now: ShadowOffline(now=now, conn=conn)))

    def s_watch_broker(self) -> None:
        """Every 50 ms: keepalive expiry at the broker, the client noticing, reconnects."""
        t = self.t
        conn = self.b_conn
        dead_min = self.sc.timing.broker_dead_min_ms / 1000
        if conn is not None and t - self.s_last_packet > dead_min + self.sc.lwt_extra:
            self.publish_will(conn)
        if not self.sb_up(t):
            if self.s_client_conn is not None and not self.s_noticing:
                self.s_noticing = True
                cut_conn = self.s_client_conn

                def notice() -> None:
                    self.s_noticing = False
                    if self.s_client_conn == cut_conn and not self.sb_up(self.t):
                        self.s_client_conn = None
                        self.to_s(lambda now: BrokerDisconnected(now=now))
                self.at(t + self.sc.notice_delay, notice)
        elif self.s_client_conn is None:
            self.at(t + self.sc.reconnect_delay,
                    lambda: self.s_connect() if self.s_client_conn is None
                    and self.sb_up(self.t) else None)
        elif self.b_conn != self.s_client_conn:
            # the broker dropped us while the client did not notice: it notices now
            self.s_client_conn = None
            self.to_s(lambda now: BrokerDisconnected(now=now))
        if self.hb_up(t) and not self.h_broker_up:
            status = self.s_status  # retained hb/shadow on the source's reconnect
            if status[1]:
                self.broker_to_h(lambda: self.to_h(lambda now: ShadowOnline(
                    now=now, conn=status[0])))
            else:
                self.broker_to_h(lambda: self.to_h(lambda now: ShadowOffline(
                    now=now, conn=status[0])))
        self.h_broker_up = self.hb_up(t)
        self.at(t + 0.05, self.s_watch_broker)

    # -- invariant ---------------------------------------------------------------------
    def check(self) -> None:
        if self.s_running and self.primary == "running":
            self.trace.overlap.append(self.t)
        awake = not self.h_dead and self.h_frozen_until(self.t) is None
        if self.s_running and awake and self.h.may_run() and self.primary != "dead":
            self.trace.belief_overlap.append(self.t)

    # -- run ---------------------------------------------------------------------------
    def run(self) -> Trace:
        sc = self.sc
        self.s_client_conn = "s1"
        self.s_conn_no = 2
        self.to_s(lambda now: BrokerConnected(now=now, conn="s1"))
        self.at(0.0, self.s_heartbeat)
        self.at(0.0, lambda: self.to_h(lambda now: Tick(now=now)))
        self.at(0.01, lambda: self.broker_to_h(lambda: self.to_h(
            lambda now: ShadowOnline(now=now, conn="s1"))))
        self.at(0.05, self.s_watch_broker)
        if sc.h_death is not None:
            self.at(sc.h_death, self.h_die)
        if sc.qemu_crash is not None:
            self.at(sc.qemu_crash, lambda: self.kill_primary(self.t))
        for _a, b in sc.h_freeze:
            self.at(b, lambda: self.to_h(lambda now: Tick(now=now)))
        while self.q:
            t, _, fn = heapq.heappop(self.q)
            self.t = t
            fn()
            self.check()
        self.trace.source_states = list(self.h.history)
        self.trace.shadow_states = list(self.s.history)
        return self.trace


def run(sc: Scenario) -> Trace:
    """Run one scenario."""
    return Sim(sc).run()
