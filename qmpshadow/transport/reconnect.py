"""Reconnecting after a link ended: capped, jittered exponential backoff.

:class:`Backoff` is sans-I/O (delays from a seeded ``random.Random`` are reproducible);
:func:`reconnect` retries a connect callable with it. What to do once connected again is the
layer above's business: the shadow agent asks for a full epoch (RESYNC_REQUEST) and the source
agent clears its page caches, since frames may have been lost with the old link.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from qmpshadow.errors import ConfigError, TransportError
from qmpshadow.transport.errors import PeerAuthError

__all__ = ["Backoff", "reconnect"]

log = logging.getLogger("qmpshadow.transport")

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Delay before retry ``n`` (0-based): ``min(maximum, initial * factor**n)``, shortened by
    a random fraction of at most ``jitter`` (so many agents restarting together spread out,
    and no delay ever exceeds ``maximum``).
    """

    initial: float = 0.1
    maximum: float = 10.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        """Raises ConfigError for out-of-range values."""
        if not 0 < self.initial <= self.maximum:
            raise ConfigError(
                f"backoff needs 0 < initial <= maximum, got initial={self.initial} "
                f"maximum={self.maximum}"
            )
        if self.factor < 1:
            raise ConfigError(f"backoff factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"backoff jitter must be in [0, 1], got {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before retry ``attempt``."""
        # Compare exponents, not powers: factor**attempt overflows long before it matters.
        base = self.initial
        for _ in range(attempt):
            base *= self.factor
            if base >= self.maximum:
                return self.maximum
        return min(base, self.maximum)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The jittered delay before retry ``attempt``: in ``[c * (1 - jitter), c]``."""
        c = self.ceiling(attempt)
        return c * (1.0 - self.jitter * rng.random())

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Endless delays for retries 0, 1, 2, ..."""
        r = rng or random.Random()
        attempt = 0
        while True:
            yield self.delay(attempt, r)
            attempt += 1


async def reconnect(
    connect: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff | None = None,
    max_attempts: int | None = None,
    deadline: float | None = None,
    retry_auth: bool = False,
    on_retry: Callable[[int, float, TransportError], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Call ``connect()`` until it returns, sleeping per ``backoff`` after each failure.

    Only TransportError is retried. PeerAuthError is raised at once unless ``retry_auth``
    (certificates or allowed peers are wrong: waiting will not fix them); ConfigError and
    anything else propagate at once, as does cancellation. ``on_retry(attempt, delay, error)``
    is called before each sleep. After ``max_attempts`` calls, or when the next sleep would end
    past ``deadline`` seconds from now, raises TransportError naming the attempts and the last
    error (chained).
    """
    if max_attempts is not None and max_attempts < 1:
        raise ConfigError(f"max_attempts must be >= 1 or None, got {max_attempts}")
    bo = backoff or Backoff()
    delays = bo.delays(rng)
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        error: TransportError
        try:
            return await connect()
        except PeerAuthError as exc:
            if not retry_auth:
                raise
            error = exc
        except TransportError as exc:
            error = exc
        elapsed = time.monotonic() - start
        wait = next(delays)
        if max_attempts is not None and attempt >= max_attempts:
            raise _give_up(attempt, elapsed, error, "attempts exhausted") from error
        if deadline is not None and elapsed + wait > deadline:
            raise _give_up(attempt, elapsed, error, f"deadline of {deadline} s") from error
        if on_retry is not None:
            on_retry(attempt, wait, error)
        log.info("connect attempt %d failed (%s); retrying in %.2f s", attempt, error, wait)
        await asyncio.sleep(wait)


def _give_up(attempts: int, elapsed: float, error: TransportError, why: str) -> TransportError:
    return TransportError(
        f"gave up reconnecting after {attempts} attempt(s) in {elapsed:.1f} s ({why}); last "
        f"error: {error}"
    )
