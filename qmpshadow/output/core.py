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


def encode_frame(frame: bytes) -> bytes:
    """One frame in redirector framing. Raises OutputFramingError for an oversized frame."""
    if len(frame) > MAX_FRAME:
        raise OutputFramingError(f"frame of {len(frame)} bytes, expected at most {MAX_FRAME}",
                                 offset=0, length=len(frame))
    return _LEN.pack(len(frame)) + frame


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
    stamps: list[float] = field(default_factory=list)
    size: int = 0


class HoldQueue:
    """Output held per epoch until that epoch commits (one queue per output channel).

    ``hold(data, now)`` puts output into the open epoch (the one the guest is running in);
    ``seal(n)`` closes it as epoch ``n`` — call it while the primary is stopped for
    checkpoint ``n``, after every byte produced before the stop was held, so that everything
    held so far was produced by an epoch <= n. ``commit(n, now)`` returns, in order, the
    items of sealed epochs <= n that may leave now. ``drop()`` forgets everything not
    committed (failover: uncommitted output must never be seen). Output produced after
    ``cont`` goes into the next epoch, which only ever delays it, never releases it early.

    ``floor`` (seconds, 0: none) is the release floor: a committed item leaves no sooner
    than ``floor`` after it was held. Released at commit, an item waits between the commit
    round trip and a whole epoch more, depending on when in the epoch it was produced; a
    TCP peer sees that as an RTT jumping by up to an epoch, and CUBIC's HyStart ends slow
    start at whatever window it had then. A floor at least the longest of those waits
    makes every item wait the same (a constant RTT) at the price of a higher mean
    latency. Items waiting for their floor are committed: :meth:`due` hands them out when
    their time comes, :meth:`flush` at once.
    """

    def __init__(self, floor: float = 0.0) -> None:
        if floor < 0:
            raise ValueError(f"release floor: expected >= 0 s, got {floor}")
        self.floor = floor
        self._sealed: deque[_Held] = deque()
        self._open = _Held(epoch=-1)
        self._ready: deque[tuple[float, bytes]] = deque()  # (due, item), committed
        self.committed = 0
        self.released_items = 0
        self.released_bytes = 0
        self.dropped_items = 0
        #: items whose commit came after their floor had passed (the floor was too short
        #: to make the wait constant)
        self.late_items = 0

    def hold(self, data: bytes, now: float = 0.0) -> None:
        """Hold ``data`` (a frame or a chunk of serial bytes), produced at ``now``, in the
        open epoch."""
        if data:
            self._open.items.append(data)
            self._open.stamps.append(now)
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
            last.stamps += cur.stamps
            last.size += cur.size
            return
        cur.epoch = epoch
        self._sealed.append(cur)

    def commit(self, epoch: int, now: float = 0.0) -> list[bytes]:
        """Commit every sealed epoch <= ``epoch``; returns, oldest first, the items that may
        leave at ``now`` (all of them without a floor)."""
        self.committed = max(self.committed, epoch)
        while self._sealed and self._sealed[0].epoch <= epoch:
            held = self._sealed.popleft()
            for at, item in zip(held.stamps, held.items, strict=True):
                due = at + self.floor
                if self.floor and due < now:
                    self.late_items += 1
                self._ready.append((due, item))
        return self.due(now)

    def due(self, now: float) -> list[bytes]:
        """The committed items whose floor has passed at ``now``, oldest first (order is
        kept: an item never overtakes an earlier one)."""
        out: list[bytes] = []
        while self._ready and self._ready[0][0] <= now:
            out.append(self._ready.popleft()[1])
        self._count(out)
        return out

    def flush(self) -> list[bytes]:
        """Every committed item, floor or not (the channel closes)."""
        out = [item for _due, item in self._ready]
        self._ready.clear()
        self._count(out)
        return out

    def _count(self, out: list[bytes]) -> None:
        self.released_items += len(out)
        self.released_bytes += sum(len(x) for x in out)

    @property
    def next_due(self) -> float | None:
        """When the oldest committed item may leave (None: none waits)."""
        return self._ready[0][0] if self._ready else None

    def drop(self) -> int:
        """Forget all output not committed (sealed and open); returns how many items were
        dropped. Committed items waiting for their floor stay (see :meth:`flush`)."""
        n = sum(len(h.items) for h in self._sealed) + len(self._open.items)
        self._sealed.clear()
        self._open = _Held(epoch=-1)
        self.dropped_items += n
        return n

    @property
    def held_items(self) -> int:
        """Items not yet released (uncommitted, or committed and waiting for the floor)."""
        return (sum(len(h.items) for h in self._sealed) + len(self._open.items)
                + len(self._ready))

    @property
    def held_bytes(self) -> int:
        """Bytes not yet released."""
        return (sum(h.size for h in self._sealed) + self._open.size
                + sum(len(x) for _d, x in self._ready))

    @property
    def open_items(self) -> int:
        """Items produced since the last seal (output activity in the running epoch)."""
        return len(self._open.items)


class AutoFloor:
    """The release floor that makes every frame wait the same: the longest wait an item
    can have, measured as seal of the previous epoch → commit of this one (an item of
    epoch N was produced after the previous seal), the largest of the last ``window``
    epochs plus ``margin`` seconds. Starts at 0 (no floor) until an epoch was measured."""

    def __init__(self, window: int = 8, margin: float = 0.002) -> None:
        if window < 1:
            raise ValueError(f"AutoFloor window: expected >= 1, got {window}")
        self._spans: deque[float] = deque(maxlen=window)
        self.margin = margin

    def note(self, span: float) -> None:
        """One epoch's seal-to-commit span in seconds."""
        self._spans.append(max(0.0, span))

    @property
    def floor(self) -> float:
        """The floor in seconds (0 before any span was noted)."""
        return max(self._spans) + self.margin if self._spans else 0.0
