"""Cluster messages on MQTT: topics and JSON payloads (sans-I/O).

Topic tree (``<cluster>`` and ``<vm>`` are names without ``/``, ``+``, ``#``)::

    qmpshadow/<cluster>/<vm>/hb/source   renewals of the holder (= its heartbeats), and its
                                         retained online/offline status (last will)
    qmpshadow/<cluster>/<vm>/hb/shadow   the shadow's heartbeats and acks, and its retained
                                         online/offline status (last will)
    qmpshadow/<cluster>/<vm>/lease       retained: who holds which generation, and how
                                         (protected, unprotected, fenced, released, ...)
    qmpshadow/<cluster>/<vm>/state       retained: the current primary as its holder sees it
    qmpshadow/<cluster>/<vm>/events      transitions, fencing, promotions with timings

Every payload is one JSON object with ``"v": 1``, ``"kind"``, ``"gen"`` (the generation =
fencing token), ``"time"`` (sender's wall clock, for humans and latency reports) and the
fields of its kind. :func:`decode` refuses anything else with a :class:`MessageError`
that says what was expected and what came; peer data is never trusted with ``assert``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Final, Literal

from qmpshadow.cluster.errors import MessageError
from qmpshadow.errors import ConfigError

__all__ = [
    "MAX_PAYLOAD",
    "SCHEMA",
    "EventDoc",
    "LeaseDoc",
    "Message",
    "Role",
    "ShadowHeartbeat",
    "SourceRenewal",
    "StateDoc",
    "Status",
    "Topics",
    "decode",
    "encode",
]

SCHEMA: Final = 1
MAX_PAYLOAD: Final = 16 << 10
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
Role = Literal["source", "shadow"]
ROLES: Final = ("source", "shadow")
LEASE_MODES: Final = ("protected", "unprotected", "fenced", "released", "deposed", "ended",
                      "promoted")


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree of one VM in one cluster.

    Raises:
        ConfigError: a name is empty, too long or contains characters other than letters,
            digits, ``.``, ``_``, ``-``.
    """

    cluster: str
    vm: str

    def __post_init__(self) -> None:
        for what, name in (("cluster", self.cluster), ("vm", self.vm)):
            if not _NAME_RE.match(name):
                raise ConfigError(f"{what} name for MQTT topics: expected 1-64 letters, digits, "
                                  f"'.', '_' or '-' (starting with a letter or digit), got "
                                  f"{name!r}")

    @property
    def root(self) -> str:
        return f"qmpshadow/{self.cluster}/{self.vm}"

    def hb(self, role: str) -> str:
        return f"{self.root}/hb/{role}"

    @property
    def lease(self) -> str:
        return f"{self.root}/lease"

    @property
    def state(self) -> str:
        return f"{self.root}/state"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def all(self) -> str:
        """Wildcard subscription for the whole tree of this VM."""
        return f"{self.root}/#"

    def suffix(self, topic: str) -> str | None:
        """``hb/source``, ``lease``, ... for a topic of this tree, else None."""
        prefix = self.root + "/"
        return topic[len(prefix):] if topic.startswith(prefix) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Fields every payload has."""

    gen: int
    time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceRenewal(Message):
    """``hb/source``: renewal ``seq`` of ``session``; ``named`` is the shadow's broker
    connection this renewal names (None: the primary runs unprotected)."""

    KIND: ClassVar[str] = "renewal"
    session: str
    seq: int
    named: str | None
    conn: str
    holder: str
    state: str
    epoch: int = 0
    committed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowHeartbeat(Message):
    """``hb/shadow``: the shadow is alive on broker connection ``conn``; ``sent_mono`` is
    its own monotonic send time (only the shadow reads it: echo); ``ack_seq`` /
    ``ack_session`` acknowledge a renewal."""

    KIND: ClassVar[str] = "hb"
    conn: str
    sent_mono: float
    state: str
    epoch: int = 0
    ack_seq: int | None = None
    ack_session: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Message):
    """``hb/<role>`` retained: ``online`` on connect, ``online: false`` as the last will."""

    KIND: ClassVar[str] = "status"
    role: str
    conn: str
    online: bool
    holder: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseDoc(Message):
    """``lease`` retained: ``holder`` (role ``role``) holds generation ``gen`` in ``mode``;
    ``released`` tells the shadow it may promote at once."""

    KIND: ClassVar[str] = "lease"
    holder: str
    role: str
    mode: str
    session: str = ""
    named: str | None = None
    lease_ms: int = 0
    epoch: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StateDoc(Message):
    """``state`` retained: the primary as its holder sees it."""

    KIND: ClassVar[str] = "state"
    primary: str
    role: str
    status: str
    epoch: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class EventDoc(Message):
    """``events``: ``event`` with free-form ``fields`` (JSON values)."""

    KIND: ClassVar[str] = "event"
    event: str
    role: str
    fields: dict[str, Any] = field(default_factory=dict)


_KINDS: dict[str, type[Message]] = {c.KIND: c for c in (
    SourceRenewal, ShadowHeartbeat, Status, LeaseDoc, StateDoc, EventDoc)}


def encode(msg: Message) -> bytes:
    """The JSON payload of ``msg``."""
    body = asdict(msg)
    if isinstance(msg, EventDoc):
        body.update(body.pop("fields"))
    body = {"v": SCHEMA, "kind": getattr(type(msg), "KIND", "?"), **body}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str,
           *, optional: bool = False) -> Any:
    if name not in doc:
        if optional:
            return None
        raise MessageError(f"{what}: expected field {name!r}, got fields {sorted(doc)}")
    value = doc[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind is not bool and bool not in (
            kind if isinstance(kind, tuple) else (kind,)):
        raise MessageError(f"{what}: field {name!r}: expected {kind}, got {value!r}")
    if not isinstance(value, kind):
        raise MessageError(f"{what}: field {name!r}: expected {kind}, got {value!r}")
    return value


def decode(payload: bytes | bytearray, *, where: str = "message") -> Message:
    """Parse one payload.

    Raises:
        MessageError: too large, not a JSON object, unknown schema or kind, a field is
            missing or has the wrong type or range.
    """
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"{where}: {len(payload)} bytes, expected at most {MAX_PAYLOAD}")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{where}: expected a JSON object, got {bytes(payload[:60])!r} "
                           f"({exc})") from None
    if not isinstance(doc, dict):
        raise MessageError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("v") != SCHEMA:
        raise MessageError(f"{where}: expected schema v={SCHEMA}, got {doc.get('v')!r}; "
                           "are both agents the same qmpshadow version?")
    kind = doc.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"{where}: expected kind in {sorted(_KINDS)}, got {kind!r}")
    what = f"{where} ({kind})"
    gen = _field(doc, "gen", int, what)
    when = _field(doc, "time", (int, float), what)
    if gen < 0 or not math.isfinite(when):
        raise MessageError(f"{what}: expected gen >= 0 and a finite time, got {gen}, {when}")
    common: dict[str, Any] = {"gen": gen, "time": float(when)}
    if cls is SourceRenewal:
        seq = _field(doc, "seq", int, what)
        if seq <= 0:
            raise MessageError(f"{what}: expected seq > 0, got {seq}")
        return SourceRenewal(
            **common, session=_field(doc, "session", str, what), seq=seq,
            named=_field(doc, "named", str, what, optional=True),
            conn=_field(doc, "conn", str, what), holder=_field(doc, "holder", str, what),
            state=_field(doc, "state", str, what),
            epoch=_field(doc, "epoch", int, what, optional=True) or 0,
            committed=_field(doc, "committed", int, what, optional=True) or 0)
    if cls is ShadowHeartbeat:
        sent = _field(doc, "sent_mono", (int, float), what)
        ack = _field(doc, "ack_seq", int, what, optional=True)
        return ShadowHeartbeat(
            **common, conn=_field(doc, "conn", str, what), sent_mono=float(sent),
            state=_field(doc, "state", str, what),
            epoch=_field(doc, "epoch", int, what, optional=True) or 0, ack_seq=ack,
            ack_session=_field(doc, "ack_session", str, what, optional=True))
    if cls is Status:
        role = _field(doc, "role", str, what)
        if role not in ROLES:
            raise MessageError(f"{what}: expected role in {ROLES}, got {role!r}")
        return Status(**common, role=role, conn=_field(doc, "conn", str, what),
                      online=_field(doc, "online", bool, what),
                      holder=_field(doc, "holder", str, what, optional=True) or "")
    if cls is LeaseDoc:
        mode = _field(doc, "mode", str, what)
        if mode not in LEASE_MODES:
            raise MessageError(f"{what}: expected mode in {LEASE_MODES}, got {mode!r}")
        return LeaseDoc(
            **common, holder=_field(doc, "holder", str, what),
            role=_field(doc, "role", str, what), mode=mode,
            session=_field(doc, "session", str, what, optional=True) or "",
            named=_field(doc, "named", str, what, optional=True),
            lease_ms=_field(doc, "lease_ms", int, what, optional=True) or 0,
            epoch=_field(doc, "epoch", int, what, optional=True) or 0,
            reason=_field(doc, "reason", str, what, optional=True) or "")
    if cls is StateDoc:
        return StateDoc(**common, primary=_field(doc, "primary", str, what),
                        role=_field(doc, "role", str, what),
                        status=_field(doc, "status", str, what),
                        epoch=_field(doc, "epoch", int, what, optional=True) or 0)
    event = _field(doc, "event", str, what)
    role = _field(doc, "role", str, what)
    rest = {k: v for k, v in doc.items() if k not in ("v", "kind", "gen", "time", "event",
                                                        "role")}
    return EventDoc(**common, event=event, role=role, fields=rest)
