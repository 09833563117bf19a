"""The transport-neutral link interface: :class:`Link`, :class:`Listener` and their states.

Every replication transport (TCP with mutual TLS, plain TCP on loopback, unix sockets, and
later RDMA) gives the layer above the same thing: a bidirectional, ordered, authenticated
stream of *whole, verified* delta frames (see :mod:`qmpshadow.frames.wire`).

- :meth:`Link.send` takes one encoded frame (``bytes`` or the buffer list of
  ``encode_frame_parts`` / ``EpochWriter``) and returns once the link no longer needs the
  caller's buffers; it awaits while the peer is slow (bounded write buffer).
- :meth:`Link.receive` returns the next decoded frame; the link reads from the network only
  while it has no frame to return, so a slow consumer throttles the sender.
- Links end in :attr:`LinkState.CLOSED` (on purpose) or :attr:`LinkState.FAILED` (dropped,
  corrupt, refused); :attr:`Link.error` keeps the reason, and every later call raises it.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from qmpshadow.errors import ConfigError, QmpShadowError
from qmpshadow.frames.limits import DEFAULT_MAX_PAYLOAD, PAYLOAD_LIMIT
from qmpshadow.frames.wire import Buffer, Frame, encode_frame_parts
from qmpshadow.transport.errors import LinkClosedError

__all__ = [
    "Link",
    "LinkOptions",
    "LinkState",
    "LinkStats",
    "Listener",
    "PeerIdentity",
    "SendData",
]

#: What :meth:`Link.send` accepts: one encoded frame, whole or as its buffer list.
SendData = Buffer | Sequence[Buffer]


class LinkState(enum.Enum):
    """Where a link is in its life. A link object exists only once it is established."""

    #: Established and authenticated: frames flow both ways.
    OPEN = "open"
    #: :meth:`Link.close` was called: no new sends; the current one finishes, buffers flush.
    CLOSING = "closing"
    #: Ended on purpose (locally, or by the peer between frames). Terminal.
    CLOSED = "closed"
    #: Ended by an error (dropped, corrupt, integrity): :attr:`Link.error`. Terminal.
    FAILED = "failed"


#: The one table of allowed state transitions.
TRANSITIONS: Final[dict[LinkState, frozenset[LinkState]]] = {
    LinkState.OPEN: frozenset({LinkState.CLOSING, LinkState.CLOSED, LinkState.FAILED}),
    LinkState.CLOSING: frozenset({LinkState.CLOSED, LinkState.FAILED}),
    LinkState.CLOSED: frozenset(),
    LinkState.FAILED: frozenset(),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerIdentity:
    """Who is on the other end, as this side verified it.

    ``name`` is the certificate identity (SAN DNS name, else CN) that matched one of the
    allowed peer names (TLS only); ``uid``/``pid`` come from SO_PEERCRED (unix sockets only).
    ``authenticated`` is False only for plain loopback TCP (``insecure_loopback=True``).
    """

    transport: str
    address: str
    authenticated: bool
    encrypted: bool
    name: str | None = None
    uid: int | None = None
    pid: int | None = None

    def __str__(self) -> str:
        who = self.name or (f"uid {self.uid}" if self.uid is not None else "unauthenticated")
        return f"{who} at {self.transport}:{self.address}"


@dataclass(slots=True)
class LinkStats:
    """Counters of one link (monotonic, never reset)."""

    frames_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    #: Seconds :meth:`Link.send` spent waiting for the peer (backpressure).
    send_blocked_s: float = 0.0
    #: Times reading from the network was paused because nothing consumed the frames.
    read_pauses: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkOptions:
    """Bounds and timeouts shared by every transport.

    - ``max_payload``: largest frame payload accepted from the peer (the decoder refuses a
      larger one from its header alone) and the bound :meth:`Link.send_frame` encodes with.
    - ``write_buffer``: bytes the link may hold for the peer before :meth:`Link.send` awaits
      (resumes below a quarter of it).
    - ``read_buffer``: bytes received but not yet consumed before the link stops reading
      (the peer's sends then block). A frame being assembled may exceed it (up to
      ``max_payload``).
    - ``socket_buffer``: SO_SNDBUF/SO_RCVBUF in bytes; None keeps the kernel's autotuning.
    - ``connect_timeout``, ``handshake_timeout`` (TLS handshake plus link preamble),
      ``close_timeout`` (graceful close before the connection is aborted), in seconds.
    """

    max_payload: int = DEFAULT_MAX_PAYLOAD
    write_buffer: int = 1 << 20
    read_buffer: int = 1 << 20
    socket_buffer: int | None = None
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0

    def __post_init__(self) -> None:
        """Raises ConfigError for out-of-range values."""
        if not 0 < self.max_payload <= PAYLOAD_LIMIT:
            raise ConfigError(
                f"max_payload must be in [1, {PAYLOAD_LIMIT}], got {self.max_payload}"
            )
        for name in ("write_buffer", "read_buffer"):
            value = getattr(self, name)
            if not 4096 <= value <= 1 << 30:
                raise ConfigError(f"{name} must be in [4096, 1 GiB] bytes, got {value}")
        if self.socket_buffer is not None and not 4096 <= self.socket_buffer <= 1 << 30:
            raise ConfigError(
                f"socket_buffer must be None or in [4096, 1 GiB] bytes, got {self.socket_buffer}"
            )
        for name in ("connect_timeout", "handshake_timeout", "close_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")


class Link(abc.ABC):
    """One established, authenticated replication link (transport-neutral).

    Use it as an async context manager (closes on exit) and as an async iterator of frames
    (stops when the peer closes between frames; any other end raises). ``send`` and
    ``receive`` may run concurrently in two tasks; concurrent sends are serialised whole
    frame by whole frame, so frames never interleave.
    """

    peer: PeerIdentity
    options: LinkOptions
    stats: LinkStats

    def __init__(self, *, peer: PeerIdentity, options: LinkOptions) -> None:
        self.peer = peer
        self.options = options
        self.stats = LinkStats()
        self._state = LinkState.OPEN
        self._error: QmpShadowError | None = None
        self._history: list[LinkState] = [LinkState.OPEN]

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        """The current :class:`LinkState`."""
        return self._state

    @property
    def error(self) -> QmpShadowError | None:
        """What ended the link (None while open, or after a local :meth:`close`)."""
        return self._error

    @property
    def is_open(self) -> bool:
        """True while frames can be sent and received."""
        return self._state is LinkState.OPEN

    def _set_state(self, new: LinkState) -> bool:
        """Move to ``new`` if the table allows it; returns whether it moved."""
        if new is self._state or new not in TRANSITIONS[self._state]:
            return False
        self._state = new
        self._history.append(new)
        return True

    def _ended_error(self) -> QmpShadowError:
        """The error to raise from a call on a link that is no longer open."""
        if self._error is not None:
            return self._error
        return LinkClosedError(
            f"link to {self.peer} is {self._state.value}: it was closed locally; "
            "open a new link",
            by_peer=False,
        )

    # -- the interface ---------------------------------------------------------------------

    @abc.abstractmethod
    async def send(self, data: SendData) -> None:
        """Send one encoded frame (``bytes``, or the buffer list of ``encode_frame_parts``).

        Awaits while the peer is slow (the link holds at most about ``write_buffer`` bytes
        plus one chunk). The caller may reuse its buffers once this returns. Raises
        ConfigError when ``data`` is not exactly one whole frame (nothing is sent);
        LinkClosedError, LinkDroppedError, LinkIntegrityError or the FrameError that ended
        the link when it is not open. If cancelled part-way through a frame, the link is
        aborted (LinkDroppedError): a frame is never left half-sent on a link that stays open.
        """

    @abc.abstractmethod
    async def receive(self) -> Frame:
        """The next whole, checksum-verified frame from the peer.

        Raises LinkClosedError (``by_peer``) when the peer closed between frames;
        LinkDroppedError when the connection was lost (a frame cut short is dropped);
        LinkIntegrityError when TLS refused altered bytes; FrameChecksumError /
        FrameFormatError when the bytes are corrupt or malformed (the link is then closed).
        Once the link has ended, every call raises the same error.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close gracefully: refuse new sends, let the frame being sent finish, flush, and
        close (TLS close_notify). Aborts after ``options.close_timeout``. Idempotent; never
        raises for a link that already ended.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Close at once, dropping unsent bytes (the peer sees a dropped link). Idempotent."""

    # -- conveniences ----------------------------------------------------------------------

    async def send_frame(self, frame: Frame, *, compress_level: int | None = None) -> None:
        """Encode ``frame`` (bounded by ``options.max_payload``) and :meth:`send` it.

        Raises ConfigError when the frame cannot be encoded, else as :meth:`send`.
        """
        await self.send(
            encode_frame_parts(
                frame, compress_level=compress_level, max_payload=self.options.max_payload
            )
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            self.abort()  # cancelled or interrupted: do not wait for a graceful close
        else:
            await self.close()

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._iter_frames()

    async def _iter_frames(self) -> AsyncIterator[Frame]:
        while True:
            try:
                frame = await self.receive()
            except LinkClosedError:
                return
            yield frame

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._state.value} peer={self.peer}>"


@dataclass(slots=True)
class ListenerStats:
    """Counters of one listener."""

    accepted: int = 0
    rejected: int = 0
    #: The most recent refusals (bounded), newest last: what each peer did wrong.
    recent_rejections: list[QmpShadowError] = field(default_factory=list)


class Listener(abc.ABC):
    """Accepts links on one address. Authentication happens before :meth:`accept` returns:
    peers that fail it never reach the caller; they are counted in :attr:`stats` (with the
    reason) and logged on the ``qmpshadow.transport`` logger.
    """

    #: Human-readable address (``host:port``, or the socket path).
    address: str
    stats: ListenerStats

    @abc.abstractmethod
    async def accept(self) -> Link:
        """The next established link. Raises LinkClosedError once the listener is closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening; abort handshakes in progress and links nobody accepted yet.
        Links already returned by :meth:`accept` stay open. Idempotent.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Link]:
        return self._iter_links()

    async def _iter_links(self) -> AsyncIterator[Link]:
        while True:
            try:
                link = await self.accept()
            except LinkClosedError:
                return
            yield link
