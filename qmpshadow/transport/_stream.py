"""The :class:`~qmpshadow.transport.base.Link` over an asyncio byte-stream transport.

Shared by TCP (plain or TLS) and unix sockets. Three pieces:

- :class:`LinkProtocol`: an ``asyncio.Protocol`` with explicit flow control both ways (it
  stops reading once ``read_buffer`` bytes wait unconsumed; it records the transport's
  pause/resume of writing).
- :func:`establish`: TLS handshake (optional), the peer check, then the link preamble
  exchange; returns an open :class:`StreamLink` or raises, leaving nothing open.
- :class:`StreamListener`: accepts connections and establishes them in the background;
  :meth:`~StreamListener.accept` only ever returns authenticated links.

The link preamble is 8 bytes each side sends once its own peer check passed: ``b"QSLK"``,
version 1, status (0 accepted, 1 refused), two reserved zero bytes. It is transport framing,
never delivered as a frame. It lets a refused side learn so at connect time, with a clear
error, instead of on its first receive (in TLS 1.3 the client finishes its handshake before
the server has judged the client's certificate).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, cast

from qmpshadow.errors import ConfigError, FrameError, QmpShadowError, TransportError
from qmpshadow.frames.wire import HEADER_SIZE, MAGIC, Buffer, Frame, FrameDecoder
from qmpshadow.transport.base import (
    Link,
    LinkOptions,
    LinkState,
    Listener,
    ListenerStats,
    PeerIdentity,
    SendData,
)
from qmpshadow.transport.errors import (
    LinkClosedError,
    LinkDroppedError,
    LinkIntegrityError,
    PeerAuthError,
)

log = logging.getLogger("qmpshadow.transport")

PREAMBLE_MAGIC: Final = b"QSLK"
PREAMBLE_VERSION: Final = 1
_PREAMBLE = struct.Struct("<4sBBH")
PREAMBLE_SIZE: Final = _PREAMBLE.size
STATUS_OK: Final = 0
STATUS_REFUSED: Final = 1

#: Large frames are written in pieces of this size, draining in between, so the link never
#: holds more than ``write_buffer`` plus one piece.
WRITE_CHUNK: Final = 256 << 10
#: Recent refusals a listener keeps.
MAX_RECENT_REJECTIONS: Final = 32

_LEN = struct.Struct("<I")


def preamble(status: int) -> bytes:
    """The 8 preamble bytes with ``status``."""
    return _PREAMBLE.pack(PREAMBLE_MAGIC, PREAMBLE_VERSION, status, 0)


# ---------------------------------------------------------------------------------------------
# Protocol


class LinkProtocol(asyncio.Protocol):
    """Buffers received chunks (bounded: reading pauses above ``read_buffer``) and tracks the
    transport's write flow control and connection loss. No parsing happens here.
    """

    def __init__(self, *, read_buffer: int, pause_on_connect: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_connected: Callable[[LinkProtocol], None] | None = None
        self.on_lost: Callable[[BaseException | None], None] | None = None
        self._read_high = read_buffer
        self._pause_on_connect = pause_on_connect
        self._chunks: deque[bytes] = deque()
        self._nbytes = 0
        self._reading_paused = False
        self.read_pauses = 0
        self.eof = False
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # stream transports only
        if self._pause_on_connect:
            # TLS follows: no byte may reach this protocol before start_tls() takes over.
            self.transport.pause_reading()
        if self.on_connected is not None:
            self.on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._nbytes += len(data)
        if (
            self._nbytes >= self._read_high
            and not self._reading_paused
            and self.transport is not None
            and not self.lost
        ):
            self.transport.pause_reading()
            self._reading_paused = True
            self.read_pauses += 1
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self.eof = True
        self._wake_reader()
        self._wake_drain()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # reading -------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken."""
        return self._nbytes

    def take(self) -> list[bytes]:
        """All buffered chunks; resumes reading if it was paused."""
        chunks = list(self._chunks)
        self._chunks.clear()
        self._nbytes = 0
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunks

    def take_exact(self, n: int) -> bytes:
        """Exactly ``n`` buffered bytes (caller checked :attr:`buffered` >= n)."""
        out = bytearray()
        while len(out) < n:
            chunk = self._chunks.popleft()
            need = n - len(out)
            if len(chunk) > need:
                self._chunks.appendleft(chunk[need:])
                chunk = chunk[:need]
            out += chunk
        self._nbytes -= n
        return bytes(out)

    async def wait_readable(self) -> None:
        """Return once bytes are buffered, EOF arrived, or the connection is lost. After
        EOF it waits for the loss (the transport closes itself right after EOF), so a loop
        calling it never spins.
        """
        if self._chunks or self.lost:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._read_waiter = waiter
        try:
            await waiter
        finally:
            self._read_waiter = None

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # writing -------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Return once the transport accepts more bytes, or the connection is lost."""
        while self.write_paused and not self.lost:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)


async def release(proto: LinkProtocol, *transports: asyncio.Transport | None) -> None:
    """Abort ``transports`` and let the loop close their sockets before returning.

    A socket is closed on the loop turn after ``abort()`` (two turns under TLS); a transport
    whose TLS handshake failed never reports to ``proto``, hence turns, not a wait on it.
    """
    for t in transports:
        if t is not None:
            t.abort()
    for _ in range(3):
        if proto.closed.done():
            return
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------
# Errors from the wire


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def map_loss(exc: BaseException, where: str, partial: int) -> TransportError:
    """The TransportError for a connection lost with ``exc``."""
    if isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
    ):
        return LinkIntegrityError(
            f"TLS refused bytes received from {where}: {_ssl_reason(exc)} (expected "
            "authentic records; the bytes were altered in transit or the peer's TLS stack "
            "failed); the link is closed: reconnect and resynchronise"
        )
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cut = f"; {partial} bytes of an incomplete frame were dropped" if partial else ""
    return LinkDroppedError(
        f"connection to {where} lost ({detail}){cut}: reconnect and resynchronise with a "
        "full epoch",
        partial_bytes=partial,
    )


# ---------------------------------------------------------------------------------------------
# Link


def whole_frame(data: SendData) -> tuple[list[memoryview], int]:
    """Byte views of one whole encoded frame, and its size; ConfigError otherwise."""
    raw: Sequence[Buffer] = (
        [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    )
    views: list[memoryview] = []
    try:
        for p in raw:
            mv = memoryview(p)
            views.append(mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"send() takes bytes-like frame buffers, got {[type(p).__name__ for p in raw]}: "
            f"{exc}"
        ) from None
    total = sum(v.nbytes for v in views)
    head = bytearray()
    for v in views:
        if len(head) >= HEADER_SIZE:
            break
        head += v[: HEADER_SIZE - len(head)]
    if total < HEADER_SIZE or bytes(head[:4]) != MAGIC:
        raise ConfigError(
            f"send() takes one encoded frame (48-byte header starting {MAGIC!r}), got "
            f"{total} bytes starting {bytes(head[:8])!r}: pass what encode_frame[_parts]() "
            "or EpochWriter returned"
        )
    (length,) = _LEN.unpack_from(head, 24)
    if total != HEADER_SIZE + length:
        raise ConfigError(
            f"send() takes exactly one whole frame: its header declares {length} payload "
            f"bytes, but {total - HEADER_SIZE} follow it: send one encode_frame[_parts]() "
            "result per call"
        )
    return views, total


_ENDED: Final = (LinkState.CLOSED, LinkState.FAILED)


class StreamLink(Link):
    """A :class:`Link` over an asyncio stream transport (see the module docstring)."""

    def __init__(
        self,
        proto: LinkProtocol,
        transport: asyncio.Transport,
        *,
        peer: PeerIdentity,
        options: LinkOptions,
    ) -> None:
        super().__init__(peer=peer, options=options)
        self._proto = proto
        self._transport = transport
        self._decoder = FrameDecoder(max_payload=options.max_payload)
        self._ready: deque[Frame] = deque()
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        transport.set_write_buffer_limits(
            high=options.write_buffer, low=options.write_buffer // 4
        )
        proto.on_lost = self._on_connection_lost
        if proto.lost:  # lost between establishment and now
            self._on_connection_lost(proto.lost_exc)

    @property
    def transport(self) -> asyncio.Transport:
        """The asyncio transport (for socket options and extra info)."""
        return self._transport

    # -- ending ----------------------------------------------------------------------------

    def _end(self, error: QmpShadowError | None) -> None:
        """Move to the terminal state for ``error`` and release the connection."""
        closed = error is None or isinstance(error, LinkClosedError)
        if self._set_state(LinkState.CLOSED if closed else LinkState.FAILED):
            self._error = error
            if error is not None:
                log.info("link to %s ended: %s", self.peer, error)
        if not self._proto.lost:
            self._transport.abort()

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        self.stats.read_pauses = self._proto.read_pauses
        if self._state is LinkState.CLOSING:
            self._set_state(LinkState.CLOSED)
            return
        if self._state is not LinkState.OPEN:
            return
        # Deliver what arrived whole before the end; judge the rest.
        error: QmpShadowError
        try:
            for chunk in self._proto.take():
                self._decoder.receive_data(chunk)
            while True:
                ev = self._decoder.next_event()
                if not isinstance(ev, Frame):
                    break
                self._ready.append(ev)
        except FrameError as fe:
            error = fe
        else:
            partial = self._decoder.buffered
            where = str(self.peer)
            if exc is not None:
                error = map_loss(exc, where, partial)
            elif partial:
                kind = self._pending_kind()
                error = LinkDroppedError(
                    f"{where} closed the connection inside a frame: {partial} bytes of an "
                    f"incomplete {kind} were dropped (expected the rest of the frame); "
                    "reconnect and resynchronise with a full epoch",
                    partial_bytes=partial,
                )
            else:
                error = LinkClosedError(f"{where} closed the link", by_peer=True)
        self._end(error)

    def _pending_kind(self) -> str:
        if self._decoder.pending_payload is None:
            return "frame header"
        return f"frame with a {self._decoder.pending_payload}-byte payload"

    # -- receive ---------------------------------------------------------------------------

    async def receive(self) -> Frame:
        async with self._recv_lock:
            while True:
                if self._ready:
                    return self._count(self._ready.popleft())
                if self._state not in (LinkState.OPEN, LinkState.CLOSING):
                    raise self._ended_error()
                try:
                    ev = self._decoder.next_event()
                except FrameError as exc:
                    self._end(exc)
                    raise
                if isinstance(ev, Frame):
                    return self._count(ev)
                chunks = self._proto.take()
                if chunks:
                    for chunk in chunks:
                        self._decoder.receive_data(chunk)
                    continue
                await self._proto.wait_readable()

    def _count(self, frame: Frame) -> Frame:
        self.stats.frames_received += 1
        self.stats.read_pauses = self._proto.read_pauses
        self.stats.bytes_received = self._decoder.offset
        return frame

    # -- send ------------------------------------------------------------------------------

    async def send(self, data: SendData) -> None:
        views, total = whole_frame(data)
        async with self._send_lock:
            if self._state is not LinkState.OPEN:
                raise self._ended_error()
            written = 0
            try:
                if total <= WRITE_CHUNK:
                    self._transport.write(b"".join(views))
                    written = total
                    await self._drain()
                else:
                    for view in views:
                        # The transport may hold on to what it is given (TLS queues it): only
                        # immutable bytes go in uncopied, so the caller may reuse its buffers.
                        copy = not isinstance(view.obj, bytes)
                        for off in range(0, view.nbytes, WRITE_CHUNK):
                            if self._proto.lost or self._state in _ENDED:
                                raise self._ended_error()
                            piece = view[off : off + WRITE_CHUNK]
                            self._transport.write(bytes(piece) if copy else piece)
                            written += piece.nbytes
                            await self._drain()
            finally:
                if 0 < written < total and self._state in (LinkState.OPEN, LinkState.CLOSING):
                    # Cancelled mid-frame: the stream now ends in a partial frame. End the
                    # link so the peer sees a dropped link, never a frame stitched together.
                    self._end(
                        LinkDroppedError(
                            f"send to {self.peer} was interrupted after {written} of {total} "
                            "bytes of a frame; the link was aborted so that the peer never "
                            "sees a partial frame: reconnect",
                            partial_bytes=written,
                        )
                    )
            self.stats.frames_sent += 1
            self.stats.bytes_sent += total

    async def _drain(self) -> None:
        if self._proto.write_paused:
            t0 = time.monotonic()
            try:
                await self._proto.drain()
            finally:
                self.stats.send_blocked_s += time.monotonic() - t0
        if self._proto.lost:
            if self._state is LinkState.OPEN:
                self._on_connection_lost(self._proto.lost_exc)
            raise self._ended_error()

    # -- close -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._state is LinkState.CLOSING:
            await asyncio.shield(self._proto.closed)
            return
        if self._state is not LinkState.OPEN:
            return
        self._set_state(LinkState.CLOSING)
        graceful = False
        try:
            async with asyncio.timeout(self.options.close_timeout):
                async with self._send_lock:  # the frame being sent finishes first
                    self._transport.close()  # flushes, then FIN (TLS: close_notify first)
                await asyncio.shield(self._proto.closed)
            graceful = True
        except TimeoutError:
            log.info(
                "link to %s did not close within %.1f s (peer not reading?): aborted",
                self.peer,
                self.options.close_timeout,
            )
        finally:
            if not graceful:
                self._transport.abort()
            self._set_state(LinkState.CLOSED)
            self._ready.clear()

    def abort(self) -> None:
        if self._state in (LinkState.CLOSED, LinkState.FAILED):
            return
        self._set_state(LinkState.CLOSED)
        self._ready.clear()
        self._transport.abort()


# ---------------------------------------------------------------------------------------------
# Establishment

PeerCheck = Callable[[asyncio.Transport], PeerIdentity]


async def establish(
    proto: LinkProtocol,
    transport: asyncio.Transport,
    *,
    side: Literal["client", "server"],
    where: str,
    options: LinkOptions,
    check_peer: PeerCheck,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> StreamLink:
    """TLS handshake (if ``tls``), ``check_peer`` (raises PeerAuthError), preamble exchange.

    ``where`` names the peer in messages. On any failure the connection is aborted before
    this raises PeerAuthError (authentication failed or refused), TransportError (timeout,
    connection lost, not a qmpshadow link) or ConfigError.
    """
    loop = asyncio.get_running_loop()
    current: asyncio.Transport = transport
    ok = False
    try:
        async with asyncio.timeout(options.handshake_timeout):
            if tls is not None:
                try:
                    new = await loop.start_tls(
                        transport,
                        proto,
                        tls,
                        server_side=side == "server",
                        server_hostname=server_hostname,
                        ssl_handshake_timeout=options.handshake_timeout,
                    )
                except (ssl.SSLError, OSError) as exc:
                    raise _handshake_error(exc, side, where) from None
                if new is None:  # pragma: no cover - only for closed transports
                    raise TransportError(f"TLS handshake with {where}: transport closed")
                current = new
                proto.transport = new
            try:
                peer = check_peer(current)
            except PeerAuthError:
                current.write(preamble(STATUS_REFUSED))
                raise
            current.write(preamble(STATUS_OK))
            await _read_preamble(proto, side, where, tls is not None)
        ok = True
    except TimeoutError:
        raise TransportError(
            f"link setup with {where} timed out after {options.handshake_timeout} s "
            "(TLS handshake and link preamble): expected a qmpshadow agent answering; "
            "check the address, that the peer uses the same transport (TLS or not), and "
            "its load"
        ) from None
    finally:
        if not ok:
            await release(proto, current, transport)
    return StreamLink(proto, current, peer=peer, options=options)


def _handshake_error(exc: BaseException, side: str, where: str) -> TransportError:
    reason = _ssl_reason(exc)
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        if side == "server":
            hint = (
                "the client must present a certificate signed by this side's CA, for TLS "
                "1.3 (PEER_DID_NOT_RETURN_A_CERTIFICATE: it sent none; CERTIFICATE_VERIFY_"
                "FAILED: foreign CA, self-signed or expired)"
            )
        else:
            hint = (
                "the server must present a certificate signed by this side's CA and speak "
                "TLS 1.3 (WRONG_VERSION_NUMBER: it does not speak TLS, e.g. "
                "insecure_loopback)"
            )
        return PeerAuthError(f"TLS handshake with {where} failed: {reason}; {hint}")
    return LinkDroppedError(
        f"connection to {where} lost during the TLS handshake ({reason}): expected a TLS "
        "1.3 peer; a peer that closes here usually refused this side's certificate or does "
        "not use TLS"
    )


async def _read_preamble(proto: LinkProtocol, side: str, where: str, tls: bool) -> None:
    while proto.buffered < PREAMBLE_SIZE and not proto.lost:
        await proto.wait_readable()
    if proto.buffered < PREAMBLE_SIZE:
        exc = proto.lost_exc
        if isinstance(exc, ssl.SSLError):
            raise PeerAuthError(
                f"{where} refused the TLS session: {_ssl_reason(exc)}; present a "
                "certificate signed by the peer's CA, for a name the peer allows"
            )
        got = proto.take()
        if tls:
            # In TLS 1.3 the server judges the client's certificate after the client finished
            # its handshake; asyncio then drops the connection without sending the alert.
            raise PeerAuthError(
                f"{where} closed the connection right after the TLS handshake, before "
                "confirming the link: it most likely refused this side's certificate (foreign "
                "CA, self-signed, expired, or none); see the peer's log. Otherwise it is "
                "shutting down"
            )
        raise TransportError(
            f"{where} closed the connection during link setup (after {sum(map(len, got))} "
            f"of the {PREAMBLE_SIZE}-byte link preamble): expected a qmpshadow agent; it "
            "may have refused this side, require TLS, or be shutting down (see its log)"
        )
    raw = proto.take_exact(PREAMBLE_SIZE)
    magic, version, status, _ = _PREAMBLE.unpack(raw)
    if magic != PREAMBLE_MAGIC:
        tls_hint = " (it looks like TLS: configure tls here)" if raw[:1] == b"\x16" else ""
        raise TransportError(
            f"{where} sent {raw!r} where the link preamble {PREAMBLE_MAGIC!r} was expected: "
            f"it is not a qmpshadow link endpoint{tls_hint}"
        )
    if version != PREAMBLE_VERSION:
        raise TransportError(
            f"{where} speaks link preamble version {version}, this side {PREAMBLE_VERSION}: "
            "run the same qmpshadow release on both sides"
        )
    if status == STATUS_REFUSED:
        other = "server" if side == "client" else "client"
        raise PeerAuthError(
            f"the {other} at {where} refused this side: its identity (certificate name or "
            "uid) is not among the peers the other side allows; fix its allowed peers or "
            "use the right certificate"
        )
    if status != STATUS_OK:
        raise TransportError(f"{where} sent unknown link preamble status {status}")


# ---------------------------------------------------------------------------------------------
# Listener

Establisher = Callable[[LinkProtocol, asyncio.Transport], Awaitable[StreamLink]]


class StreamListener(Listener):
    """Accepts connections of an ``asyncio.Server`` and establishes them in the background.

    At most ``max_handshakes`` establishments run at once and at most ``max_pending``
    established links wait for :meth:`accept`; connections beyond either are refused.
    """

    def __init__(
        self,
        *,
        address: str,
        options: LinkOptions,
        establisher: Establisher,
        tls: bool,
        max_pending: int = 16,
        max_handshakes: int = 64,
    ) -> None:
        self.address = address
        self.options = options
        self.stats = ListenerStats()
        self._establisher = establisher
        self._tls = tls
        self._max_pending = max_pending
        self._max_handshakes = max_handshakes
        self._server: asyncio.AbstractServer | None = None
        self._links: deque[StreamLink] = deque()
        self._cond = asyncio.Condition()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = False

    def protocol_factory(self) -> LinkProtocol:
        """For ``loop.create_server``."""
        proto = LinkProtocol(read_buffer=self.options.read_buffer, pause_on_connect=self._tls)
        proto.on_connected = self._on_connected
        return proto

    def attach(self, server: asyncio.AbstractServer) -> None:
        """Set the server whose connections this listener accepts."""
        self._server = server

    def _on_connected(self, proto: LinkProtocol) -> None:
        transport = proto.transport
        if transport is None:  # pragma: no cover - set by connection_made
            return
        if self._closed:
            transport.abort()
            return
        busy = len(self._handshakes) >= self._max_handshakes
        if busy or len(self._links) >= self._max_pending:
            what = "handshakes" if busy else "unaccepted links"
            self._reject(
                TransportError(
                    f"connection to {self.address} refused: too many {what} in progress "
                    "(is anything calling accept()?)"
                )
            )
            transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._establish(proto, transport))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _establish(self, proto: LinkProtocol, transport: asyncio.Transport) -> None:
        try:
            link = await self._establisher(proto, transport)
        except (QmpShadowError, OSError) as exc:
            err = exc if isinstance(exc, QmpShadowError) else TransportError(str(exc))
            self._reject(err)
            await release(proto, transport)
            return
        async with self._cond:
            if self._closed:
                link.abort()
                return
            if len(self._links) >= self._max_pending:
                link.abort()
                self._reject(TransportError(
                    f"link from {link.peer} to {self.address} dropped: {self._max_pending} "
                    "established links are already waiting for accept()"
                ))
                return
            self._links.append(link)
            self.stats.accepted += 1
            self._cond.notify()

    def _reject(self, exc: QmpShadowError) -> None:
        self.stats.rejected += 1
        recent = self.stats.recent_rejections
        recent.append(exc)
        del recent[:-MAX_RECENT_REJECTIONS]
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
        if self._server is not None:
            self._server.close()
        tasks = list(self._handshakes)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        async with self._cond:
            links, self._links = list(self._links), deque()
            self._cond.notify_all()
        for link in links:
            link.abort()
        self._after_close()

    def _after_close(self) -> None:
        """Hook for subclasses (e.g. unlink a socket file)."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "listening"
        return f"<{type(self).__name__} {state} {self.address}>"
