"""Shadow agent: link from the source agent → epoch assembler → replica → ack.

One source link at a time (a new one replaces the old). Frames of an epoch are staged in the
replica's journal as they arrive; when the assembler says the epoch is whole and verified
the replica commits it, and the agent acknowledges it as soon as the commit record is
durable (the replica applies it meanwhile; a crash from there recovers it). A corrupt or
inconsistent epoch, or a delta whose base is not the committed epoch, is dropped (the
replica keeps the previous committed epoch) and the source is asked once for a full
resync: until a full epoch arrives, the deltas it sent meanwhile are dropped unread. A
dropped link likewise ends with the open epoch aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import FrameError, QmpShadowError
from ..frames.epoch import EpochAssembler
from ..frames.wire import (
    Ack,
    EpochBegin,
    EpochEnd,
    Feature,
    Frame,
    Heartbeat,
    Hello,
    ResyncReason,
    ResyncRequest,
    Role,
)
from ..shadow.replica import Replica
from ..transport.base import Link, Listener

log = logging.getLogger(__name__)
StatusFn = Callable[[dict[str, Any]], None]


class ShadowAgent:
    """Receives epochs into ``replica``; see the module docstring."""

    def __init__(self, *, listener: Listener, replica: Replica, machine_type: str | None,
                 name: str = "", on_status: StatusFn | None = None,
                 on_commit: Callable[[], object] | None = None) -> None:
        """``on_commit`` runs after each commit is applied, after its ack (e.g. the
        standby's ``prepare`` so that the promotion stream is built off the failover path;
        after the ack because the source's output commit releases the epoch's held output
        on that ack: 4-22 ms of ``prepare`` were added to every held frame's latency)."""
        self.listener = listener
        self.replica = replica
        self.machine_type = machine_type
        self.name = name
        self.on_status = on_status
        self.on_commit = on_commit
        self.link: Link | None = None
        self._session: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_frame_at = 0.0
        self.epochs_committed = 0
        self.resyncs = 0
        #: frames dropped unread after a refusal (the rest of the refused epoch, deltas
        #: the source sent before it read the RESYNC_REQUEST)
        self.skipped = 0
        self.fenced = False
        #: Cluster hook: every frame from the source, before it is processed (heartbeats
        #: carry lease renewals; any frame shows the source's side is alive).
        self.on_frame: Callable[[Frame], None] | None = None
        #: Frames of a generation below this one are refused (set after a promotion).
        self.min_generation = 0
        self._hb_task: asyncio.Task[None] | None = None
        self._bytes_closed = 0
        #: set (and replaced) each time a commit has been applied
        self._applied = asyncio.Event()

    async def wait_committed(self, epoch: int, *, timeout: float = 30.0) -> None:
        """Return once the replica holds ``epoch`` (or a later one) applied.

        The source gets its ack as soon as an epoch is durable (its commit record); the
        apply follows. Whoever reads the replica after an ack (its RAM file, its disks,
        :attr:`Replica.committed_epoch`) waits here first.

        Raises:
            QmpShadowError: the replica did not get there within ``timeout`` seconds (the
                message says which epoch it holds).
        """
        deadline = time.monotonic() + timeout
        while self.replica.committed_epoch < epoch:
            applied = self._applied
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpShadowError(
                    f"the replica holds epoch {self.replica.committed_epoch}, not {epoch}, "
                    f"after {timeout} s: the shadow agent is stuck or the source stopped")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applied.wait(), left)

    @property
    def bytes_received(self) -> int:
        """Bytes received from sources on all links so far (for metrics)."""
        link = self.link
        return self._bytes_closed + (link.stats.bytes_received if link is not None else 0)

    @property
    def session(self) -> str:
        """The current source session id (hex; empty before the first HELLO)."""
        return self._session.hex() if self._session else ""

    def send_heartbeat(self, frame: Heartbeat) -> bool:
        """Send a HEARTBEAT frame to the source without waiting; False when there is no
        link or the previous one is still queued. Never raises for link failures."""
        link = self.link
        if link is None or not link.is_open:
            return False
        if self._hb_task is not None and not self._hb_task.done():
            return False

        async def send() -> None:
            try:
                await link.send_frame(frame)
            except QmpShadowError as exc:
                log.debug("heartbeat not sent: %s", exc)
        self._hb_task = asyncio.create_task(send())
        return True

    def _emit(self, **doc: Any) -> None:
        if self.on_status is not None:
            doc.setdefault("time", time.time())
            self.on_status(doc)

    async def serve(self) -> None:
        """Accept source links until cancelled (or :meth:`stop`)."""
        while True:
            link = await self.listener.accept()
            if self._task is not None and not self._task.done():
                log.info("a new source link replaces the current one")
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, QmpShadowError):
                    await self._task
            self._task = asyncio.create_task(self._handle(link))

    async def stop(self) -> None:
        """Stop receiving: the current link is closed, the open epoch aborted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, QmpShadowError):
                await self._task
        if self.link is not None:
            self.link.abort()
        with contextlib.suppress(QmpShadowError):
            self.replica.abort()

    async def _commit(self, done: Any, link: Link) -> None:
        """``replica.commit`` in a worker thread, acknowledged once it is sealed.

        A worker thread because a full epoch of a large VM takes seconds (every page of a
        fresh RAM file faults in), and this event loop must go on acknowledging lease
        renewals meanwhile. The ack goes out when the commit record is durable, while the
        thread goes on applying: the source's wait (output commit's hold, a sync ack's
        pause) is not made longer by the apply and the data files' sync. Whatever
        happens (a cancel for a promotion, a broken link), this returns only once the
        thread is done, so the replica is never promoted or touched half-applied.
        """
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        sealed: asyncio.Future[float] = loop.create_future()

        def on_sealed() -> None:  # in the worker thread
            loop.call_soon_threadsafe(_resolve, sealed, time.monotonic())

        fut = asyncio.ensure_future(
            asyncio.to_thread(self.replica.commit, done, on_sealed=on_sealed))
        try:
            either: set[asyncio.Future[Any]] = {sealed, fut}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if sealed.done() or (fut.done() and not fut.cancelled()
                                 and fut.exception() is None):
                await link.send_frame(Ack(generation=done.generation, epoch=done.epoch,
                                          digest=done.digest))
            await asyncio.shield(fut)
        except BaseException:
            await asyncio.wait({fut})
            if not fut.cancelled() and fut.exception() is None:
                self._committed(done, t0, sealed)
            raise
        self._committed(done, t0, sealed)

    def _committed(self, done: Any, t0: float, sealed: asyncio.Future[float]) -> None:
        # seal_ms: journal record (+ fsync), the shadow's part of output commit's hold;
        # commit_ms: that and the apply (+ the data files' sync)
        self.epochs_committed += 1
        self._applied.set()
        self._applied = asyncio.Event()
        seal = sealed.result() if sealed.done() else time.monotonic()
        self._emit(event="committed", epoch=done.epoch, pages=done.pages, frames=done.frames,
                   seal_ms=round((seal - t0) * 1000, 1),
                   commit_ms=round((time.monotonic() - t0) * 1000, 1))

    async def _handle(self, link: Link) -> None:
        self.link = link
        replica = self.replica
        asm: EpochAssembler | None = None
        new_session = False
        # After a refusal the source was asked once for a full epoch. What it sent before
        # reading that (the rest of the refused epoch, deltas behind it) is dropped
        # quietly until a full epoch begins: one request per refused frame would each
        # make the source send yet another full epoch after the one already coming.
        dropping = False
        try:
            async with link:
                await link.send_frame(Hello(
                    generation=replica.generation, epoch=replica.committed_epoch,
                    session_id=self._session or b"\0" * 16, role=Role.SHADOW,
                    page_size=replica.page_size or 4096,
                    features=Feature.DELTA | (Feature.DISK if replica.disk_count else 0),
                    max_payload=link.options.max_payload, name=self.name))
                async for frame in link:
                    self.last_frame_at = time.monotonic()
                    if frame.generation < self.min_generation:
                        self.fenced = True
                        raise FrameError(
                            f"frame of generation {frame.generation} from a deposed primary "
                            f"(generation {self.min_generation} is current): refused")
                    if self.on_frame is not None:
                        self.on_frame(frame)
                    if isinstance(frame, Hello):
                        if frame.role != Role.SOURCE:
                            raise FrameError(f"peer says it is {frame.role.name}, expected "
                                             "SOURCE")
                        if frame.features & Feature.DISK and not replica.disk_count:
                            raise FrameError(
                                "the source replicates disks, this shadow has none: give "
                                "the shadow the primary's [[disks]] (docs/disks.md)")
                        new_session = frame.session_id != self._session
                        self._session = frame.session_id
                        self._emit(event="source-connected", peer=str(link.peer),
                                   new_session=new_session)
                        continue
                    if isinstance(frame, Heartbeat):
                        continue
                    if frame.generation < replica.generation:
                        self.fenced = True
                        raise FrameError(
                            f"frame of generation {frame.generation} from a deposed primary "
                            f"(current generation {replica.generation}): refused")
                    if dropping and isinstance(frame, EpochBegin):
                        dropping = frame.base != 0
                    if dropping:
                        self.skipped += 1
                        continue
                    try:
                        if isinstance(frame, EpochBegin):
                            if (new_session or frame.blocks != replica.blocks
                                    or frame.generation != replica.generation):
                                replica.reset(frame.blocks, frame.generation,
                                              machine_type=self.machine_type)
                                new_session = False
                            # epochs only move forward: an older one is refused (resync)
                            asm = EpochAssembler(generation=frame.generation,
                                                 last_epoch=replica.committed_epoch)
                        if asm is None:
                            raise FrameError(f"{type(frame).__name__} outside an epoch")
                        if not isinstance(frame, EpochEnd):
                            replica.stage(frame)
                        done = asm.feed(frame)
                        if done is not None:
                            await self._commit(done, link)
                            if self.on_commit is not None:
                                try:
                                    self.on_commit()
                                except QmpShadowError as exc:  # promotion would fail too
                                    log.error("committed epoch %d is not promotable: %s",
                                              done.epoch, exc)
                                    self._emit(event="not-promotable", epoch=done.epoch,
                                               reason=str(exc))
                            asm = None
                    except FrameError as exc:
                        log.warning("epoch refused, asking for a resync: %s", exc)
                        dropping = True
                        replica.abort()
                        asm = None
                        self.resyncs += 1
                        self._emit(event="resync", reason=str(exc))
                        await link.send_frame(ResyncRequest(
                            generation=replica.generation, epoch=replica.committed_epoch,
                            reason=ResyncReason.DECODE_ERROR, message=str(exc)[:200]))
        except QmpShadowError as exc:
            log.warning("source link ended: %s", exc)
            self._emit(event="source-lost", reason=str(exc))
        finally:
            with contextlib.suppress(QmpShadowError):
                replica.abort()
            if self.link is link:
                self.link = None
            self._bytes_closed += link.stats.bytes_received  # after: never counted twice


def _resolve(fut: asyncio.Future[float], value: float) -> None:
    if not fut.done():
        fut.set_result(value)
