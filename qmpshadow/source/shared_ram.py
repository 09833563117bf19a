"""Shared-RAM source: checkpoints of a primary whose RAM is a shared file we can read.

Per checkpoint: ``stop`` → device state by ``migrate`` with ``x-ignore-shared`` to our unix
socket (small RAM blocks + devices + vmdesc, no page of the shared block; read to EOF —
QEMU closes only after it set ``postmigrate``) → keyed xxh3 scan of every page of the RAM
file against the previous epoch's table → copy the changed pages → ``cont`` → parse the
stream (the primary need not wait for that). Works under TCG and KVM and needs no COLO.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..disk.replicator import DiskCapture, DiskReplicator
from ..errors import ConfigError, QmpCommandError, QmpShadowError, StreamFormatError
from ..frames.pagehash import UnchangedFilter
from ..frames.wire import DeviceStateFormat, RamBlock
from ..migstream import StreamParser
from ..migstream.constants import RamFlag
from ..migstream.events import RamMemSize, RamRecords, _NeedData
from ..qmp.control import QmpControl
from ..qmp.events import EventSubscription
from .epoch import CapturedEpoch, block_table

#: File magic and version 3: what ``xen-save-devices-state`` writes before its sections.
_XEN_HEADER = b"QEVM\x00\x00\x00\x03"


def parse_device_stream(data: bytes, main_block: str) -> tuple[list[tuple[str, int]],
                                                                dict[str, dict[int, bytes]], int]:
    """(block list, small-block pages, page size) of an x-ignore-shared stream.

    Raises StreamFormatError when the stream is malformed, ConfigError when it is not an
    x-ignore-shared stream or carries pages of the main block.
    """
    parser = StreamParser()
    parser.receive_data(data)
    parser.receive_data(b"")
    blocks: list[tuple[str, int]] = []
    small: dict[str, dict[int, bytes]] = {}
    while not isinstance(ev := parser.next_event(), _NeedData):
        if isinstance(ev, RamMemSize):
            blocks = [(b.idstr, b.used_length) for b in ev.blocks]
        elif isinstance(ev, RamRecords):
            ps = ev.page_size
            for flags, offset, block, pos in ev.records:
                if block == main_block:
                    raise ConfigError(
                        f"the device-state stream carries pages of the main block "
                        f"{main_block!r}: its memory backend must be share=on and "
                        "x-ignore-shared set")
                page = (bytes(ev.data[pos : pos + ps]) if flags & RamFlag.PAGE
                        else bytes([ev.data[pos]]) * ps)
                small.setdefault(block, {})[offset] = page
    if not parser.ignore_shared:
        raise ConfigError("the primary's stream is not x-ignore-shared")
    return blocks, small, parser.page_size


class SharedRamSource:
    """Takes epochs of a primary whose main RAM block is the shared file ``mem_path``."""

    def __init__(self, qmp: QmpControl, *, mem_path: str | Path, main_block: str,
                 sock_path: str | Path, page_size: int = 4096,
                 seed: int | None = None, size: int | None = None,
                 disks: DiskReplicator | None = None, scan_threads: int | None = None
                 ) -> None:
        """``size``: the RAM block's length when the file may be longer (a promoted
        shadow's RAM file is a replica's, with a trailer page after the block).
        ``disks``: capture the VM's disks at each checkpoint too (docs/disks.md).
        ``scan_threads``: threads hashing the stopped primary's RAM (default: one per CPU,
        at most 4; the pause is mostly this scan, and the vCPUs' cores are idle then)."""
        self.disks = disks
        self.scan_threads = scan_threads or min(4, os.cpu_count() or 1)
        # Disk epochs take device state with xen-save-devices-state (no block-node
        # inactivation, so the backup runs after cont); these are the fallbacks' reasons.
        self._blocks: tuple[RamBlock, ...] | None = None
        self._force_full = False
        self._reset_seen = False
        self._reset_task: asyncio.Task[None] | None = None
        self._last_disk: DiskCapture | None = None
        self._xen = True  # False once QEMU lacks xen-save-devices-state
        self.qmp = qmp
        self.mem_path = Path(mem_path)
        self.main_block = main_block
        self.sock_path = str(sock_path)
        self.page_size = page_size
        self._seed = seed
        self.size = size
        self._mm: mmap.mmap | None = None
        self._filter: UnchangedFilter | None = None
        self._server: asyncio.AbstractServer | None = None
        self._streams: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self.epoch_number = 0
        #: Wall-clock time of the STOP event of the last checkpoint (QEMU's timestamp).
        self.stopped_at: float | None = None
        #: Called with the epoch's number while the primary is still stopped, once the
        #: checkpoint succeeded (output commit seals the output it produced).
        self.on_stopped: Callable[[int], None] | None = None

    async def open(self) -> None:
        """Map the RAM file, listen, set capabilities. Raises ConfigError, QmpError."""
        try:
            fd = os.open(self.mem_path, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"cannot open the primary's RAM file {str(self.mem_path)!r}: "
                              f"{exc.strerror}; the shared-ram source needs memory.backend = "
                              "'file' with mem_path in the VM spec") from None
        try:
            size = os.fstat(fd).st_size
            if self.size is not None:
                if size < self.size:
                    raise ConfigError(f"RAM file {str(self.mem_path)!r} has size {size}, "
                                      f"smaller than the VM's RAM ({self.size})")
                size = self.size
            if size == 0 or size % self.page_size:
                raise ConfigError(f"RAM file {str(self.mem_path)!r} has size {size}, expected "
                                  f"a positive multiple of {self.page_size}")
            self._mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._filter = UnchangedFilter(size // self.page_size, self.page_size, seed=self._seed)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        self._server = await asyncio.start_unix_server(self._handle, self.sock_path)
        await self.qmp.migrate_set_capabilities({"x-ignore-shared": True, "events": True})
        await self.qmp.migrate_set_parameters(max_bandwidth=1 << 40)
        if self.disks is not None:
            await self.disks.open()
            sub = self.qmp.subscribe(["RESET"])
            self._reset_task = asyncio.create_task(self._watch_resets(sub))

    async def close(self) -> None:
        """Stop listening and unmap."""
        if self._reset_task is not None:
            self._reset_task.cancel()
            await asyncio.gather(self._reset_task, return_exceptions=True)
            self._reset_task = None
        if self.disks is not None:
            await self.disks.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        if self._mm is not None:
            # a scan cancelled mid-way may still hold the map in its thread: then the
            # map is unmapped when that thread lets go of it
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            data = await reader.read()
            await self._streams.put(data)
        except OSError as exc:
            await self._streams.put(exc)
        finally:
            writer.close()

    async def _watch_resets(self, sub: EventSubscription) -> None:
        # A guest reset rebuilds small RAM blocks (ACPI tables): the next epoch takes the
        # migrate path, which carries them (the xen-save path does not).
        with sub, contextlib.suppress(QmpShadowError):  # QEMU gone: nothing more to see
            async for _ev in sub:
                self._reset_seen = True

    @property
    def last_disk(self) -> DiskCapture | None:
        """The disk capture of the last checkpoint (None without disks)."""
        return self._last_disk

    def reset(self) -> None:
        """Forget the previous table: the next epoch carries every page (full resync)."""
        if self._filter is not None:
            self._filter.reset(reseed=True)

    async def checkpoint(self, *, full: bool = False, held: asyncio.Event | None = None,
                         release: asyncio.Event | None = None,
                         timeout: float = 30.0, resume: bool = True) -> CapturedEpoch:
        """Take one epoch. ``full`` (or the first epoch) carries every page.

        ``held``/``release`` let a caller act while the primary is stopped (tests take a
        pmemsave there). The primary is resumed afterwards, also on failure — except with
        ``resume=False`` (the final epoch of a switchover): then it stays stopped on
        success and is resumed only when the checkpoint failed. :attr:`stopped_at` is the
        STOP event's timestamp.
        Raises QmpShadowError subclasses (QMP failure, timeout, bad stream).
        """
        assert self._mm is not None and self._filter is not None, "open() first"
        qmp = self.qmp
        full = full or self.epoch_number == 0 or self._force_full
        if (self.disks is not None and not full and resume and self._blocks is not None
                and not self._reset_seen and self._xen):
            return await self._checkpoint_xen(held, release)
        if full:
            self._filter.reset(reseed=False)
        since = qmp.last_event_seq
        t0 = time.monotonic()
        self.stopped_at = None
        await qmp.stop()
        scan = self._start_scan()
        ok = False
        disk: list[tuple[int, int, bytes]] = []
        disk_cap: DiskCapture | None = None
        try:
            if self.disks is not None:
                # before the migrate: it inactivates the block nodes, after which no
                # backup can start, and a running job makes it fail (docs/disks.md)
                self._reset_seen = False
                self._force_full = True  # until this epoch is captured
                self._last_disk = disk_cap = await self.disks.capture(full=full)
                disk = disk_cap.blocks
            while not self._streams.empty():  # a stale stream of a failed earlier attempt
                self._streams.get_nowait()
            await qmp.migrate(f"unix:{self.sock_path}")
            try:
                got = await asyncio.wait_for(self._streams.get(), timeout)
            except TimeoutError:
                raise QmpShadowError(f"no device-state stream within {timeout} s") from None
            if isinstance(got, BaseException):
                raise QmpShadowError(f"device-state stream failed: {got}")
            changed, pages = await asyncio.shield(scan)
            await self._while_stopped(held, release)
            ok = True
        finally:
            await self._scan_done(scan)
            if not ok:
                # the scan may have entered this attempt's pages in the table: an epoch
                # after it would leave out what changed since the last captured one
                self._force_full = True
            if resume or not ok:
                await qmp.cont()
        t1 = time.monotonic()
        # Parsed once the primary runs again: the stream is already whole, and its parse
        # was a quarter of the pause (3.6 of 13.8 ms, 128 MiB Linux guest under TCG).
        try:
            blocks, small, ps = parse_device_stream(got, self.main_block)
            if ps != self.page_size:
                raise StreamFormatError(f"page size {ps}, expected {self.page_size}",
                                        offset=0)
        except QmpShadowError:
            self._force_full = True
            if not resume:  # a failed checkpoint never leaves the primary stopped
                await qmp.cont()
            raise
        base = 0 if full else self.epoch_number
        self.epoch_number += 1
        self._force_full = False
        self._blocks = block_table(blocks, self.main_block)
        ep = CapturedEpoch(self.epoch_number, full=full, base=base,
                           blocks=self._blocks,
                           main_block=self.main_block, page_size=ps, main=pages, small=small,
                           device_state=got,
                           device_format=DeviceStateFormat.IGNORE_SHARED_STREAM,
                           reported_pages=len(changed), disk=disk,
                           disks=self.disks is not None,
                           disk_full=bool(disk_cap and disk_cap.full))
        if resume:
            ep.pause_ms = await self._pause_from_events(since) or (t1 - t0) * 1000
        else:
            with contextlib.suppress(QmpShadowError):
                stop = await self.qmp.wait_event("STOP", timeout=1.0, since=since)
                self.stopped_at = stop.timestamp
        return ep

    async def _checkpoint_xen(self, held: asyncio.Event | None,
                              release: asyncio.Event | None) -> CapturedEpoch:
        """An incremental epoch with disks: stop → device state by
        ``xen-save-devices-state`` (FULL sections, no RAM, block nodes stay active) →
        the disk transaction → RAM scan → cont; the backup jobs then copy the checkpoint's
        blocks (copy-before-write) while the guest runs, and the epoch is returned once
        they completed. Small RAM blocks are not captured: they are the last migrate-path
        epoch's (a guest RESET sends the next epoch down that path).
        Raises QmpShadowError subclasses; on any failure the next epoch is full."""
        assert self._blocks is not None and self.disks is not None
        qmp = self.qmp
        since = qmp.last_event_seq
        t0 = time.monotonic()
        self._force_full = True  # until this epoch is captured
        dev_path = Path(self.sock_path).with_suffix(".dev")
        await qmp.stop()
        scan = self._start_scan()
        try:
            try:
                await qmp.execute("xen-save-devices-state",
                                  {"filename": str(dev_path), "live": False})
            except QmpCommandError as exc:
                if exc.error_class == "CommandNotFound":
                    self._xen = False  # from now on the migrate path, copy in the pause
                raise
            pending = await self.disks.start(hold=True)
            changed, pages = await asyncio.shield(scan)
            await self._while_stopped(held, release)
        finally:
            await self._scan_done(scan)
            await qmp.cont()
        t1 = time.monotonic()
        await self.disks.release(pending)
        try:
            blob = dev_path.read_bytes()
        except OSError as exc:
            raise QmpShadowError(f"cannot read the device state {dev_path}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                dev_path.unlink()
        if blob[:8] != _XEN_HEADER:
            raise StreamFormatError(f"device state starts {blob[:8].hex()}, expected a "
                                    "QEVM version 3 header", offset=0)
        self._last_disk = await self.disks.finish(pending)
        self.epoch_number += 1
        self._force_full = False
        ep = CapturedEpoch(self.epoch_number, full=False, base=self.epoch_number - 1,
                           blocks=self._blocks,
                           main_block=self.main_block, page_size=self.page_size, main=pages,
                           small={}, device_state=blob[8:],
                           device_format=DeviceStateFormat.QEMU_SECTIONS,
                           reported_pages=len(changed), disk=self._last_disk.blocks,
                           scanned=True, disks=True, disk_full=False)
        ep.pause_ms = await self._pause_from_events(since) or (t1 - t0) * 1000
        return ep

    async def _while_stopped(self, held: asyncio.Event | None,
                             release: asyncio.Event | None) -> None:
        """The last step before ``cont``: a caller's hold (tests), then ``on_stopped``
        (output commit seals what the stopped primary produced)."""
        if held is not None:
            held.set()
            if release is not None:
                await release.wait()
        if self.on_stopped is not None:
            self.on_stopped(self.epoch_number + 1)

    def _start_scan(self) -> asyncio.Future[tuple[Any, dict[int, bytes]]]:
        """The RAM scan of the stopped primary, started at once: it runs in a worker
        thread (the compiled twin releases the GIL; a 1 GiB scan takes 100-200 ms here,
        and lease renewals share this event loop) while QEMU saves the device state, so
        the pause holds the longer of the two, not their sum."""
        return asyncio.ensure_future(asyncio.to_thread(self._scan_copy, self.page_size))

    @staticmethod
    async def _scan_done(scan: asyncio.Future[Any]) -> None:
        """Never ``cont`` while the scan still reads RAM (an epoch that failed too: its
        result is dropped, its error is the checkpoint's own or none)."""
        if not scan.done():
            await asyncio.wait({scan})
        if not scan.cancelled():
            scan.exception()  # retrieved: a failure after a failure is not news

    def _scan_copy(self, ps: int) -> tuple[Any, dict[int, bytes]]:
        mm, filt = self._mm, self._filter
        assert mm is not None and filt is not None
        changed = filt.scan(mm, threads=self.scan_threads)
        return changed, {i: mm[i * ps : (i + 1) * ps] for i in changed}

    async def _pause_from_events(self, since: int) -> float | None:
        """STOP→RESUME from QEMU's own event timestamps, when both arrived."""
        try:
            stop = await self.qmp.wait_event("STOP", timeout=1.0, since=since)
            self.stopped_at = stop.timestamp
            resume = await self.qmp.wait_event("RESUME", timeout=1.0, since=stop.seq)
        except QmpShadowError:
            return None
        return (resume.timestamp - stop.timestamp) * 1000
