"""Delta-frame wire format between the source and the shadow agent (sans-I/O).

Every frame is a fixed 48-byte header followed by ``length`` payload bytes; all integers are
little-endian::

    off  size  field
      0     4  magic b"QSDF"
      4     1  version (1)
      5     1  type (FrameType)
      6     2  flags (FrameFlags; unknown bits are refused)
      8     8  generation: fencing token of the primary that produced the frame
     16     8  epoch
     24     4  payload length (bounded by the receiver's max_payload)
     28     4  reserved, must be zero
     32     8  xxh3-64 of the payload bytes as sent (after compression)
     40     8  xxh3-64 of header bytes 0..39

The header checksum is verified before the payload length is believed, so a corrupted length
never makes the receiver wait for or allocate bytes that will not come. Payload layouts are in
docs/frames.md and in the ``_parse_*`` functions below.

:class:`FrameDecoder` follows h11: ``receive_data(bytes)`` then ``next_event()`` until it
returns ``NEED_DATA``. It never delivers a partial or unverified frame. Checksums catch
corruption, not forgery: authenticity is the transport's job (TLS).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeAlias

import xxhash
import zstandard

from qmpshadow.errors import (
    ConfigError,
    FencedFrameError,
    FrameChecksumError,
    FrameError,
    FrameFormatError,
)
from qmpshadow.frames.limits import (
    DEFAULT_MAX_PAYLOAD,
    PAGE_SIZE_MAX,
    PAGE_SIZE_MIN,
    PAYLOAD_LIMIT,
)

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_PAYLOAD",
    "HEADER_SIZE",
    "MAGIC",
    "NEED_DATA",
    "VERSION",
    "Ack",
    "BlockFlags",
    "Buffer",
    "DecoderState",
    "DeviceState",
    "DeviceStateFormat",
    "DiskBlock",
    "EpochBegin",
    "EpochEnd",
    "Feature",
    "Frame",
    "FrameDecoder",
    "FrameFlags",
    "FrameType",
    "Heartbeat",
    "Hello",
    "Pages",
    "RamBlock",
    "ResyncReason",
    "ResyncRequest",
    "Role",
    "SmallBlock",
    "check_generation",
    "encode_frame",
    "encode_frame_parts",
]

#: Bulk data the encoder accepts without copying (the decoder always yields bytes).
Buffer: TypeAlias = bytes | bytearray | memoryview

MAGIC: Final = b"QSDF"
VERSION: Final = 2
HEADER_SIZE: Final = 48
_HEADER = struct.Struct("<4sBBHQQIIQ")  # bytes 0..39; the header checksum follows
_U64 = struct.Struct("<Q")

#: Bounds on variable parts of control payloads (they are small; a peer sending more is broken).
MAX_BLOCKS: Final = 4096
MAX_IDSTR: Final = 255
MAX_NAME: Final = 255
MAX_MESSAGE: Final = 1024
SESSION_ID_SIZE: Final = 16


class FrameType(enum.IntEnum):
    """The ``type`` byte of a frame header."""

    HELLO = 1
    EPOCH_BEGIN = 2
    PAGES = 3
    SMALL_BLOCK = 4
    DEVICE_STATE = 5
    EPOCH_END = 6
    ACK = 7
    RESYNC_REQUEST = 8
    HEARTBEAT = 9
    #: Bytes of one of the VM's disks at a byte offset, captured at the epoch's checkpoint
    #: (added with Feature.DISK; a receiver without disks refuses it).
    DISK_BLOCK = 10


class FrameFlags(enum.IntFlag):
    """The ``flags`` field of a frame header."""

    NONE = 0
    #: The payload is one zstd frame (with its content size); the checksum covers the
    #: compressed bytes, so corruption is caught before decompression.
    ZSTD = 0x0001


_KNOWN_FLAGS: Final = int(FrameFlags.ZSTD)
_COMPRESSIBLE: Final = frozenset({FrameType.PAGES, FrameType.SMALL_BLOCK, FrameType.DEVICE_STATE,
                                  FrameType.DISK_BLOCK})


class Role(enum.IntEnum):
    """Who sent a HELLO."""

    SOURCE = 1
    SHADOW = 2


class Feature(enum.IntFlag):
    """Capabilities advertised in HELLO."""

    NONE = 0
    ZSTD = 0x1
    DELTA = 0x2
    #: The sender may send DISK_BLOCK frames (disk replication, docs/disks.md).
    DISK = 0x4


class BlockFlags(enum.IntFlag):
    """Per-RAM-block flags of the EPOCH_BEGIN block table."""

    NONE = 0
    #: Shipped as SMALL_BLOCK blobs (bios, rom, acpi tables), not as PAGES.
    SMALL = 0x1


class DeviceStateFormat(enum.IntEnum):
    """What a DEVICE_STATE blob holds."""

    #: QEMU device sections (FULL sections ending in EOF), as in a COLO checkpoint.
    QEMU_SECTIONS = 1
    #: A whole x-ignore-shared migration stream (shared-RAM source), replayable as-is.
    IGNORE_SHARED_STREAM = 2


class ResyncReason(enum.IntEnum):
    """Why a shadow asks for a full resynchronisation."""

    UNSPECIFIED = 0
    DECODE_ERROR = 1
    DIGEST_MISMATCH = 2
    REPLICA_RESET = 3
    EPOCH_GAP = 4


# ---------------------------------------------------------------------------------------------
# Frames (events)


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """Base of every frame: the header fields shared by all types.

    ``wire_checksum`` is the header checksum the frame was received (or sent) with; the epoch
    digest chains it. It is not part of equality and is ignored by :func:`encode_frame`.
    """

    TYPE: ClassVar[FrameType]

    generation: int
    epoch: int
    wire_checksum: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class RamBlock:
    """One RAMBlock of the primary: QEMU idstr, used length in bytes, flags."""

    idstr: str
    length: int
    flags: BlockFlags = BlockFlags.NONE


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Frame):
    """Session parameters; sent first by both sides.

    The header ``epoch`` is the last epoch the sender knows committed (0: none). The page-hash
    seed is deliberately absent: only the sender's unchanged filter uses it.
    """

    TYPE: ClassVar[FrameType] = FrameType.HELLO

    session_id: bytes
    role: Role
    page_size: int
    features: Feature
    max_payload: int
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochBegin(Frame):
    """Opens ``epoch``; carries the RAM block table that PAGES/SMALL_BLOCK refer to by index.

    ``base`` is the epoch whose state this one's pages were taken against (a delta only
    completes that state), 0 when the epoch carries every page and needs no base."""

    TYPE: ClassVar[FrameType] = FrameType.EPOCH_BEGIN

    blocks: tuple[RamBlock, ...]
    base: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Pages(Frame):
    """``count`` encoded page records (see the page codec) for block number ``block``."""

    TYPE: ClassVar[FrameType] = FrameType.PAGES

    block: int
    count: int
    records: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class SmallBlock(Frame):
    """Raw bytes of a small RAM block at ``offset`` (a block may span several frames)."""

    TYPE: ClassVar[FrameType] = FrameType.SMALL_BLOCK

    block: int
    offset: int
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskBlock(Frame):
    """Bytes of disk number ``disk`` (the VM spec's ``[[disks]]`` order) at byte ``offset``,
    as they were at the epoch's checkpoint. The receiver bounds ``offset + len(data)`` by
    its own copy of that disk's size."""

    TYPE: ClassVar[FrameType] = FrameType.DISK_BLOCK

    disk: int
    offset: int
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState(Frame):
    """The epoch's device-state blob."""

    TYPE: ClassVar[FrameType] = FrameType.DEVICE_STATE

    format: DeviceStateFormat
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochEnd(Frame):
    """Closes ``epoch``: what the receiver must hold to call the epoch complete.

    ``frames`` counts the epoch's frames from EPOCH_BEGIN (included) to EPOCH_END (excluded),
    heartbeats not counted; ``pages`` sums PAGES counts; ``blob_bytes`` sums SMALL_BLOCK,
    DISK_BLOCK and DEVICE_STATE data lengths; ``digest`` chains their header checksums (see
    epoch.py).
    """

    TYPE: ClassVar[FrameType] = FrameType.EPOCH_END

    frames: int
    pages: int
    blob_bytes: int
    digest: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Frame):
    """The shadow committed ``epoch`` (header); ``digest`` echoes its EPOCH_END digest."""

    TYPE: ClassVar[FrameType] = FrameType.ACK

    digest: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ResyncRequest(Frame):
    """The shadow asks for a full resync; header ``epoch`` = its last committed epoch."""

    TYPE: ClassVar[FrameType] = FrameType.RESYNC_REQUEST

    reason: ResyncReason
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Frame):
    """Liveness on the replication link; not part of any epoch."""

    TYPE: ClassVar[FrameType] = FrameType.HEARTBEAT

    seq: int
    timestamp_ns: int


class DecoderState(enum.Enum):
    """Non-frame results of :meth:`FrameDecoder.next_event`."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


#: More bytes are needed before the next frame can be returned.
NEED_DATA: Final = DecoderState.NEED_DATA
#: The peer closed the stream cleanly, between frames.
CLOSED: Final = DecoderState.CLOSED


# ---------------------------------------------------------------------------------------------
# Encoding

_HELLO = struct.Struct("<16sBBHIII")  # session_id, role, name_len, reserved, page_size, ...
_BLOCK = struct.Struct("<QIB")  # length, flags, idstr length; idstr follows
_U32 = struct.Struct("<I")
_PAGES = struct.Struct("<II")
_SMALL = struct.Struct("<IIQ")
_DEVSTATE = struct.Struct("<II")
_EPOCH_END = struct.Struct("<IIQQQ")
_RESYNC = struct.Struct("<IHH")
_HEARTBEAT = struct.Struct("<QQ")


def _utf8(text: str, limit: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise ConfigError(f"{what} is {len(raw)} bytes of UTF-8, at most {limit} allowed")
    return raw


def _payload_hello(f: Hello) -> list[Buffer]:
    if len(f.session_id) != SESSION_ID_SIZE:
        raise ConfigError(f"session_id must be {SESSION_ID_SIZE} bytes, got {len(f.session_id)}")
    name = _utf8(f.name, MAX_NAME, "HELLO name")
    return [
        _HELLO.pack(f.session_id, f.role, len(name), 0, f.page_size, f.features, f.max_payload),
        name,
    ]


def _payload_epoch_begin(f: EpochBegin) -> list[Buffer]:
    if len(f.blocks) > MAX_BLOCKS:
        raise ConfigError(f"{len(f.blocks)} RAM blocks, at most {MAX_BLOCKS} allowed")
    parts: list[Buffer] = [_U32.pack(len(f.blocks))]
    for b in f.blocks:
        idstr = _utf8(b.idstr, MAX_IDSTR, "RAM block idstr")
        if not idstr:
            raise ConfigError("RAM block idstr must not be empty")
        parts.append(_BLOCK.pack(b.length, b.flags, len(idstr)))
        parts.append(idstr)
    if f.base < 0 or (f.base and f.base >= f.epoch):
        raise ConfigError(f"EPOCH_BEGIN of epoch {f.epoch} with base {f.base}: expected 0 "
                          "or an earlier epoch")
    parts.append(_U64.pack(f.base))
    return parts


def _payload_pages(f: Pages) -> list[Buffer]:
    return [_PAGES.pack(f.block, f.count), f.records]


def _payload_small(f: SmallBlock) -> list[Buffer]:
    return [_SMALL.pack(f.block, 0, f.offset), f.data]


def _payload_disk(f: DiskBlock) -> list[Buffer]:
    return [_SMALL.pack(f.disk, 0, f.offset), f.data]


def _payload_devstate(f: DeviceState) -> list[Buffer]:
    return [_DEVSTATE.pack(f.format, 0), f.data]


def _payload_epoch_end(f: EpochEnd) -> list[Buffer]:
    return [_EPOCH_END.pack(f.frames, 0, f.pages, f.blob_bytes, f.digest)]


def _payload_ack(f: Ack) -> list[Buffer]:
    return [_U64.pack(f.digest)]


def _payload_resync(f: ResyncRequest) -> list[Buffer]:
    msg = _utf8(f.message, MAX_MESSAGE, "RESYNC_REQUEST message")
    return [_RESYNC.pack(f.reason, len(msg), 0), msg]


def _payload_heartbeat(f: Heartbeat) -> list[Buffer]:
    return [_HEARTBEAT.pack(f.seq, f.timestamp_ns)]


def _payload_parts(frame: Frame) -> list[Buffer]:
    # isinstance dispatch keeps mypy aware of each subclass's fields.
    if isinstance(frame, Pages):
        return _payload_pages(frame)
    if isinstance(frame, SmallBlock):
        return _payload_small(frame)
    if isinstance(frame, DeviceState):
        return _payload_devstate(frame)
    if isinstance(frame, DiskBlock):
        return _payload_disk(frame)
    if isinstance(frame, EpochBegin):
        return _payload_epoch_begin(frame)
    if isinstance(frame, EpochEnd):
        return _payload_epoch_end(frame)
    if isinstance(frame, Ack):
        return _payload_ack(frame)
    if isinstance(frame, Heartbeat):
        return _payload_heartbeat(frame)
    if isinstance(frame, Hello):
        return _payload_hello(frame)
    if isinstance(frame, ResyncRequest):
        return _payload_resync(frame)
    raise ConfigError(f"cannot encode {type(frame).__name__}: not a concrete frame type")


def encode_frame_parts(
    frame: Frame,
    *,
    compress_level: int | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> list[Buffer]:
    """Encode ``frame`` as a list of buffers (header first) for ``writelines``.

    Large payload parts (page records, blobs) are passed through without copying.
    ``compress_level`` applies zstd to PAGES/SMALL_BLOCK/DEVICE_STATE payloads, kept only when
    it is smaller. Raises ConfigError when a field is out of range or the payload exceeds
    ``max_payload`` (split the batch; the receiver refuses larger frames).
    """
    try:
        parts = _payload_parts(frame)
    except struct.error as exc:
        raise ConfigError(f"{type(frame).__name__} field out of range: {exc}") from None
    length = sum(len(p) for p in parts)
    if length > max_payload or length > PAYLOAD_LIMIT:
        raise ConfigError(
            f"{frame.TYPE.name} payload is {length} bytes, above max_payload {max_payload}: "
            "send the pages in smaller batches"
        )
    flags = 0
    if compress_level is not None and frame.TYPE in _COMPRESSIBLE and length:
        packed = zstandard.ZstdCompressor(level=compress_level, write_content_size=True).compress(
            b"".join(parts)
        )
        if len(packed) < length:
            parts, length, flags = [packed], len(packed), int(FrameFlags.ZSTD)
    hasher = xxhash.xxh3_64()
    for p in parts:
        hasher.update(p)
    try:
        head = _HEADER.pack(
            MAGIC,
            VERSION,
            frame.TYPE,
            flags,
            frame.generation,
            frame.epoch,
            length,
            0,
            hasher.intdigest(),
        )
    except struct.error as exc:
        raise ConfigError(f"frame header field out of range: {exc}") from None
    head += _U64.pack(xxhash.xxh3_64_intdigest(head))
    return [head, *parts]


def encode_frame(
    frame: Frame,
    *,
    compress_level: int | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> bytes:
    """Encode ``frame`` to bytes; see :func:`encode_frame_parts` for arguments and errors."""
    return b"".join(
        encode_frame_parts(frame, compress_level=compress_level, max_payload=max_payload)
    )


def header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The header checksum (``wire_checksum``) of an encoded frame's first 48 bytes."""
    return int(_U64.unpack_from(header, 40)[0])


def check_generation(frame: Frame, current: int) -> int:
    """Fencing check: return the generation to keep after accepting ``frame``.

    A frame from an older generation than ``current`` raises FencedFrameError (its sender is a
    deposed primary). A newer generation is adopted: the caller stores the returned value.
    """
    if frame.generation < current:
        raise FencedFrameError(frame.generation, current)
    return frame.generation


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, slots=True)
class _Header:
    ftype: FrameType
    flags: int
    generation: int
    epoch: int
    length: int
    payload_checksum: int
    header_checksum: int


class _Reader:
    """Bounds-checked cursor over one payload; errors carry the absolute stream offset."""

    __slots__ = ("_base", "_data", "_pos", "_what")

    def __init__(self, data: memoryview, base: int, what: str) -> None:
        self._data = data
        self._base = base
        self._pos = 0
        self._what = what

    def fail(self, message: str) -> FrameFormatError:
        return FrameFormatError(f"{self._what}: {message}", offset=self._base + self._pos)

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        if len(self._data) - self._pos < st.size:
            raise self.fail(
                f"payload ends after {len(self._data)} bytes, need {st.size} more at {self._pos}"
            )
        values = st.unpack_from(self._data, self._pos)
        self._pos += st.size
        return tuple(values)

    def take(self, n: int) -> bytes:
        if len(self._data) - self._pos < n:
            raise self.fail(f"field of {n} bytes runs past the payload end")
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def text(self, n: int, what: str) -> str:
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._pos -= n
            raise self.fail(f"{what} is not UTF-8: {raw[:32]!r}") from None

    def rest(self) -> bytes:
        # The one copy of bulk data out of the receive buffer.
        chunk = bytes(self._data[self._pos :])
        self._pos = len(self._data)
        return chunk

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise self.fail(f"{len(self._data) - self._pos} trailing bytes after the fields")

    def reserved(self, value: int) -> None:
        if value:
            raise self.fail(f"reserved field is {value:#x}, must be 0")


def _enum(r: _Reader, cls: type[enum.IntEnum], value: int, what: str) -> int:
    try:
        return int(cls(value))
    except ValueError:
        raise r.fail(f"unknown {what} {value}") from None


def _parse_hello(h: _Header, r: _Reader) -> Frame:
    sid, role, name_len, res, page_size, features, max_payload = r.unpack(_HELLO)
    r.reserved(res)
    role_v = Role(_enum(r, Role, role, "HELLO role"))
    if page_size < PAGE_SIZE_MIN or page_size > PAGE_SIZE_MAX or page_size & (page_size - 1):
        raise r.fail(f"HELLO page size {page_size} is not a power of two in range")
    if features & ~int(Feature.ZSTD | Feature.DELTA | Feature.DISK):
        raise r.fail(f"HELLO advertises unknown features {features:#x}")
    name = r.text(name_len, "HELLO name")
    r.finish()
    return Hello(
        generation=h.generation,
        epoch=h.epoch,
        wire_checksum=h.header_checksum,
        session_id=bytes(sid),
        role=role_v,
        page_size=page_size,
        features=Feature(features),
        max_payload=max_payload,
        name=name,
    )


def _parse_epoch_begin(h: _Header, r: _Reader) -> Frame:
    (count,) = r.unpack(_U32)
    if count > MAX_BLOCKS:
        raise r.fail(f"EPOCH_BEGIN lists {count} RAM blocks, at most {MAX_BLOCKS} allowed")
    blocks = []
    for _ in range(count):
        length, flags, idlen = r.unpack(_BLOCK)
        if flags & ~int(BlockFlags.SMALL):
            raise r.fail(f"RAM block has unknown flags {flags:#x}")
        if idlen == 0:
            raise r.fail("RAM block idstr is empty")
        idstr = r.text(idlen, "RAM block idstr")
        blocks.append(RamBlock(idstr=idstr, length=length, flags=BlockFlags(flags)))
    (base,) = r.unpack(_U64)
    if base and base >= h.epoch:
        raise r.fail(f"EPOCH_BEGIN of epoch {h.epoch} names base epoch {base}: a base "
                     "precedes its epoch")
    r.finish()
    return EpochBegin(
        generation=h.generation,
        epoch=h.epoch,
        wire_checksum=h.header_checksum,
        blocks=tuple(blocks),
        base=base,
    )


def _parse_pages(h: _Header, r: _Reader) -> Frame:
    block, count = r.unpack(_PAGES)
    return Pages(
        generation=h.generation,
        epoch=h.epoch,
        wire_checksum=h.header_checksum,
        block=block,
        count=count,
        records=r.rest(),
    )


def _block_bytes(r: _Reader) -> tuple[int, int, bytes]:
    """(index, offset, data) of a SMALL_BLOCK or DISK_BLOCK payload (same layout)."""
    index, res, offset = r.unpack(_SMALL)
    r.reserved(res)
    return index, offset, r.rest()


def _parse_small(h: _Header, r: _Reader) -> Frame:
    block, offset, data = _block_bytes(r)
    return SmallBlock(generation=h.generation, epoch=h.epoch, wire_checksum=h.header_checksum,
                      block=block, offset=offset, data=data)


def _parse_disk(h: _Header, r: _Reader) -> Frame:
    disk, offset, data = _block_bytes(r)
    return DiskBlock(generation=h.generation, epoch=h.epoch, wire_checksum=h.header_checksum,
                     disk=disk, offset=offset, data=data)


def _parse_devstate(h: _Header, r: _Reader) -> Frame:
    fmt, res = r.unpack(_DEVSTATE)
    r.reserved(res)
    fmt_v = DeviceStateFormat(_enum(r, DeviceStateFormat, fmt, "device-state format"))
    return DeviceState(
        generation=h.generation,
        epoch=h.epoch,
        wire_checksum=h.header_checksum,
        format=fmt_v,
        data=r.rest(),
    )


def _parse_epoch_end(h: _Header, r: _Reader) -> Frame:
    frames, res, pages, blob_bytes, digest = r.unpack(_EPOCH_END)
    r.reserved(res)
    r.finish()
    return EpochEnd(
        generation=h.generation,
        epoch=h.epoch,
        wire_checksum=h.header_checksum,
        frames=frames,
        pages=pages,
        blob_bytes=blob_bytes,
        digest=digest,
    )


def _parse_ack(h: _Header, r: _Reader) -> Frame:
    (digest,) = r.unpack(_U64)
    r.finish()
    return Ack(
        generation=h.generation, epoch=h.epoch, wire_checksum=h.header_checksum, digest=digest
    )


def _parse_resync(h: _Header, r: _Reader) -> Frame:
    reason, msg_len, res = r.unpack(_RESYNC)
    r.reserved(res)
    reason_v = ResyncReason(_enum(r, ResyncReason, reason, "resync reason"))
    if msg_len > MAX_MESSAGE:
        raise r.fail(f"RESYNC_REQUEST message of {msg_len} bytes, at most {MAX_MESSAGE}")
    message = r.text(msg_len, "RESYNC_REQUEST message")
    r.finish()
    return ResyncRequest(
        generation=h.generation,
        epoch=h.epoch,
        wire_checksum=h.header_checksum,
        reason=reason_v,
        message=message,
    )


def _parse_heartbeat(h: _Header, r: _Reader) -> Frame:
    seq, ts = r.unpack(_HEARTBEAT)
    r.finish()
    return Heartbeat(
        generation=h.generation,
        epoch=h.epoch,
        wire_checksum=h.header_checksum,
        seq=seq,
        timestamp_ns=ts,
    )


_PARSERS: Final[dict[FrameType, Callable[[_Header, _Reader], Frame]]] = {
    FrameType.HELLO: _parse_hello,
    FrameType.EPOCH_BEGIN: _parse_epoch_begin,
    FrameType.PAGES: _parse_pages,
    FrameType.SMALL_BLOCK: _parse_small,
    FrameType.DEVICE_STATE: _parse_devstate,
    FrameType.EPOCH_END: _parse_epoch_end,
    FrameType.ACK: _parse_ack,
    FrameType.RESYNC_REQUEST: _parse_resync,
    FrameType.HEARTBEAT: _parse_heartbeat,
    FrameType.DISK_BLOCK: _parse_disk,
}


def _decompress(payload: bytes, max_payload: int, offset: int) -> bytes:
    """Inflate a ZSTD payload without trusting it: the declared size is bounded first."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise FrameFormatError(
            f"zstd payload has no valid frame header: {exc}", offset=offset
        ) from None
    if declared < 0:
        raise FrameFormatError("zstd payload does not declare its content size", offset=offset)
    if declared > max_payload:
        raise FrameFormatError(
            f"zstd payload declares {declared} bytes, above max_payload {max_payload}",
            offset=offset,
        )
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(payload)
    except zstandard.ZstdError as exc:
        raise FrameFormatError(f"zstd payload does not decompress: {exc}", offset=offset) from None
    # One whole frame, exactly as large as declared: trailing or missing bytes mean a broken
    # sender, and silently accepting them would hide it.
    if not dobj.eof or dobj.unused_data or len(out) != declared:
        raise FrameFormatError(
            f"zstd payload is not exactly one frame of {declared} bytes "
            f"(got {len(out)}, {len(dobj.unused_data)} trailing)",
            offset=offset,
        )
    return out


def _parse_payload(
    hdr: _Header, buf: bytearray, end: int, payload_at: int, max_payload: int
) -> Frame:
    """Parse the verified payload ``buf[HEADER_SIZE:end]`` into its frame."""
    if hdr.flags & FrameFlags.ZSTD:
        inflated = _decompress(bytes(memoryview(buf)[HEADER_SIZE:end]), max_payload, payload_at)
        # Offsets inside an inflated payload have no stream position: they count from the
        # payload start.
        return _PARSERS[hdr.ftype](hdr, _Reader(memoryview(inflated), payload_at, hdr.ftype.name))
    with memoryview(buf) as whole, whole[HEADER_SIZE:end] as view:
        return _PARSERS[hdr.ftype](hdr, _Reader(view, payload_at, hdr.ftype.name))


class FrameDecoder:
    """Incremental frame parser: bytes in, verified :class:`Frame` events out.

    ``receive_data(b"")`` signals EOF. After any FrameError the decoder stays failed (a byte
    stream cannot be resynchronised after corruption): every later ``next_event`` raises.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD, offset: int = 0) -> None:
        """``max_payload`` bounds both wire and decompressed payloads; ``offset`` is the stream
        offset of the first byte fed (for error messages). Raises ConfigError when out of range.
        """
        if not 0 <= max_payload <= PAYLOAD_LIMIT:
            raise ConfigError(f"max_payload must be in [0, {PAYLOAD_LIMIT}], got {max_payload}")
        self._max_payload = max_payload
        self._buf = bytearray()
        self._offset = offset
        self._eof = False
        self._header: _Header | None = None
        self._error: FrameError | None = None

    @property
    def offset(self) -> int:
        """Absolute stream offset of the first byte not yet consumed by a returned frame."""
        return self._offset

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf)

    @property
    def pending_payload(self) -> int | None:
        """Payload length of the frame being waited for, once its header is verified."""
        return None if self._header is None else self._header.length

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes; ``b""`` means the peer closed (repeatable). Raises FrameError for
        bytes after EOF.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise FrameError("receive_data() called with bytes after EOF was signalled")
        if self._error is not None:
            return  # next_event() reports the failure; bytes after it mean nothing
        self._buf += data

    def next_event(self) -> Frame | Literal[DecoderState.NEED_DATA, DecoderState.CLOSED]:
        """Return the next verified frame, ``NEED_DATA`` or (after a clean EOF) ``CLOSED``.

        Raises FrameFormatError (bad magic/version/type/flags, length above max_payload,
        malformed payload, truncated stream at EOF) or FrameChecksumError, with the offset.
        """
        if self._error is not None:
            raise FrameFormatError(
                f"decoder already failed ({self._error}); open a new session",
                offset=self._offset,
            )
        try:
            return self._next()
        except FrameError as exc:
            self._error = exc
            # The traceback may pin views of the old buffer; a failed decoder keeps no bytes.
            self._buf = bytearray()
            raise

    def _next(self) -> Frame | Literal[DecoderState.NEED_DATA, DecoderState.CLOSED]:
        buf = self._buf
        if self._header is None:
            have = len(buf)
            # Refuse a foreign stream as soon as the magic is visible, not after 48 bytes.
            if have and bytes(buf[: min(have, 4)]) != MAGIC[: min(have, 4)]:
                raise FrameFormatError(
                    f"bad frame magic {bytes(buf[:4])!r}, expected {MAGIC!r}: peer is not a "
                    "qmpshadow agent or the stream is corrupt",
                    offset=self._offset,
                )
            if have < HEADER_SIZE:
                if self._eof:
                    if not have:
                        return CLOSED
                    raise FrameFormatError(
                        f"stream ended inside a frame header ({have} of {HEADER_SIZE} bytes)",
                        offset=self._offset,
                    )
                return NEED_DATA
            self._header = self._parse_header()
        hdr = self._header
        end = HEADER_SIZE + hdr.length
        if len(buf) < end:
            if self._eof:
                raise FrameFormatError(
                    f"stream ended inside a {hdr.ftype.name} payload "
                    f"({len(buf) - HEADER_SIZE} of {hdr.length} bytes)",
                    offset=self._offset + len(buf),
                )
            return NEED_DATA
        payload_at = self._offset + HEADER_SIZE
        got = xxhash.xxh3_64_intdigest(memoryview(buf)[HEADER_SIZE:end])
        if got != hdr.payload_checksum:
            raise FrameChecksumError(
                f"{hdr.ftype.name} payload checksum {got:#018x} does not match the "
                f"header's {hdr.payload_checksum:#018x}: corrupted in transit",
                offset=payload_at,
            )
        frame = _parse_payload(hdr, buf, end, payload_at, self._max_payload)
        # No view of buf survives _parse_payload, so the buffer may shrink.
        del buf[:end]
        self._offset += end
        self._header = None
        return frame

    def _parse_header(self) -> _Header:
        buf, at = self._buf, self._offset
        _, version, ftype, flags, gen, epoch, length, res, pcs = _HEADER.unpack_from(buf, 0)
        (hcs,) = _U64.unpack_from(buf, 40)
        if version != VERSION:
            raise FrameFormatError(
                f"unsupported frame version {version} (this build speaks {VERSION}): the peer "
                "runs another qmpshadow release, or the header is corrupt",
                offset=at + 4,
            )
        got = xxhash.xxh3_64_intdigest(bytes(buf[:40]))
        if got != hcs:
            raise FrameChecksumError(
                f"header checksum {got:#018x} does not match {hcs:#018x}: corrupted in transit",
                offset=at,
            )
        try:
            ft = FrameType(ftype)
        except ValueError:
            raise FrameFormatError(f"unknown frame type {ftype}", offset=at + 5) from None
        if flags & ~_KNOWN_FLAGS:
            raise FrameFormatError(f"unknown frame flags {flags:#06x}", offset=at + 6)
        if flags & FrameFlags.ZSTD and ft not in _COMPRESSIBLE:
            raise FrameFormatError(f"{ft.name} frames cannot be compressed", offset=at + 6)
        if res:
            raise FrameFormatError(f"reserved header field is {res:#x}, must be 0", offset=at + 28)
        if length > self._max_payload:
            raise FrameFormatError(
                f"{ft.name} payload of {length} bytes exceeds max_payload {self._max_payload}: "
                "raise max_payload on the receiver or send smaller batches",
                offset=at + 24,
            )
        return _Header(ft, flags, gen, epoch, length, pcs, hcs)
