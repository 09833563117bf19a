"""The primary's lease and the shadow's failover decision, as sans-I/O state machines.

Two machines, one per side, fed events (``handle(event)``) that carry the local monotonic
time and returning actions for the asyncio shell to carry out. Neither imports asyncio or
sockets; both are property-tested on a fake clock (tests/cluster/test_lease_props.py).
The timing argument is in docs/failover.md; in short:

- **Renewals** (:class:`SourceLease`): every ``heartbeat`` the source agent sends a
  renewal (sequence number, generation, the shadow's broker connection it *names*) on both
  paths: MQTT ``hb/source`` and a HEARTBEAT frame on the replication link. Renewals are
  the heartbeats.
- **Acks**: the shadow acknowledges each renewal it receives, on the path it came by. An
  ack of renewal ``n`` proves the shadow received it at some time ``r_n >= s_n`` (its send
  time), and the shadow promises never to promote before ``r + lease`` for the latest
  renewal ``r`` it received. So the primary's lease ends at ``s_n + lease`` for the
  newest acknowledged ``n``: it holds no matter which messages are lost or late.
- **Self-fencing**: at ``lease_end - soft_margin`` the source agent stops the primary
  (QMP ``stop``); at ``lease_end - hard_margin`` a separate fencer process SIGKILLs it
  unless the stop was confirmed (or the agent died: then at once).
- **Promotion** (:class:`ShadowWatch`) needs all of: the latest renewal names the
  shadow's current broker connection (P1), nothing heard from the primary's side on
  either path for ``lease`` (P2) and no heartbeat for ``detect`` (P3), and the shadow's
  own broker connection proven alive within ``fresh`` by the echo of its own heartbeat
  (P4). Or a **release** from the holder (the primary is dead or killed): promote at once.
  A promotion bumps the generation (the fencing token); anything of an older generation
  is refused.
- **Unprotected mode**: when the broker reports (last will, or the shadow's own offline
  status) that the shadow's named connection died before the lease end, so that the
  shadow cannot have promoted on it, the primary
  stops naming it and runs without a lease; a shadow whose connection is not named
  cannot promote (P1), so a dead shadow does not take its primary down.
- **Planned switchover**: the source agent stops the primary at an epoch boundary
  (:class:`HandoverStarted`: FENCED for good, renewals go on so the shadow does not time
  out), ships the final epoch and, once the shadow committed it, releases the lease
  (:class:`HandoverCommitted`): the shadow promotes at once. If the shadow does not
  commit, :class:`HandoverAborted` returns to the ordinary fenced rules.
- **Release / handover**: when the primary QEMU exits (or stayed fenced for
  ``reacquire`` without getting its lease back, after which the agent kills it) the
  source agent releases the lease: the shadow may promote at once.

Link encoding: a HEARTBEAT frame's ``seq`` carries the renewal number plus
:data:`RELEASE_FLAG` (the lease is released; with :data:`HANDOVER_FLAG` for a planned
switchover) or :data:`UNNAMED_FLAG` (no shadow named).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from qmpshadow.errors import ConfigError

__all__ = [
    "HANDOVER_FLAG",
    "RELEASE_FLAG",
    "SEQ_MASK",
    "SHADOW_ACCEPTS",
    "SHADOW_TRANSITIONS",
    "SOURCE_ACCEPTS",
    "SOURCE_TRANSITIONS",
    "AckReceived",
    "Action",
    "AnnounceRelease",
    "ArmFencer",
    "BrokerConnected",
    "BrokerDisconnected",
    "ClusterTiming",
    "EchoReceived",
    "EndProtection",
    "Event",
    "FencerLost",
    "FencerSafe",
    "GenerationSeen",
    "HandoverAborted",
    "HandoverCommitted",
    "HandoverStarted",
    "Heard",
    "KillPrimary",
    "ManualPromote",
    "PathKind",
    "PrimaryExited",
    "Promote",
    "PromotionFinished",
    "ProtectionEnded",
    "Refused",
    "ReleaseReceived",
    "RenewalReceived",
    "ResumePrimary",
    "SendAck",
    "SendRenewal",
    "ShadowOffline",
    "ShadowOnline",
    "ShadowState",
    "ShadowWatch",
    "SourceLease",
    "SourceState",
    "StopConfirmed",
    "StopPrimary",
    "Tick",
    "Transition",
    "link_handover",
    "link_seq",
    "parse_link_seq",
]

#: HEARTBEAT ``seq`` bit: the holder released the lease (its primary is dead or killed).
RELEASE_FLAG: Final = 1 << 63
#: HEARTBEAT ``seq`` bit: this renewal names no shadow (the primary runs unprotected).
UNNAMED_FLAG: Final = 1 << 62
#: HEARTBEAT ``seq`` bit, with RELEASE_FLAG: the release is a planned switchover.
HANDOVER_FLAG: Final = 1 << 61
#: The renewal number's bits in a HEARTBEAT ``seq``.
SEQ_MASK: Final = HANDOVER_FLAG - 1

_NEVER = -math.inf
_MAX_DEAD_CONNS = 64


def link_seq(seq: int, *, release: bool = False, named: bool = True,
             handover: bool = False) -> int:
    """The HEARTBEAT ``seq`` of renewal ``seq`` (flags: released, names no shadow).

    Raises:
        ConfigError: ``seq`` does not fit in :data:`SEQ_MASK`.
    """
    if not 0 < seq <= SEQ_MASK:
        raise ConfigError(f"renewal number must be in [1, {SEQ_MASK}], got {seq}")
    return (seq | (RELEASE_FLAG if release else 0) | (0 if named else UNNAMED_FLAG)
            | (HANDOVER_FLAG if handover and release else 0))


def link_handover(value: int) -> bool:
    """True when a released HEARTBEAT ``seq`` says the release is a planned switchover."""
    return bool(value & RELEASE_FLAG and value & HANDOVER_FLAG)


def parse_link_seq(value: int) -> tuple[int, bool, bool]:
    """``(seq, release, named)`` from a HEARTBEAT ``seq`` (see :func:`link_seq`)."""
    return value & SEQ_MASK, bool(value & RELEASE_FLAG), not value & UNNAMED_FLAG


class PathKind(enum.Enum):
    """Which of the two heartbeat paths a message came by."""

    LINK = "link"
    BROKER = "broker"


# ------------------------------------------------------------------------------- timing


@dataclass(frozen=True, slots=True)
class ClusterTiming:
    """Every duration of the protocol, in milliseconds (see docs/failover.md).

    - ``heartbeat_ms``: renewal (= heartbeat) period of the source, heartbeat of the shadow.
    - ``lease_ms``: lease length, from the *send* time of the newest acknowledged renewal
      (source) / the *receipt* of the newest message from the source's side (shadow).
    - ``soft_margin_ms``: the source agent stops the primary this long before the lease
      ends; ``hard_margin_ms``: the fencer process kills it this long before, unless the
      stop was confirmed.
    - ``detect_ms``: the shadow promotes only after no heartbeat came on either path for
      this long (and the lease expired).
    - ``fresh_ms``: the shadow trusts its broker connection only while the echo of one of
      its own heartbeats, sent at most this long ago, came back.
    - ``keepalive_s``: MQTT keepalive; mosquitto declares a client dead (and publishes its
      last will) only after more than ``keepalive_s * 3 // 2`` whole seconds of silence.
    - ``reacquire_ms``: how long a fenced primary waits to get its lease back before the
      agent kills it and releases the lease (handover).
    - ``drift_ppm``: bound on the rate difference of the hosts' monotonic clocks;
      ``fence_latency_ms``: bound on fencer wake-up plus SIGKILL taking effect.

    Raises:
        ConfigError: a value is out of range or the safety constraints do not hold
            (the message names the constraint and the values).
    """

    heartbeat_ms: int = 100
    lease_ms: int = 4000
    soft_margin_ms: int = 400
    hard_margin_ms: int = 150
    detect_ms: int = 500
    fresh_ms: int = 300
    keepalive_s: int = 1
    reacquire_ms: int = 4000
    drift_ppm: int = 1000
    fence_latency_ms: int = 50

    def __post_init__(self) -> None:
        for name in ("heartbeat_ms", "lease_ms", "soft_margin_ms", "hard_margin_ms",
                     "detect_ms", "fresh_ms", "keepalive_s", "reacquire_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.drift_ppm <= 100_000 or self.fence_latency_ms < 0:
            raise ConfigError(f"drift_ppm must be in [0, 100000] and fence_latency_ms >= 0, "
                              f"got {self.drift_ppm} and {self.fence_latency_ms}")
        problems = self.violations()
        if problems:
            raise ConfigError("cluster timing is not safe: " + "; ".join(problems)
                              + " (see docs/failover.md, 'Timing argument')")

    @property
    def rho(self) -> float:
        """Clock rate bound as a fraction."""
        return self.drift_ppm / 1e6

    @property
    def broker_dead_min_ms(self) -> int:
        """Least silence after which mosquitto may publish a client's last will."""
        return 1000 * (self.keepalive_s * 3 // 2)

    def violations(self) -> list[str]:
        """The safety constraints that do not hold (empty: the timing is safe)."""
        out = []
        rho = self.rho
        if self.heartbeat_ms < 10:
            out.append(f"heartbeat_ms {self.heartbeat_ms} < 10")
        if self.lease_ms < 4 * self.heartbeat_ms:
            out.append(f"lease_ms {self.lease_ms} < 4 x heartbeat_ms {self.heartbeat_ms}")
        need_hard = 2 * rho * self.lease_ms + self.fence_latency_ms
        if self.hard_margin_ms < need_hard:
            out.append(f"hard_margin_ms {self.hard_margin_ms} < 2 x drift x lease + "
                       f"fence_latency = {need_hard:.1f}")
        if self.soft_margin_ms < self.hard_margin_ms + 50:
            out.append(f"soft_margin_ms {self.soft_margin_ms} < hard_margin_ms "
                       f"{self.hard_margin_ms} + 50 (time for a QMP stop)")
        if self.soft_margin_ms + 2 * self.heartbeat_ms > self.lease_ms:
            out.append(f"soft_margin_ms {self.soft_margin_ms} + 2 x heartbeat_ms > lease_ms "
                       f"{self.lease_ms}")
        if self.detect_ms < 2 * self.heartbeat_ms:
            out.append(f"detect_ms {self.detect_ms} < 2 x heartbeat_ms {self.heartbeat_ms}")
        if self.fresh_ms < 2 * self.heartbeat_ms:
            out.append(f"fresh_ms {self.fresh_ms} < 2 x heartbeat_ms {self.heartbeat_ms}")
        if self.fresh_ms * (1 + rho) >= self.broker_dead_min_ms * (1 - rho):
            out.append(f"fresh_ms {self.fresh_ms} must be below the broker's least "
                       f"dead-client time {self.broker_dead_min_ms} ms (keepalive_s "
                       f"{self.keepalive_s})")
        return out

    @property
    def broker_report_max_ms(self) -> int:
        """What mosquitto 2.0.11 took at most here to publish the last will of a client
        cut off the network (12 cuts, keepalive 1 s: 2.35-3.37 s), scaled: whole seconds
        past ``keepalive_s * 3 // 2``, its one-second check loop, and 0.5 s to spare."""
        return 1000 * (self.keepalive_s * 3 // 2 + 2) + 500

    def availability_notes(self) -> list[str]:
        """Settings that are safe but cost availability: with a lease shorter than the
        broker's report of a dead shadow host, a shadow host that dies
        makes its primary stay fenced (stopped) until a shadow or an operator comes."""
        notes = []
        lease_ok_ms = self.lease_ms - self.heartbeat_ms
        if lease_ok_ms < self.broker_report_max_ms:
            notes.append(f"lease_ms {self.lease_ms} is too short for the broker to report a "
                         f"dead shadow host in time (up to ~{self.broker_report_max_ms} ms "
                         "with this keepalive): the primary may then stay stopped although "
                         "no shadow can take over; use a longer lease")
        return notes

    # seconds, for the machines
    @property
    def heartbeat(self) -> float:
        return self.heartbeat_ms / 1000

    @property
    def lease(self) -> float:
        return self.lease_ms / 1000

    @property
    def soft_margin(self) -> float:
        return self.soft_margin_ms / 1000

    @property
    def hard_margin(self) -> float:
        return self.hard_margin_ms / 1000

    @property
    def detect(self) -> float:
        return self.detect_ms / 1000

    @property
    def fresh(self) -> float:
        return self.fresh_ms / 1000

    @property
    def reacquire(self) -> float:
        return self.reacquire_ms / 1000


# ------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every input; ``now`` is the local monotonic time in seconds."""

    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick(Event):
    """Time passed (call at ``next_wakeup()`` at the latest)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationSeen(Event):
    """Some message (retained lease, state, peer heartbeat, link HELLO) carried
    ``generation``; ``what`` says which, for messages."""

    generation: int
    what: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AckReceived(Event):
    """The shadow acknowledged renewal ``seq`` of ``session`` (source side)."""

    seq: int
    generation: int
    path: PathKind
    session: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowOnline(Event):
    """The shadow is on the broker with connection ``conn`` (source side)."""

    conn: str
    generation: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowOffline(Event):
    """The shadow's connection ``conn`` is gone: its last will, or its own ``online:
    false`` on a clean close. ``generation`` is the one the message carries (a will's is
    from when the shadow connected; a clean close's is current: newer than ours after
    a promotion)."""

    conn: str
    generation: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StopConfirmed(Event):
    """The primary is stopped (QMP ``stop`` answered and the run state is paused)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PrimaryExited(Event):
    """The primary QEMU process is gone (its pidfd became readable)."""

    reason: str = "the primary QEMU exited"


@dataclass(frozen=True, slots=True, kw_only=True)
class FencerLost(Event):
    """The fencer process died or stopped reading: nothing guards the primary anymore."""

    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndProtection(Event):
    """Clean end of protection: stop naming the shadow, leave once it acknowledged."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverStarted(Event):
    """Planned switchover: the primary was stopped at its final epoch (source side).

    From here the primary never resumes unless :class:`HandoverAborted` comes first; the
    machine goes FENCED (renewals go on, so the shadow does not time out)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverAborted(Event):
    """The switchover failed before the release (the shadow did not commit the final
    epoch): back to the ordinary fenced rules (resume on a fresh ack, else hand over)."""

    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverCommitted(Event):
    """The shadow committed the final epoch: release the lease to it (switchover)."""

    reason: str = "planned switchover"


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewalReceived(Event):
    """A renewal of the holder (shadow side). ``named`` is the broker connection it names
    (broker path); on the link only ``named_any`` (it names some shadow) is known."""

    path: PathKind
    seq: int
    generation: int
    session: str
    named: str | None = None
    named_any: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseReceived(Event):
    """The holder released the lease of ``generation`` (its primary is gone)."""

    path: PathKind
    generation: int
    session: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heard(Event):
    """Something else came from the holder's side (an epoch frame, its lease message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConnected(Event):
    """The shadow's broker connection ``conn`` is up (subscribed)."""

    conn: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerDisconnected(Event):
    """The shadow's broker connection dropped."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoReceived(Event):
    """The shadow's own heartbeat came back from the broker: it was sent at ``sent_at``
    (this host's monotonic seconds) on connection ``conn``."""

    conn: str
    sent_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PromotionFinished(Event):
    """The promotion the machine asked for succeeded (``ok``) or failed (``detail``)."""

    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ManualPromote(Event):
    """An operator's promote command for ``generation`` (refused when older)."""

    generation: int


# ------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """Base of every output."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition(Action):
    """The machine moved from ``old`` to ``new`` (for logs and the events topic)."""

    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused(Action):
    """A message of an older generation (or unknown session) was refused."""

    what: str
    generation: int
    current: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendRenewal(Action):
    """Send renewal ``seq`` on both paths, naming broker connection ``named`` (or none)."""

    seq: int
    generation: int
    named: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ArmFencer(Action):
    """Tell the fencer to kill the primary at ``deadline`` (monotonic) unless re-armed."""

    deadline: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FencerSafe(Action):
    """The primary needs no guard (stopped, or no shadow can promote): disarm."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StopPrimary(Action):
    """Stop the primary now (QMP ``stop``), then feed :class:`StopConfirmed`."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumePrimary(Action):
    """Resume the stopped primary (QMP ``cont``): its lease is valid again."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KillPrimary(Action):
    """Kill the primary QEMU (handover); feed :class:`PrimaryExited` once it is gone."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnounceRelease(Action):
    """Tell the shadow on both paths that the lease of ``generation`` is released."""

    generation: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectionEnded(Action):
    """The clean end of protection is done (the shadow acknowledged it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SendAck(Action):
    """Acknowledge renewal ``seq`` of ``session`` on ``path`` (shadow side)."""

    seq: int
    session: str
    generation: int
    path: PathKind


@dataclass(frozen=True, slots=True, kw_only=True)
class Promote(Action):
    """Promote now; the new primary holds ``generation`` (the old one plus one)."""

    generation: int
    reason: str
    decided_at: float
    last_heard: float


# ------------------------------------------------------------------------------- source


class SourceState(enum.Enum):
    """Where the primary's side is."""

    #: No shadow connection is named: no shadow can promote, the primary runs freely.
    UNPROTECTED = "unprotected"
    #: A shadow connection is named: the primary runs while its lease is valid.
    PROTECTED = "protected"
    #: The lease lapsed: the primary is being stopped.
    FENCING = "fencing"
    #: The primary is stopped; renewals go on so that an ack can give the lease back. After
    #: ``reacquire`` it is killed and the lease released (handover), unless the named
    #: shadow connection died: then it stays stopped (killing it could destroy the only
    #: copy) until a shadow comes back and acknowledges, or an operator acts. A shadow
    #: connection named while fenced restarts the ``reacquire`` clock.
    FENCED = "fenced"
    #: The primary is gone and the lease released to the shadow. Terminal.
    RELEASED = "released"
    #: A newer generation exists: the primary must stay stopped. Terminal.
    DEPOSED = "deposed"
    #: Protection ended cleanly (the shadow acknowledged). Terminal.
    ENDED = "ended"


#: The one table of the source machine's transitions.
SOURCE_TRANSITIONS: Final[dict[SourceState, frozenset[SourceState]]] = {
    SourceState.UNPROTECTED: frozenset({SourceState.PROTECTED, SourceState.RELEASED,
                                        SourceState.DEPOSED, SourceState.ENDED}),
    SourceState.PROTECTED: frozenset({SourceState.UNPROTECTED, SourceState.FENCING,
                                      SourceState.FENCED, SourceState.RELEASED, SourceState.DEPOSED,
                                      SourceState.ENDED}),
    SourceState.FENCING: frozenset({SourceState.FENCED, SourceState.RELEASED,
                                    SourceState.DEPOSED}),
    SourceState.FENCED: frozenset({SourceState.PROTECTED, SourceState.UNPROTECTED,
                                   SourceState.RELEASED, SourceState.DEPOSED,
                                   SourceState.ENDED}),
    SourceState.RELEASED: frozenset(),
    SourceState.DEPOSED: frozenset(),
    SourceState.ENDED: frozenset(),
}

_LIVE_SOURCE = frozenset({SourceState.UNPROTECTED, SourceState.PROTECTED,
                          SourceState.FENCING, SourceState.FENCED})
_ALL_SOURCE_EVENTS = frozenset({Tick, AckReceived, ShadowOnline, ShadowOffline,
                                GenerationSeen, StopConfirmed, PrimaryExited, FencerLost,
                                EndProtection, HandoverStarted, HandoverAborted,
                                HandoverCommitted})
#: Which events each state reacts to (others are ignored).
SOURCE_ACCEPTS: Final[dict[SourceState, frozenset[type[Event]]]] = {
    **{s: _ALL_SOURCE_EVENTS for s in _LIVE_SOURCE},
    SourceState.RELEASED: frozenset(),
    SourceState.DEPOSED: frozenset({StopConfirmed, PrimaryExited}),
    SourceState.ENDED: frozenset(),
}


class SourceLease:
    """The primary side's lease (see the module docstring).

    ``generation`` is the fencing token this primary holds; ``session`` identifies this
    agent run (acks of other sessions are ignored). Starts UNPROTECTED; names the shadow
    (and becomes PROTECTED) once the shadow is seen on the broker.
    """

    def __init__(self, timing: ClusterTiming, *, generation: int, session: str,
                 now: float) -> None:
        self.timing = timing
        self.generation = generation
        self.session = session
        self.state = SourceState.UNPROTECTED
        self.seq = 0
        self.sent: OrderedDict[int, float] = OrderedDict()
        self.named: str | None = None
        self.lease_end = _NEVER
        self.next_renewal = now
        self.dead_conns: OrderedDict[str, None] = OrderedDict()
        self.fence_started: float | None = None
        self.resume_unprotected = False
        self.ending = False
        self.unnamed_from = 0
        self.primary_running = True
        self.fencer_ok = True
        #: A planned switchover holds the primary stopped at its final epoch.
        self.handover = False
        self.history: list[SourceState] = [self.state]

    # -- queries -----------------------------------------------------------------------

    def may_run(self) -> bool:
        """True while the primary is allowed to run."""
        return self.state in (SourceState.UNPROTECTED, SourceState.PROTECTED)

    @property
    def soft_deadline(self) -> float:
        """When the agent stops the primary unless renewed (PROTECTED)."""
        return self.lease_end - self.timing.soft_margin

    @property
    def hard_deadline(self) -> float:
        """When the fencer kills the primary unless re-armed or disarmed."""
        return self.lease_end - self.timing.hard_margin

    def next_wakeup(self) -> float:
        """The latest time at which :class:`Tick` must be fed."""
        if self.state not in _LIVE_SOURCE:
            return math.inf
        t = self.next_renewal
        if self.state is SourceState.PROTECTED:
            t = min(t, self.soft_deadline)
        if (self.state is SourceState.FENCED and self.fence_started is not None
                and self.named is not None):
            t = min(t, self.fence_started + self.timing.reacquire)
        return t

    # -- driving -----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns the actions to carry out, in order."""
        if type(event) not in SOURCE_ACCEPTS[self.state]:
            return []
        out: list[Action] = []
        if isinstance(event, Tick):
            self._tick(event.now, out)
        elif isinstance(event, AckReceived):
            self._ack(event, out)
        elif isinstance(event, ShadowOnline):
            self._online(event, out)
        elif isinstance(event, ShadowOffline):
            self._offline(event, out)
        elif isinstance(event, GenerationSeen):
            self._generation(event, out)
        elif isinstance(event, StopConfirmed):
            self._stopped(event, out)
        elif isinstance(event, PrimaryExited):
            self.primary_running = False
            if self.state is SourceState.DEPOSED:
                return out  # never release a lease that is not ours anymore
            self._goto(SourceState.RELEASED, event.reason, out)
            out.append(AnnounceRelease(generation=self.generation, reason=event.reason))
            out.append(FencerSafe())
        elif isinstance(event, FencerLost):
            self._fencer_lost(event, out)
        elif isinstance(event, EndProtection):
            if not self.handover:  # a switchover in progress finishes or aborts first
                self._end(event.now, out)
        elif isinstance(event, HandoverStarted):
            self._handover_start(event, out)
        elif isinstance(event, HandoverAborted):
            self._handover_abort(event, out)
        elif isinstance(event, HandoverCommitted):
            self._handover_commit(event, out)
        return out

    def _handover_start(self, ev: HandoverStarted, out: list[Action]) -> None:
        if self.state not in (SourceState.PROTECTED, SourceState.FENCING) or self.ending:
            return  # the shell checks :attr:`handover` and reports the refusal
        self.handover = True
        self.resume_unprotected = False
        self.fence_started = math.inf  # never killed, never re-acquired while handing over
        self._goto(SourceState.FENCED, "planned switchover: the primary is stopped at its "
                                       "final epoch", out)
        out.append(FencerSafe())

    def _handover_commit(self, ev: HandoverCommitted, out: list[Action]) -> None:
        if self.state is not SourceState.FENCED or not self.handover:
            return
        self._goto(SourceState.RELEASED, f"{ev.reason}: the shadow committed the final "
                                         "epoch", out)
        out.append(AnnounceRelease(generation=self.generation, reason=ev.reason))
        out.append(FencerSafe())

    def _handover_abort(self, ev: HandoverAborted, out: list[Action]) -> None:
        if self.state is not SourceState.FENCED or not self.handover:
            return
        self.handover = False
        # ordinary fenced rules from now: a renewal sent from now on that the shadow
        # acknowledges in time gives the lease back (ResumePrimary), else hand over
        self.fence_started = ev.now
        if self.named is None and self.resume_unprotected:
            self.resume_unprotected = False
            self.fence_started = None
            self._goto(SourceState.UNPROTECTED, "switchover aborted and the shadow is gone "
                                                "(broker last will in time): resuming "
                                                "unprotected", out)
            out.append(ResumePrimary(reason="switchover aborted"))

    def _goto(self, new: SourceState, reason: str, out: list[Action]) -> None:
        if new is self.state:
            return
        if new not in SOURCE_TRANSITIONS[self.state]:
            raise AssertionError(f"source lease: {self.state.value} -> {new.value} is not "
                                 "in the transition table")  # a bug in this module
        out.append(Transition(old=self.state.value, new=new.value, reason=reason))
        self.state = new
        self.history.append(new)

    def _renew(self, now: float, out: list[Action]) -> None:
        self.seq += 1
        self.sent[self.seq] = now
        while self.sent and next(iter(self.sent.values())) < now - 2 * self.timing.lease:
            self.sent.popitem(last=False)
        self.next_renewal = now + self.timing.heartbeat
        named = self.named if self.state in (SourceState.PROTECTED, SourceState.FENCING,
                                             SourceState.FENCED) else None
        out.append(SendRenewal(seq=self.seq, generation=self.generation, named=named))

    def _tick(self, now: float, out: list[Action]) -> None:
        t = self.timing
        if self.state is SourceState.PROTECTED and now >= self.soft_deadline:
            self._fence(now, "lease not renewed in time (no ack from the shadow)", out)
        if (self.state is SourceState.FENCED and self.fence_started is not None
                and self.named is not None and now >= self.fence_started + t.reacquire):
            out.append(KillPrimary(reason=f"fenced for {t.reacquire_ms} ms without getting "
                                          "the lease back: handing over to the shadow"))
            self.fence_started = math.inf  # ask once
        if now >= self.next_renewal and self.state in _LIVE_SOURCE:
            self._renew(now, out)

    def _fence(self, now: float, reason: str, out: list[Action]) -> None:
        self.fence_started = now
        self.resume_unprotected = False
        self._goto(SourceState.FENCING, reason, out)
        out.append(StopPrimary(reason=reason))

    def _extend(self, end: float) -> bool:
        if end > self.lease_end:
            self.lease_end = end
            return True
        return False

    def _ack(self, ev: AckReceived, out: list[Action]) -> None:
        if ev.generation > self.generation:
            self._deposed(ev.generation, f"ack from generation {ev.generation}", out)
            return
        if ev.generation < self.generation or (ev.session and ev.session != self.session):
            out.append(Refused(what=f"ack of renewal {ev.seq} ({ev.path.value})",
                               generation=ev.generation, current=self.generation))
            return
        sent = self.sent.get(ev.seq)
        if sent is None:
            return
        if self.ending and ev.seq >= self.unnamed_from and self.state in (
                SourceState.PROTECTED, SourceState.UNPROTECTED, SourceState.FENCED):
            self._goto(SourceState.ENDED, "the shadow acknowledged the end of protection", out)
            out.append(FencerSafe())
            out.append(ProtectionEnded())
            return
        end = sent + self.timing.lease
        if self.state is SourceState.PROTECTED:
            if self._extend(end):
                out.append(ArmFencer(deadline=self.hard_deadline))
        elif (self.state is SourceState.FENCED and self.named is not None and self.fencer_ok
              and not self.handover
              and self.fence_started is not None and sent >= self.fence_started
              and ev.now < end - self.timing.soft_margin and not self.ending):
            # the shadow received a renewal sent after we stopped, and acked it: it had
            # not promoted then, and will not before that receipt + lease
            self.lease_end = end
            self.fence_started = None
            self._goto(SourceState.PROTECTED, "lease re-acquired (the shadow acknowledged a "
                                              "renewal sent after the fence)", out)
            out.append(ArmFencer(deadline=self.hard_deadline))
            out.append(ResumePrimary(reason="lease re-acquired"))

    def _name(self, conn: str, now: float, out: list[Action]) -> None:
        self.named = conn
        self.unnamed_from = 0
        if self.state is SourceState.UNPROTECTED:
            # The shadow cannot promote before it receives a renewal naming conn (sent at
            # >= now) plus a lease: we may run until then without an ack. Arm first.
            self.lease_end = now + self.timing.lease
            out.append(ArmFencer(deadline=self.hard_deadline))
            self._goto(SourceState.PROTECTED, f"shadow connection {conn} named", out)
        elif self.state is SourceState.PROTECTED:
            self._extend(now + self.timing.lease)
            out.append(ArmFencer(deadline=self.hard_deadline))
        elif (self.state is SourceState.FENCED and self.fence_started is not None
              and self.fence_started != math.inf and self.fencer_ok):
            # A shadow that comes back (after a will too late to prove anything) gets a
            # whole reacquire time to acknowledge a renewal naming it; the old clock may be
            # long past, and handing over at once kills a primary its shadow would have
            # given the lease back a few ms later.
            self.fence_started = max(self.fence_started, now)
        self._renew(now, out)

    def _online(self, ev: ShadowOnline, out: list[Action]) -> None:
        if ev.generation > self.generation:
            self._deposed(ev.generation, "shadow heartbeat", out)
            return
        if ev.conn in self.dead_conns or ev.conn == self.named or self.ending:
            return
        if self.named is not None:
            self._bury(self.named)
        if self.state in (SourceState.UNPROTECTED, SourceState.PROTECTED,
                          SourceState.FENCED, SourceState.FENCING):
            self._name(ev.conn, ev.now, out)

    def _bury(self, conn: str) -> None:
        self.dead_conns[conn] = None
        while len(self.dead_conns) > _MAX_DEAD_CONNS:
            self.dead_conns.popitem(last=False)

    def _offline(self, ev: ShadowOffline, out: list[Action]) -> None:
        if ev.generation > self.generation:
            # a promoted shadow saying goodbye: it replaced us
            self._deposed(ev.generation, "the shadow's offline status", out)
            return
        self._bury(ev.conn)
        if ev.conn != self.named:
            return
        self.named = None
        # The shadow cannot promote before lease_end (no renewal for a lease), nor on
        # another connection (not named). So a report received before lease_end proves
        # it never promoted on conn. Not later: a will comes at once when the shadow's
        # process dies (or its offline status when it closes), promoted or not; only a
        # host or network death waits for the broker's keepalive (the grace this once
        # allowed past lease_end assumed that, and a shadow that promoted and exited
        # then "died in time": its old primary resumed next to it).
        proven = ev.now < self.lease_end - 2 * self.timing.rho * self.timing.lease
        if not proven:
            return  # the shadow may have promoted: stay (or become) fenced
        if self.state is SourceState.PROTECTED:
            self._goto(SourceState.UNPROTECTED, f"shadow connection {ev.conn} died (broker "
                                                "last will): running unprotected", out)
            out.append(FencerSafe())
        elif self.state is SourceState.FENCING or self.handover:
            self.resume_unprotected = True  # (after the stop / an aborted switchover)
        elif self.state is SourceState.FENCED and self.fence_started != math.inf:
            self.fence_started = None
            self._goto(SourceState.UNPROTECTED, f"shadow connection {ev.conn} died before it "
                                                "could promote: resuming unprotected", out)
            out.append(FencerSafe())
            out.append(ResumePrimary(reason="the shadow is gone (broker last will in time)"))
        if self.ending and self.state is SourceState.UNPROTECTED:
            self._goto(SourceState.ENDED, "protection ended (the shadow is gone)", out)
            out.append(ProtectionEnded())

    def _generation(self, ev: GenerationSeen, out: list[Action]) -> None:
        if ev.generation > self.generation:
            self._deposed(ev.generation, ev.what, out)

    def _deposed(self, generation: int, what: str, out: list[Action]) -> None:
        was_running = self.state in (SourceState.UNPROTECTED, SourceState.PROTECTED,
                                     SourceState.ENDED)
        stopping = self.state is SourceState.FENCING
        self._goto(SourceState.DEPOSED, f"generation {generation} seen ({what})", out)
        out.append(Refused(what=f"our own lease (generation {self.generation})",
                           generation=self.generation, current=generation))
        if was_running or stopping:
            out.append(StopPrimary(reason=f"deposed by generation {generation}"))
        else:
            out.append(FencerSafe())

    def _stopped(self, ev: StopConfirmed, out: list[Action]) -> None:
        if self.state is SourceState.DEPOSED:
            out.append(FencerSafe())
            return
        if self.state is not SourceState.FENCING:
            return
        self._goto(SourceState.FENCED, "the primary is stopped", out)
        out.append(FencerSafe())
        if self.resume_unprotected:
            self.resume_unprotected = False
            self.fence_started = None
            self._goto(SourceState.UNPROTECTED, "the shadow is gone (broker last will in "
                                                "time): resuming unprotected", out)
            out.append(ResumePrimary(reason="the shadow is gone"))

    def _fencer_lost(self, ev: FencerLost, out: list[Action]) -> None:
        self.fencer_ok = False
        if self.state is SourceState.PROTECTED:
            # nothing would stop the primary if this agent died now: stop it ourselves and
            # hand over at once (no re-acquiring without a fencer)
            self._fence(ev.now, f"the fencer is gone ({ev.reason})", out)
            self.fence_started = ev.now - self.timing.reacquire

    def _end(self, now: float, out: list[Action]) -> None:
        self.ending = True
        if self.state is SourceState.UNPROTECTED:
            self._goto(SourceState.ENDED, "protection ended", out)
            out.append(FencerSafe())
            out.append(ProtectionEnded())
            return
        self.named = None
        self.unnamed_from = self.seq + 1
        self._renew(now, out)


# ------------------------------------------------------------------------------- shadow


class ShadowState(enum.Enum):
    """Where the shadow's side is."""

    #: The latest renewal does not name this shadow's broker connection: it may not
    #: promote on a timeout (a release still promotes).
    WAITING = "waiting"
    #: Named by the holder: watching the lease and both heartbeat paths.
    ARMED = "armed"
    #: A promotion was decided and is running.
    PROMOTING = "promoting"
    #: Promoted: this side holds the new generation. Terminal.
    PROMOTED = "promoted"


SHADOW_TRANSITIONS: Final[dict[ShadowState, frozenset[ShadowState]]] = {
    ShadowState.WAITING: frozenset({ShadowState.ARMED, ShadowState.PROMOTING}),
    ShadowState.ARMED: frozenset({ShadowState.WAITING, ShadowState.PROMOTING}),
    ShadowState.PROMOTING: frozenset({ShadowState.PROMOTED, ShadowState.WAITING,
                                      ShadowState.ARMED}),
    ShadowState.PROMOTED: frozenset(),
}

_WATCHING = frozenset({ShadowState.WAITING, ShadowState.ARMED})
_ALL_SHADOW_EVENTS = frozenset({Tick, RenewalReceived, ReleaseReceived, Heard,
                                BrokerConnected, BrokerDisconnected, EchoReceived,
                                GenerationSeen, ManualPromote})
SHADOW_ACCEPTS: Final[dict[ShadowState, frozenset[type[Event]]]] = {
    ShadowState.WAITING: _ALL_SHADOW_EVENTS,
    ShadowState.ARMED: _ALL_SHADOW_EVENTS,
    ShadowState.PROMOTING: frozenset({PromotionFinished, Heard, BrokerConnected,
                                      BrokerDisconnected, EchoReceived}),
    ShadowState.PROMOTED: frozenset(),
}


class ShadowWatch:
    """The shadow side's failover decision (see the module docstring).

    ``generation`` is the newest generation this shadow knows (it adopts a newer holder's
    and refuses older ones).
    """

    def __init__(self, timing: ClusterTiming, *, generation: int, now: float) -> None:
        self.timing = timing
        self.generation = generation
        self.state = ShadowState.WAITING
        self.session = ""
        self.conn: str | None = None
        self.echo_at = _NEVER
        self.last_heard = _NEVER
        self.last_hb = _NEVER
        self.named_seq = 0
        self.unnamed_seq = 0
        self.started = now
        self.promote_reason = ""
        self.released = False
        self.history: list[ShadowState] = [self.state]

    def fresh(self, now: float) -> bool:
        """True while the broker connection is proven alive by a recent echo (P4)."""
        return self.conn is not None and now - self.echo_at < self.timing.fresh

    def named(self) -> bool:
        """P1: the newest renewal names this shadow's current broker connection."""
        return self.conn is not None and self.named_seq > self.unnamed_seq

    def expires_at(self) -> float:
        """When P2 and P3 both hold (absent news)."""
        t = self.timing
        return max(self.last_heard + t.lease, self.last_hb + t.detect)

    def next_wakeup(self) -> float:
        """The latest time at which :class:`Tick` must be fed."""
        if self.state is not ShadowState.ARMED:
            return math.inf
        return self.expires_at()

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns the actions to carry out, in order."""
        if type(event) not in SHADOW_ACCEPTS[self.state]:
            return []
        out: list[Action] = []
        if isinstance(event, Tick):
            self._tick(event.now, out)
        elif isinstance(event, RenewalReceived):
            self._renewal(event, out)
        elif isinstance(event, ReleaseReceived):
            self._release(event, out)
        elif isinstance(event, Heard):
            self.last_heard = max(self.last_heard, event.now)
            self.last_hb = max(self.last_hb, event.now)
        elif isinstance(event, BrokerConnected):
            self.conn = event.conn
            self.echo_at = _NEVER
            self.named_seq = 0  # nothing named this connection yet
            self._rearm(out)
        elif isinstance(event, BrokerDisconnected):
            self.conn = None
            self._rearm(out)
        elif isinstance(event, EchoReceived):
            if event.conn == self.conn:
                self.echo_at = max(self.echo_at, event.sent_at)
        elif isinstance(event, GenerationSeen):
            if self._accept_generation(event.generation, event.what, out):
                self._rearm(out)
        elif isinstance(event, ManualPromote):
            if event.generation < self.generation:
                out.append(Refused(what="promote command", generation=event.generation,
                                   current=self.generation))
            else:
                self._promote(event.now, "operator's promote command", out)
        elif isinstance(event, PromotionFinished):
            if event.ok:
                self.generation += 1
                self._goto(ShadowState.PROMOTED, self.promote_reason, out)
            else:
                # retried on a later tick while the reason still holds
                self._goto(ShadowState.WAITING, f"promotion failed: {event.detail}", out)
                self._rearm(out)
        return out

    def _goto(self, new: ShadowState, reason: str, out: list[Action]) -> None:
        if new is self.state:
            return
        if new not in SHADOW_TRANSITIONS[self.state]:
            raise AssertionError(f"shadow watch: {self.state.value} -> {new.value} is not "
                                 "in the transition table")  # a bug in this module
        out.append(Transition(old=self.state.value, new=new.value, reason=reason))
        self.state = new
        self.history.append(new)

    def _rearm(self, out: list[Action]) -> None:
        if self.state not in _WATCHING:
            return
        if self.named():
            self._goto(ShadowState.ARMED, f"named by the holder on connection {self.conn}",
                       out)
        else:
            self._goto(ShadowState.WAITING, "not named by the holder on the current "
                                            "broker connection", out)

    def _accept_generation(self, generation: int, what: str, out: list[Action]) -> bool:
        if generation < self.generation:
            out.append(Refused(what=what, generation=generation, current=self.generation))
            return False
        if generation > self.generation:
            self.generation = generation
            self.named_seq = self.unnamed_seq = 0
            self.released = False
        return True

    def _renewal(self, ev: RenewalReceived, out: list[Action]) -> None:
        # anything from the holder's side postpones the promotion, even if refused
        self.last_heard = max(self.last_heard, ev.now)
        if not self._accept_generation(ev.generation, f"renewal {ev.seq} ({ev.path.value})",
                                       out):
            return
        self.last_hb = max(self.last_hb, ev.now)
        if ev.session != self.session:
            self.session = ev.session
            self.named_seq = self.unnamed_seq = 0
        if ev.path is PathKind.BROKER:
            if ev.named is not None and ev.named == self.conn:
                self.named_seq = max(self.named_seq, ev.seq)
            else:
                self.unnamed_seq = max(self.unnamed_seq, ev.seq)
        elif not ev.named_any:
            self.unnamed_seq = max(self.unnamed_seq, ev.seq)
        out.append(SendAck(seq=ev.seq, session=ev.session, generation=self.generation,
                           path=ev.path))
        self._rearm(out)

    def _release(self, ev: ReleaseReceived, out: list[Action]) -> None:
        if not self._accept_generation(ev.generation, f"release ({ev.path.value})", out):
            return
        why = ev.reason or "the holder released its lease"
        self.released = True
        self._promote(ev.now, f"lease released by the holder: {why}", out)

    def _tick(self, now: float, out: list[Action]) -> None:
        if self.released and self.state in _WATCHING:
            self._promote(now, self.promote_reason, out)  # retry after a failure
            return
        if self.state is not ShadowState.ARMED:
            return
        if not self.named() or not self.fresh(now):
            return
        if now >= self.last_heard + self.timing.lease and now >= self.last_hb + self.timing.detect:
            self._promote(now, "lease expired and no heartbeat on either path", out)

    def _promote(self, now: float, reason: str, out: list[Action]) -> None:
        self.promote_reason = reason
        self._goto(ShadowState.PROMOTING, reason, out)
        out.append(Promote(generation=self.generation + 1, reason=reason, decided_at=now,
                           last_heard=self.last_heard))
