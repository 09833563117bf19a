"""QMP events: a typed event, a per-connection backlog and subscriptions.

The backlog starts recording when the connection is established, so an event emitted
before anyone waits for it is not lost: QEMU sends ``STOP`` *before* the reply to
``stop``, so ``await qmp.stop(); await qmp.wait_event("STOP")`` must find it already
there. ``wait_event`` consumes the first matching event from the backlog; events nobody
waits for age out when the backlog is full (it is bounded so that an agent running for
weeks does not grow). Subscriptions see every event from their creation on, each with
its own bounded queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from qmpshadow.errors import QmpError, QmpTimeoutError

log = logging.getLogger(__name__)

EventPredicate = Callable[["QmpEvent"], bool]


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """One QMP event: ``name`` (e.g. "STOP"), ``data`` (may be empty), QEMU's
    ``timestamp`` (seconds since the epoch, host clock) and ``seq``, the 1-based position
    of the event on its connection."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0
    seq: int = 0

    @classmethod
    def from_message(cls, msg: Mapping[str, Any], seq: int) -> QmpEvent:
        """Build from a raw QMP event message; tolerant of missing optional members."""
        ts = msg.get("timestamp")
        timestamp = 0.0
        if isinstance(ts, Mapping):
            secs, usecs = ts.get("seconds", 0), ts.get("microseconds", 0)
            if isinstance(secs, int | float) and isinstance(usecs, int | float):
                timestamp = secs + usecs / 1e6
        data = msg.get("data")
        return cls(
            name=str(msg.get("event", "")),
            data=dict(data) if isinstance(data, Mapping) else {},
            timestamp=timestamp,
            seq=seq,
        )


class _Closed:
    """Why a hub stopped: ``error`` means the peer went away (waiters get an error)."""

    __slots__ = ("error", "reason")

    def __init__(self, reason: str, *, error: bool) -> None:
        self.reason = reason
        self.error = error


class EventSubscription:
    """Events from the moment of subscription on, optionally only some names.

    Async-iterate it (``async for event in sub``) or call :meth:`get`. Iteration ends
    (``StopAsyncIteration``) after a local ``close()`` of the connection; when QEMU went
    away it raises :class:`~qmpshadow.errors.QmpError` once the buffered events are
    consumed. Use it as a context manager (``with qmp.subscribe("STOP") as sub:``) or
    call :meth:`close` to unregister. ``dropped`` counts events lost to a full queue.
    """

    def __init__(
        self, hub: EventHub, names: frozenset[str] | None, maxsize: int
    ) -> None:
        self._hub = hub
        self.names = names
        self._queue: deque[QmpEvent] = deque()
        self._maxsize = maxsize
        self._signal = asyncio.Event()
        self.dropped = 0
        self._active = True

    def _put(self, event: QmpEvent) -> None:
        if self.names is not None and event.name not in self.names:
            return
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._signal.set()

    def _wake(self) -> None:
        self._signal.set()

    async def get(self, *, timeout: float | None = None) -> QmpEvent:
        """The next event.

        Raises:
            QmpTimeoutError: none came within ``timeout`` seconds.
            QmpError: the connection is closed and no buffered event is left (also after
                a local close, unlike iteration, which just ends).
        """
        try:
            async with asyncio.timeout(timeout):
                return await self._next()
        except TimeoutError as err:
            wanted = "any event" if self.names is None else f"one of {sorted(self.names)}"
            raise QmpTimeoutError(
                f"expected {wanted} within {timeout}s on {self._hub.label}, got none; "
                "check that the command producing it succeeded, or raise the timeout"
            ) from err

    async def _next(self) -> QmpEvent:
        while True:
            if self._queue:
                return self._queue.popleft()
            closed = self._hub.closed
            if closed is not None:
                raise QmpError(
                    f"no more events on {self._hub.label}: {closed.reason}"
                )
            if not self._active:
                raise QmpError(f"subscription on {self._hub.label} was closed")
            self._signal.clear()
            await self._signal.wait()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> QmpEvent:
        if not self._queue:
            closed = self._hub.closed
            if (closed is not None and not closed.error) or not self._active:
                raise StopAsyncIteration
        return await self._next()

    def close(self) -> None:
        """Stop receiving events; buffered ones stay readable."""
        if self._active:
            self._active = False
            self._hub._unsubscribe(self)
            self._signal.set()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventHub:
    """Per-connection event dispatch: backlog for :meth:`wait`, plus subscriptions.

    ``label`` names the connection in error messages.
    """

    def __init__(self, label: str, *, backlog: int = 1024) -> None:
        self.label = label
        self._backlog: deque[QmpEvent] = deque(maxlen=backlog)
        self._subs: list[EventSubscription] = []
        self._seq = 0
        self._signal = asyncio.Event()
        self.closed: _Closed | None = None

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest event received so far (0 before the first)."""
        return self._seq

    def publish(self, msg: Mapping[str, Any]) -> QmpEvent:
        """Record a raw QMP event message and wake waiters; returns the typed event."""
        self._seq += 1
        event = QmpEvent.from_message(msg, self._seq)
        if len(self._backlog) == self._backlog.maxlen:
            log.debug("%s: event backlog full, dropping %s", self.label, self._backlog[0])
        self._backlog.append(event)
        for sub in self._subs:
            sub._put(event)
        # Replace the signal so that waiters of this round wake and later ones block.
        self._signal.set()
        self._signal = asyncio.Event()
        return event

    def close(self, reason: str, *, error: bool) -> None:
        """Stop the hub: current and future waiters fail (or iterations end)."""
        if self.closed is not None:
            return
        self.closed = _Closed(reason, error=error)
        self._signal.set()
        for sub in self._subs:
            sub._wake()

    def subscribe(self, names: Iterable[str] | None, maxsize: int) -> EventSubscription:
        """A new subscription receiving events from now on.

        Raises:
            QmpError: the hub is closed.
        """
        if self.closed is not None:
            raise QmpError(f"cannot subscribe to events on {self.label}: {self.closed.reason}")
        sub = EventSubscription(self, frozenset(names) if names is not None else None, maxsize)
        self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: EventSubscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def take(
        self, name: str | None, predicate: EventPredicate | None, since: int | None
    ) -> QmpEvent | None:
        """Remove and return the oldest backlog event matching, or ``None``."""
        for i, event in enumerate(self._backlog):
            if since is not None and event.seq <= since:
                continue
            if name is not None and event.name != name:
                continue
            if predicate is not None and not predicate(event):
                continue
            del self._backlog[i]
            return event
        return None

    def clear(self) -> list[QmpEvent]:
        """Drop and return every backlog event not yet taken."""
        events = list(self._backlog)
        self._backlog.clear()
        return events

    async def wait(
        self,
        name: str | None,
        *,
        timeout: float | None,
        predicate: EventPredicate | None = None,
        since: int | None = None,
    ) -> QmpEvent:
        """The oldest not-yet-taken event named ``name`` (any name when ``None``) that
        satisfies ``predicate`` and has ``seq > since``; waits for it if needed.

        Raises:
            QmpTimeoutError: no such event within ``timeout`` seconds.
            QmpError: the connection closed before such an event came.
        """
        start_seq = self._seq
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self.take(name, predicate, since)
                    if event is not None:
                        return event
                    if self.closed is not None:
                        raise QmpError(
                            f"expected QMP event {name or '(any)'} on {self.label}, but "
                            f"{self.closed.reason}"
                        )
                    await self._signal.wait()
        except TimeoutError as err:
            seen = [e.name for e in self._backlog if e.seq > start_seq]
            raise QmpTimeoutError(
                f"expected QMP event {name or '(any)'}"
                f"{' matching the predicate' if predicate else ''} within {timeout}s on "
                f"{self.label}; received meanwhile: {seen or 'nothing'}. Check that the "
                "command producing it succeeded, or raise the timeout"
            ) from err
