"""COLO source: qmpshadow as the secondary endpoint of an unmodified QEMU's COLO protocol.

The primary has capability ``x-colo`` and migrates to our unix socket. Its initial stream
becomes epoch 1 (every page); each checkpoint (dirty pages + device state) becomes the next
epoch. :class:`ColoCapture` is the sans-I/O core: stream bytes in, epochs and the return-path
answers out. When the answers are sent is the ack mode's business (see :class:`ColoSource`):
``async`` answers as soon as the epoch is captured here (when nothing has to happen inside
the pause, together with CHECKPOINT_REPLY: QEMU reads the answers only once the whole
checkpoint is in our socket), ``sync`` only once the shadow committed it — the primary
stays paused until it gets VMSTATE_LOADED.

A planned switchover uses that pause: :meth:`ColoSource.final_checkpoint` makes QEMU take
a checkpoint now and *holds* it (the answers are not sent), so the primary stays stopped at
that epoch boundary, with only its dirty pages and device state to ship;
:meth:`ColoSource.release_held` answers (the primary resumes: the switchover's rollback),
otherwise the old primary is killed without ever being answered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..disk.replicator import DiskReplicator, PendingCapture
from ..errors import (
    AccelError,
    DiskError,
    QmpShadowError,
    StreamFormatError,
    StreamUnsupportedError,
)
from ..frames.wire import DeviceStateFormat
from ..migstream import StreamParser
from ..migstream.colo import encode_colo
from ..migstream.constants import ColoMessage, RamFlag
from ..migstream.events import (
    ColoMessageEvent,
    ColoVmstate,
    DeviceSection,
    EndOfStream,
    RamMemSize,
    RamRecords,
    RamXbzrle,
    VmDescription,
    _NeedData,
)
from ..migstream.writer import device_section_bytes
from ..qmp.control import QmpControl
from .epoch import CapturedEpoch, block_table

AckMode = str  # "async" | "sync"
_T = TypeVar("_T")
log = logging.getLogger(__name__)


@dataclass
class EpochReady:
    """An epoch is captured; ``answers`` are the return-path messages it calls for.

    With :attr:`ColoCapture.defer_pages` its pages are copied out of the stream only by
    :meth:`take_pages` (until then ``epoch.main`` and ``epoch.small`` are empty): the
    shell answers first, then copies, so the primary's pause does not include the copy.
    """

    epoch: CapturedEpoch
    answers: list[ColoMessage]
    pending: list[RamRecords] = field(default_factory=list)

    def take_pages(self) -> None:
        """Copy the deferred pages into the epoch (a no-op once done)."""
        for ev in self.pending:
            _copy_pages(self.epoch, ev)
        self.pending = []


@dataclass
class Received:
    """With :attr:`ColoCapture.early_ack`: checkpoint ``number``'s bytes are all here
    (not parsed yet); ``answers`` may go now if the ack mode allows. Its
    :class:`EpochReady` follows, with the same answers (the shell sends them once)."""

    number: int
    answers: list[ColoMessage]


@dataclass
class Answer:
    """Return-path messages to send now (not tied to an epoch: CHECKPOINT_REPLY)."""

    answers: list[ColoMessage]


@dataclass
class ColoCapture:
    """Sans-I/O COLO secondary that turns the primary's stream into epochs."""

    main_block: str
    parser: StreamParser = field(default_factory=StreamParser)
    epoch_number: int = 0
    _blocks: list[tuple[str, int]] = field(default_factory=list)
    _current: CapturedEpoch | None = None
    _devices: list[bytes] = field(default_factory=list)
    _request_at: float | None = None
    ended: bool = False
    #: leave the page copies to :meth:`EpochReady.take_pages` (the RAM records refer
    #: into the received chunks, which stay valid)
    defer_pages: bool = False
    #: report :class:`Received` as soon as a checkpoint's device state is buffered,
    #: before it is parsed and split
    early_ack: bool = False
    _records: list[RamRecords] = field(default_factory=list)
    _received: bool = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes of the primary's stream (``b""`` when it closed)."""
        self.parser.receive_data(data)

    def _epoch(self) -> CapturedEpoch:
        if self._current is None:
            if not self._blocks:
                raise StreamFormatError("RAM pages before the RAM setup record",
                                        offset=self.parser.offset, section="ram")
            self.epoch_number += 1
            # every checkpoint holds what was dirtied since the previous one; the first
            # is QEMU's bulk pass over all RAM
            first = self.epoch_number == 1
            self._current = CapturedEpoch(
                self.epoch_number, full=first, base=0 if first else self.epoch_number - 1,
                blocks=block_table(self._blocks, self.main_block),
                main_block=self.main_block, page_size=self.parser.page_size)
        return self._current

    def next_event(self) -> EpochReady | Received | Answer | None:
        """The next thing the shell must act on, or None when more bytes are needed.

        Raises StreamFormatError for a bad stream, StreamUnsupportedError for XBZRLE (the
        secondary keeps no RAM to decode it against) or a main block missing from the
        primary's RAM.
        """
        while True:
            if self.early_ack and not self._received and self.parser.colo_vmstate_buffered():
                self._received = True
                return Received(self._epoch().number, [ColoMessage.VMSTATE_RECEIVED,
                                                       ColoMessage.VMSTATE_LOADED])
            ev = self.parser.next_event()
            if isinstance(ev, _NeedData):
                return None
            if isinstance(ev, RamRecords):
                self._take_records(ev)
            elif isinstance(ev, RamMemSize):
                self._blocks = [(b.idstr, b.used_length) for b in ev.blocks]
                if self.main_block not in {b for b, _ in self._blocks}:
                    names = ", ".join(b for b, _ in self._blocks)
                    raise StreamUnsupportedError(
                        f"main RAM block {self.main_block!r} is not in the primary's stream "
                        f"(blocks: {names}); set memory.backend_id in the VM spec to the "
                        "primary's RAM block", offset=self.parser.offset, section="ram")
            elif isinstance(ev, RamXbzrle):
                raise StreamUnsupportedError(
                    "XBZRLE page in a COLO stream: disable the xbzrle capability on the "
                    "primary", offset=self.parser.offset, section="ram")
            elif isinstance(ev, DeviceSection):
                self._devices.append(device_section_bytes(ev))
            elif isinstance(ev, VmDescription):
                if not self.parser.colo_enabled:
                    raise StreamUnsupportedError(
                        "the primary's stream did not enable COLO: set capability x-colo "
                        "before migrating", offset=self.parser.offset)
                ep = self._epoch()
                ep.device_state = b"".join(self._devices) + b"\x00"
                self._devices = []
                return self._ready(ep, [ColoMessage.CHECKPOINT_READY])
            elif isinstance(ev, ColoMessageEvent):
                if ev.message == ColoMessage.CHECKPOINT_REQUEST:
                    self._request_at = time.monotonic()
                    return Answer([ColoMessage.CHECKPOINT_REPLY])
            elif isinstance(ev, ColoVmstate):
                ep = self._epoch()
                ep.device_state = ev.data
                ep.device_format = DeviceStateFormat.QEMU_SECTIONS
                self._received = False
                return self._ready(ep, [ColoMessage.VMSTATE_RECEIVED,
                                        ColoMessage.VMSTATE_LOADED])
            elif isinstance(ev, EndOfStream):
                self.ended = True
                return None

    def _take_records(self, ev: RamRecords) -> None:
        ep = self._epoch()
        ep.reported_pages += len(ev.records)
        if self.defer_pages:
            self._records.append(ev)
        else:
            _copy_pages(ep, ev)

    def _ready(self, ep: CapturedEpoch, answers: list[ColoMessage]) -> EpochReady:
        self._current = None
        pending, self._records = self._records, []
        return EpochReady(ep, answers, pending)


def _copy_pages(ep: CapturedEpoch, ev: RamRecords) -> None:
    """The pages of ``ev`` into ``ep`` (each its own bytes)."""
    ps = ev.page_size
    data = ev.data
    zero = bytes(ps)
    main = ep.main
    main_block = ep.main_block
    page_flag = RamFlag.PAGE
    for flags, offset, block, pos in ev.records:
        if flags & page_flag:
            page = bytes(data[pos : pos + ps])
        else:
            fill = data[pos]
            page = zero if fill == 0 else bytes([fill]) * ps
        if block == main_block:
            main[offset // ps] = page
        else:
            ep.small.setdefault(block, {})[offset] = page


EpochSink = Callable[[CapturedEpoch], Awaitable[None]]
#: how often a checkpoint asked for is asked for again while none came (see
#: ColoSource._notify_until)
RENOTIFY_S = 0.05


class ColoSource:
    """Asyncio shell: drives the primary into COLO and captures its epochs.

    ``sink(epoch)`` is awaited for every epoch: in ``sync`` mode the primary's answer
    (READY/LOADED) is sent only after it returns, so a sink that returns once the shadow
    committed makes the ack synchronous; in ``async`` mode the answers go first.
    """

    def __init__(self, qmp: QmpControl, *, main_block: str, sock_path: str | Path,
                 sink: EpochSink, ack_mode: AckMode = "async",
                 checkpoint_delay_ms: int = 200, disks: DiskReplicator | None = None,
                 disk_full: Callable[[], bool] | None = None) -> None:
        """``disks``: capture the VM's disks at each checkpoint too, while the primary
        waits for our answer (COLO keeps block nodes active); ``disk_full()`` says
        whether the next capture must copy every block (the shadow needs a full epoch)."""
        self.disks = disks
        self.disk_full = disk_full
        if ack_mode not in ("async", "sync"):
            raise QmpShadowError(f"ack mode must be 'async' or 'sync', got {ack_mode!r}")
        self.qmp = qmp
        self.sock_path = str(sock_path)
        self.sink = sink
        self.ack_mode = ack_mode
        self.delay = checkpoint_delay_ms
        self.capture = ColoCapture(main_block, defer_pages=True, early_ack=True)
        #: the checkpoint being parsed was answered on :class:`Received`, or before
        self._early = False
        #: the checkpoint in flight was answered together with its CHECKPOINT_REPLY
        #: (see :meth:`_may_pipeline`); its bookkeeping waits for its device state
        self._pipelined = False
        #: wall-clock time just before the last CHECKPOINT_REPLY went out: the primary's
        #: STOP for that checkpoint is later (QEMU stops only once it read the reply)
        self._reply_wall = 0.0
        self._held_reply_wall = 0.0
        self.epochs = 0
        self._server: asyncio.AbstractServer | None = None
        self._done: asyncio.Future[None] | None = None
        self._link: _PrimaryLink | None = None
        self._serving: asyncio.Future[None] | None = None
        self._hold: asyncio.Future[CapturedEpoch] | None = None
        self._next_done: asyncio.Future[int] | None = None
        self._held_answer: bytes | None = None
        self._held_since = 0
        #: event seq after the last answered checkpoint: the next STOP is newer than it
        self._answered_seq = 0
        #: wall-clock time of the held checkpoint's STOP event (QEMU's timestamp)
        self.stopped_at: float | None = None
        #: Called with the epoch's number while the primary is stopped in its checkpoint,
        #: before any answer goes out (output commit seals the output it produced: the
        #: vCPUs stopped after CHECKPOINT_REPLY and resume only on VMSTATE_LOADED, or on
        #: CHECKPOINT_READY for the initial stream).
        self.on_stopped: Callable[[int], None] | None = None
        #: Called after each answer that resumed the primary (the epoch pacer's clock).
        self.on_answered: Callable[[], None] | None = None
        #: loop time of the last answer (the primary resumed then); None before the first
        self.answered_at: float | None = None
        #: a checkpoint is in flight: CHECKPOINT_REQUEST seen, the answer not sent yet
        self.in_checkpoint = False
        self._request_waiters: list[asyncio.Future[None]] = []

    @property
    def holding(self) -> bool:
        """A checkpoint is held: the primary is stopped, waiting for our answer."""
        return self._held_answer is not None

    async def final_checkpoint(self, *, timeout: float = 10.0) -> CapturedEpoch:
        """Take a checkpoint now and keep the primary stopped at it (see the module doc).

        QEMU 7.2's ``migrate-set-parameters x-checkpoint-delay`` calls
        ``colo_checkpoint_notify()`` while in COLO state, which starts a checkpoint at
        once (migration/migration.c, ``migrate_params_apply``); setting the unchanged
        delay is our "checkpoint now". A checkpoint already in flight whose answer has not
        gone out yet is the one held (then the primary stopped before the request).
        :attr:`stopped_at` is its STOP event's timestamp (None if QEMU did not send one
        within a second).

        Raises QmpShadowError: no COLO session, a checkpoint already held, QMP failed, or
        no checkpoint within ``timeout`` (the primary runs on).
        """
        if (self._link is None or self._link.is_closing() or self._done is None
                or self._done.done()):
            raise QmpShadowError("no COLO session with the primary: cannot take a final "
                                 "checkpoint")
        if self._hold is not None or self.holding:
            raise QmpShadowError("a final COLO checkpoint is already held")
        self.stopped_at = None
        hold: asyncio.Future[CapturedEpoch] = asyncio.get_running_loop().create_future()
        self._hold = hold
        try:
            ep = await self._checkpoint(hold, timeout)
        finally:
            self._hold = None
        with contextlib.suppress(QmpShadowError):
            # the first STOP after the held checkpoint's reply: with pipelined answers
            # the checkpoint before it may have stopped (and resumed) after _held_since
            after = self._held_reply_wall
            stop = await self.qmp.wait_event("STOP", timeout=1.0, since=self._held_since,
                                             predicate=lambda e: e.timestamp >= after)
            self.stopped_at = stop.timestamp
        return ep

    async def checkpoint_now(self, *, timeout: float = 10.0) -> int:
        """Make QEMU take a checkpoint now (as :meth:`final_checkpoint` does) and return
        the number of the next epoch once it was answered and handed to the sink (a
        checkpoint in flight may be that one). A switchover runs one right before its
        final checkpoint, so that the final one, taken with the primary stopped until the
        shadow committed it, holds only what the guest dirtied in between.

        Raises QmpShadowError: no COLO session, QMP failed, or no epoch within ``timeout``.
        """
        if self._done is None or self._done.done():
            raise QmpShadowError("no COLO session with the primary: cannot take a checkpoint")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._next_done = fut
        try:
            return await self._checkpoint(fut, timeout)
        finally:
            self._next_done = None

    async def request_checkpoint(self, *, timeout: float = 10.0) -> None:
        """Ask QEMU for a checkpoint now and return once one started (its
        CHECKPOINT_REQUEST came after the ask; then the primary stops after our reply, so
        the checkpoint covers everything the guest did before the ask). The epoch pacer's
        "output is waiting" path; unlike :meth:`checkpoint_now` it does not wait for the
        epoch.

        Raises QmpShadowError: no COLO session, QMP failed, or no checkpoint started
        within ``timeout``.
        """
        if self._done is None or self._done.done():
            raise QmpShadowError("no COLO session with the primary: cannot take a checkpoint")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._request_waiters.append(fut)
        try:
            await self._checkpoint(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._request_waiters.remove(fut)

    async def _checkpoint(self, fut: asyncio.Future[_T], timeout: float) -> _T:
        """``fut``'s result, once the handler resolved it for a checkpoint asked for now.

        Raises QmpShadowError: QMP failed, or no checkpoint within ``timeout`` (the primary
        runs on).
        """
        try:
            await self._notify_until(fut, timeout)
        finally:
            if not fut.done():
                fut.cancel()
        if fut.cancelled():
            raise QmpShadowError(f"the primary took no COLO checkpoint within {timeout:g} s "
                                 "of the request; it runs on")
        return fut.result()

    async def _notify_until(self, fut: asyncio.Future[Any], timeout: float) -> None:
        """Ask QEMU for a checkpoint until ``fut`` resolves or ``timeout`` passes.

        Asked again every :data:`RENOTIFY_S`: 7.2's COLO thread wakes on its event and
        resets it only inside the next checkpoint (after REQUEST/REPLY and the stop), so a
        notify landing in between is absorbed by that checkpoint, and if that one is not
        the one waited for, the next would come only with the timer, which the notify
        re-armed a full interval ahead (seen once: a 500 ms wait). An extra notify costs
        at most one extra checkpoint right after the one waited for.

        Raises QmpShadowError (QMP failed).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not fut.done():
            await self.qmp.migrate_set_parameters(x_checkpoint_delay=self.delay)
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(RENOTIFY_S, left)):
                    await asyncio.shield(fut)

    async def release_held(self) -> bool:
        """Answer the held checkpoint (VMSTATE_RECEIVED/LOADED): the primary resumes.
        Returns False when nothing was held or the session is gone.

        Raises nothing: a dead connection is reported as False.
        """
        answer, self._held_answer = self._held_answer, None
        if answer is None or self._link is None or self._link.is_closing():
            return False
        self._answered(self._link, answer)
        return True

    def _may_answer_early(self) -> bool:
        """Whether the checkpoint in flight may be answered before it is parsed: async,
        no disk capture, no switchover waiting to hold it."""
        return (self.ack_mode == "async" and self.disks is None
                and not (self._hold is not None and not self._hold.done()))

    def _may_pipeline(self) -> bool:
        """Whether the checkpoint that starts now may be answered with its reply.

        QEMU reads VMSTATE_RECEIVED and VMSTATE_LOADED only after it wrote the whole
        checkpoint into our socket (migration/colo.c, colo_do_checkpoint_transaction), so
        answers sent together with CHECKPOINT_REPLY resume the primary the moment its
        checkpoint is in our receive buffer: the async guarantee (the epoch is on this
        host, ours alone) without our parse and wakeup inside its pause. Not when
        something has to happen while the primary is stopped: output to seal
        (``on_stopped``), a disk capture, a switchover's hold, or the sync ack.
        """
        return self.on_stopped is None and self._may_answer_early()

    def _pipelined_done(self, link: _PrimaryLink) -> bool:
        """If the checkpoint in flight was answered with its reply, its bookkeeping now
        (its device state is here) and True."""
        if not self._pipelined:
            return False
        self._pipelined = False
        self._answered(link, b"")
        self._early = True
        return True

    def _answered(self, link: _PrimaryLink, answer: bytes) -> None:
        """Send a checkpoint's answer (the primary resumes on it; ``b""``: it was sent
        with the reply) and note when."""
        if answer:
            link.write(answer)
        self._answered_seq = self.qmp.last_event_seq
        self.in_checkpoint = False
        self.answered_at = asyncio.get_running_loop().time()
        if self.on_answered is not None:
            self.on_answered()

    async def check_accel(self) -> None:
        """Refuse a primary not running under KVM (COLO deadlocks under TCG on 7.2).

        Raises AccelError.
        """
        kvm = await self.qmp.execute("query-kvm")
        if not (kvm.get("enabled") and kvm.get("present")):
            raise AccelError(
                "the colo source needs the primary under KVM: QEMU 7.2's COLO deadlocks at "
                "its first checkpoint under TCG. Use the shared-ram source (--source "
                "shared-ram) or run the primary with -accel kvm")

    async def run(self) -> None:
        """Start COLO and capture until the primary stops sending or the task is cancelled.

        Raises AccelError (not KVM), QmpCommandError (QEMU refused), StreamFormatError.
        """
        await self.check_accel()
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        self._server = await loop.create_unix_server(self._connected, self.sock_path)
        try:
            if self.disks is not None:
                await self.disks.open()
            # x-ignore-shared off: a primary that was a promoted shadow still has it on
            # (its promotion stream used it), and its RAM is a shared file: QEMU would
            # then leave the main RAM out of every checkpoint
            await self.qmp.migrate_set_capabilities({"x-colo": True, "events": False,
                                                     "x-ignore-shared": False})
            await self.qmp.migrate_set_parameters(x_checkpoint_delay=self.delay,
                                                  max_bandwidth=1 << 40)
            await self.qmp.migrate(f"unix:{self.sock_path}")
            await self._done
        finally:
            self._server.close()
            if self._link is not None:  # hang up: the primary's next REQUEST fails
                self._link.close()
            if self._serving is not None:
                self._serving.cancel()
                await asyncio.gather(self._serving, return_exceptions=True)
            if self.disks is not None:
                await self.disks.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sock_path)

    async def _take_disk(self, ep: CapturedEpoch, pending: PendingCapture | None, *,
                         release: bool) -> None:
        """The epoch's disk blocks. A failure does not end the COLO session (the primary
        must get its answer): the epoch is marked and the agent does not ship it."""
        assert self.disks is not None
        ep.disks = True
        try:
            if pending is None:
                raise DiskError("the disk transaction failed")
            if release:
                await self.disks.release(pending)
            cap = await self.disks.finish(pending)
        except DiskError as exc:
            log.warning("epoch %d: disk capture failed, not shipped: %s", ep.number, exc)
            ep.disk_failed = True
            return
        ep.disk = cap.blocks
        ep.disk_full = cap.full

    def _connected(self) -> _PrimaryLink:
        return _PrimaryLink(self)

    def _on_items(self, link: _PrimaryLink) -> None:
        """Parse what the primary sent so far, as it arrives (called from the protocol).

        Runs in the transport's callback, not in :meth:`_serve`'s task, so that a
        checkpoint's answer in async mode goes out as soon as its last byte is here: no
        task wakeup between the device state's arrival and the answer (which resumes the
        primary). Epochs are queued for :meth:`_serve` in order; reading pauses while
        one is queued, so the primary's next checkpoint waits for the sink, as it would
        with a reader that awaits the sink before reading on.
        """
        cap = self.capture
        while (item := cap.next_event()) is not None:
            if isinstance(item, Answer):  # CHECKPOINT_REQUEST: one starts
                self.in_checkpoint = True
                for w in self._request_waiters:
                    if not w.done():
                        w.set_result(None)
                answers = list(item.answers)
                if self._may_pipeline():
                    answers += [ColoMessage.VMSTATE_RECEIVED, ColoMessage.VMSTATE_LOADED]
                    self._pipelined = True
                self._reply_wall = time.time()
                link.write(b"".join(encode_colo(m) for m in answers))
                continue
            if isinstance(item, Received):
                # answer now, before parsing the device state (the primary is paused
                # until the answer), unless it went with the reply
                if not self._pipelined_done(link) and self._may_answer_early():
                    if self.on_stopped is not None:
                        self.on_stopped(item.number)
                    self._answered(link, b"".join(encode_colo(m) for m in item.answers))
                    self._early = True
                continue
            self.epochs += 1
            ep = item.epoch
            self._pipelined_done(link)  # (without a Received before it)
            early, self._early = self._early, False
            if self.on_stopped is not None and not early:
                # the primary waits for our answer: all it produced is before it
                self.on_stopped(ep.number)
            item.take_pages()  # after the early answer: the primary runs meanwhile
            link.queue.append((item, early))
            link.pause()
            break  # the rest is parsed once _serve took this epoch

    async def _serve(self, link: _PrimaryLink) -> None:
        """The primary's epochs, in order: answers that wait (sync, disks, a held
        switchover) and the sink."""
        assert self._done is not None
        try:
            while True:
                if not link.queue:
                    if link.error is not None:
                        raise link.error
                    if link.closed or self.capture.ended:
                        break
                    link.wake.clear()
                    link.resume()
                    await link.wake.wait()
                    continue
                item, answered = link.queue.popleft()
                await self._take(link, item, answered)
                if self._next_done is not None and not self._next_done.done():
                    self._next_done.set_result(item.epoch.number)
                link.parse()  # what arrived meanwhile (reading resumes once drained)
            if not self._done.done():
                self._done.set_result(None)
        except Exception as exc:  # delivered to run(); the connection closes below
            if not self._done.done():
                self._done.set_exception(exc)
        finally:
            link.close()

    async def _take(self, link: _PrimaryLink, item: EpochReady, answered: bool) -> None:
        answer = b"".join(encode_colo(m) for m in item.answers)
        ep = item.epoch
        held = self._hold is not None and not self._hold.done()
        pending = None
        if self.disks is not None:
            # the primary is stopped until it gets our answer: the disk's checkpoint is now
            full = ep.full or (self.disk_full is not None and self.disk_full())
            with contextlib.suppress(DiskError):  # _take_disk marks the epoch
                pending = await self.disks.start(
                    full=full, hold=self.ack_mode == "async" and not held)
        if held and not answered:
            # the switchover's final epoch: it ships it; nobody answers. Its disk copy
            # runs inside the held pause, as in sync mode
            if self.disks is not None:
                await self._take_disk(ep, pending, release=False)
            self._held_answer = answer
            self._held_since = self._answered_seq  # its STOP is newer
            self._held_reply_wall = self._reply_wall
            assert self._hold is not None
            self._hold.set_result(ep)
            return
        if self.ack_mode == "async":
            if not answered:
                self._answered(link, answer)
            if self.disks is not None:
                await self._take_disk(ep, pending, release=True)
            await self.sink(ep)
        else:
            if self.disks is not None:  # sync: the copy is inside the pause
                await self._take_disk(ep, pending, release=False)
            await self.sink(ep)
            self._answered(link, answer)


class _PrimaryLink(asyncio.Protocol):
    """The primary's migration connection: bytes go to the capture as they arrive."""

    def __init__(self, src: ColoSource) -> None:
        self.src = src
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[EpochReady, bool]] = collections.deque()
        self.wake = asyncio.Event()
        self.error: BaseException | None = None
        self.closed = False
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.src._link is not None:
            transport.close()  # one primary per source
            self.closed = True
            return
        self.transport = transport
        self.src._link = self
        self.src._serving = asyncio.ensure_future(self.src._serve(self))

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self) -> bool:
        self.closed = True
        self._feed(b"")
        return False

    def _feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.src.capture.receive_data(data)
        except Exception as exc:  # a bad stream: _serve raises it
            self._fail(exc)
            return
        self.parse()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.pause()
        self.wake.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:  # reset, not closed: a checkpoint cut off is still an error
            self.closed = True
            self._feed(b"")
        self.wake.set()

    def parse(self) -> None:
        """Parse what is buffered, unless an epoch waits for :meth:`ColoSource._serve`."""
        if self.queue or self.error is not None:
            return
        try:
            self.src._on_items(self)
        except Exception as exc:  # a bad stream: _serve raises it
            self._fail(exc)
            return
        if self.queue or self.closed:
            self.wake.set()  # else _serve has nothing to do: not woken for nothing

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
