"""Disk replication per epoch: dirty bitmaps + ``blockdev-backup`` into the source agent.

At each checkpoint, while the primary is stopped, one QMP ``transaction`` per VM does for
every disk: ``block-dirty-bitmap-add`` (the next epoch's bitmap, 64 KiB granularity) and
``blockdev-backup`` to an ``nbd`` node served by this agent (:class:`NbdTarget`), with
``sync: incremental`` and the bitmap of the epoch that just ended (``sync: full`` for the
first epoch and whenever the shadow needs a full one). The backup's writes arrive here as
(offset, data) and become that epoch's DISK_BLOCK frames.

Order with the shared-RAM source (measured on QEMU 7.2): the device-state ``migrate``
inactivates every block node on completion, after which ``blockdev-backup`` fails with
"Block node is read-only"; and a running job makes that ``migrate`` fail
(``bdrv_inactivate_all() failed``). So the transaction comes first and its jobs finish
before the ``migrate`` — the backup is inside the pause (see docs/disks.md).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpshadow.errors import DiskError, QmpCommandError, QmpShadowError
from qmpshadow.qmp.control import QmpControl

from .target import NbdTarget

GRANULARITY = 64 * 1024


@dataclass(frozen=True, slots=True)
class DiskSource:
    """One disk of the primary: its block node name and size in bytes."""

    node: str
    size: int


@dataclass(slots=True)
class DiskCapture:
    """What one checkpoint captured: ``blocks`` as (disk index, offset, data)."""

    full: bool
    blocks: list[tuple[int, int, bytes]]
    job_ms: float

    @property
    def nbytes(self) -> int:
        """Bytes of disk data captured."""
        return sum(len(b[2]) for b in self.blocks)


@dataclass(frozen=True, slots=True)
class PendingCapture:
    """A capture whose transaction was issued (:meth:`DiskReplicator.start`)."""

    prev: str | None
    new: str
    jobs: dict[str, int]
    since: int
    t0: float
    full: bool


class DiskReplicator:
    """Captures the primary's disks at each checkpoint (call :meth:`capture` stopped)."""

    def __init__(self, qmp: QmpControl, disks: list[DiskSource], sock_dir: str | Path,
                 *, tag: str = "qs", job_timeout: float = 60.0,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``on_progress`` gets ``disk-sync`` status documents while a full copy runs
        (every ~0.25 s, from ``query-jobs``) and when it completes."""
        self.on_progress = on_progress
        self.qmp = qmp
        self.disks = disks
        self.sock_dir = Path(sock_dir)
        self.tag = tag
        self.job_timeout = job_timeout
        self.targets = [NbdTarget(self.sock_dir / f"{tag}-disk{i}.nbd", f"disk{i}", d.size)
                        for i, d in enumerate(disks)]
        self._bitmap: str | None = None
        self._seq = 0
        #: Last job progress (bytes done, total) per disk, from query-jobs (status).
        self.progress: list[tuple[int, int]] = [(0, 0)] * len(disks)
        #: Time from the transaction to the last job's completion, last capture (ms).
        self.last_job_ms = 0.0

    def _target(self, i: int) -> str:
        return f"{self.tag}-tgt{i}"

    async def open(self) -> None:
        """Serve the NBD targets and add their nodes to the primary.

        Raises DiskError (socket), QmpCommandError (unknown node, QEMU without nbd)."""
        for i, t in enumerate(self.targets):
            await t.start()
            await self.qmp.execute("blockdev-add", {
                "driver": "nbd", "node-name": self._target(i), "export": t.name,
                "server": {"type": "unix", "path": os.fspath(t.sock_path)}})

    async def close(self) -> None:
        """Drop the target nodes and bitmaps (best effort) and stop serving."""
        for i, d in enumerate(self.disks):
            if self._bitmap is not None:
                await self._quiet("block-dirty-bitmap-remove",
                                  {"node": d.node, "name": self._bitmap})
            await self._quiet("blockdev-del", {"node-name": self._target(i)})
        self._bitmap = None
        for t in self.targets:
            await t.close()

    async def _quiet(self, cmd: str, args: dict[str, Any]) -> None:
        with contextlib.suppress(QmpShadowError):
            await self.qmp.execute(cmd, args)

    def reset(self) -> None:
        """The next capture is a full copy (the shadow's disk is not known to match)."""
        self._bitmap = None

    async def capture(self, *, full: bool = False) -> DiskCapture:
        """Copy what changed since the last capture (every block when ``full``), with the
        primary stopped. Returns when every job completed and its writes arrived.

        Raises DiskError (a job failed or timed out; the next capture is then full),
        QmpShadowError subclasses for QMP failures.
        """
        return await self.finish(await self.start(full=full))

    async def start(self, *, full: bool = False, hold: bool = False) -> PendingCapture:
        """Issue the checkpoint's transaction (primary stopped) and return at once: the
        jobs' copy-before-write keeps the checkpoint's blocks even once the primary runs
        again. :meth:`finish` waits for them. ``hold``: start the jobs throttled to
        (almost) nothing until :meth:`release`, so that their copying does not compete
        with the rest of the pause (QEMU's main loop and ours). Raises DiskError."""
        prev = None if full else self._bitmap
        self._seq += 1
        new = f"{self.tag}-b{self._seq}"
        jobs = {f"{self.tag}-j{self._seq}-{i}": i for i in range(len(self.disks))}
        actions: list[dict[str, Any]] = []
        for (job, i), d in zip(jobs.items(), self.disks, strict=True):
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": d.node, "name": new, "granularity": GRANULARITY}})
            backup: dict[str, Any] = {"device": d.node, "target": self._target(i),
                                      "job-id": job, "auto-dismiss": True}
            if hold:
                backup["speed"] = 1  # bytes/s: at most the first chunk moves
            if prev is None:
                backup["sync"] = "full"
            else:
                backup.update(sync="incremental", bitmap=prev)
            actions.append({"type": "blockdev-backup", "data": backup})
        for t in self.targets:
            t.take()
        since = self.qmp.last_event_seq
        t0 = time.monotonic()
        self._bitmap = None  # until this capture succeeded, the next one must be full
        try:
            await self.qmp.execute("transaction", {"actions": actions})
        except QmpShadowError as exc:
            raise DiskError(f"disk checkpoint transaction failed: {exc}") from exc
        return PendingCapture(prev=prev, new=new, jobs=jobs, since=since, t0=t0,
                              full=full or prev is None)

    async def release(self, pending: PendingCapture) -> None:
        """Lift the throttle of :meth:`start` (``hold=True``). Raises DiskError."""
        for job in pending.jobs:
            try:
                await self.qmp.execute("block-job-set-speed", {"device": job, "speed": 0})
            except QmpCommandError as exc:
                if exc.error_class != "DeviceNotActive":  # else: it already finished
                    raise DiskError(f"cannot release disk backup job {job}: {exc}") from exc
            except QmpShadowError as exc:
                raise DiskError(f"cannot release disk backup job {job}: {exc}") from exc

    async def finish(self, pending: PendingCapture) -> DiskCapture:
        """Wait for the jobs of :meth:`start` and collect their writes. Raises DiskError
        (the next capture is then full), QmpShadowError subclasses."""
        try:
            await self._wait_jobs(pending.jobs, pending.since)
        except BaseException:
            # a job left running would write its (older) blocks into a later epoch
            await self._cancel_jobs(pending.jobs)
            await self._drop_bitmap(pending.new)
            raise
        job_ms = self.last_job_ms = (time.monotonic() - pending.t0) * 1000
        if pending.prev is not None:
            await self._drop_bitmap(pending.prev)
        else:
            await self._drop_stale_bitmaps(keep=pending.new)
        self._bitmap = pending.new
        blocks = [(i, off, data) for i, t in enumerate(self.targets) for off, data in t.take()]
        if pending.full and self.on_progress is not None:
            for d in self.disks:
                self.on_progress({"event": "disk-sync", "disk": d.node, "done": d.size,
                                  "total": d.size, "complete": True,
                                  "job_ms": round(job_ms, 1)})
        return DiskCapture(full=pending.full, blocks=blocks, job_ms=job_ms)

    async def _wait_jobs(self, jobs: dict[str, int], since: int) -> None:
        pending = set(jobs)
        deadline = time.monotonic() + self.job_timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DiskError(f"disk backup job(s) {sorted(pending)} did not finish within "
                                f"{self.job_timeout} s")
            try:
                ev = await self.qmp.wait_event(
                    None, timeout=min(left, 0.25), since=since,
                    predicate=lambda e: e.name in ("BLOCK_JOB_COMPLETED",
                                                   "BLOCK_JOB_CANCELLED")
                    and e.data.get("device") in pending)
            except QmpShadowError:
                await self._poll_progress(jobs)
                continue
            job = str(ev.data.get("device"))
            pending.discard(job)
            err = ev.data.get("error")
            if ev.name == "BLOCK_JOB_CANCELLED" or err:
                i = jobs[job]
                extra = self.targets[i].error or ""
                raise DiskError(f"disk backup of {self.disks[i].node!r} failed: "
                                f"{err or 'cancelled'} {extra}".strip())

    async def _cancel_jobs(self, jobs: dict[str, int]) -> None:
        """Cancel (force) whichever of ``jobs`` still runs and wait (≤ 5 s) until none
        does; then drop what they wrote into the targets."""
        since = self.qmp.last_event_seq
        with contextlib.suppress(QmpShadowError):
            running = {j["id"] for j in await self.qmp.execute("query-jobs")
                       if j.get("id") in jobs and j.get("status") not in ("concluded", "null")}
            for job in running:
                await self._quiet("block-job-cancel", {"device": job, "force": True})
            deadline = time.monotonic() + 5.0
            while running and time.monotonic() < deadline:
                ev = await self.qmp.wait_event(
                    None, timeout=max(0.01, deadline - time.monotonic()), since=since,
                    predicate=lambda e: e.name in ("BLOCK_JOB_COMPLETED",
                                                   "BLOCK_JOB_CANCELLED")
                    and e.data.get("device") in running)
                running.discard(str(ev.data.get("device")))
        for t in self.targets:
            t.take()

    async def _poll_progress(self, jobs: dict[str, int]) -> None:
        with contextlib.suppress(QmpShadowError):
            for j in await self.qmp.execute("query-jobs"):
                if j.get("id") in jobs:
                    i = jobs[j["id"]]
                    done, total = (int(j.get("current-progress", 0)),
                                   int(j.get("total-progress", 0)))
                    self.progress[i] = (done, total)
                    if self.on_progress is not None:
                        self.on_progress({"event": "disk-sync", "disk": self.disks[i].node,
                                          "done": done, "total": total, "complete": False})

    async def _drop_bitmap(self, name: str) -> None:
        for d in self.disks:
            await self._quiet("block-dirty-bitmap-remove", {"node": d.node, "name": name})

    async def _drop_stale_bitmaps(self, keep: str) -> None:
        """After a full copy, bitmaps of earlier (failed or superseded) epochs go."""
        try:
            info = await self.qmp.execute("query-named-block-nodes", {"flat": True})
        except QmpShadowError:
            return
        nodes = {d.node for d in self.disks}
        for n in info:
            if n.get("node-name") not in nodes:
                continue
            for bm in n.get("dirty-bitmaps", []):
                name = str(bm.get("name", ""))
                if name.startswith(f"{self.tag}-b") and name != keep:
                    await self._quiet("block-dirty-bitmap-remove",
                                      {"node": n["node-name"], "name": name})

