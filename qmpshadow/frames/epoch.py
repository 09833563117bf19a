"""One epoch on the wire: the sender's :class:`EpochWriter`, the receiver's
:class:`EpochAssembler` (sans-I/O).

An epoch is EPOCH_BEGIN, then PAGES / SMALL_BLOCK / DISK_BLOCK / DEVICE_STATE frames, then
EPOCH_END with the counts and a digest: ``d0 = 0``,
``d(i+1) = xxh3_64(le64(d(i)) + le64(wire_checksum(i)))`` over the header checksums of
every frame from EPOCH_BEGIN to the last one before EPOCH_END. A header checksum covers
type, flags, generation, epoch, length and payload checksum, so equal digests mean the
receiver saw exactly the frames that were sent, in order. Heartbeats may be interleaved and
are not part of it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import xxhash

from qmpshadow.errors import ConfigError, FrameError
from qmpshadow.frames.limits import DEFAULT_MAX_PAYLOAD
from qmpshadow.frames.wire import (
    BlockFlags,
    Buffer,
    DeviceState,
    DeviceStateFormat,
    DiskBlock,
    EpochBegin,
    EpochEnd,
    Frame,
    FrameType,
    Heartbeat,
    Pages,
    RamBlock,
    SmallBlock,
    check_generation,
    encode_frame_parts,
    header_checksum,
)

__all__ = ["DIGEST_INIT", "EpochAssembler", "EpochComplete", "EpochWriter", "digest_step"]

DIGEST_INIT: Final = 0
_PAIR = struct.Struct("<QQ")


def digest_step(digest: int, wire_checksum: int) -> int:
    """Chain one frame's header checksum into the epoch digest."""
    return xxhash.xxh3_64_intdigest(_PAIR.pack(digest, wire_checksum))


class EpochWriter:
    """Encodes the frames of one epoch and tallies what EPOCH_END must declare.

    Each method returns the frame as buffers for ``writelines``. Order is enforced:
    :meth:`begin`, any number of pages/small_block/device_state, :meth:`end`; misuse raises
    ConfigError, as do blocks outside the table and payloads above ``max_payload``.
    """

    def __init__(
        self,
        *,
        generation: int,
        epoch: int,
        blocks: tuple[RamBlock, ...],
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        compress_level: int | None = None,
        base: int = 0,
    ) -> None:
        """``base``: the epoch this one's pages are a delta against (0: it carries every
        page); the receiver applies it only on top of exactly that epoch."""
        self.generation = generation
        self.base = base
        self.epoch = epoch
        self.blocks = blocks
        self._max_payload = max_payload
        self._compress = compress_level
        self._state = "new"
        self.frames = 0
        self.pages_sent = 0
        self.blob_bytes = 0
        self.digest = DIGEST_INIT
        self.wire_bytes = 0

    def _emit(self, frame: Frame, compress: bool) -> list[Buffer]:
        parts = encode_frame_parts(
            frame,
            compress_level=self._compress if compress else None,
            max_payload=self._max_payload,
        )
        self.digest = digest_step(self.digest, header_checksum(parts[0]))
        self.frames += 1
        self.wire_bytes += sum(len(p) for p in parts)
        return parts

    def _need(self, state: str, what: str) -> None:
        if self._state != state:
            raise ConfigError(f"{what} in epoch writer state {self._state!r}")

    def _block(self, block: int, small: bool) -> RamBlock:
        if not 0 <= block < len(self.blocks):
            raise ConfigError(f"block {block} is not in the table ({len(self.blocks)} blocks)")
        b = self.blocks[block]
        if bool(b.flags & BlockFlags.SMALL) != small:
            kind = "SMALL_BLOCK" if small else "PAGES"
            raise ConfigError(f"block {b.idstr!r} has flags {b.flags!r}: not sent as {kind}")
        return b

    def begin(self) -> list[Buffer]:
        """EPOCH_BEGIN with the block table."""
        self._need("new", "begin()")
        parts = self._emit(
            EpochBegin(generation=self.generation, epoch=self.epoch, blocks=self.blocks,
                       base=self.base),
            False,
        )
        self._state = "open"
        return parts

    def pages(self, block: int, count: int, records: Buffer) -> list[Buffer]:
        """A PAGES frame of ``count`` records (from the page codec) for ``block``."""
        self._need("open", "pages()")
        self._block(block, small=False)
        parts = self._emit(
            Pages(
                generation=self.generation,
                epoch=self.epoch,
                block=block,
                count=count,
                records=records,
            ),
            True,
        )
        self.pages_sent += count
        return parts

    def small_block(self, block: int, offset: int, data: Buffer) -> list[Buffer]:
        """Bytes of small RAM block ``block`` at ``offset``."""
        self._need("open", "small_block()")
        b = self._block(block, small=True)
        if offset < 0 or offset + len(data) > b.length:
            raise ConfigError(
                f"{len(data)} bytes at {offset} overrun block {b.idstr!r} of {b.length} bytes"
            )
        parts = self._emit(
            SmallBlock(
                generation=self.generation, epoch=self.epoch, block=block, offset=offset, data=data
            ),
            True,
        )
        self.blob_bytes += len(data)
        return parts

    def disk_block(self, disk: int, offset: int, data: Buffer) -> list[Buffer]:
        """Bytes of disk ``disk`` at byte ``offset`` (bounded by the receiver's disk size)."""
        self._need("open", "disk_block()")
        if disk < 0 or offset < 0:
            raise ConfigError(f"disk {disk} offset {offset}: expected non-negative values")
        parts = self._emit(
            DiskBlock(generation=self.generation, epoch=self.epoch, disk=disk, offset=offset,
                      data=data),
            True,
        )
        self.blob_bytes += len(data)
        return parts

    def device_state(self, fmt: DeviceStateFormat, data: Buffer) -> list[Buffer]:
        """The device-state blob."""
        self._need("open", "device_state()")
        parts = self._emit(
            DeviceState(generation=self.generation, epoch=self.epoch, format=fmt, data=data), True
        )
        self.blob_bytes += len(data)
        return parts

    def end(self) -> list[Buffer]:
        """EPOCH_END with the counts and digest of everything emitted since begin()."""
        self._need("open", "end()")
        frame = EpochEnd(
            generation=self.generation,
            epoch=self.epoch,
            frames=self.frames,
            pages=self.pages_sent,
            blob_bytes=self.blob_bytes,
            digest=self.digest,
        )
        parts = encode_frame_parts(frame, max_payload=self._max_payload)
        self.wire_bytes += sum(len(p) for p in parts)
        self._state = "ended"
        return parts


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochComplete:
    """The receiver holds every frame of ``epoch``, verified against EPOCH_END."""

    generation: int
    epoch: int
    blocks: tuple[RamBlock, ...]
    frames: int
    pages: int
    blob_bytes: int
    digest: int


class _State(enum.Enum):
    IDLE = "idle"
    OPEN = "open"


class EpochAssembler:
    """Receiver-side epoch bookkeeping: order, fencing, bounds, completeness.

    Feed it every decoded frame of the epoch stream (heartbeats are accepted and ignored). It
    does not apply pages; it tells the caller when everything of an epoch has arrived and
    matches its EPOCH_END, so the caller can commit. Errors (all FrameError): FencedFrameError
    for an older generation; otherwise a frame out of order, of the wrong epoch or generation,
    referring outside the block table, a delta whose base is not the last completed epoch,
    or an EPOCH_END whose counts or digest do not match. After an error, :meth:`abort` the
    epoch (and ask for a resync).
    """

    def __init__(self, *, generation: int = 0, last_epoch: int = 0) -> None:
        self.generation = generation
        self.last_epoch = last_epoch
        self._state = _State.IDLE
        self._begin: EpochBegin | None = None
        self._frames = 0
        self._pages = 0
        self._blob_bytes = 0
        self._digest = DIGEST_INIT

    @property
    def open_epoch(self) -> int | None:
        """The epoch being received, or None between epochs."""
        return None if self._begin is None else self._begin.epoch

    def abort(self) -> None:
        """Drop a partially received epoch (the connection broke, or feed() raised)."""
        self._state = _State.IDLE
        self._begin = None

    def feed(self, frame: Frame) -> EpochComplete | None:
        """Account for one frame; returns EpochComplete when ``frame`` closes a valid epoch."""
        self.generation = check_generation(frame, self.generation)
        if isinstance(frame, Heartbeat):
            return None
        handler = _TRANSITIONS.get((self._state, frame.TYPE))
        if handler is None:
            raise FrameError(
                f"{frame.TYPE.name} frame not expected while {self._state.value}"
                + (f" in epoch {self.open_epoch}" if self._begin else "")
            )
        return handler(self, frame)

    def _in_epoch(self, frame: Frame) -> EpochBegin:
        begin = self._begin
        if begin is None:  # unreachable through the table; keeps the type checker honest
            raise FrameError(f"{frame.TYPE.name} outside an epoch")
        if frame.epoch != begin.epoch or frame.generation != begin.generation:
            raise FrameError(
                f"{frame.TYPE.name} of epoch {frame.epoch} generation {frame.generation} "
                f"inside epoch {begin.epoch} generation {begin.generation}"
            )
        return begin

    def _count(self, frame: Frame) -> None:
        self._frames += 1
        self._digest = digest_step(self._digest, frame.wire_checksum)

    def _on_begin(self, frame: Frame) -> None:
        frame = cast(EpochBegin, frame)  # the transition table matched its TYPE
        if frame.epoch <= self.last_epoch:
            raise FrameError(
                f"EPOCH_BEGIN of epoch {frame.epoch}, but epoch {self.last_epoch} already "
                "completed: epochs must increase"
            )
        if frame.base and frame.base != self.last_epoch:
            # its pages complete epoch `base` only: on top of anything else they would
            # make a RAM that never existed (an epoch lost or refused in between)
            raise FrameError(
                f"epoch {frame.epoch} is a delta against epoch {frame.base}, but the receiver "
                f"holds epoch {self.last_epoch}: refused; a full epoch must come next"
            )
        self._state = _State.OPEN
        self._begin = frame
        self._frames = self._pages = self._blob_bytes = 0
        self._digest = DIGEST_INIT
        self._count(frame)

    def _block(self, begin: EpochBegin, index: int, small: bool, what: str) -> RamBlock:
        if index >= len(begin.blocks):
            raise FrameError(f"{what} names block {index}; the table has {len(begin.blocks)}")
        b = begin.blocks[index]
        if bool(b.flags & BlockFlags.SMALL) != small:
            raise FrameError(f"{what} for block {b.idstr!r}, which is not sent that way")
        return b

    def _on_pages(self, frame: Frame) -> None:
        frame = cast(Pages, frame)
        begin = self._in_epoch(frame)
        self._block(begin, frame.block, False, "PAGES")
        self._count(frame)
        self._pages += frame.count

    def _on_small(self, frame: Frame) -> None:
        frame = cast(SmallBlock, frame)
        begin = self._in_epoch(frame)
        b = self._block(begin, frame.block, True, "SMALL_BLOCK")
        if frame.offset > b.length or len(frame.data) > b.length - frame.offset:
            raise FrameError(
                f"SMALL_BLOCK of {len(frame.data)} bytes at {frame.offset} overruns block "
                f"{b.idstr!r} of {b.length} bytes"
            )
        self._count(frame)
        self._blob_bytes += len(frame.data)

    def _on_disk(self, frame: Frame) -> None:
        # bounds against the disk's size are the replica's (it holds the disk files)
        frame = cast(DiskBlock, frame)
        self._in_epoch(frame)
        self._count(frame)
        self._blob_bytes += len(frame.data)

    def _on_device(self, frame: Frame) -> None:
        frame = cast(DeviceState, frame)
        self._in_epoch(frame)
        self._count(frame)
        self._blob_bytes += len(frame.data)

    def _on_end(self, frame: Frame) -> EpochComplete:
        frame = cast(EpochEnd, frame)
        begin = self._in_epoch(frame)
        got = (self._frames, self._pages, self._blob_bytes, self._digest)
        want = (frame.frames, frame.pages, frame.blob_bytes, frame.digest)
        if got != want:
            raise FrameError(
                f"epoch {begin.epoch} incomplete or altered: received frames/pages/blob "
                f"bytes/digest {got[0]}/{got[1]}/{got[2]}/{got[3]:#x}, EPOCH_END declares "
                f"{want[0]}/{want[1]}/{want[2]}/{want[3]:#x}; request a resync"
            )
        self.last_epoch = begin.epoch
        self._state = _State.IDLE
        self._begin = None
        return EpochComplete(
            generation=begin.generation,
            epoch=begin.epoch,
            blocks=begin.blocks,
            frames=frame.frames,
            pages=frame.pages,
            blob_bytes=frame.blob_bytes,
            digest=frame.digest,
        )


# The one state table: (state, frame type) -> handler. Anything absent is a protocol error.
_TRANSITIONS: Final[
    dict[tuple[_State, FrameType], Callable[[EpochAssembler, Frame], EpochComplete | None]]
] = {
    (_State.IDLE, FrameType.EPOCH_BEGIN): EpochAssembler._on_begin,
    (_State.OPEN, FrameType.PAGES): EpochAssembler._on_pages,
    (_State.OPEN, FrameType.SMALL_BLOCK): EpochAssembler._on_small,
    (_State.OPEN, FrameType.DEVICE_STATE): EpochAssembler._on_device,
    (_State.OPEN, FrameType.DISK_BLOCK): EpochAssembler._on_disk,
    (_State.OPEN, FrameType.EPOCH_END): EpochAssembler._on_end,
}
