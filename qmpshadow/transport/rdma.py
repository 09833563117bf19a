"""RDMA links: delta frames over an RC queue pair (pyverbs), set up over a TCP control link.

The same :class:`~qmpshadow.transport.base.Link` / :class:`~qmpshadow.transport.base.Listener`
as :mod:`~qmpshadow.transport.tcp` and :mod:`~qmpshadow.transport.local`. Per link:

- **Control channel**: a TCP link from :func:`qmpshadow.transport.tcp.connect` /
  :func:`~qmpshadow.transport.tcp.listen`, so mutual TLS 1.3 (``tls=TlsConfig(...)``) or
  plain TCP on loopback (``insecure_loopback=True``) authenticates the peer exactly as for TCP
  links. Over it each side sends one HELLO frame carrying its queue pair's parameters (QPN,
  PSN, GID, LID, active MTU, the address, rkey and geometry of its receive ring), moves its
  queue pair to RTS, posts its receives and sends a second HELLO saying it is ready. These
  HELLOs are transport setup (``name`` starts ``qsrdma/1``), never delivered to the caller.
  The control link then stays open: its end tells the other side that this one closed
  (after every write completed) or died.
- **Data path**: one RC queue pair per link. Each side registers a **ring** of ``slots``
  buffers the peer may write into. A frame is cut into pieces of at most one slot, staged in
  a registered send buffer and written with RDMA WRITE WITH IMMEDIATE into the next slot of
  the peer's ring (the immediate value is the piece's length). The receiver feeds slots, in
  order, to a :class:`~qmpshadow.frames.wire.FrameDecoder`, so checksums are verified as on
  every transport and only whole, verified frames are delivered.
- **Credits**: the sender may write only into slots the receiver gave back. The receiver
  gives slots back (a 0-byte SEND WITH IMMEDIATE carrying the count, once half a ring is
  owed) after their bytes went to the decoder, and it feeds the decoder only while
  :meth:`RdmaLink.receive` has no frame to return: a slow consumer holds the ring full.
  :meth:`RdmaLink.send` copies the frame into the staging area and returns; pieces are
  written as credits come back, and ``send`` awaits only while the staging area is full
  (backpressure, counted in ``stats.send_blocked_s``; a full ring counts a
  ``stats.read_pauses``). A link thus holds at most ``write_buffer`` + ``read_buffer``
  bytes in flight (a TCP link holds its kernel socket buffers on top).
- **Completions**: one completion queue with a completion channel whose descriptor is
  watched by the event loop (``loop.add_reader``); no thread polls. Only every few send
  work requests are signaled (always the one taking the last staging slot, and a final
  0-byte RDMA WRITE on close): a completion retires everything posted before it.
- **Failures**: a queue-pair error (retries exhausted, remote access error, ...) or the end
  of the control link ends the link: frames received whole before are still delivered, then
  :class:`~qmpshadow.transport.errors.LinkDroppedError` (with ``partial_bytes`` when a
  frame was cut short) or, when the peer closed between frames,
  :class:`~qmpshadow.transport.errors.LinkClosedError` (``by_peer``). Nothing partial is
  ever delivered; the layer above reconnects and resynchronises with a full epoch.

Sizes come from :class:`~qmpshadow.transport.base.LinkOptions`: ``read_buffer`` is the ring
(8 slots of ``read_buffer / 8`` bytes, 4 KiB to 1 MiB each), ``write_buffer`` the send
staging area (2 to 64 of the peer's slots).

RDMA data is neither encrypted nor authenticated on the wire (RoCE has no such layer): the
control channel authenticates the peer and hands out the queue pair's numbers only to it;
frame checksums catch corruption. pyverbs is imported on first use; without it, or without
an RDMA device, :func:`connect` and :func:`listen` raise
:class:`~qmpshadow.transport._verbs.RdmaUnavailableError` naming ``--transport tcp``.
See docs/transport-rdma.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from qmpshadow.errors import FrameError, QmpShadowError, TransportError
from qmpshadow.frames.wire import Feature, Frame, FrameDecoder, Hello, Role
from qmpshadow.transport import tcp
from qmpshadow.transport._stream import whole_frame
from qmpshadow.transport._verbs import (
    MTU_BYTES,
    WC_RECV,
    WC_RECV_RDMA_WITH_IMM,
    WC_SUCCESS,
    WC_WR_FLUSH_ERR,
    Completion,
    Endpoint,
    PortInfo,
    RdmaUnavailableError,
    devices,
    find_port,
    gid_text,
    load,
)
from qmpshadow.transport.base import (
    Link,
    LinkOptions,
    LinkState,
    Listener,
    ListenerStats,
    PeerIdentity,
    SendData,
)
from qmpshadow.transport.errors import LinkClosedError, LinkDroppedError

__all__ = [
    "RdmaLink",
    "RdmaListener",
    "RdmaUnavailableError",
    "available",
    "connect",
    "listen",
]

log = logging.getLogger("qmpshadow.transport")

#: Prefix of the control HELLOs' ``name``.
SETUP_TAG: Final = "qsrdma/1"
_PARAMS = struct.Struct("<IIQIII16sHBB")  # qpn psn ring_addr rkey slot_size slots gid lid mtu 0
#: Ring geometry bounds (the peer's advertised values are checked against them too).
MIN_SLOT: Final = 4096
MAX_SLOT: Final = 1 << 20
MAX_PEER_SLOT: Final = 1 << 20
MAX_SLOTS: Final = 256
MAX_TX_SLOTS: Final = 64
_RECV_SPARE: Final = 8

# wr_id = kind << 32 | index
_WR_RECV: Final = 1
_WR_DATA: Final = 2
_WR_CREDIT: Final = 3
_WR_FENCE: Final = 4
_WR_WHAT: Final = {_WR_RECV: "receive", _WR_DATA: "RDMA WRITE", _WR_CREDIT: "credit SEND",
                   _WR_FENCE: "closing RDMA WRITE"}

_KEEPALIVE: Final = tcp.KeepAlive()
_ENDED: Final = (LinkState.CLOSED, LinkState.FAILED)
_LIVE: Final = (LinkState.OPEN, LinkState.CLOSING)


def available() -> str | None:
    """None when an RDMA link can be set up here, else why not (without importing pyverbs
    when there is no device).
    """
    if not devices():
        return "no RDMA device (/sys/class/infiniband is empty)"
    try:
        find_port()
        load()
    except RdmaUnavailableError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# Setup parameters


@dataclass(frozen=True, slots=True)
class _Params:
    """What one side tells the other over the control channel."""

    qpn: int
    psn: int
    ring_addr: int
    rkey: int
    slot_size: int
    slots: int
    gid: bytes
    lid: int
    mtu: int

    def encode(self) -> str:
        raw = _PARAMS.pack(self.qpn, self.psn, self.ring_addr, self.rkey, self.slot_size,
                           self.slots, self.gid, self.lid, self.mtu, 0)
        return f"{SETUP_TAG} params {raw.hex()}"

    @classmethod
    def decode(cls, name: str, where: str) -> _Params:
        """Raises TransportError when ``name`` is not a valid parameter message."""
        prefix = f"{SETUP_TAG} params "
        if not name.startswith(prefix):
            raise _not_rdma(where, name)
        try:
            raw = bytes.fromhex(name[len(prefix):])
            qpn, psn, addr, rkey, slot, slots, gid, lid, mtu, _ = _PARAMS.unpack(raw)
        except (ValueError, struct.error):
            raise TransportError(
                f"{where} sent malformed RDMA parameters {name!r}: expected "
                f"{_PARAMS.size} bytes in hex; run the same qmpshadow release on both sides"
            ) from None
        problems = []
        if not 0 < qpn < 1 << 24:
            problems.append(f"QPN {qpn}")
        if psn >= 1 << 24:
            problems.append(f"PSN {psn}")
        if not MIN_SLOT <= slot <= MAX_PEER_SLOT:
            problems.append(f"slot size {slot}")
        if not 1 <= slots <= MAX_SLOTS:
            problems.append(f"{slots} slots")
        if mtu not in MTU_BYTES:
            problems.append(f"MTU code {mtu}")
        if problems:
            raise TransportError(
                f"{where} sent out-of-range RDMA parameters ({', '.join(problems)}): "
                f"expected QPN/PSN below 2^24, slots of {MIN_SLOT}..{MAX_PEER_SLOT} bytes, "
                f"1..{MAX_SLOTS} slots, an ibv_mtu code 1..5"
            )
        return cls(qpn=qpn, psn=psn, ring_addr=addr, rkey=rkey, slot_size=slot, slots=slots,
                   gid=gid, lid=lid, mtu=mtu)


def _not_rdma(where: str, what: str) -> TransportError:
    return TransportError(
        f"{where} answered {what!r} where RDMA setup ({SETUP_TAG}) was expected: it is not "
        "an RDMA endpoint (does it listen with --transport tcp?); use the same transport "
        "on both sides"
    )


def ring_geometry(read_buffer: int) -> tuple[int, int]:
    """``(slots, slot_size)`` of the receive ring for ``read_buffer`` bytes."""
    slot = min(MAX_SLOT, max(MIN_SLOT, (read_buffer // 8) // 4096 * 4096))
    slots = min(MAX_SLOTS, max(2, read_buffer // slot))
    return slots, slot


def _hello(side: str, token: bytes, options: LinkOptions, name: str) -> Hello:
    return Hello(generation=0, epoch=0, session_id=token,
                 role=Role.SOURCE if side == "client" else Role.SHADOW, page_size=4096,
                 features=Feature.NONE, max_payload=options.max_payload, name=name)


# ---------------------------------------------------------------------------------------------
# Link


class RdmaLink(Link):
    """A :class:`Link` over an RC queue pair (see the module docstring)."""

    def __init__(self, control: Link, ep: Endpoint, remote: _Params, *, peer: PeerIdentity,
                 options: LinkOptions, ring_slots: int, slot_size: int, tx_slots: int,
                 send_view: memoryview) -> None:
        super().__init__(peer=peer, options=options)
        self._control = control
        self._ep = ep
        self._remote = remote
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_payload=options.max_payload)
        self._ready: deque[Frame] = deque()
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._rx_event = asyncio.Event()
        self._tx_event = asyncio.Event()
        self._released = False
        self._judging = False
        self._qp_error: TransportError | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # receive side: the ring the peer writes into
        self._ring = ep.ring.view
        self._ring_slots = ring_slots
        self._slot_size = slot_size
        self._rx_seq = 0
        self._arrived: deque[tuple[int, int]] = deque()  # (slot, length) not yet consumed
        self._owed = 0  # consumed slots not yet given back
        self._credit_batch = max(1, ring_slots // 2)
        # send side: the peer's ring, our staging slots
        self._send_view = send_view
        self._credits = remote.slots
        self._tx_seq = 0
        self._tx_free: deque[int] = deque(range(tx_slots))
        self._staged: deque[tuple[int, int]] = deque()  # (slot, length) awaiting a credit
        self._send_waiting = False
        # Send work requests posted and not yet retired, in order: (kind, index, signaled).
        # Only every few are signaled; a signaled one's completion retires all before it.
        self._sq: deque[tuple[int, int, bool]] = deque()
        self._since_signal = 0
        self._signal_every = max(1, tx_slots // 2)
        self.device = str(ep.port)
        self._loop.add_reader(ep.fd, self._on_completion_event)
        self._watcher = self._loop.create_task(self._watch_control())

    # -- ending ----------------------------------------------------------------------------

    def _release(self) -> None:
        """Stop watching, destroy the queue pair and buffers, drop the control link."""
        if self._released:
            return
        self._released = True
        self._arrived.clear()
        self._staged.clear()
        with contextlib.suppress(ValueError, OSError):
            if self._ep.fd >= 0:
                self._loop.remove_reader(self._ep.fd)
        self._ring = memoryview(b"")
        self._send_view = memoryview(b"")
        self._ep.close()
        self._control.abort()
        if self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        if not self._closed.done():
            self._closed.set_result(None)
        self._wake()

    def _end(self, error: QmpShadowError | None) -> None:
        """Move to the terminal state for ``error`` and release everything."""
        closed = error is None or isinstance(error, LinkClosedError)
        if self._set_state(LinkState.CLOSED if closed else LinkState.FAILED):
            self._error = error
            if error is not None:
                log.info("link to %s ended: %s", self.peer, error)
        self._release()

    def _wake(self) -> None:
        self._rx_event.set()
        self._tx_event.set()

    def _peer_gone(self, cause: QmpShadowError) -> None:
        """The control link ended or the queue pair failed: deliver what arrived whole,
        judge the rest, end the link.
        """
        if self._judging or self._state not in _LIVE:
            return
        self._judging = True
        if self._state is LinkState.CLOSING:
            self._end(None)
            return
        self._poll_all()  # completions not yet seen arrived before the end
        error: QmpShadowError
        try:
            self._feed_arrived()
            while isinstance(ev := self._decoder.next_event(), Frame):
                self._ready.append(ev)
        except FrameError as fe:
            error = fe
        else:
            partial = self._decoder.buffered
            if partial:
                kind = (
                    "frame header" if self._decoder.pending_payload is None
                    else f"frame with a {self._decoder.pending_payload}-byte payload"
                )
                error = LinkDroppedError(
                    f"RDMA link to {self.peer} ended inside a frame ({cause}): {partial} bytes "
                    f"of an incomplete {kind} were dropped (expected the rest of the frame); "
                    "reconnect and resynchronise with a full epoch",
                    partial_bytes=partial,
                )
            elif isinstance(cause, LinkClosedError) and cause.by_peer:
                error = LinkClosedError(f"{self.peer} closed the link", by_peer=True)
            elif isinstance(cause, LinkDroppedError):
                error = cause
            else:
                error = LinkDroppedError(
                    f"RDMA link to {self.peer} lost: {cause}; reconnect and resynchronise "
                    "with a full epoch"
                )
        self._end(error)

    async def _watch_control(self) -> None:
        """The control link carries nothing after setup: its end is the peer's end."""
        cause: QmpShadowError
        try:
            frame = await self._control.receive()
        except LinkClosedError as exc:
            if not exc.by_peer:
                return  # closed by this side
            cause = exc
        except QmpShadowError as exc:
            cause = exc
        else:
            cause = TransportError(
                f"{self.peer} sent a {type(frame).__name__} frame on the RDMA control link "
                "after setup (it carries none): protocol violation"
            )
        self._peer_gone(cause)

    # -- completions -----------------------------------------------------------------------

    def _on_completion_event(self) -> None:
        if self._released:
            return
        try:
            self._ep.take_event()
        except TransportError as exc:
            self._qp_error = self._qp_error or exc
        self._poll_all()

    def _poll_all(self) -> None:
        """Handle every completion queued; a queue-pair error ends the link afterwards."""
        while not self._released:
            try:
                batch = self._ep.poll(64)
            except TransportError as exc:
                self._qp_error = self._qp_error or exc
                break
            if not batch:
                break
            for wc in batch:
                self._handle(wc)
        if self._qp_error is not None and not self._judging:
            self._peer_gone(self._qp_error)

    def _signal(self, force: bool = False) -> bool:
        """Whether the send work request about to be posted is signaled."""
        if force or self._since_signal + 1 >= self._signal_every:
            self._since_signal = 0
            return True
        self._since_signal += 1
        return False

    def _handle(self, wc: Completion) -> None:
        kind = wc.wr_id >> 32
        if wc.status != WC_SUCCESS:
            if wc.status == WC_WR_FLUSH_ERR and self._qp_error is not None:
                return  # flushed after the first error
            self._qp_error = self._qp_error or LinkDroppedError(
                f"RDMA queue pair error on a {_WR_WHAT.get(kind, 'work request')}: "
                f"{wc.status_text} (status {wc.status}, vendor error {wc.vendor_err}); the "
                "peer died, reset its queue pair or is unreachable"
            )
            return
        if kind != _WR_RECV:  # a signaled send: it and everything posted before it are done
            while self._sq:
                done_kind, index, signaled = self._sq.popleft()
                if done_kind == _WR_DATA:
                    self._tx_free.append(index)
                if signaled:
                    break
            self._tx_event.set()
        else:
            try:
                self._ep.post_recv(wc.wr_id)
            except TransportError as exc:
                self._qp_error = self._qp_error or exc
                return
            if wc.opcode == WC_RECV_RDMA_WITH_IMM:
                self._on_data(wc.imm)
            elif wc.opcode == WC_RECV:
                self._on_credits(wc.imm)
            else:
                self._violation(f"a completion with opcode {wc.opcode} on a receive")

    def _on_data(self, length: int) -> None:
        if not 0 < length <= self._slot_size:
            self._violation(f"a write of {length} bytes into a slot of {self._slot_size}")
            return
        if len(self._arrived) >= self._ring_slots:
            self._violation(f"a write into a full ring of {self._ring_slots} slots (no credit)")
            return
        self._arrived.append((self._rx_seq % self._ring_slots, length))
        self._rx_seq += 1
        if len(self._arrived) == self._ring_slots:
            self.stats.read_pauses += 1
        self._rx_event.set()

    def _on_credits(self, n: int) -> None:
        if n < 1 or self._credits + n > self._remote.slots:
            self._violation(f"{n} credits with {self._credits} of {self._remote.slots} held")
            return
        self._credits += n
        self._pump()
        self._tx_event.set()

    def _violation(self, what: str) -> None:
        self._qp_error = self._qp_error or TransportError(
            f"{self.peer} broke the RDMA link protocol: {what}; the link is closed (run the "
            "same qmpshadow release on both sides)"
        )

    # -- receive ---------------------------------------------------------------------------

    def _feed_arrived(self) -> None:
        """Move every arrived slot into the decoder; they become credits owed to the peer."""
        size = self._slot_size
        while self._arrived:
            slot, length = self._arrived.popleft()
            with self._ring[slot * size : slot * size + length] as piece:
                self._decoder.receive_data(piece)
            self._owed += 1

    def _give_credits(self) -> None:
        """Give consumed slots back once half the ring is owed. Never deadlocks: a sender
        that ran out of credits has the whole ring in flight, all of it owed once consumed.
        """
        if self._owed < self._credit_batch or self._released or self._state not in _LIVE:
            return
        n, self._owed = self._owed, 0
        signaled = self._signal()
        try:
            self._ep.post_send_imm(_WR_CREDIT << 32, n, signaled=signaled)
        except TransportError as exc:
            self._qp_error = self._qp_error or exc
            self._peer_gone(exc)
            return
        self._sq.append((_WR_CREDIT, 0, signaled))

    async def receive(self) -> Frame:
        async with self._recv_lock:
            while True:
                if self._ready:
                    return self._count(self._ready.popleft())
                if self._state not in _LIVE:
                    raise self._ended_error()
                try:
                    ev = self._decoder.next_event()
                except FrameError as exc:
                    self._end(exc)
                    raise
                if isinstance(ev, Frame):
                    return self._count(ev)
                if self._arrived:
                    self._feed_arrived()
                    self._give_credits()
                    continue
                self._rx_event.clear()
                await self._rx_event.wait()

    def _count(self, frame: Frame) -> Frame:
        self.stats.frames_received += 1
        self.stats.bytes_received = self._decoder.offset
        return frame

    # -- send ------------------------------------------------------------------------------

    async def _tx_slot(self) -> int:
        """A free staging slot (waits while ``write_buffer`` is staged or in flight)."""
        t0: float | None = None
        try:
            while True:
                if self._state not in _LIVE or self._released:
                    raise self._ended_error()
                if self._tx_free:
                    return self._tx_free.popleft()
                if t0 is None:
                    t0 = time.monotonic()
                    self._send_waiting = True
                self._tx_event.clear()
                await self._tx_event.wait()
        finally:
            if t0 is not None:
                self._send_waiting = False
                self.stats.send_blocked_s += time.monotonic() - t0

    @property
    def send_waiting(self) -> bool:
        """True while a :meth:`send` waits for staging space (the peer is not reading)."""
        return self._send_waiting

    def _pump(self) -> None:
        """Write staged pieces into the peer's ring while it has free slots (credits).
        Runs after staging and whenever credits arrive; a failed post ends the link.
        """
        remote = self._remote
        while self._staged and self._credits > 0 and not self._released:
            slot, n = self._staged[0]
            target = remote.ring_addr + (self._tx_seq % remote.slots) * remote.slot_size
            # with no staging slot left, signal: the completion frees the slots
            signaled = self._signal(force=not self._tx_free)
            try:
                self._ep.post_write_imm((_WR_DATA << 32) | slot, slot * remote.slot_size, n,
                                        target, remote.rkey, n, signaled=signaled)
            except TransportError as exc:
                self._qp_error = self._qp_error or exc
                self._peer_gone(exc)
                return
            self._staged.popleft()
            self._sq.append((_WR_DATA, slot, signaled))
            self._tx_seq += 1
            self._credits -= 1

    async def send(self, data: SendData) -> None:
        views, total = whole_frame(data)
        async with self._send_lock:
            if self._state is not LinkState.OPEN:
                raise self._ended_error()
            piece_max = self._remote.slot_size
            staged = 0
            vi = voff = 0
            try:
                while staged < total:
                    slot = await self._tx_slot()
                    n = min(piece_max, total - staged)
                    dst = slot * piece_max
                    need = n
                    buf = self._send_view
                    while need:
                        v = views[vi]
                        k = min(v.nbytes - voff, need)
                        if k <= 0:
                            vi, voff = vi + 1, 0
                            continue
                        buf[dst : dst + k] = v[voff : voff + k]
                        dst += k
                        voff += k
                        need -= k
                    self._staged.append((slot, n))
                    staged += n
                    self._pump()
            finally:
                if 0 < staged < total and self._state in _LIVE:
                    # Cancelled (or failed) mid-frame: the peer may hold part of a frame. End
                    # the link so that it sees a dropped link, never a frame stitched together.
                    self._end(LinkDroppedError(
                        f"send to {self.peer} was interrupted after {staged} of {total} bytes "
                        "of a frame; the link was aborted so that the peer never sees a "
                        "partial frame: reconnect",
                        partial_bytes=staged,
                    ))
            if self._state not in _LIVE:
                raise self._ended_error()
            self.stats.frames_sent += 1
            self.stats.bytes_sent += total

    # -- close -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._state is LinkState.CLOSING:
            await asyncio.shield(self._closed)
            return
        if self._state is not LinkState.OPEN:
            return
        self._set_state(LinkState.CLOSING)
        graceful = False
        try:
            async with asyncio.timeout(self.options.close_timeout):
                async with self._send_lock:  # the frame being sent finishes first
                    pass
                while self._staged and not self._released:  # the peer must free ring slots
                    self._tx_event.clear()
                    await self._tx_event.wait()
                if self._sq and not self._sq[-1][2] and not self._released:
                    try:  # a signaled tail, so that the last writes' completion is seen
                        self._ep.post_fence(_WR_FENCE << 32, self._remote.ring_addr,
                                            self._remote.rkey)
                        self._sq.append((_WR_FENCE, 0, True))
                    except TransportError as exc:
                        self._peer_gone(exc)
                while self._sq and not self._released:  # every write landed
                    self._tx_event.clear()
                    await self._tx_event.wait()
                if not self._released:
                    await self._control.close()  # the peer sees a close between frames
            graceful = True
        except TimeoutError:
            log.info("RDMA link to %s did not close within %.1f s (writes not completing; "
                     "peer not reading?): aborted", self.peer, self.options.close_timeout)
        finally:
            if not graceful:
                self._control.abort()
            self._set_state(LinkState.CLOSED)
            self._ready.clear()
            self._release()

    def abort(self) -> None:
        if self._state in _ENDED:
            return
        self._set_state(LinkState.CLOSED)
        self._ready.clear()
        self._release()


# ---------------------------------------------------------------------------------------------
# Establishment


async def _setup_message(control: Link, where: str) -> Hello:
    """The next setup HELLO from the control link. Raises TransportError."""
    try:
        frame = await control.receive()
    except LinkClosedError:
        raise TransportError(
            f"{where} closed the control link during RDMA setup: it refused the setup (see "
            "its log: no RDMA device, bad parameters) or is shutting down"
        ) from None
    if not isinstance(frame, Hello):
        raise _not_rdma(where, type(frame).__name__)
    return frame


async def _establish(control: Link, port: PortInfo, options: LinkOptions, side: str
                     ) -> RdmaLink:
    """Exchange queue-pair parameters over ``control`` and connect the queue pair.

    On failure everything is released (the control link aborted) before this raises
    TransportError (timeout, peer not an RDMA endpoint, verbs failure),
    RdmaUnavailableError or the control link's own error.
    """
    where = str(control.peer)
    ring_slots, slot_size = ring_geometry(options.read_buffer)
    ep: Endpoint | None = None
    ok = False
    try:
        async with asyncio.timeout(options.handshake_timeout):
            ep = Endpoint(port, ring_slots=ring_slots, slot_size=slot_size,
                          max_send_wr=2 * MAX_TX_SLOTS + ring_slots + 2 * _RECV_SPARE,
                          max_recv_wr=ring_slots + MAX_SLOTS + _RECV_SPARE)
            mine = _Params(qpn=ep.qpn, psn=ep.psn, ring_addr=ep.ring_addr, rkey=ep.ring_rkey,
                           slot_size=slot_size, slots=ring_slots, gid=port.gid, lid=port.lid,
                           mtu=ep.mtu)
            token = os.urandom(16)
            await control.send_frame(_hello(side, token, options, mine.encode()))
            first = await _setup_message(control, where)
            remote = _Params.decode(first.name, where)
            ep.connect(qpn=remote.qpn, psn=remote.psn, gid=remote.gid, lid=remote.lid,
                       mtu=remote.mtu)
            for i in range(ring_slots + remote.slots + _RECV_SPARE):
                ep.post_recv((_WR_RECV << 32) | i)
            tx_slots = min(MAX_TX_SLOTS, max(2, options.write_buffer // remote.slot_size))
            send_view = ep.register_send(tx_slots * remote.slot_size)
            # READY echoes the peer's token: each side knows the answer is to its own setup
            await control.send_frame(_hello(side, first.session_id, options,
                                            f"{SETUP_TAG} ready"))
            second = await _setup_message(control, where)
            if second.name != f"{SETUP_TAG} ready":
                raise _not_rdma(where, second.name)
            if second.session_id != token:
                raise TransportError(
                    f"{where} confirmed another RDMA setup (token mismatch): protocol violation"
                )
            peer = PeerIdentity(
                transport="rdma",
                address=f"{control.peer.address} qp {remote.qpn} gid {gid_text(remote.gid)}",
                authenticated=control.peer.authenticated, encrypted=False,
                name=control.peer.name,
            )
            link = RdmaLink(control, ep, remote, peer=peer, options=options,
                            ring_slots=ring_slots, slot_size=slot_size, tx_slots=tx_slots,
                            send_view=send_view)
        ok = True
        log.debug("RDMA link to %s up: %s, %d x %d B ring, path MTU %d", peer, link.device,
                  ring_slots, slot_size, MTU_BYTES.get(min(ep.mtu, remote.mtu), 0))
        return link
    except TimeoutError:
        raise TransportError(
            f"RDMA link setup with {where} timed out after {options.handshake_timeout} s: "
            "expected the peer's queue-pair parameters on the control link; is the peer an "
            "RDMA endpoint, and can both reach each other's RDMA device?"
        ) from None
    finally:
        if not ok:
            if ep is not None:
                ep.close()
            control.abort()


async def connect(
    host: str,
    port: int,
    *,
    tls: tcp.TlsConfig | None = None,
    insecure_loopback: bool = False,
    options: LinkOptions | None = None,
    keepalive: tcp.KeepAlive | None = _KEEPALIVE,
    device: str | None = None,
    ib_port: int = 1,
    gid_index: int | None = None,
) -> Link:
    """Connect to an :func:`listen`-ing agent: control link to ``host:port`` (as
    :func:`qmpshadow.transport.tcp.connect`), then an RC queue pair on ``device`` (default:
    the first device with an ACTIVE port ``ib_port``) using GID ``gid_index`` (default: the
    first RoCE v2 IPv4-mapped GID).

    Raises RdmaUnavailableError (no pyverbs, no device, port not active: before any
    connection is made), ConfigError and PeerAuthError as tcp.connect, TransportError
    (cannot connect, setup failed or timed out, the peer is not an RDMA endpoint).
    """
    local = find_port(device, ib_port, gid_index)
    load()
    opts = options or LinkOptions()
    control = await tcp.connect(host, port, tls=tls, insecure_loopback=insecure_loopback,
                                options=opts, keepalive=keepalive)
    return await _establish(control, local, opts, "client")


class RdmaListener(Listener):
    """Accepts RDMA links: control links from a :class:`~qmpshadow.transport.tcp.TcpListener`
    (``control``), set up in the background; :meth:`accept` returns only links whose queue
    pair is connected. ``host``/``port`` are the control address.
    """

    host: str
    port: int

    def __init__(self, control: tcp.TcpListener, setup: Callable[[Link], Awaitable[RdmaLink]],
                 *, max_pending: int) -> None:
        self.control = control
        self.host, self.port = control.host, control.port
        self.address = f"rdma+{control.address}"
        self.stats = ListenerStats()
        self._setup = setup
        self._max_pending = max_pending
        self._links: deque[RdmaLink] = deque()
        self._cond = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        while True:
            try:
                ctl = await self.control.accept()
            except LinkClosedError:
                return
            task = asyncio.get_running_loop().create_task(self._set_up(ctl))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _set_up(self, ctl: Link) -> None:
        try:
            link = await self._setup(ctl)
        except QmpShadowError as exc:
            self._reject(exc)
            return
        async with self._cond:
            if self._closed or len(self._links) >= self._max_pending:
                link.abort()
                if not self._closed:
                    self._reject(TransportError(
                        f"RDMA link from {link.peer} dropped: {self._max_pending} links are "
                        "already waiting for accept()"
                    ))
                return
            self._links.append(link)
            self.stats.accepted += 1
            self._cond.notify()

    def _reject(self, exc: QmpShadowError) -> None:
        self.stats.rejected += 1
        self.stats.recent_rejections.append(exc)
        del self.stats.recent_rejections[:-32]
        log.warning("listener %s refused a peer: %s", self.address, exc)

    async def accept(self) -> Link:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._links) or self._closed)
            if self._links:
                return self._links.popleft()
        raise LinkClosedError(f"listener {self.address} is closed", by_peer=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._acceptor.cancel()
        tasks = [self._acceptor, *self._tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.control.close()
        async with self._cond:
            links, self._links = list(self._links), deque()
            self._cond.notify_all()
        for link in links:
            link.abort()

    def __repr__(self) -> str:
        return f"<RdmaListener {'closed' if self._closed else 'listening'} {self.address}>"


async def listen(
    host: str,
    port: int,
    *,
    tls: tcp.TlsConfig | None = None,
    insecure_loopback: bool = False,
    options: LinkOptions | None = None,
    keepalive: tcp.KeepAlive | None = _KEEPALIVE,
    device: str | None = None,
    ib_port: int = 1,
    gid_index: int | None = None,
    max_pending: int = 16,
) -> RdmaListener:
    """Listen for :func:`connect`-ing agents: control links on ``host:port`` (port 0: any
    free port; as :func:`qmpshadow.transport.tcp.listen`), queue pairs on ``device`` /
    ``ib_port`` / ``gid_index`` (defaults as :func:`connect`).

    Raises RdmaUnavailableError (no pyverbs, no device, port not active), ConfigError as
    tcp.listen, TransportError when the address cannot be bound.
    """
    local = find_port(device, ib_port, gid_index)
    load()
    opts = options or LinkOptions()
    control = await tcp.listen(host, port, tls=tls, insecure_loopback=insecure_loopback,
                               options=opts, keepalive=keepalive, max_pending=max_pending)

    async def setup(ctl: Link) -> RdmaLink:
        return await _establish(ctl, local, opts, "server")

    return RdmaListener(control, setup, max_pending=max_pending)
