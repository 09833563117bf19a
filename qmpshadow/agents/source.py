"""Source agent: checkpoint source → epoch encoder → link to the shadow agent.

It ships every captured epoch and tracks the shadow's acknowledgements. The encoder's page
cache and unchanged table mirror the shadow's replica; whenever that mirror may be wrong
(new link, RESYNC_REQUEST, an epoch not acknowledged) the next epoch goes out full. For the
COLO source, which only ever sees dirty pages, the agent keeps a mirror of the primary's
RAM to build that full epoch from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import QmpShadowError
from ..frames.wire import Ack, Feature, Frame, Heartbeat, Hello, ResyncRequest, Role
from ..source.encoder import EncodeStats, EpochEncoder
from ..source.epoch import CapturedEpoch
from ..transport.base import Link

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[Link]]
StatusFn = Callable[[dict[str, Any]], None]


@dataclass
class SourceStats:
    """Running totals, published in status events."""

    captured: int = 0
    committed: int = 0
    wire_bytes: int = 0
    raw_bytes: int = 0
    resyncs: int = 0
    last: EncodeStats | None = None
    pauses_ms: list[float] = field(default_factory=list)


class Mirror:
    """The primary's RAM as the source agent last saw it (COLO source only)."""

    def __init__(self) -> None:
        self.main = bytearray()
        self.small: dict[str, dict[int, bytes]] = {}
        self.page_size = 4096

    def update(self, ep: CapturedEpoch) -> None:
        """Apply a captured epoch."""
        ps = self.page_size = ep.page_size
        if ep.full or not self.main:
            length = next(b.length for b in ep.blocks if b.idstr == ep.main_block)
            if len(self.main) != length:
                self.main = bytearray(length)
        for i, page in ep.main.items():
            self.main[i * ps : (i + 1) * ps] = page
        for block, pages in ep.small.items():
            self.small.setdefault(block, {}).update(pages)

    def full_epoch(self, ep: CapturedEpoch) -> CapturedEpoch:
        """``ep`` widened to every page the mirror holds (after :meth:`update`)."""
        ps = self.page_size
        mv = memoryview(self.main)
        main = {i: bytes(mv[i * ps : (i + 1) * ps]) for i in range(len(self.main) // ps)}
        return CapturedEpoch(ep.number, True, ep.blocks, ep.main_block, ps, main,
                             {b: dict(p) for b, p in self.small.items()}, ep.device_state,
                             ep.device_format, ep.reported_pages, ep.pause_ms, ep.disk,
                             ep.scanned, ep.disks, ep.disk_full, ep.disk_failed)


class SourceAgent:
    """Ships epochs to the shadow agent over links made by ``connect``.

    ``ship(ep)`` is the source's sink; with ``wait_ack`` it returns only once the shadow
    committed ``ep`` (or ``ack_timeout`` passed, after which protection is marked degraded
    and the next epoch goes full), which is how the COLO source's ``sync`` mode holds the
    primary until the shadow has the checkpoint.
    """

    def __init__(self, *, connect: Connect, page_size: int, main_pages: int,
                 generation: int = 1, keep_mirror: bool = False, wait_ack: bool = False,
                 ack_timeout: float = 5.0, cache_bytes: int | None = None,
                 compress_level: int | None = None, name: str = "",
                 on_status: StatusFn | None = None, disks: bool = False) -> None:
        self.connect = connect
        self.generation = generation
        # A cache as large as the RAM makes every re-dirtied page a DELTA candidate; a
        # smaller direct-mapped one loses pages whose slots collide (configurable).
        self.encoder = EpochEncoder(page_size=page_size, main_pages=main_pages,
                                    generation=generation,
                                    cache_bytes=cache_bytes or main_pages * page_size,
                                    compress_level=compress_level)
        self.mirror = Mirror() if keep_mirror else None
        #: HELLO says Feature.DISK: epochs carry DISK_BLOCK frames (docs/disks.md)
        self.disks = disks
        self.wait_ack = wait_ack
        self.ack_timeout = ack_timeout
        self.name = name
        self.on_status = on_status
        self.stats = SourceStats()
        self.link: Link | None = None
        self._need_full = True
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._session = os.urandom(16)
        self._ship_lock = asyncio.Lock()
        #: the last epoch whose frames started out (a delta must have it as its base)
        self._sent = 0
        self.page_size = page_size
        #: Cluster hooks: HEARTBEAT and HELLO frames from the shadow (acks, its generation).
        self.on_heartbeat: Callable[[Heartbeat], None] | None = None
        self.on_hello: Callable[[Hello], None] | None = None
        self._hb_task: asyncio.Task[None] | None = None
        #: Called with the epoch number whenever the shadow's committed epoch advances
        #: (output commit releases that epoch's output).
        self.on_commit: Callable[[int], None] | None = None

    @property
    def session(self) -> str:
        """This agent run's session id (hex), as sent in HELLO."""
        return self._session.hex()

    def send_heartbeat(self, frame: Heartbeat) -> bool:
        """Send a HEARTBEAT frame on the current link without waiting for it.

        Returns False (nothing sent) when there is no open link or the previous heartbeat
        is still waiting behind epoch data. Never raises for link failures.
        """
        link = self.link
        if link is None or not link.is_open:
            return False
        if self._hb_task is not None and not self._hb_task.done():
            return False
        self._hb_task = asyncio.create_task(self._send_quietly(link, frame))
        return True

    async def send_now(self, frame: Frame, timeout: float = 1.0) -> bool:
        """Send ``frame`` on the current link and wait (bounded); False on failure."""
        link = self.link
        if link is None or not link.is_open:
            return False
        try:
            async with asyncio.timeout(timeout):
                await link.send_frame(frame)
        except (TimeoutError, QmpShadowError) as exc:
            log.info("sending %s failed: %s", type(frame).__name__, exc or "timeout")
            return False
        return True

    @staticmethod
    async def _send_quietly(link: Link, frame: Frame) -> None:
        try:
            await link.send_frame(frame)
        except QmpShadowError as exc:
            log.debug("heartbeat not sent: %s", exc)

    @property
    def need_full(self) -> bool:
        """True when the next epoch must carry every page (new link, resync, lost ack)."""
        return self._need_full or self.link is None or not self.link.is_open

    async def prepare(self) -> None:
        """Make sure a link is up before a checkpoint is taken (so need_full is right).

        Never raises for an unreachable shadow: the epoch is then captured but not shipped.
        """
        with contextlib.suppress(QmpShadowError):
            await self._ensure_link()

    @property
    def lag(self) -> int:
        """Epochs captured but not (yet) committed by the shadow."""
        return self.stats.captured - self.stats.committed

    async def _ensure_link(self) -> Link:
        if self.link is not None and self.link.is_open:
            return self.link
        await self._drop_link()
        link = await self.connect()
        await link.send_frame(Hello(generation=self.generation, epoch=self.stats.committed,
                                    session_id=self._session, role=Role.SOURCE,
                                    page_size=self.page_size,
                                    features=Feature.DELTA | (Feature.DISK if self.disks else 0),
                                    max_payload=link.options.max_payload,
                                    name=self.name))
        self.link = link
        self._need_full = True  # a new link: the shadow may hold anything
        self._reader = asyncio.create_task(self._read(link))
        return link

    async def _drop_link(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, QmpShadowError):
                await self._reader
            self._reader = None
        if self.link is not None:
            self.link.abort()
            self.link = None
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(QmpShadowError("link to the shadow lost before its ack"))
        self._acks.clear()

    async def _read(self, link: Link) -> None:
        try:
            async for frame in link:
                if isinstance(frame, Ack):
                    advanced = frame.epoch > self.stats.committed
                    self.stats.committed = max(self.stats.committed, frame.epoch)
                    if advanced and self.on_commit is not None:
                        self.on_commit(frame.epoch)
                    for n in [n for n in self._acks if n <= frame.epoch]:
                        fut = self._acks.pop(n)
                        if not fut.done():
                            fut.set_result(None)
                elif isinstance(frame, ResyncRequest):
                    log.warning("shadow asks for a resync: %s %s", frame.reason.name,
                                frame.message)
                    self._need_full = True
                elif isinstance(frame, Heartbeat) and self.on_heartbeat is not None:
                    self.on_heartbeat(frame)
                elif isinstance(frame, Hello) and self.on_hello is not None:
                    self.on_hello(frame)
        except QmpShadowError as exc:
            log.warning("link to the shadow ended: %s", exc)
        finally:
            self._need_full = True
            for fut in self._acks.values():
                if not fut.done():
                    fut.set_exception(QmpShadowError("link to the shadow ended before its ack"))

    async def ship(self, ep: CapturedEpoch, *, wait: bool | None = None,
                   timeout: float | None = None) -> bool:
        """Send one captured epoch (full when the shadow's state is uncertain).

        ``wait``/``timeout`` override ``wait_ack``/``ack_timeout`` for this epoch (a
        switchover's final epoch is always shipped synchronously). Returns True when the
        shadow acknowledged the epoch before this returned (only known when waiting).
        ``timeout`` runs from this call, encoding and sending included (it bounds how long
        a caller that holds its primary stopped waits); ``ack_timeout`` from the end of the
        send (a large full epoch takes a while to encode).

        Epochs go out one at a time, in the order of the calls, which must be their
        capture order: a delta (``ep.base``) goes out only right after its base epoch, else
        it is widened to a full one (the COLO mirror) or not shipped (then the next
        capture must be full: :attr:`need_full`).

        Link failures do not raise: the epoch is counted as not committed and the next one
        goes full over a new link. Raises QmpShadowError only for encoding bugs.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # taken before this coroutine first yields: a caller that captured an epoch and
        # calls ship() straight away is in line before any later capture
        async with self._ship_lock:
            sent = await self._send_epoch(ep)
        if sent is None:
            return False
        fut, ep, stats = sent
        acked = False
        if self.wait_ack if wait is None else wait:
            try:
                # an ack that came while we sent, but after the deadline, is late too
                left = (self.ack_timeout if deadline is None
                        else deadline - loop.time())
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(asyncio.shield(fut), left)
                acked = True
            except (TimeoutError, QmpShadowError) as exc:
                log.warning("no ack for epoch %d: %s", ep.number, exc or "timeout")
                self._need_full = True
        self._emit(ep, stats)
        return acked

    async def _send_epoch(self, ep: CapturedEpoch
                          ) -> tuple[asyncio.Future[None], CapturedEpoch, EncodeStats] | None:
        """Encode and send ``ep`` (under the ship lock): the future of its ack, the epoch
        as sent (maybe widened) and its stats; None when it was not sent (the reason
        emitted)."""
        self.stats.captured = max(self.stats.captured, ep.number)
        if ep.pause_ms is not None:
            self.stats.pauses_ms.append(ep.pause_ms)
        if self.mirror is not None:
            self.mirror.update(ep)
        if ep.number <= self._sent:
            # a capture handed over after a later one: the later one did not include
            # it and went out (or was refused) already; nothing can use it now
            self._need_full = True
            self._emit(ep, None, error=f"epoch {ep.number} is older than epoch "
                       f"{self._sent}, already shipped: not shipped, the next epoch is full")
            return None
        if ep.disk_failed:
            self._need_full = True
            self._emit(ep, None, error="disk capture failed: not shipped, the next epoch is "
                       "full")
            return None
        try:
            link = await self._ensure_link()
        except QmpShadowError as exc:
            log.warning("shadow unreachable, epoch %d not shipped: %s", ep.number, exc)
            self._emit(ep, None, error=str(exc))
            return None
        if not ep.full and (self._need_full or ep.base != self._sent):
            if ep.disks and not ep.disk_full:
                # the mirror widens RAM, not disks: the next epoch copies every block
                self._need_full = True
                self._emit(ep, None, error="the shadow needs a full epoch (disks too); "
                           "not shipped")
                return None
            if self.mirror is None:
                # shared-RAM source: the driver takes a full checkpoint next (need_full)
                self._need_full = True
                self._emit(ep, None, error="the shadow needs a full epoch; not shipped")
                return None
            ep = self.mirror.full_epoch(ep)
            self.stats.resyncs += 1
        self._need_full = False
        self._sent = ep.number
        # In a worker thread (the page codec releases the GIL): a full epoch takes long
        # enough to hold up the lease renewals that share this event loop.
        frames, stats = await asyncio.to_thread(self.encoder.encode, ep)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # an ack nobody waits for (async mode, or after a timeout) may still fail later
        fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        self._acks[ep.number] = fut
        try:
            for frame in frames:
                await link.send(frame)
        except QmpShadowError as exc:
            log.warning("sending epoch %d failed: %s", ep.number, exc)
            self._need_full = True
            self._acks.pop(ep.number, None)
            self._emit(ep, stats, error=str(exc))
            return None
        self.stats.wire_bytes += stats.wire_bytes
        self.stats.raw_bytes += stats.raw_bytes
        self.stats.last = stats
        return fut, ep, stats

    async def wait_committed(self, number: int, timeout: float) -> bool:
        """Whether the shadow acknowledged epoch ``number`` (or a later one) within
        ``timeout`` seconds. False also for an epoch not in flight (never shipped, or its
        link was lost). Raises nothing."""
        if self.stats.committed >= number:
            return True
        fut = self._acks.get(number)
        if fut is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except (TimeoutError, QmpShadowError):
            return False
        return True

    def _emit(self, ep: CapturedEpoch, stats: EncodeStats | None, error: str = "") -> None:
        if self.on_status is None:
            return
        doc: dict[str, Any] = {
            "event": "epoch", "epoch": ep.number, "full": ep.full,
            "dirty_pages": ep.reported_pages, "pause_ms": ep.pause_ms,
            "committed": self.stats.committed, "lag": self.lag,
            "wire_bytes_total": self.stats.wire_bytes, "time": time.time(),
        }
        if stats is not None:
            doc.update(wire_bytes=stats.wire_bytes, raw_bytes=stats.raw_bytes,
                       sent_pages=stats.sent_pages, unchanged_pages=stats.unchanged_pages)
        if error:
            doc["error"] = error
        self.on_status(doc)

    async def close(self) -> None:
        """Close the link."""
        await self._drop_link()
