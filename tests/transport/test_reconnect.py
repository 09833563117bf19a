"""Backoff (sans-I/O) and reconnect() against real unix-socket listeners."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from qmpshadow.errors import ConfigError, TransportError
from qmpshadow.transport import Backoff, Link, PeerAuthError, local, reconnect


def test_backoff_is_capped_and_jittered() -> None:
    bo = Backoff(initial=0.1, maximum=2.0, factor=2.0, jitter=0.5)
    assert [bo.ceiling(n) for n in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert bo.ceiling(10_000) == 2.0  # no overflow
    rng = random.Random(1)
    for n in range(50):
        d = bo.delay(n, rng)
        assert bo.ceiling(n) * 0.5 <= d <= bo.ceiling(n) <= 2.0
    # Reproducible with a seeded generator; spread out without one.
    a = Backoff().delays(random.Random(5))
    b = Backoff().delays(random.Random(5))
    assert [next(a) for _ in range(8)] == [next(b) for _ in range(8)]
    spread = {round(Backoff().delay(3, random.Random()), 9) for _ in range(20)}
    assert len(spread) > 10
    assert list(zip(range(3), Backoff(jitter=0).delays(), strict=False)) == [
        (0, 0.1), (1, 0.2), (2, 0.4)]
    for bad in ({"initial": 0}, {"initial": 3, "maximum": 2}, {"factor": 0.5}, {"jitter": 2}):
        with pytest.raises(ConfigError):
            Backoff(**bad)  # type: ignore[arg-type]


FAST = Backoff(initial=0.01, maximum=0.05)


async def test_reconnect_once_the_listener_is_back(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    retries: list[tuple[int, float, str]] = []

    async def start_later() -> local.UnixListener:
        await asyncio.sleep(0.15)
        return await local.listen(path)

    starter = asyncio.create_task(start_later())
    link: Link = await reconnect(
        lambda: local.connect(path), backoff=FAST,
        on_retry=lambda n, d, e: retries.append((n, d, type(e).__name__)),
    )
    lst = await starter
    try:
        server = await asyncio.wait_for(lst.accept(), 5)
        assert link.is_open and server.is_open
        assert len(retries) >= 2
        assert [r[0] for r in retries] == list(range(1, len(retries) + 1))
        assert all(0.005 <= d <= 0.05 and kind == "TransportError" for _, d, kind in retries)
        await link.close()
        await server.close()
    finally:
        await lst.close()


async def test_reconnect_gives_up(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    with pytest.raises(TransportError, match=r"gave up reconnecting after 3 attempt") as info:
        await reconnect(lambda: local.connect(path), backoff=FAST, max_attempts=3)
    assert isinstance(info.value.__cause__, TransportError)
    assert "expected an agent listening" in str(info.value)
    with pytest.raises(TransportError, match="deadline"):
        await reconnect(lambda: local.connect(path), backoff=FAST, deadline=0.1)
    with pytest.raises(ConfigError):
        await reconnect(lambda: local.connect(path), max_attempts=0)


async def test_auth_failures_are_not_retried(tmp_path: Path) -> None:
    path = tmp_path / "auth.sock"
    lst = await local.listen(path, allowed_uids=[12345])
    calls = 0

    async def connect() -> Link:
        nonlocal calls
        calls += 1
        return await local.connect(path)

    try:
        with pytest.raises(PeerAuthError):
            await reconnect(connect, backoff=FAST)
        assert calls == 1
        with pytest.raises(TransportError, match="after 2 attempt"):
            await reconnect(connect, backoff=FAST, max_attempts=2, retry_auth=True)
        assert calls == 3
    finally:
        await lst.close()


async def test_cancellation_is_not_wrapped(tmp_path: Path) -> None:
    task = asyncio.create_task(
        reconnect(lambda: local.connect(tmp_path / "x.sock"), backoff=Backoff(initial=5))
    )
    await asyncio.sleep(0.05)  # sleeping in the backoff
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
