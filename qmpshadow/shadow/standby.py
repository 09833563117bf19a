"""Warm standby: a shadow QEMU waiting for its promotion stream, and promotion itself.

:class:`Standby` launches the shadow QEMU from the VM spec (:func:`~qmpshadow.qemu.argv.
shadow_argv`: same device model, main RAM = the replica's RAM file, ``-S -incoming
defer``), then ahead of time sets ``x-ignore-shared`` and ``events`` and issues
``migrate-incoming unix:<run>/incoming.sock``, and learns the QEMU's machine type and RAM
blocks (to refuse a promotion stream it could not load). A watcher task respawns the QEMU
whenever it exits (a refused incoming stream makes QEMU exit), with a backoff.

:meth:`Standby.promote` builds and validates the promotion stream of the replica's
committed epoch (nothing is sent when that fails), writes it on the incoming connection
(opened when the QEMU got ready, so not inside the promotion), waits for the MIGRATION
``completed`` event, retires the replica (its RAM file now belongs to a running VM), sends
``cont`` and confirms the RESUME event. It returns a :class:`PromotionResult` with the
time of each piece. From then on the QEMU is
the primary: the standby stops watching it and never respawns on that RAM file.

Timing on QEMU 7.2.22 is in docs/shadow.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from qmpshadow.errors import QemuError, QmpError
from qmpshadow.frames.wire import DeviceStateFormat
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.argv import QEMU_BINARY, RunPaths, shadow_argv
from qmpshadow.qemu.process import QemuProcess, kill_and_wait
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.shadow.errors import PromotionError
from qmpshadow.shadow.promotion import PromotionBuilder, PromotionStream, TargetBlock
from qmpshadow.shadow.replica import Replica

__all__ = ["INCOMING_SOCKET", "PromotionResult", "Standby", "StandbyState"]

log = logging.getLogger(__name__)

#: Name of the incoming-migration socket in the standby's run directory.
INCOMING_SOCKET = "incoming.sock"
_MACHINE_SUFFIX = "-machine"
_MAX_BACKOFF = 5.0
#: SO_SNDBUF of the incoming connection (the kernel caps it at net.core.wmem_max).
_SNDBUF = 1 << 20


class StandbyState(enum.Enum):
    """Where a :class:`Standby` is."""

    NEW = "new"
    #: A shadow QEMU is being (re)launched and prepared.
    STARTING = "starting"
    #: A shadow QEMU waits on the incoming socket.
    READY = "ready"
    #: promote() is sending the stream / starting the VM.
    PROMOTING = "promoting"
    #: The shadow QEMU runs the guest: it is the primary now.
    PROMOTED = "promoted"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PromotionResult:
    """What a promotion did and how long each piece took (milliseconds).

    ``build_ms``: build + validate the stream (0 when :meth:`Standby.prepare` had built
    it); ``prepare_ms``: what that :meth:`Standby.prepare` took (at the commit, before
    the promotion; 0 when the stream was built here), ``prepare_reused`` whether it reused
    the previous epoch's checked RAM part (:class:`PromotionBuilder`); ``connect_ms``:
    take the incoming connection (~0: opened when the QEMU got ready; else connect now);
    ``send_ms``: write all bytes;
    ``load_ms``: last byte written until QEMU's MIGRATION ``completed`` event (its
    timestamp); ``handoff_ms``: from that event until ``cont`` is sent (event delivery,
    retiring the replica); ``resume_ms``: ``cont`` sent until QEMU's RESUME event (its timestamp:
    the vCPUs run from then); ``cont_ms``: ``cont`` sent until its reply (later than
    RESUME: a running TCG guest delays QMP replies by 5-20 ms); ``running_ms``:
    promote() entry until RESUME; ``total_ms``: promote() entry until it returned.
    ``resumed_at`` is RESUME's wall-clock time (``time.time()`` scale), so a caller can
    compute kill → running. ``pid`` is the promoted QEMU's.
    """

    generation: int
    epoch: int
    format: DeviceStateFormat
    stream_bytes: int
    replayed: bool
    build_ms: float
    prepare_ms: float
    prepare_reused: bool
    connect_ms: float
    send_ms: float
    load_ms: float
    handoff_ms: float
    resume_ms: float
    cont_ms: float
    running_ms: float
    total_ms: float
    resumed_at: float
    pid: int


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000.0, 3)


class Standby:
    """A warm-standby shadow QEMU for one VM (see the module docstring).

    ``run`` is the standby's run directory (QMP sockets, logs, the incoming socket);
    ``ram_path`` the replica's RAM file. ``die_with_parent`` makes the kernel kill the
    QEMU with this process (tests only: a promoted VM must outlive its agent).
    """

    def __init__(
        self,
        spec: VmSpec,
        run: RunPaths,
        *,
        ram_path: str | os.PathLike[str],
        accel: AccelChoice | str,
        binary: str = QEMU_BINARY,
        start_timeout: float = 10.0,
        respawn: bool = True,
        respawn_delay: float = 0.1,
        die_with_parent: bool = False,
        name: str | None = None,
    ) -> None:
        """Raises ConfigError (from :func:`shadow_argv`) for an unresolved ``accel`` or a
        ``ram_path`` that is the primary's own RAM file."""
        self.spec = spec
        self.run = run
        self.ram_path = Path(ram_path)
        self.argv = shadow_argv(spec, run, accel=accel, mem_path=self.ram_path, binary=binary)
        self.start_timeout = start_timeout
        self.respawn = respawn
        self.respawn_delay = respawn_delay
        self.die_with_parent = die_with_parent
        self.name = name or f"{spec.name}-standby"
        self.respawns = 0
        self.last_exit: str | None = None
        self.machine_type: str | None = None
        self.ramblocks: tuple[TargetBlock, ...] = ()
        self._state = StandbyState.NEW
        self._proc: QemuProcess | None = None
        self._ready = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._prepared: tuple[tuple[int, int, int], PromotionStream, float, bool] | None = None
        # Reuses the checked small-block part between epochs: prepare() at a commit only
        # composes the new device state (it runs inside a switchover's downtime).
        self.builder = PromotionBuilder()
        # The incoming connection, opened as soon as the QEMU listens (see _spawn).
        self._conn: asyncio.StreamWriter | None = None

    # ------------------------------------------------------------------ properties

    @property
    def state(self) -> StandbyState:
        """The current :class:`StandbyState`."""
        return self._state

    @property
    def incoming_socket(self) -> Path:
        """The unix socket the shadow QEMU listens on for its promotion stream."""
        return self.run.root / INCOMING_SOCKET

    @property
    def process(self) -> QemuProcess:
        """The current shadow QEMU (after promotion: the new primary).

        Raises:
            QemuError: not started.
        """
        if self._proc is None:
            raise QemuError(f"{self.name}: no shadow QEMU; expected start() first")
        return self._proc

    def __repr__(self) -> str:
        return f"<Standby {self.name} {self._state.value} {self._proc!r}>"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Launch and prepare the shadow QEMU, then keep it alive (respawn on exit).

        Raises:
            QemuExitedError: QEMU exited while starting (bad spec, RAM file, accel).
            QemuError: QEMU did not answer QMP in time, or already started.
            QmpError: preparing it (capabilities, migrate-incoming) failed.
        """
        if self._state is not StandbyState.NEW:
            raise QemuError(f"{self.name}: start() in state {self._state.value}; expected new")
        self._state = StandbyState.STARTING
        try:
            await self._reap_stale()
            await self._spawn()
        except BaseException:
            self._state = StandbyState.CLOSED
            raise
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.name} watcher")

    async def _reap_stale(self) -> None:
        """A standby QEMU left in this run directory by a shadow agent that died (kill -9:
        the standby does not die with its agent, so that a promoted one outlives it) is
        killed when it still waits paused for its promotion stream. One that runs the guest
        (a promoted copy) is never touched: starting a standby next to it is refused.

        Raises:
            QemuError: a QEMU from an earlier agent runs the guest in this directory.
        """
        try:
            pid = int(self.run.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return  # gone
        if os.fsencode(str(self.run.root)) not in cmdline:
            return  # the pid was reused by another process
        from qmpshadow.qmp.control import QmpControl

        # its first socket: the dead agent held it (the second may have another client)
        try:
            qmp = await QmpControl.open(self.run.qmp_sock, timeout=2.0)
            try:
                status = await qmp.query_status(timeout=2.0)
            finally:
                await qmp.close()
        except (QmpError, OSError) as exc:
            log.warning("%s: QEMU pid %d from an earlier shadow agent is still there and does "
                        "not answer QMP (%s): leaving it alone", self.name, pid, exc)
            return
        if status.running:
            raise QemuError(
                f"{self.name}: QEMU pid {pid} in {self.run.root} runs the guest ({status.status}"
                "): it is a promoted copy, not a standby. Expected no running QEMU there; "
                "protect that VM afresh instead of restarting this shadow agent")
        log.warning("%s: killing the standby QEMU pid %d (%s) left by a shadow agent that "
                    "died", self.name, pid, status.status)
        await kill_and_wait(pid)

    async def _spawn(self) -> None:
        """Launch one shadow QEMU and make it wait on the incoming socket."""
        self._ready.clear()
        proc = QemuProcess(self.argv, self.run, name=self.name,
                           start_timeout=self.start_timeout,
                           die_with_parent=self.die_with_parent)
        with contextlib.suppress(FileNotFoundError):
            self.incoming_socket.unlink()
        self._proc = proc
        await proc.start()
        try:
            qmp = proc.qmp
            await qmp.migrate_set_capabilities({"x-ignore-shared": True, "events": True})
            mtype = await qmp.execute("qom-get", {"path": "/machine", "property": "type"})
            if isinstance(mtype, str) and mtype.endswith(_MACHINE_SUFFIX):
                self.machine_type = mtype[: -len(_MACHINE_SUFFIX)]
            self.ramblocks = tuple(
                TargetBlock(b.idstr, b.used_length, b.max_length)
                for b in await qmp.info_ramblock()
            )
            await qmp.migrate_incoming(f"unix:{self.incoming_socket}")
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        # Connect now rather than at promotion (which then only writes): QEMU accepts,
        # starts its load coroutine and waits in it for the header without blocking its
        # main loop (QMP answers on). A failure here only means promote() connects itself.
        self._drop_conn()
        try:
            _, self._conn = await asyncio.open_unix_connection(str(self.incoming_socket))
            # Room for a whole promotion stream (~270 KB; the default is ~208 KB): the
            # write then completes at once and QEMU reads it without waiting for us.
            sock = self._conn.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        except OSError as exc:
            log.warning("%s: could not pre-connect to %s (%s); promotion will connect",
                        self.name, self.incoming_socket, exc)
        self._state = StandbyState.READY
        self._ready.set()
        log.info("%s: shadow QEMU pid %d ready on %s", self.name, proc.pid,
                 self.incoming_socket)

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _watch(self) -> None:
        delay = self.respawn_delay
        while True:
            proc = self._proc
            if proc is None:
                return
            rc = await proc.wait()
            if self._state in (StandbyState.PROMOTED, StandbyState.CLOSED):
                return
            if proc is not self._proc:
                continue
            self.last_exit = f"pid {proc.pid} exited with status {rc}: {proc.stderr_tail(5)}"
            log.warning("%s: shadow QEMU %s", self.name, self.last_exit)
            if not self.respawn:
                self._state = StandbyState.CLOSED
                self._ready.set()  # wake waiters: they see CLOSED
                return
            self._state = StandbyState.STARTING
            self._ready.clear()
            while True:
                await asyncio.sleep(delay)
                if self._state is StandbyState.CLOSED:
                    return
                try:
                    await self._spawn()
                except (QemuError, QmpError) as exc:
                    log.warning("%s: respawn failed: %s", self.name, exc)
                    delay = min(delay * 2, _MAX_BACKOFF)
                    continue
                self.respawns += 1
                delay = self.respawn_delay
                break

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until a shadow QEMU waits on the incoming socket.

        Raises:
            QemuError: the standby is closed, promoted, or not ready within ``timeout``.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            raise QemuError(
                f"{self.name}: no ready shadow QEMU within {timeout}s (state "
                f"{self._state.value}; last exit: {self.last_exit})"
            ) from None
        if self._state is not StandbyState.READY:
            raise QemuError(f"{self.name}: standby is {self._state.value}, not ready")

    async def close(self) -> None:
        """Stop watching; kill the shadow QEMU unless it was promoted (a promoted VM is
        the primary and keeps running; :attr:`process` still refers to it)."""
        promoted = self._state is StandbyState.PROMOTED
        if not promoted:
            self._state = StandbyState.CLOSED
        self._ready.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            await asyncio.wait({watcher})
        if not promoted and self._proc is not None and self._proc.started:
            self._proc.kill()
            await self._proc.wait()
        self._drop_conn()

    async def __aenter__(self) -> Standby:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ promotion

    def prepare(self, replica: Replica) -> PromotionStream:
        """Build and validate the promotion stream of the replica's committed epoch now
        and keep it, so that :meth:`promote` of that same epoch only sends it. Call it
        after each commit (it takes milliseconds) to take building off the failover path.

        Raises:
            PromotionStreamError: as :func:`~qmpshadow.shadow.promotion.build_promotion_stream`.
        """
        t0 = time.perf_counter()
        hits = self.builder.hits
        stream = self._build(replica)
        self._prepared = (self._key(replica), stream, (time.perf_counter() - t0) * 1000.0,
                          self.builder.hits > hits)
        return stream

    @staticmethod
    def _key(replica: Replica) -> tuple[int, int, int]:
        return (replica.generation, replica.committed_epoch, replica.committed_digest)

    def _build(self, replica: Replica) -> PromotionStream:
        return self.builder.build(replica, machine_type=self.machine_type,
                                   target=self.ramblocks or None)

    async def promote(self, replica: Replica, *, timeout: float = 10.0) -> PromotionResult:
        """Make the shadow QEMU run the guest from ``replica``'s committed epoch.

        Steps and timings: see :class:`PromotionResult`. The replica is retired just
        before ``cont``. ``timeout`` bounds waiting for a ready QEMU and for the load.

        Raises:
            PromotionStreamError: no valid stream can be built (nothing committed, bad
                device state, machine type or blocks the shadow QEMU does not have);
                nothing was sent, the standby is still ready.
            PromotionError: the shadow QEMU refused the stream (it exits; the watcher
                starts another one and promote() may be retried) or did not run after
                ``cont``; ``stderr_tail`` holds its last log lines. A shadow QEMU that
                was sent a stream is spent: it is killed and replaced.
            QemuError: no ready shadow QEMU within ``timeout``, or already promoted.
        """
        t0 = time.time()
        if self._state is StandbyState.PROMOTED:
            raise QemuError(f"{self.name}: already promoted (pid {self.process.pid})")
        await self.wait_ready(timeout)
        prepared = self._prepared
        if prepared is not None and prepared[0] == self._key(replica):
            stream = prepared[1]
        else:
            stream = self._build(replica)
        t1 = time.time()
        used_prepared = prepared is not None and stream is prepared[1]
        proc = self.process
        qmp = proc.qmp
        self._state = StandbyState.PROMOTING
        try:
            since = qmp.last_event_seq
            try:
                async with asyncio.timeout(timeout):
                    writer, self._conn = self._conn, None
                    if writer is None or writer.is_closing():
                        _, writer = await asyncio.open_unix_connection(
                            str(self.incoming_socket))
                    t2 = time.time()
                    try:
                        writer.write(stream.data)
                        await writer.drain()
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                    t3 = time.time()
                    ev = await qmp.wait_event(
                        "MIGRATION", since=since, timeout=None,
                        predicate=lambda e: e.data.get("status") in ("completed", "failed"))
                    t4 = time.time()
                    # QEMU loads as the bytes arrive: it may finish before our close.
                    t_loaded = min(max(ev.timestamp, t3), t4) if ev.timestamp else t4
            except TimeoutError:
                raise PromotionError(
                    f"{self.name}: the shadow QEMU did not finish loading the promotion "
                    f"stream within {timeout}s; check its log {self.run.stderr_log}",
                    stderr_tail=proc.stderr_tail()) from None
            except (OSError, QmpError) as exc:
                raise await self._refused(proc, f"lost it while loading ({exc})") from exc
            if ev.data.get("status") != "completed":
                raise await self._refused(proc, "reported the incoming migration failed")
            replica.retire()
            try:
                since = qmp.last_event_seq
                t4c = time.time()
                await qmp.cont()
                # QEMU emits RESUME as the vCPUs start, before its reply to cont: taking it
                # from the backlog confirms the run state without another round trip
                # (which a busy TCG guest can delay by 10 ms).
                resume = await qmp.wait_event("RESUME", since=since, timeout=1.0)
            except QmpError as exc:
                status = "unknown"
                with contextlib.suppress(QmpError):
                    status = (await qmp.query_status()).status
                raise PromotionError(
                    f"{self.name}: cont after loading did not start the VM ({exc}); its run "
                    f"state is {status!r}, expected 'running': inspect it over QMP",
                    stderr_tail=proc.stderr_tail()) from exc
            t5 = time.time()
            # QEMU's clock and ours are the host's CLOCK_REALTIME (µs in events).
            t_resumed = min(max(resume.timestamp, t4c), t5) if resume.timestamp else t5
        except BaseException:
            # A QEMU takes one incoming stream: whatever went wrong after connecting, this
            # one is spent. Kill it (it may be exiting already); the watcher respawns.
            if self._state is StandbyState.PROMOTING:
                self._state = StandbyState.STARTING
                self._ready.clear()
                proc.kill()
            raise
        self._state = StandbyState.PROMOTED
        self._prepared = None
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            await asyncio.wait({watcher})
        result = PromotionResult(
            generation=stream.generation, epoch=stream.epoch, format=stream.format,
            stream_bytes=len(stream.data), replayed=stream.replayed,
            build_ms=0.0 if used_prepared else _ms(t0, t1),
            prepare_ms=round(prepared[2], 3) if prepared is not None and used_prepared else 0.0,
            prepare_reused=prepared is not None and used_prepared and prepared[3],
            connect_ms=_ms(t1, t2), send_ms=_ms(t2, t3), load_ms=_ms(t3, t_loaded),
            handoff_ms=_ms(t_loaded, t4c), resume_ms=_ms(t4c, t_resumed), cont_ms=_ms(t4c, t5),
            running_ms=_ms(t0, t_resumed), total_ms=_ms(t0, t5), resumed_at=t_resumed,
            pid=proc.pid)
        log.info("%s: promoted epoch %d (generation %d): running after %.1f ms: %s",
                 self.name, result.epoch, result.generation, result.running_ms, result)
        return result

    async def _refused(self, proc: QemuProcess, what: str) -> PromotionError:
        # QEMU exits after a failed load; give it a moment so its log explains why.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while proc.running:
                    await asyncio.sleep(0.02)
        return PromotionError(
            f"{self.name}: the shadow QEMU (pid {proc.pid}) {what}; it refused the "
            f"promotion stream. A new standby is being started; its log: "
            f"{self.run.stderr_log}", stderr_tail=proc.stderr_tail())

