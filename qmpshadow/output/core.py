"""Sans-I/O cores of output commit: redirector framing and the release queue.

QEMU's ``filter-redirector`` writes each frame on its chardev as a be32 length followed by
the Ethernet frame (``vnet_hdr_support`` off, measured on QEMU 7.2); the same framing is read
back on the ``indev`` side. :class:`FrameDecoder` is fed bytes and returns whole frames,
bounding the length it accepts. :class:`HoldQueue` holds output tagged with the epoch that
produced it and hands it out when that epoch commits; no asyncio or sockets here.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

from ..errors import QmpShadowError

#: Largest frame accepted from the redirector: a 64 KiB GSO-less jumbo is already far past
#: anything a 1500-MTU guest sends; a larger length means the stream lost its framing.
MAX_FRAME = 65536 + 18
_LEN = struct.Struct(">I")


class OutputFramingError(QmpShadowError):
    """The redirector stream does not follow be32 length + frame framing.

    Carries the stream ``offset`` of the bad length field and the ``length`` read.
    """

    def __init__(self, message: str, *, offset: int, length: int) -> None:
        super().__init__(f"{message} (at offset {offset})")
        self.offset = offset
        self.length = length


def encode_frames(frames: list[bytes]) -> bytes:
    """Frames in redirector framing, joined (one release). Raises OutputFramingError for an
    oversized frame."""
    if frames and (n := max(map(len, frames))) > MAX_FRAME:
        raise OutputFramingError(f"frame of {n} bytes, expected at most {MAX_FRAME}",
                                 offset=0, length=n)
    pack = _LEN.pack
    return b"".join([x for f in frames for x in (pack(len(f)), f)])


class FrameDecoder:
    """Splits a redirector byte stream into frames.

    ``receive_data(b)`` then ``frames()`` (all whole frames so far). A zero length is
    skipped (QEMU never sends one; tolerated, not an error). Raises OutputFramingError for a
    length above :data:`MAX_FRAME`: the stream cannot be resynchronised, the caller must
    reconnect.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]
        self.max_frame = max_frame

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the chardev."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf)

    def frames(self) -> list[bytes]:
        """The whole frames received so far (each without its length field).

        Raises OutputFramingError for a length above the bound.
        """
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > self.max_frame:
                raise OutputFramingError(
                    f"frame length {n}, expected at most {self.max_frame}: the redirector "
                    "stream lost its framing (is vnet_hdr_support off on both redirectors?)",
                    offset=self._offset + pos, length=n)
            if len(buf) - pos - 4 < n:
                break
            if n:
                out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
            self._offset += pos
        return out


@dataclass(slots=True)
class _Held:
    epoch: int
    items: list[bytes] = field(default_factory=list)
    size: int = 0


class HoldQueue:
    """Output held per epoch until that epoch commits (one queue per output channel).

    ``hold(data)`` puts output into the open epoch (the one the guest is running in);
    ``seal(n)`` closes it as epoch ``n`` — call it while the primary is stopped for
    checkpoint ``n``, after every byte produced before the stop was held, so that everything
    held so far was produced by an epoch <= n. ``commit(n)`` returns, in order, every item
    of sealed epochs <= n. ``drop()`` forgets everything held (failover: uncommitted output
    must never be seen). Output produced after ``cont`` goes into the next epoch, which only
    ever delays it, never releases it early.
    """

    def __init__(self) -> None:
        self._sealed: deque[_Held] = deque()
        self._open = _Held(epoch=-1)
        self.committed = 0
        self.released_items = 0
        self.released_bytes = 0
        self.dropped_items = 0

    def hold(self, data: bytes) -> None:
        """Hold ``data`` (a frame or a chunk of serial bytes) in the open epoch."""
        if data:
            self._open.items.append(data)
            self._open.size += len(data)

    def seal(self, epoch: int) -> None:
        """Everything held so far belongs to ``epoch`` (or an earlier one).

        An epoch not above the last sealed one is merged into that one (a checkpoint that
        failed and was retried reuses its number). Raises nothing.
        """
        cur = self._open
        self._open = _Held(epoch=-1)
        if not cur.items:
            return
        if self._sealed and self._sealed[-1].epoch >= epoch:
            last = self._sealed[-1]
            last.items += cur.items
            last.size += cur.size
            return
        cur.epoch = epoch
        self._sealed.append(cur)

    def commit(self, epoch: int) -> list[bytes]:
        """Release the output of every sealed epoch <= ``epoch``, oldest first."""
        out: list[bytes] = []
        self.committed = max(self.committed, epoch)
        while self._sealed and self._sealed[0].epoch <= epoch:
            held = self._sealed.popleft()
            out += held.items
            self.released_items += len(held.items)
            self.released_bytes += held.size
        return out

    def drop(self) -> int:
        """Forget all held output (sealed and open); returns how many items were dropped."""
        n = sum(len(h.items) for h in self._sealed) + len(self._open.items)
        self._sealed.clear()
        self._open = _Held(epoch=-1)
        self.dropped_items += n
        return n

    @property
    def held_items(self) -> int:
        """Items waiting (sealed and open)."""
        return sum(len(h.items) for h in self._sealed) + len(self._open.items)

    @property
    def held_bytes(self) -> int:
        """Bytes waiting (sealed and open)."""
        return sum(h.size for h in self._sealed) + self._open.size

    @property
    def open_items(self) -> int:
        """Items produced since the last seal (output activity in the running epoch)."""
        return len(self._open.items)
