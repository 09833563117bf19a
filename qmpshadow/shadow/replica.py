"""The shadow's replica of a primary VM: RAM file, small RAM blocks, device state, epochs.

A :class:`Replica` lives in a directory and owns:

- the **RAM file**: the shared block's bytes (the primary's main RAM), mapped read-write,
  then one trailer page naming the replica. It is the shadow QEMU's
  ``memory-backend-file`` (``share=on``; QEMU maps the first ``size`` bytes of a larger
  file and leaves the rest alone), so what the replica writes is what the promoted guest
  runs on. It may live elsewhere (e.g. ``/dev/shm``).
- ``small.bin``: every SMALL block of the table (bios, option ROMs, ACPI tables) back to
  back, page aligned, mapped read-write.
- ``devstate-<generation>-<epoch>.bin``: the device state of the committed epoch.
- ``state``: what is committed (generation, epoch, its digest, page size, block table,
  machine type, device-state file, RAM token) as JSON in one of two checksummed slots
  written alternately in place: a torn write leaves the other slot, the previous state.
- ``journal``: the write-ahead journal of the epoch being received.
- ``RETIRED``: present once a promotion consumed the replica (see :meth:`Replica.retire`).

Epochs are applied atomically. :meth:`Replica.stage` appends each frame of the open epoch
to the journal (validated, re-encoded uncompressed with the frame format's checksums) and
touches nothing else. :meth:`Replica.commit` takes the
:class:`~qmpshadow.frames.epoch.EpochComplete` the epoch assembler returned and

1. appends the commit record (an ACK frame with the epoch's wire digest, then an
   EPOCH_END frame counting and chaining the journal's own frames) and fsyncs the
   journal: from here on the epoch survives a crash;
2. applies the pages and small blocks in frame order (page records carry new bytes, so
   applying them again after a crash is harmless) and writes the device-state file;
3. writes the state into its older slot (and fsyncs it);
4. syncs the RAM and small-block files, truncates the journal and removes the previous
   device-state file.

The epoch may be acknowledged once step 1 is done (``commit(on_sealed=...)`` says when):
applying it, and above all syncing the data files, stays out of the time the source waits
for its ack.

:meth:`Replica.open` recovers: a journal whose commit record verifies is applied again and
the state brought to its epoch; any other journal is discarded. Killed at any point, the
replica therefore comes back at exactly the epoch before the commit or exactly the epoch
being committed, and once the commit record is durable (``on_sealed``, or ``commit``
returning: the moments its caller may acknowledge the epoch) never before it. A random
token written at :meth:`Replica.reset` into both the state and the RAM file's trailer ties
them together: a RAM file that was recreated (``/dev/shm`` after a reboot, a shadow QEMU
that created a missing file, an operator's copy) makes the replica hold nothing (epoch 0)
rather than claim bytes it lost.

One process at a time: the directory is locked (``flock``) while a replica is open.
Not thread-safe; run :meth:`~Replica.commit` in a worker thread from asyncio if its fsyncs
matter. See docs/shadow.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import fcntl
import json
import logging
import mmap
import os
import re
import secrets
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import xxhash

from qmpshadow.errors import ConfigError, FencedFrameError, FrameError
from qmpshadow.frames.codec import apply_pages, check_pages
from qmpshadow.frames.epoch import DIGEST_INIT, EpochComplete, digest_step
from qmpshadow.frames.limits import PAYLOAD_LIMIT, check_page_size
from qmpshadow.frames.wire import (
    NEED_DATA,
    Ack,
    BlockFlags,
    Buffer,
    DeviceState,
    DeviceStateFormat,
    DiskBlock,
    EpochBegin,
    EpochEnd,
    Frame,
    FrameDecoder,
    Heartbeat,
    Pages,
    RamBlock,
    SmallBlock,
    encode_frame_parts,
    header_checksum,
)
from qmpshadow.shadow.errors import ReplicaCorruptError, ReplicaError

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "JOURNAL_FILE",
    "SMALL_FILE",
    "STATE_FILE",
    "TRAILER_SIZE",
    "CommittedDeviceState",
    "Recovery",
    "RecoveryAction",
    "Replica",
    "StepHook",
]

log = logging.getLogger(__name__)

STATE_FILE: Final = "state"
JOURNAL_FILE: Final = "journal"
SMALL_FILE: Final = "small.bin"
LOCK_FILE: Final = "lock"
RETIRED_FILE: Final = "RETIRED"
DEFAULT_RAM_FILE: Final = "ram"
DEFAULT_PAGE_SIZE: Final = 4096
STATE_FORMAT: Final = 1
#: Bytes of retained frames above which commit re-reads the journal instead.
DEFAULT_MEMORY_LIMIT: Final = 256 << 20

#: state: two slots (written alternately in place, so no rename: ext4 flushes data on a
#: rename over a file, 4-13 ms here); a slot is a header and the state as JSON.
STATE_SLOT: Final = 2 << 20
_SLOT_MAGIC = b"QSREPST1"
_SLOT_HEAD = struct.Struct(">8sQIQ")  # magic, sequence, JSON length, xxh3-64 of the JSON
_READ_CHUNK = 8 << 20
_ZERO_CHUNK = 16 << 20
_DEVSTATE_RE = re.compile(r"devstate-(\d+)-(\d+)\.bin\Z")
#: The RAM file carries one page after the guest RAM: a trailer naming the replica (QEMU
#: maps only the backend's ``size`` bytes of a larger file and leaves the rest alone).
TRAILER_SIZE: Final = 4096
_TRAILER_MAGIC = b"QSRAMID1"

#: Called with the name of each step of :meth:`Replica.commit` (and of recovery) once it
#: is done; tests use it to kill the process at every step.
StepHook = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class CommittedDeviceState:
    """The device state of the committed epoch: its ``format`` and bytes."""

    format: DeviceStateFormat
    data: bytes


class RecoveryAction(enum.Enum):
    """What :meth:`Replica.open` found and did."""

    #: Nothing to recover (no journal, or an empty one).
    NONE = "none"
    #: A journal without a valid commit record was discarded (its epoch was never acked).
    DISCARDED = "discarded"
    #: A committed journal was applied (again) and the state brought to its epoch.
    REPLAYED = "replayed"
    #: The RAM file or device-state file no longer matched the state: the replica now
    #: holds nothing (epoch 0) and needs a full resync.
    INVALIDATED = "invalidated"


@dataclass(frozen=True, slots=True)
class Recovery:
    """The outcome of recovery on open: ``action``, the journal's ``epoch`` (if any),
    and a human-readable ``detail``."""

    action: RecoveryAction
    epoch: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _DevFile:
    name: str
    format: DeviceStateFormat
    length: int
    xxh3: int


@dataclass(frozen=True, slots=True)
class _State:
    generation: int = 0
    epoch: int = 0
    digest: int = 0
    page_size: int = DEFAULT_PAGE_SIZE
    blocks: tuple[RamBlock, ...] = ()
    machine_type: str | None = None
    ram_path: str | None = None
    ram_token: str = ""
    device: _DevFile | None = None

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "format": STATE_FORMAT,
            "generation": self.generation,
            "epoch": self.epoch,
            "digest": self.digest,
            "page_size": self.page_size,
            "blocks": [[b.idstr, b.length, int(b.flags)] for b in self.blocks],
            "machine_type": self.machine_type,
            "ram_path": self.ram_path,
            "ram_token": self.ram_token,
            "device_state": None if self.device is None else {
                "file": self.device.name,
                "format": int(self.device.format),
                "length": self.device.length,
                "xxh3": self.device.xxh3,
            },
        }
        return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, path: Path) -> _State:
        def bad(why: str) -> ReplicaCorruptError:
            return ReplicaCorruptError(
                f"replica state file does not verify: {why}; remove the replica directory "
                "and let the source resynchronise it",
                path=str(path),
            )

        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise bad(f"not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise bad("expected a JSON object")
        if body.get("format") != STATE_FORMAT:
            raise bad(f"format {body.get('format')!r}, this build reads {STATE_FORMAT}")
        try:
            blocks = tuple(
                RamBlock(idstr=str(i), length=int(n), flags=BlockFlags(int(f)))
                for i, n, f in body["blocks"]
            )
            dev = body["device_state"]
            return cls(
                generation=int(body["generation"]),
                epoch=int(body["epoch"]),
                digest=int(body["digest"]),
                page_size=int(body["page_size"]),
                blocks=blocks,
                machine_type=body["machine_type"],
                ram_path=body["ram_path"],
                ram_token=str(body["ram_token"]),
                device=None if dev is None else _DevFile(
                    str(dev["file"]), DeviceStateFormat(int(dev["format"])),
                    int(dev["length"]), int(dev["xxh3"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"malformed field ({exc!r})") from None


@dataclass(slots=True)
class _Open:
    """The epoch being staged."""

    begin: EpochBegin
    frames: int = 1  # EPOCH_BEGIN counts, as in the assembler's tally
    pages: int = 0
    blob_bytes: int = 0
    wire_digest: int = DIGEST_INIT  # over the received frames' wire checksums
    journal_digest: int = DIGEST_INIT  # over the journal's own frames
    device: DeviceStateFormat | None = None
    retained: list[Frame] | None = field(default_factory=list)
    retained_bytes: int = 0


def _payload_size(frame: Frame) -> int:
    if isinstance(frame, Pages):
        return len(frame.records)
    if isinstance(frame, SmallBlock | DeviceState | DiskBlock):
        return len(frame.data)
    return 0


def _write_all(fd: int, parts: Sequence[Buffer]) -> int:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = 0
    while views:
        n = os.writev(fd, views[:1024])
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


_TMPFS_MAGIC = 0x01021994
_RAMFS_MAGIC = 0x858458F6


def _volatile_fs(path: Path) -> bool:
    """True when ``path`` (a directory) is on tmpfs or ramfs; False when unsure."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on 64-bit Linux
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)
    return f_type & 0xFFFFFFFF in (_TMPFS_MAGIC, _RAMFS_MAGIC)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Replica:
    """A replica directory, opened with :meth:`open` (locks it) and closed with
    :meth:`close` (or ``with``). See the module docstring for the protocol."""

    def __init__(self, directory: Path, lock_fd: int, *, durable: bool | None,
                 memory_limit: int, step_hook: StepHook | None) -> None:
        # Use Replica.open(); this only sets fields.
        self._dir = directory
        self._lock_fd = lock_fd
        self._durable_opt = durable
        self._durable = bool(durable)  # resolved by _load once the RAM path is known
        self._memory_limit = memory_limit
        self._hook = step_hook
        self._state = _State()
        self._ram_path = directory / DEFAULT_RAM_FILE
        self._ram_fd = -1
        self._ram: mmap.mmap | None = None
        self._small_fd = -1
        self._small: mmap.mmap | None = None
        self._small_offsets: dict[str, tuple[int, int]] = {}
        self._journal_fd = -1
        #: (fd, size) of each disk image, in the spec's order
        self._disks: list[tuple[int, int]] = []
        self._state_fd = -1
        self._state_seq = 0
        self._device: CommittedDeviceState | None = None
        self._open: _Open | None = None
        self._broken: str | None = None
        self._closed = False
        self._retired = False
        self.recovery = Recovery(RecoveryAction.NONE)

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        ram_path: str | os.PathLike[str] | None = None,
        durable: bool | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        step_hook: StepHook | None = None,
        disks: Sequence[str | os.PathLike[str]] = (),
    ) -> Replica:
        """Open (creating it if needed) the replica in ``directory`` and recover it.

        ``ram_path`` is the RAM file (the shadow QEMU's ``mem-path``); default: the one
        the state names, else ``<directory>/ram``. ``durable`` fsyncs the journal, state
        and data files, which only matters for a host crash (a killed process loses
        nothing either way); None (default) means: durable unless the RAM file is on tmpfs
        or ramfs, whose contents a host crash takes along with every epoch (the RAM
        file's trailer is then gone and the replica comes back holding nothing, whatever
        was fsynced). Frames of an epoch are kept in memory up to ``memory_limit`` bytes to
        apply them at commit; a larger epoch is re-read from the journal. ``step_hook`` is
        called after each commit step (tests). ``disks`` are the shadow's disk images
        (raw, in the VM spec's ``[[disks]]`` order): DISK_BLOCK frames of a committed
        epoch are written into them, and only then (docs/disks.md).

        After open, :attr:`recovery` says what recovery did.

        Raises:
            ReplicaError: the directory is locked by another process, or cannot be
                created, or a replica file cannot be read or written.
            ReplicaCorruptError: the state file has no valid slot.
        """
        path = Path(directory).absolute()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ReplicaError(f"cannot create replica directory {path}: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(lock_fd)
            raise ReplicaError(
                f"replica {path} is in use by another process (pid {holder}); expected one "
                "shadow agent per replica: stop the other one or use another directory"
            ) from None
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        self = cls(path, lock_fd, durable=durable, memory_limit=memory_limit,
                   step_hook=step_hook)
        try:
            self._open_disks(disks)
            self._load(None if ram_path is None else Path(ram_path).absolute())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Unmap the files and release the lock (idempotent). A staged, uncommitted epoch
        stays in the journal and is discarded by the next open."""
        if self._closed:
            return
        self._closed = True
        self._unmap()
        for fd, _ in self._disks:
            os.close(fd)
        self._disks.clear()
        for attr in ("_journal_fd", "_state_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Replica {self._dir} generation {self.generation} epoch "
                f"{self.committed_epoch}{' retired' if self.retired else ''}>")

    # ------------------------------------------------------------------ properties

    @property
    def directory(self) -> Path:
        """The replica directory."""
        return self._dir

    @property
    def ram_path(self) -> Path:
        """The RAM file: give it to the shadow QEMU as its RAM backend's ``mem-path``."""
        return self._ram_path

    @property
    def durable(self) -> bool:
        """Whether commits fsync (see :meth:`open`)."""
        return self._durable

    @property
    def generation(self) -> int:
        """Generation (fencing token) of the primary this replica follows."""
        return self._state.generation

    @property
    def committed_epoch(self) -> int:
        """The last committed epoch; 0 when the replica holds nothing promotable."""
        return self._state.epoch

    @property
    def committed_digest(self) -> int:
        """EPOCH_END digest of the committed epoch (what its ACK echoes); 0 if none."""
        return self._state.digest

    @property
    def page_size(self) -> int:
        """Page size of the PAGES records applied to the RAM file."""
        return self._state.page_size

    @property
    def disk_count(self) -> int:
        """How many disk images DISK_BLOCK frames may write (``disks`` of :meth:`open`)."""
        return len(self._disks)

    @property
    def blocks(self) -> tuple[RamBlock, ...]:
        """The block table (empty before the first :meth:`reset`)."""
        return self._state.blocks

    @property
    def shared_block(self) -> RamBlock:
        """The block held in the RAM file (the one not flagged SMALL).

        Raises:
            ReplicaError: no block table yet (:meth:`reset` first).
        """
        for b in self._state.blocks:
            if not b.flags & BlockFlags.SMALL:
                return b
        raise ReplicaError(f"replica {self._dir} has no block table yet: reset() it first")

    @property
    def machine_type(self) -> str | None:
        """QEMU machine type of the primary (e.g. ``pc-i440fx-7.2``), when known."""
        return self._state.machine_type

    @property
    def device_state(self) -> CommittedDeviceState | None:
        """The committed epoch's device state, or None when nothing is committed."""
        return self._device

    @property
    def open_epoch(self) -> int | None:
        """The epoch being staged, or None."""
        return None if self._open is None else self._open.begin.epoch

    @property
    def retired(self) -> bool:
        """True once :meth:`retire` was called: the RAM file belongs to a running VM."""
        return self._retired

    def small_block(self, idstr: str) -> bytes:
        """The committed bytes of SMALL block ``idstr``.

        Raises:
            ReplicaError: ``idstr`` is not a SMALL block of the table.
        """
        where = self._small_offsets.get(idstr)
        if where is None or self._small is None:
            known = ", ".join(repr(k) for k in self._small_offsets) or "none"
            raise ReplicaError(
                f"{idstr!r} is not a small block of replica {self._dir} (small blocks: {known})"
            )
        off, length = where
        return bytes(self._small[off : off + length])

    # ------------------------------------------------------------------ reset / retire

    def reset(
        self,
        blocks: Sequence[RamBlock],
        generation: int,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        machine_type: str | None = None,
    ) -> None:
        """Start over for a new session or a full resync: the replica holds nothing
        (epoch 0) until the next epoch, a full one, commits.

        ``blocks`` is the session's block table: exactly one block without the SMALL flag
        (kept in the RAM file, which is created or resized to its length; keep its size
        equal to the shadow QEMU's RAM). Every byte of the RAM file and of the small
        blocks is zeroed. ``machine_type`` is the primary's QEMU machine type (from its
        initial stream's configuration section), needed to promote from QEMU device
        sections.

        Raises:
            ConfigError: the table has not exactly one non-SMALL block, repeats an idstr,
                has a length that is not a page multiple, or the page size is invalid.
            FencedFrameError: ``generation`` is older than the replica's.
            ReplicaError: the replica is retired, closed, broken, or a file cannot be
                written.
        """
        self._usable("reset")
        check_page_size(page_size)
        table = tuple(blocks)
        shared = [b for b in table if not b.flags & BlockFlags.SMALL]
        if len(shared) != 1:
            raise ConfigError(
                f"block table must have exactly one block without the SMALL flag (the RAM "
                f"file), got {len(shared)}: {[b.idstr for b in shared]}"
            )
        if len({b.idstr for b in table}) != len(table):
            raise ConfigError(f"block table repeats an idstr: {[b.idstr for b in table]}")
        for b in table:
            if b.length <= 0 or b.length % page_size:
                raise ConfigError(
                    f"block {b.idstr!r} length {b.length} is not a positive multiple of the "
                    f"page size {page_size}"
                )
        if generation < self._state.generation:
            raise FencedFrameError(generation, self._state.generation)
        self.abort()
        self._truncate_journal()
        old_dev = self._state.device
        self._state = replace(
            self._state, generation=generation, epoch=0, digest=0, page_size=page_size,
            blocks=table, machine_type=machine_type, device=None,
            ram_path=self._ram_ref(), ram_token=secrets.token_hex(16),
        )
        self._device = None
        self._write_state()  # from here the replica claims nothing
        self._map(shared[0].length, zero=True)
        if old_dev is not None:
            self._unlink(old_dev.name)
        self._remove_stray_device_files()

    def retire(self) -> None:
        """Mark the replica as consumed by a promotion: its RAM file is now the memory of
        a running VM, so no epoch may be staged, committed or reset into it again (also
        not by an agent restarted on this directory). Idempotent.

        This runs on the failover path just before ``cont``, so it only creates the
        ``RETIRED`` marker file (tens of microseconds; a state rewrite costs 1-2 ms) and
        does not fsync: it guards against a restarted agent, not against a host crash
        (which the promoted VM would not survive either).

        Raises:
            ReplicaError: closed, or the marker cannot be created.
        """
        if self._closed:
            raise ReplicaError(f"replica {self._dir} is closed")
        self.abort()
        if self._retired:
            return
        try:
            fd = os.open(self._dir / RETIRED_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
        except OSError as exc:
            raise ReplicaError(f"cannot retire replica {self._dir}: {exc}") from exc
        self._retired = True

    # ------------------------------------------------------------------ staging

    def stage(self, frame: Frame) -> None:
        """Append one frame of the epoch being received to the journal.

        Accepts EPOCH_BEGIN (opens the epoch), then PAGES (for the RAM file's block; the
        records are validated now), SMALL_BLOCK and one DEVICE_STATE. Heartbeats are
        ignored. EPOCH_END is not staged: feed it to the epoch assembler and pass the
        result to :meth:`commit`. Nothing outside the journal is modified.

        Raises:
            FencedFrameError: the frame's generation is older than the replica's.
            FrameError: the frame does not belong here: wrong epoch, generation or block
                table, out of order, a block outside the table, a second DEVICE_STATE.
                :meth:`abort` the epoch and ask for a resync.
            FrameFormatError: malformed PAGES records (same as above).
            ReplicaError: the replica is retired, closed or broken, or the journal cannot be
                written (the epoch is then aborted).
        """
        self._usable("stage a frame")
        if isinstance(frame, Heartbeat):
            return
        if isinstance(frame, EpochBegin):
            self._stage_begin(frame)
            return
        if not isinstance(frame, Pages | SmallBlock | DeviceState | DiskBlock):
            raise FrameError(
                f"{frame.TYPE.name} frames are not staged: pass EPOCH_END to the epoch "
                "assembler and its EpochComplete to commit()"
            )
        op = self._open
        if op is None:
            raise FrameError(
                f"{frame.TYPE.name} frame of epoch {frame.epoch} with no epoch open: "
                "expected EPOCH_BEGIN first"
            )
        begin = op.begin
        if frame.generation != begin.generation or frame.epoch != begin.epoch:
            raise FrameError(
                f"{frame.TYPE.name} of epoch {frame.epoch} generation {frame.generation} "
                f"inside epoch {begin.epoch} generation {begin.generation}"
            )
        if isinstance(frame, Pages):
            block = self._table_block(frame.block, small=False, what="PAGES")
            check_pages(frame.records, block.length // self._state.page_size,
                        self._state.page_size, frame.count)
            op.pages += frame.count
        elif isinstance(frame, SmallBlock):
            block = self._table_block(frame.block, small=True, what="SMALL_BLOCK")
            if frame.offset > block.length or len(frame.data) > block.length - frame.offset:
                raise FrameError(
                    f"SMALL_BLOCK of {len(frame.data)} bytes at {frame.offset} overruns block "
                    f"{block.idstr!r} of {block.length} bytes"
                )
            op.blob_bytes += len(frame.data)
        elif isinstance(frame, DiskBlock):
            self._check_disk_block(frame)
            op.blob_bytes += len(frame.data)
        else:
            if op.device is not None:
                raise FrameError(
                    f"second DEVICE_STATE in epoch {begin.epoch}: an epoch carries one "
                    "device-state blob"
                )
            op.device = frame.format
            op.blob_bytes += len(frame.data)
        self._journal(op, frame)
        op.frames += 1
        op.wire_digest = digest_step(op.wire_digest, frame.wire_checksum)
        if op.retained is not None:
            size = _payload_size(frame)
            if op.retained_bytes + size > self._memory_limit:
                op.retained = None  # commit re-reads the journal instead
            else:
                op.retained.append(frame)
                op.retained_bytes += size

    def _stage_begin(self, frame: EpochBegin) -> None:
        st = self._state
        if self._open is not None:
            raise FrameError(
                f"EPOCH_BEGIN of epoch {frame.epoch} while epoch {self._open.begin.epoch} is "
                "staged: commit() or abort() it first"
            )
        if frame.generation < st.generation:
            raise FencedFrameError(frame.generation, st.generation)
        if frame.generation > st.generation:
            raise FrameError(
                f"EPOCH_BEGIN of generation {frame.generation}, the replica follows "
                f"generation {st.generation}: reset(blocks, {frame.generation}) first"
            )
        if not st.blocks:
            raise FrameError("EPOCH_BEGIN before any block table: reset() the replica first")
        if frame.epoch <= st.epoch:
            raise FrameError(
                f"EPOCH_BEGIN of epoch {frame.epoch}, but epoch {st.epoch} is already "
                "committed: epochs must increase"
            )
        if frame.blocks != st.blocks:
            raise FrameError(
                f"EPOCH_BEGIN block table {_table(frame.blocks)} differs from the replica's "
                f"{_table(st.blocks)}: the VM's RAM layout changed; reset() and resync"
            )
        self._truncate_journal()
        op = _Open(begin=frame)
        self._open = op
        try:
            self._journal(op, frame)
        except BaseException:
            self._open = None
            raise
        op.wire_digest = digest_step(op.wire_digest, frame.wire_checksum)

    def _check_disk_block(self, frame: DiskBlock) -> None:
        if frame.disk >= len(self._disks):
            raise FrameError(
                f"DISK_BLOCK for disk {frame.disk}, but this shadow has {len(self._disks)} "
                "disk(s): give the shadow the same [[disks]] as the primary's VM spec"
            )
        size = self._disks[frame.disk][1]
        if frame.offset > size or len(frame.data) > size - frame.offset:
            raise FrameError(
                f"DISK_BLOCK of {len(frame.data)} bytes at {frame.offset} overruns disk "
                f"{frame.disk} of {size} bytes: the shadow's image must be as large as "
                "the primary's"
            )

    def _open_disks(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        for p in paths:
            try:
                fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise ReplicaError(
                    f"cannot open the shadow's disk image {os.fspath(p)!r}: {exc}; create "
                    "it (raw, as large as the primary's disk) first"
                ) from exc
            self._disks.append((fd, os.fstat(fd).st_size))

    def _table_block(self, index: int, *, small: bool, what: str) -> RamBlock:
        blocks = self._state.blocks
        if not 0 <= index < len(blocks):
            raise FrameError(f"{what} names block {index}; the table has {len(blocks)}")
        b = blocks[index]
        if bool(b.flags & BlockFlags.SMALL) != small:
            raise FrameError(f"{what} for block {b.idstr!r}, which is not sent that way")
        return b

    def _journal(self, op: _Open, frame: Frame) -> None:
        parts = encode_frame_parts(frame, max_payload=PAYLOAD_LIMIT)
        try:
            _write_all(self._journal_fd, parts)
        except OSError as exc:
            self.abort()
            raise ReplicaError(
                f"cannot append to the journal of replica {self._dir}: {exc}; the epoch is "
                "aborted: free space and ask the source for a resync"
            ) from exc
        op.journal_digest = digest_step(op.journal_digest, header_checksum(parts[0]))

    def abort(self) -> None:
        """Drop the staged epoch (the link broke, or a frame was refused)."""
        if self._open is None:
            return
        self._open = None
        if not self._closed and self._journal_fd >= 0:
            self._truncate_journal()

    # ------------------------------------------------------------------ commit

    def commit(self, complete: EpochComplete, *,
               on_sealed: Callable[[], object] | None = None) -> None:
        """Commit the staged epoch that ``complete`` (from the epoch assembler) closes.

        When this returns, the epoch is durable and applied. ``on_sealed`` is called as
        soon as the epoch is durable, before it is applied (step 1 of the module
        docstring done): from then on a crash recovers this epoch, so the epoch may be
        acknowledged from there (the call comes from this thread: hand it over to an
        event loop with ``call_soon_threadsafe``). An exception from ``on_sealed`` leaves
        the replica broken, like a failed apply. Without ``on_sealed``, acknowledge once
        this returns, never before.

        Raises:
            FrameError: ``complete`` does not match what was staged (epoch, generation,
                table, frame/page/byte counts or digest), or no DEVICE_STATE was staged.
                Nothing was committed; abort() and resync.
            ReplicaError: no epoch is staged, the replica is retired/closed/broken, or a file
                could not be written. If the commit record was already durable the replica
                is left broken: reopen it (recovery finishes the commit).
        """
        self._usable("commit")
        op = self._open
        if op is None:
            raise ReplicaError(
                f"commit of epoch {complete.epoch} with no epoch staged: expected stage() of "
                "its frames first"
            )
        begin = op.begin
        got = (begin.generation, begin.epoch, begin.blocks, op.frames, op.pages,
               op.blob_bytes, op.wire_digest)
        want = (complete.generation, complete.epoch, complete.blocks, complete.frames,
                complete.pages, complete.blob_bytes, complete.digest)
        if got != want:
            raise FrameError(
                f"commit of epoch {complete.epoch} generation {complete.generation} does not "
                f"match the staged epoch {begin.epoch} generation {begin.generation}: staged "
                f"frames/pages/bytes/digest {op.frames}/{op.pages}/{op.blob_bytes}/"
                f"{op.wire_digest:#x}, complete says {complete.frames}/{complete.pages}/"
                f"{complete.blob_bytes}/{complete.digest:#x}; stage every frame the "
                "assembler saw, or abort() and resync"
            )
        if op.device is None:
            raise FrameError(
                f"epoch {begin.epoch} has no DEVICE_STATE: an epoch without device state "
                "cannot be promoted; abort() and resync"
            )
        self._step("commit:begin")
        gen, epoch = begin.generation, begin.epoch
        self._journal(op, Ack(generation=gen, epoch=epoch, digest=complete.digest))
        end = EpochEnd(generation=gen, epoch=epoch, frames=op.frames + 1, pages=op.pages,
                       blob_bytes=op.blob_bytes, digest=op.journal_digest)
        try:
            _write_all(self._journal_fd, encode_frame_parts(end))
        except OSError as exc:
            self.abort()
            raise ReplicaError(
                f"cannot write the commit record of epoch {epoch} in {self._dir}: {exc}; "
                "nothing was committed: free space and resync"
            ) from exc
        # From here a crash recovers this epoch: failures leave the replica broken.
        self._step("commit:record-written")
        retained = op.retained
        self._open = None
        try:
            if self._durable:
                os.fsync(self._journal_fd)
            self._step("commit:record-synced")
            if on_sealed is not None:
                on_sealed()
            frames: Iterator[Frame] = (
                iter(retained) if retained is not None else self._journal_frames()
            )
            self._apply(frames, gen, epoch, complete.digest)
        except BaseException as exc:
            self._broken = (
                f"commit of epoch {epoch} failed after its commit record was written "
                f"({exc!r}); reopen the replica to finish it"
            )
            raise

    def _journal_frames(self) -> Iterator[Frame]:
        """Content frames of the journal (for a commit too big to keep in memory)."""
        for frame in self._read_journal():
            if isinstance(frame, Pages | SmallBlock | DeviceState | DiskBlock):
                yield frame

    def _apply(self, frames: Iterator[Frame], gen: int, epoch: int, digest: int) -> None:
        """Apply committed content frames, then make the epoch the committed one."""
        ram, small = self._ram, self._small
        if ram is None or small is None:
            raise ReplicaError(f"replica {self._dir} has no mapped RAM file to apply to")
        ps = self._state.page_size
        blocks = self._state.blocks
        dev: _DevFile | None = None
        dev_data = b""
        for i, frame in enumerate(frames, 1):
            if isinstance(frame, Pages):
                apply_pages(frame.records, ram, ps, frame.count)
            elif isinstance(frame, SmallBlock):
                off = self._small_offsets[blocks[frame.block].idstr][0] + frame.offset
                small[off : off + len(frame.data)] = frame.data
            elif isinstance(frame, DiskBlock):
                # bounds were checked when staged (and by recovery's re-read below)
                self._check_disk_block(frame)
                _pwrite_all(self._disks[frame.disk][0], frame.data, frame.offset)
            elif isinstance(frame, DeviceState):
                dev_data = bytes(frame.data)
                dev = _DevFile(f"devstate-{gen}-{epoch}.bin", frame.format, len(dev_data),
                               xxhash.xxh3_64_intdigest(dev_data))
                self._write_file(self._dir / dev.name, dev_data)
                self._step("commit:device-state-written")
            self._step(f"commit:applied:{i}")
        if dev is None:
            raise ReplicaError(f"committed epoch {epoch} holds no DEVICE_STATE frame")
        old = self._state.device
        self._state = replace(self._state, epoch=epoch, digest=digest, device=dev,
                              ram_path=self._ram_ref())
        self._device = CommittedDeviceState(dev.format, dev_data)
        self._write_state()
        self._step("commit:state-written")
        if self._durable:
            os.fsync(self._ram_fd)
            os.fsync(self._small_fd)
            for fd, _ in self._disks:
                os.fsync(fd)
        self._step("commit:data-synced")
        self._truncate_journal()
        self._step("commit:journal-truncated")
        if old is not None and old.name != dev.name:
            self._unlink(old.name)
        self._step("commit:done")

    # ------------------------------------------------------------------ recovery

    def _load(self, ram_path: Path | None) -> None:
        self._retired = (self._dir / RETIRED_FILE).exists()
        fresh = self._read_state()
        if ram_path is not None:
            self._ram_path = ram_path
        elif self._state.ram_path is not None:
            self._ram_path = self._dir / self._state.ram_path  # absolute stays absolute
        opt = self._durable_opt
        self._durable = not _volatile_fs(self._ram_path.parent) if opt is None else opt
        if fresh and self._durable:
            _fsync_dir(self._dir)
        try:
            self._journal_fd = os.open(
                self._dir / JOURNAL_FILE,
                os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ReplicaError(f"cannot open the journal in {self._dir}: {exc}") from exc
        st = self._state
        if st.blocks:
            holds = st.epoch > 0
            why = self._check_ram_identity() if holds else None
            # A replica at epoch 0 holds nothing: zero it as reset() would have (a crash
            # may have come between reset()'s state write and its zeroing).
            self._map(self.shared_block.length, zero=not holds)
            if why is None and st.device is not None:
                why = self._load_device_state(st.device)
            if holds and why is not None:
                self._invalidate(why)
        if fresh or self._state.ram_path != self._ram_ref():
            self._state = replace(self._state, ram_path=self._ram_ref())
            self._write_state()
        self._recover()
        self._remove_stray_device_files()

    def _ram_ref(self) -> str:
        """The RAM path as the state records it: relative when inside the directory (so a
        copied replica directory uses its own copy), else absolute."""
        if self._ram_path.parent == self._dir:
            return self._ram_path.name
        return str(self._ram_path)

    def _check_ram_identity(self) -> str | None:
        """Why the RAM file is not the one the state's epoch was applied to, or None."""
        length = self.shared_block.length
        try:
            with open(self._ram_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                trailer = os.pread(f.fileno(), TRAILER_SIZE, length)
        except FileNotFoundError:
            return f"the RAM file {self._ram_path} is missing"
        except OSError as exc:
            return f"the RAM file {self._ram_path} cannot be read ({exc})"
        if size != length + TRAILER_SIZE:
            return (f"the RAM file {self._ram_path} has {size} bytes, expected "
                    f"{length} + a {TRAILER_SIZE}-byte trailer: it was recreated or resized")
        if trailer != self._trailer():
            return (f"the RAM file {self._ram_path} does not carry this replica's trailer: "
                    "it was replaced")
        return None

    def _trailer(self) -> bytes:
        st = self._state
        head = _TRAILER_MAGIC + st.ram_token.encode() + self.shared_block.length.to_bytes(8, "big")
        return head.ljust(TRAILER_SIZE, b"\0")

    def _load_device_state(self, dev: _DevFile) -> str | None:
        path = self._dir / dev.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"its device-state file {path} cannot be read ({exc})"
        if len(data) != dev.length or xxhash.xxh3_64_intdigest(data) != dev.xxh3:
            return f"its device-state file {path} does not match its checksum"
        self._device = CommittedDeviceState(dev.format, data)
        return None

    def _invalidate(self, why: str) -> None:
        log.warning("replica %s: epoch %d is not held any more: %s; the replica holds "
                    "nothing until a full resync", self._dir, self._state.epoch, why)
        self.recovery = Recovery(RecoveryAction.INVALIDATED, self._state.epoch, why)
        self._state = replace(self._state, epoch=0, digest=0, device=None)
        self._device = None
        self._write_state()
        self._truncate_journal()
        # As after reset(): the next (full) epoch may leave zero pages out.
        if self._ram is not None and self._small is not None:
            _zero(self._ram, len(self._ram))
            _zero(self._small, len(self._small))

    def _recover(self) -> None:
        size = os.fstat(self._journal_fd).st_size
        if size == 0:
            return
        st = self._state
        verdict = self._verify_journal()
        if isinstance(verdict, str):
            log.info("replica %s: discarding an uncommitted journal (%s)", self._dir, verdict)
            self.recovery = Recovery(RecoveryAction.DISCARDED, None, verdict)
            self._truncate_journal()
            return
        gen, epoch, digest = verdict
        stale = (
            self._retired or not st.blocks or gen != st.generation or epoch < st.epoch
            or self._ram is None
        )
        if stale:
            why = (f"committed journal of generation {gen} epoch {epoch} does not follow the "
                   f"state (generation {st.generation} epoch {st.epoch})")
            log.warning("replica %s: discarding a %s", self._dir, why)
            self.recovery = Recovery(RecoveryAction.DISCARDED, epoch, why)
            self._truncate_journal()
            return
        log.info("replica %s: re-applying committed epoch %d from the journal", self._dir,
                 epoch)
        self._apply(self._journal_frames(), gen, epoch, digest)
        self.recovery = Recovery(RecoveryAction.REPLAYED, epoch,
                                 f"re-applied committed epoch {epoch} from the journal")

    def _read_journal(self) -> Iterator[Frame]:
        """Every frame of the journal in order; FrameError when a frame does not decode."""
        dec = FrameDecoder(max_payload=PAYLOAD_LIMIT)
        pos = 0
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                chunk = os.pread(self._journal_fd, _READ_CHUNK, pos)
                pos += len(chunk)
                dec.receive_data(chunk)  # b"" at the end: EOF
                continue
            if not isinstance(ev, Frame):  # CLOSED
                return
            yield ev

    def _verify_journal(self) -> tuple[int, int, int] | str:
        """(generation, epoch, wire digest) of a committed journal, or why it is not."""
        begin: EpochBegin | None = None
        frames = 0
        digest = DIGEST_INIT
        pages = blob = 0
        ack: Ack | None = None
        try:
            for frame in self._read_journal():
                if isinstance(frame, EpochEnd):
                    if begin is None or ack is None:
                        return "EPOCH_END without EPOCH_BEGIN and ACK"
                    got = (frames, pages, blob, digest, frame.generation, frame.epoch)
                    want = (frame.frames, frame.pages, frame.blob_bytes, frame.digest,
                            begin.generation, begin.epoch)
                    if got != want:
                        return f"commit record does not match the journal ({got} != {want})"
                    return begin.generation, begin.epoch, ack.digest
                if begin is None:
                    if not isinstance(frame, EpochBegin):
                        return f"journal starts with {frame.TYPE.name}, not EPOCH_BEGIN"
                    begin = frame
                elif ack is not None:
                    return f"{frame.TYPE.name} after the ACK of the commit record"
                elif isinstance(frame, Ack):
                    ack = frame
                elif isinstance(frame, Pages):
                    pages += frame.count
                elif isinstance(frame, SmallBlock | DeviceState | DiskBlock):
                    blob += len(frame.data)
                else:
                    return f"unexpected {frame.TYPE.name} frame in the journal"
                frames += 1
                digest = digest_step(digest, frame.wire_checksum)
        except FrameError as exc:
            return f"journal ends in a torn or corrupt frame ({exc})"
        return "no commit record (the epoch was being received)"

    # ------------------------------------------------------------------ files

    def _usable(self, what: str) -> None:
        if self._closed:
            raise ReplicaError(f"cannot {what}: replica {self._dir} is closed")
        if self._broken is not None:
            raise ReplicaError(f"cannot {what}: {self._broken}")
        if self._retired:
            raise ReplicaError(
                f"cannot {what}: replica {self._dir} is retired (its RAM file became the "
                "memory of the promoted VM); use a new replica directory"
            )

    def _step(self, name: str) -> None:
        if self._hook is not None:
            self._hook(name)

    def _read_state(self) -> bool:
        """Open the state file and load its newest valid slot; True when it is new."""
        path = self._dir / STATE_FILE
        try:
            self._state_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            raw = os.pread(self._state_fd, 2 * STATE_SLOT, 0)
        except OSError as exc:
            raise ReplicaError(f"cannot open the replica state {path}: {exc}") from exc
        best: tuple[int, _State] | None = None
        damaged = 0
        for slot in (0, 1):
            chunk = raw[slot * STATE_SLOT : (slot + 1) * STATE_SLOT]
            if len(chunk) < _SLOT_HEAD.size or not any(chunk[: _SLOT_HEAD.size]):
                continue  # never written
            magic, seq, length, check = _SLOT_HEAD.unpack_from(chunk)
            payload = chunk[_SLOT_HEAD.size : _SLOT_HEAD.size + length]
            if (magic != _SLOT_MAGIC or len(payload) != length
                    or xxhash.xxh3_64_intdigest(payload) != check):
                damaged += 1  # a torn write: the other slot holds the state before it
                continue
            st = _State.from_json(payload, path)
            if best is None or seq > best[0]:
                best = (seq, st)
        if best is None:
            if damaged or raw:
                raise ReplicaCorruptError(
                    "replica state file has no valid slot; remove the replica directory and "
                    "let the source resynchronise it", path=str(path))
            return True
        if damaged:
            log.warning("replica %s: one state slot is damaged (a write was interrupted); "
                        "using the other (sequence %d)", self._dir, best[0])
        self._state_seq, self._state = best
        return False

    def _write_state(self, *, sync: bool = True) -> None:
        payload = self._state.to_json()
        if _SLOT_HEAD.size + len(payload) > STATE_SLOT:
            raise ReplicaError(
                f"replica state of {len(payload)} bytes does not fit a {STATE_SLOT}-byte "
                f"slot (block table of {len(self._state.blocks)} blocks)")
        seq = self._state_seq + 1
        head = _SLOT_HEAD.pack(_SLOT_MAGIC, seq, len(payload), xxhash.xxh3_64_intdigest(payload))
        try:
            os.pwrite(self._state_fd, head + payload, (seq % 2) * STATE_SLOT)
            if self._durable and sync:
                os.fsync(self._state_fd)
        except OSError as exc:
            raise ReplicaError(
                f"cannot write the replica state {self._dir / STATE_FILE}: {exc}") from exc
        self._state_seq = seq

    def _write_file(self, path: Path, data: bytes, *, sync: bool = True) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, [data])
                if self._durable and sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ReplicaError(f"cannot write {path}: {exc}") from exc

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._dir / name).unlink()

    def _remove_stray_device_files(self) -> None:
        keep = None if self._state.device is None else self._state.device.name
        for p in self._dir.iterdir():
            if _DEVSTATE_RE.match(p.name) and p.name != keep:
                self._unlink(p.name)

    def _truncate_journal(self) -> None:
        try:
            os.ftruncate(self._journal_fd, 0)
        except OSError as exc:
            raise ReplicaError(f"cannot truncate the journal in {self._dir}: {exc}") from exc

    def _unmap(self) -> None:
        for attr in ("_ram", "_small"):
            m = getattr(self, attr)
            if m is not None:
                m.close()
                setattr(self, attr, None)
        for attr in ("_ram_fd", "_small_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def _map(self, ram_length: int, *, zero: bool) -> None:
        """(Re)map the RAM file (``ram_length`` bytes) and small.bin for the table."""
        self._unmap()
        offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for b in self._state.blocks:
            if b.flags & BlockFlags.SMALL:
                offsets[b.idstr] = (total, b.length)
                total += b.length
        self._small_offsets = offsets
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._ram_fd, self._ram = _map_file(self._ram_path, ram_length, flags, zero,
                                                self._trailer())
            self._small_fd, self._small = _map_file(
                self._dir / SMALL_FILE, max(total, 1), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                zero, b"")
            if self._durable:
                os.fsync(self._ram_fd)
        except OSError as exc:
            self._unmap()
            raise ReplicaError(
                f"cannot map the replica files ({self._ram_path}, {SMALL_FILE}): {exc}"
            ) from exc


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _map_file(path: Path, length: int, flags: int, zero: bool,
              trailer: bytes) -> tuple[int, mmap.mmap]:
    """Open ``path`` at exactly ``length`` bytes plus ``trailer`` (written after them) and
    map the first ``length`` bytes shared read-write."""
    fd = os.open(path, flags, 0o644)
    try:
        if os.fstat(fd).st_size != length + len(trailer):
            # A shrink invalidates mappings beyond the new end (a standby QEMU must be
            # restarted after a reset that changes the RAM size anyway).
            os.ftruncate(fd, length + len(trailer))
        if trailer:
            os.pwrite(fd, trailer, length)
        m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    if zero:
        _zero(m, length)
    return fd, m


def _zero(m: mmap.mmap, length: int) -> None:
    """Zero a shared mapping: punch the pages out (tmpfs, ext4, xfs), else write zeros."""
    try:
        m.madvise(mmap.MADV_REMOVE, 0, length)
        return
    except (OSError, AttributeError):
        pass
    zeros = bytes(min(_ZERO_CHUNK, length))
    for off in range(0, length, len(zeros)):
        n = min(len(zeros), length - off)
        m[off : off + n] = zeros[:n]


def _table(blocks: tuple[RamBlock, ...]) -> str:
    return "[" + ", ".join(f"{b.idstr}:{b.length}" for b in blocks) + "]"
