"""Split-brain watch: poll the run state of several QEMUs and keep when each ran.

:class:`RunStates` asks ``query-status`` of each named QEMU (a QMP socket path, or an open
:class:`~qmpshadow.qmp.control.QmpControl`) every ``period`` seconds and keeps the samples;
:meth:`RunStates.overlap` is the time two of them were both seen running (0.0: never two
running copies). A QEMU that does not answer counts as not running. Used by the fault
tests and by ``qmpshadow demo``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from qmpshadow.errors import QmpShadowError
from qmpshadow.qmp.control import QmpControl

__all__ = ["RunStates"]


class RunStates:
    """Polls ``query-status`` of named QEMUs (QMP socket paths) every ``period`` s."""

    def __init__(self, socks: dict[str, Path | QmpControl], period: float = 0.005) -> None:
        self.socks = socks
        self.period = period
        self.samples: dict[str, list[tuple[float, bool]]] = {n: [] for n in socks}
        #: (sent, answered, running) per sample: the state held at some time in between
        self.windows: dict[str, list[tuple[float, float, bool]]] = {n: [] for n in socks}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RunStates:
        for name, sock in self.socks.items():
            self._tasks.append(asyncio.create_task(self._poll(name, sock)))
        await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _poll(self, name: str, sock: Path | QmpControl) -> None:
        qmp: QmpControl | None = None
        if isinstance(sock, QmpControl):
            while True:
                sent = time.time()
                try:
                    running = (await sock.query_status(timeout=0.5)).running
                except QmpShadowError:
                    running = False
                self._sample(name, sent, running)
                await asyncio.sleep(self.period)
        try:
            while True:
                running = False
                sent = time.time()
                try:
                    if qmp is None:
                        qmp = await QmpControl.open(sock, timeout=0.5)
                    st = await qmp.query_status(timeout=0.5)
                    running = st.running
                except QmpShadowError:
                    if qmp is not None:
                        await qmp.close()
                    qmp = None
                self._sample(name, sent, running)
                await asyncio.sleep(self.period)
        finally:
            if qmp is not None:
                await qmp.close()

    def _sample(self, name: str, sent: float, running: bool) -> None:
        now = time.time()
        self.samples[name].append((now, running))
        self.windows[name].append((sent, now, running))

    def running_now(self, name: str) -> bool | None:
        """The latest sample of ``name`` (None before the first)."""
        s = self.samples[name]
        return s[-1][1] if s else None

    def ran(self, name: str) -> list[tuple[float, float]]:
        """Intervals (first, last sample) in which ``name`` was seen running."""
        out: list[tuple[float, float]] = []
        start = last = None
        for t, running in self.samples[name]:
            if running:
                if start is None:
                    start = t
                last = t
            elif start is not None and last is not None:
                out.append((start, last))
                start = last = None
        if start is not None and last is not None:
            out.append((start, last))
        return out

    def overlap(self, a: str, b: str) -> float:
        """Seconds during which both were *seen* running (0.0: never both)."""
        total = 0.0
        for s1, e1 in self.ran(a):
            for s2, e2 in self.ran(b):
                total += max(0.0, min(e1, e2) - max(s1, s2))
        return total

    def both_seen(self, a: str, b: str, *, max_window: float = 0.05) -> int:
        """Samples of ``a`` seen running whose query window (sent .. answered) meets the
        window of a sample of ``b`` seen running: both may have run at once.

        Windows, not answer times: a poller starved for a while (a loaded host) stamps the
        answers it finds waiting when it runs again with that late time, and a stale
        "running" of the old copy would then sit next to the new copy's first fresh one
        (a false alarm). Only windows of at most ``max_window`` seconds count: a query
        that took longer (a QEMU busy stopping, or loading its promotion stream) says
        "running" of some moment in a long span, which proves nothing. A real overlap
        longer than a few poll rounds still shows, in prompt answers of both.
        """
        return len(self.both_seen_pairs(a, b, max_window=max_window))

    def both_seen_pairs(self, a: str, b: str, *, max_window: float = 0.05
                        ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
        """The (``a`` window, ``b`` window) pairs behind :meth:`both_seen`."""
        runs_b = [(s, e) for s, e, r in self.windows[b] if r and e - s <= max_window]
        out: list[tuple[tuple[float, float], tuple[float, float]]] = []
        for s, e, r in self.windows[a]:
            if not r or e - s > max_window:
                continue
            out.extend(((s, e), (sb, eb)) for sb, eb in runs_b if s <= eb and sb <= e)
        return out
