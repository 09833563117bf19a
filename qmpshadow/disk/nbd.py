"""A minimal NBD server core (sans-I/O): just enough to be a ``blockdev-backup`` target.

QEMU's NBD client (the ``nbd`` block driver) connects with fixed-newstyle negotiation and
``NBD_OPT_GO``; the backup job then only writes (and flushes) to its target. This core
answers the handshake, offers one export of a fixed size with SEND_FLUSH, refuses
structured replies, meta contexts and any other option with ``NBD_REP_ERR_UNSUP`` (the
client falls back to simple replies), and turns transmission requests into events:
:class:`Write` (offset, data), :class:`Flush`, :class:`Disconnect`. Reads, trims and any
other command are answered with EINVAL: a backup target is never read.

Use: ``receive_data(bytes)`` (``b""`` = EOF), then ``next_event()`` until ``NEED_DATA``;
send ``data_to_send()`` after each step; acknowledge a Write/Flush with :meth:`reply` once
its data is safe. Every length read from the peer is bounded before it is believed.
Protocol reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from qmpshadow.errors import NbdProtocolError

__all__ = ["NEED_DATA", "Disconnect", "Flush", "NbdServerCore", "Ready", "Write"]

NBDMAGIC: Final = 0x4E42444D41474943
IHAVEOPT: Final = 0x49484156454F5054
REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

FLAG_FIXED_NEWSTYLE: Final = 1
FLAG_NO_ZEROES: Final = 2

OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_INFO: Final = 6
OPT_GO: Final = 7

REP_ACK: Final = 1
REP_INFO: Final = 3
REP_ERR_UNSUP: Final = 0x80000001
REP_ERR_INVALID: Final = 0x80000003
REP_ERR_UNKNOWN: Final = 0x80000006

INFO_EXPORT: Final = 0
TFLAG_HAS_FLAGS: Final = 1
TFLAG_SEND_FLUSH: Final = 4

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3

EINVAL: Final = 22

#: Bounds on what a peer may declare (QEMU's client sends at most 32 MiB per request).
MAX_OPTION: Final = 64 * 1024
MAX_REQUEST: Final = 32 * 1024 * 1024

_OPT = struct.Struct(">QII")
_REPLY = struct.Struct(">QIII")
_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")


class _NeedData(enum.Enum):
    NEED_DATA = "need-data"


NEED_DATA: Final = _NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Ready:
    """Negotiation done: transmission phase (the client may now write)."""

    export: str


@dataclass(frozen=True, slots=True)
class Write:
    """The client writes ``data`` at byte ``offset``; :meth:`NbdServerCore.reply` it."""

    handle: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Flush:
    """The client asks for its writes to be durable; reply once they are."""

    handle: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client said goodbye (NBD_CMD_DISC) or closed the connection."""

    clean: bool


Event = Ready | Write | Flush | Disconnect


class _Phase(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    DONE = "done"


class NbdServerCore:
    """One NBD connection, server side: export ``name`` of ``size`` bytes, write-only.

    Raises NbdProtocolError (from :meth:`next_event`) for a peer that breaks the protocol:
    bad magic, lengths beyond the bounds, a write outside the export.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._buf = bytearray()
        self._out = bytearray(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                          FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        self._phase = _Phase.CLIENT_FLAGS
        self._no_zeroes = False
        self._eof = False
        self._progress = False

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means it closed the connection."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (may be empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, handle: int, error: int = 0) -> None:
        """Acknowledge request ``handle`` (``error`` is an errno, 0 for success)."""
        self._out += _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Raises NbdProtocolError."""
        while True:
            ev = self._step()
            if ev is not None:
                return ev
            if self._phase is _Phase.DONE:
                return NEED_DATA
            if not self._progress:
                if self._eof:
                    self._phase = _Phase.DONE
                    return Disconnect(clean=False)
                return NEED_DATA

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            self._progress = False
            return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._progress = True
        return data

    def _step(self) -> Event | None:
        self._progress = False
        if self._phase is _Phase.CLIENT_FLAGS:
            raw = self._take(4)
            if raw is None:
                return None
            (flags,) = struct.unpack(">I", raw)
            if not flags & FLAG_FIXED_NEWSTYLE:
                raise NbdProtocolError(f"NBD client flags {flags:#x}: expected fixed newstyle")
            self._no_zeroes = bool(flags & FLAG_NO_ZEROES)
            self._phase = _Phase.OPTIONS
            return None
        if self._phase is _Phase.OPTIONS:
            return self._option()
        if self._phase is _Phase.TRANSMISSION:
            return self._request()
        return None

    def _option(self) -> Event | None:
        if len(self._buf) < _OPT.size:
            return None
        magic, opt, length = _OPT.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"NBD option magic {magic:#x}, expected {IHAVEOPT:#x}")
        if length > MAX_OPTION:
            raise NbdProtocolError(f"NBD option {opt} of {length} bytes, at most {MAX_OPTION}")
        raw = self._take(_OPT.size + length)
        if raw is None:
            return None
        data = raw[_OPT.size:]
        if opt == OPT_EXPORT_NAME:
            if data.decode(errors="replace") not in ("", self.name):
                raise NbdProtocolError(f"NBD export {data!r} requested, only {self.name!r} exists")
            self._out += struct.pack(">QH", self.size, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH)
            if not self._no_zeroes:
                self._out += bytes(124)
            self._phase = _Phase.TRANSMISSION
            return Ready(self.name)
        if opt == OPT_ABORT:
            self._rep(opt, REP_ACK)
            self._phase = _Phase.DONE
            return Disconnect(clean=True)
        if opt in (OPT_GO, OPT_INFO):
            return self._go(opt, data)
        self._rep(opt, REP_ERR_UNSUP)
        return None

    def _go(self, opt: int, data: bytes) -> Event | None:
        if len(data) < 6:
            self._rep(opt, REP_ERR_INVALID)
            return None
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._rep(opt, REP_ERR_INVALID)
            return None
        name = data[4 : 4 + nlen].decode(errors="replace")
        if name not in ("", self.name):
            self._rep(opt, REP_ERR_UNKNOWN)
            return None
        self._rep(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size,
                                            TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH))
        self._rep(opt, REP_ACK)
        if opt == OPT_GO:
            self._phase = _Phase.TRANSMISSION
            return Ready(self.name)
        return None

    def _rep(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._out += _REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data

    def _request(self) -> Event | None:
        if len(self._buf) < _REQ.size:
            return None
        magic, _flags, cmd, handle, offset, length = _REQ.unpack_from(self._buf)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"NBD request magic {magic:#x}, expected {REQUEST_MAGIC:#x}")
        if cmd == CMD_WRITE:
            if length > MAX_REQUEST or offset > self.size or length > self.size - offset:
                raise NbdProtocolError(
                    f"NBD write of {length} bytes at {offset}: outside the export of "
                    f"{self.size} bytes or above {MAX_REQUEST} per request")
            raw = self._take(_REQ.size + length)
            if raw is None:
                return None
            return Write(handle, offset, raw[_REQ.size:])
        self._take(_REQ.size)
        if cmd == CMD_FLUSH:
            return Flush(handle)
        if cmd == CMD_DISC:
            self._phase = _Phase.DONE
            return Disconnect(clean=True)
        self.reply(handle, EINVAL)
        return None
