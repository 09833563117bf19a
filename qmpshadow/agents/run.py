"""Long-running entry points of ``qmpshadow protect`` / ``shadow`` / ``promote``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..disk.replicator import DiskReplicator, DiskSource
from ..disk.spec import DiskSpec, disk_sizes
from ..errors import ConfigError, DiskError, QmpShadowError
from ..output.policy import EpochPolicy
from ..output.shell import OutputCommit
from ..qemu.accel import detect_accel
from ..qemu.argv import RunPaths
from ..qemu.spec import VmSpec
from ..qmp.control import QmpControl
from ..shadow.replica import Replica
from ..shadow.standby import Standby
from ..source.colo import ColoSource
from ..source.shared_ram import SharedRamSource
from ..transport import local, tcp
from ..transport.base import Link, Listener
from .control import ControlServer

if TYPE_CHECKING:
    from ..cluster.source_side import ClusterOptions, SourceCluster
from .shadow import ShadowAgent
from .source import SourceAgent

log = logging.getLogger(__name__)
#: how long a COLO switchover waits for the checkpoint it asked QEMU for (one is normally
#: taken at once; a slow checkpoint in flight is the one held)
_FINAL_CHECKPOINT_TIMEOUT = 10.0
StatusFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Endpoint:
    """Where the shadow agent listens: ``unix:PATH`` or ``tcp:HOST:PORT``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Raises ConfigError for anything but unix:PATH or tcp:HOST:PORT."""
        if text.startswith("unix:") and len(text) > 5:
            return cls("unix", path=text[5:])
        if text.startswith("tcp:"):
            host, sep, port = text[4:].rpartition(":")
            if sep and host and port.isdigit() and 0 <= int(port) < 65536:
                return cls("tcp", host=host.strip("[]"), port=int(port))
        raise ConfigError(f"expected unix:PATH or tcp:HOST:PORT, got {text!r}")

    def over(self, transport: str) -> Endpoint:
        """This endpoint carried by ``transport`` (``tcp`` or ``rdma``). RDMA keeps its
        authenticated control channel on the tcp address and moves frames over a queue pair.

        Raises ConfigError for rdma with a unix endpoint or an unknown transport.
        """
        if transport == "tcp":
            return self
        if transport != "rdma":
            raise ConfigError(f"expected --transport tcp or rdma, got {transport!r}")
        if self.kind != "tcp":
            raise ConfigError("--transport rdma needs a tcp:HOST:PORT endpoint (its control "
                              f"channel), got {self.kind}:{self.path}")
        return Endpoint("rdma", host=self.host, port=self.port)


@dataclass(frozen=True)
class LinkSecurity:
    """TLS material (``qmpshadow certs init`` layout) or explicit plain loopback."""

    tls_dir: Path | None = None
    name: str = ""
    peer: str = ""
    insecure_loopback: bool = False

    def tls(self) -> tcp.TlsConfig | None:
        """Raises ConfigError when neither TLS nor insecure loopback was chosen."""
        if self.tls_dir is not None:
            return tcp.TlsConfig.from_dir(self.tls_dir, name=self.name, peers=self.peer)
        if not self.insecure_loopback:
            raise ConfigError("a tcp link needs --tls DIR (with --name and --peer), or "
                              "--insecure-loopback for a plain link on 127.0.0.1")
        return None


def _rdma() -> ModuleType:
    """The rdma transport module, once this host can use it (pyverbs is imported only now):
    the transport's own checks, run before anything starts.

    Raises RdmaUnavailableError (a ConfigError) saying what is missing and naming
    ``--transport tcp``.
    """
    from ..transport import rdma
    from ..transport._verbs import RdmaUnavailableError, find_port, load

    try:
        find_port()
        load()
    except RdmaUnavailableError as exc:
        raise RdmaUnavailableError(f"--transport rdma: {exc}") from None
    return rdma


def connector(ep: Endpoint, sec: LinkSecurity) -> Callable[[], Awaitable[Link]]:
    """A ``connect()`` for the source agent."""
    if ep.kind == "unix":
        return lambda: local.connect(ep.path)
    tls = sec.tls()
    if ep.kind == "rdma":
        from ..transport import rdma  # run_protect checked this host at start

        return lambda: rdma.connect(ep.host, ep.port, tls=tls, insecure_loopback=tls is None)
    return lambda: tcp.connect(ep.host, ep.port, tls=tls,
                               insecure_loopback=tls is None)


async def listener(ep: Endpoint, sec: LinkSecurity) -> Listener:
    """The shadow agent's listener."""
    if ep.kind == "unix":
        return await local.listen(ep.path)
    tls = sec.tls()
    if ep.kind == "rdma":
        rdma_listener: Listener = await _rdma().listen(ep.host, ep.port, tls=tls,
                                                       insecure_loopback=tls is None)
        return rdma_listener
    return await tcp.listen(ep.host, ep.port, tls=tls, insecure_loopback=tls is None)


async def run_protect(*, spec: VmSpec, qmp_path: str, to: Endpoint, sec: LinkSecurity,
                      source: str, ack: str, interval_ms: int, status: StatusFn,
                      max_epochs: int = 0, generation: int = 1,
                      cluster: ClusterOptions | None = None,
                      fencer_log: Path | None = None, control: Path | None = None,
                      metrics: str | None = None, epoch_min_ms: int | None = None,
                      epoch_max_ms: int | None = None, thin_acks: bool = True) -> str:
    """Protect a running primary until interrupted (or ``max_epochs`` epochs).

    With ``cluster`` the agent also holds the primary's lease through the broker, renews
    it on both paths, self-fences when it cannot, arms a fencer process, and releases the
    lease at once when the primary exits (see qmpshadow.cluster.source_side). Returns
    ``"done"`` (epochs reached or interrupted), ``"released"`` (the primary exited and the
    shadow was told), ``"ended"`` (protection ended cleanly) or ``"switched-over"`` (a
    planned switchover moved the VM to the shadow).

    ``control``: a JSON-lines control socket with ``status`` and ``switchover`` (the
    latter needs ``cluster``; either source). ``metrics``: HOST:PORT of a
    Prometheus endpoint (qmpshadow.agents.metrics).

    ``epoch_min_ms``/``epoch_max_ms``: bounds of the adaptive epoch length (shorter while
    the guest's output waits, longer when idle; both default to ``interval_ms``, i.e. a
    fixed length). With ``spec.output_commit`` the primary's network frames and serial bytes
    are held until their epoch commits (qmpshadow.output, docs/output-commit.md);
    ``thin_acks``: each release leaves out the pure TCP ACKs a later one of the same flow
    stands for (qmpshadow.output.acks).

    Raises ConfigError for an unusable spec/source, DeposedError when a newer generation
    exists, QmpShadowError subclasses otherwise (RdmaUnavailableError before anything
    starts when ``to`` is rdma and this host cannot use it).
    """
    if to.kind == "rdma":
        _rdma()
    if source == "auto":
        source = "shared-ram" if spec.memory.backend == "file" else "colo"
    if source not in ("colo", "shared-ram"):
        raise ConfigError(f"--source must be auto, colo or shared-ram, got {source!r}")
    copied = [d for d in spec.disks if d.mode == "copy"]
    emin = epoch_min_ms or interval_ms
    policy = EpochPolicy(emin, epoch_max_ms or max(interval_ms, emin))
    oc: OutputCommit | None = None
    wake = asyncio.Event()
    status = _with_output(status, policy, lambda: oc)
    primary = None
    if cluster is not None:
        from ..cluster.primary import PrimaryProcess, pid_of_socket

        # before our QMP session: the socket serves one client at a time
        primary = PrimaryProcess(pid_of_socket(qmp_path))
    mets = None
    if metrics is not None:
        from .metrics import AgentMetrics

        mets = AgentMetrics("source", spec.name, cluster=cluster is not None)
        status = mets.wrap(status)
    qmp = await QmpControl.open(qmp_path, timeout=10)
    mem = spec.memory
    pages = (mem.size_mib << 20) // 4096
    agent = SourceAgent(connect=connector(to, sec), page_size=4096, main_pages=pages,
                        generation=generation, keep_mirror=source == "colo",
                        wait_ack=ack == "sync", name=spec.name, on_status=status,
                        disks=bool(copied))
    status({"event": "protect", "vm": spec.name, "source": source, "ack": ack,
            "interval_ms": interval_ms, "to": str(to), "generation": generation})
    ckpt_lock = asyncio.Lock()
    cl: SourceCluster | None = None
    outcome = "done"
    colo_task: asyncio.Task[None] | None = None
    shared: list[SharedRamSource] = []  # the shared-ram source, once open
    coloed: list[ColoSource] = []  # the COLO source, once created
    pacer: asyncio.Task[None] | None = None  # the COLO epoch pacer
    server: ControlServer | None = None

    async def do_status(_req: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "vm": spec.name, "source": source, "captured": agent.stats.captured,
            "committed": agent.stats.committed, "lag": agent.lag,
            "link": agent.link is not None and agent.link.is_open,
            "generation": cl.sm.generation if cl is not None else generation,
            **policy.status(), **(oc.status() if oc is not None else {})}
        if cl is not None:
            doc.update(lease=cl.sm.state.value, broker_connected=cl.bus.connected)
        return doc

    async def do_switchover(req: dict[str, Any]) -> dict[str, Any]:
        if cl is None:
            raise ConfigError("switchover needs automatic failover: run `qmpshadow protect` "
                              "with --broker (the shadow agent too)")
        commit_timeout = float(req.get("commit_timeout", 10.0))
        prefinal = bool(req.get("prefinal", True))
        promote_timeout = float(req.get("promote_timeout", 30.0))
        if source == "colo":
            if not coloed:
                raise ConfigError("switchover: the COLO session with the primary has not "
                                  "started yet; retry once the shadow committed an epoch")
            colo = coloed[0]

            async def final_colo() -> tuple[Any, float | None]:
                # QEMU stops the primary for this checkpoint and keeps it stopped until
                # the held answer goes out (abort) or it is killed (handover)
                try:
                    if prefinal:
                        # a checkpoint right before the final one, committed before it
                        # starts: the final one (the downtime) then holds only what the
                        # guest dirtied in between instead of up to one interval's worth
                        t0 = time.monotonic()
                        pre = await colo.checkpoint_now(timeout=_FINAL_CHECKPOINT_TIMEOUT)
                        t1 = time.monotonic()
                        ok = await agent.wait_committed(pre, commit_timeout)
                        status({"event": "switchover-prefinal", "epoch": pre,
                                "committed": ok,
                                "checkpoint_ms": round((t1 - t0) * 1000, 1),
                                "commit_ms": round((time.monotonic() - t1) * 1000, 1)})
                    ep = await colo.final_checkpoint(timeout=_FINAL_CHECKPOINT_TIMEOUT)
                except BaseException:
                    await colo.release_held()
                    raise
                return ep, colo.stopped_at

            return await cl.switchover(final_colo, commit_timeout=commit_timeout,
                                       promote_timeout=promote_timeout,
                                       resume=colo.release_held)
        if not shared:
            raise ConfigError("switchover: the shared-ram source is not open yet; retry "
                              "once the shadow committed an epoch")
        src = shared[0]

        async def final() -> tuple[Any, float | None]:
            ep = await src.checkpoint(full=agent.need_full, resume=False)
            return ep, src.stopped_at

        return await cl.switchover(final, commit_timeout=commit_timeout,
                                   promote_timeout=promote_timeout)

    def live_source_metrics() -> None:
        if mets is None:
            return

        def age() -> float | None:
            at = cl.last_ack_at if cl is not None else None
            return None if at is None else time.monotonic() - at

        mets.values.update(
            epoch_lag=lambda: agent.lag, committed_epoch=lambda: agent.stats.committed,
            heartbeat_age_seconds=age, epochs=lambda: agent.stats.captured,
            bytes_shipped=lambda: agent.stats.wire_bytes,
            generation=lambda: cl.sm.generation if cl is not None else generation,
            epoch_ms=lambda: policy.current_ms)

    async def colo_fence() -> None:
        if pacer is not None:  # no more checkpoint requests: the primary must not run
            pacer.cancel()
        if colo_task is not None:
            colo_task.cancel()
            await asyncio.gather(colo_task, return_exceptions=True)
        with contextlib.suppress(QmpShadowError):
            await qmp.execute("x-colo-lost-heartbeat", timeout=1.0)

    with tempfile.TemporaryDirectory(prefix="qmpshadow-src-") as tmp:
        sock = Path(tmp) / "stream.sock"
        try:
            if spec.output_commit:
                serial_log = spec.serial if isinstance(spec.serial, Path) else None
                oc = OutputCommit(spec.nics, serial=spec.serial is not False,
                                  serial_log=serial_log, on_output=wake.set,
                                  thin_acks=thin_acks)
                await oc.open(qmp)
                agent.on_commit = oc.commit
                status({"event": "output-commit", "nics": [n.id for n in spec.nics],
                        "serial": spec.serial is not False})
            if cluster is not None and primary is not None:
                from ..cluster.source_side import SourceCluster

                cl = SourceCluster(cluster, vm=spec.name, holder=f"{spec.name}@source",
                                   generation=generation, agent=agent, qmp=qmp,
                                   primary=primary, ckpt_lock=ckpt_lock, status=status,
                                   fencer_log=fencer_log,
                                   before_stop=colo_fence if source == "colo" else None)
                await cl.start()
            if mets is not None and metrics is not None:
                live_source_metrics()
                host, port = mets.serve(metrics)
                status({"event": "metrics-listening", "role": "source", "host": host,
                        "port": port, "url": f"http://{host}:{port}/metrics"})
            if control is not None:
                server = ControlServer(control, {"status": do_status,
                                                 "switchover": do_switchover})
                await server.start()
                status({"event": "control-listening", "role": "source",
                        "control": str(control)})
            if source == "colo":
                done = asyncio.Event()

                async def sink(ep: Any) -> None:
                    # the epoch policy's input, as in the shared-ram loop: did this
                    # epoch produce output (or does output still wait)?
                    policy.next_ms(_output_waiting(oc, take=True))
                    await agent.ship(ep)
                    if cl is not None:
                        cl.note_epoch(ep.number, agent.stats.committed)
                    if max_epochs and ep.number >= max_epochs:
                        done.set()

                colo = ColoSource(qmp, main_block=mem.backend_id, sock_path=sock, sink=sink,
                                  ack_mode=ack, checkpoint_delay_ms=policy.max_ms,
                                  disks=_replicator(qmp, copied, sock.parent, status),
                                  disk_full=lambda: agent.need_full)
                coloed.append(colo)
                if oc is not None:
                    colo.on_stopped = oc.seal
                colo.on_answered = wake.set
                colo_task = task = asyncio.create_task(colo.run())
                pacer = asyncio.create_task(_colo_pacer(colo, policy, oc, wake))
                waiters: set[asyncio.Future[Any]] = {task,
                                                     asyncio.ensure_future(done.wait())}
                if cl is not None:
                    waiters.add(cl.done)
                finished, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    if w is not task and w is not (cl.done if cl else None):
                        w.cancel()
                if cl is not None and cl.done in finished:
                    # protection is over (switched over, released or deposed): the
                    # session goes; a held final checkpoint stays unanswered
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                elif task in finished:
                    exc = task.exception()
                    if exc is not None and (cl is None or not await cl.primary.wait(0.5)):
                        raise exc
                    if cl is not None:
                        # the primary's stream ended, or broke off mid-checkpoint: it
                        # died, or a switchover killed it and is about to report; the
                        # cluster side settles the outcome (a release, never a clean end)
                        await asyncio.wait({cl.done}, timeout=5.0)
                        if exc is not None:
                            log.info("the primary's COLO stream broke off as it died: %s",
                                     exc)
                else:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await qmp.execute("x-colo-lost-heartbeat")
            else:
                if mem.backend != "file" or mem.mem_path is None:
                    raise ConfigError("the shared-ram source needs memory.backend = 'file' "
                                      "with mem_path in the VM spec")
                src = SharedRamSource(qmp, mem_path=mem.mem_path, main_block=mem.backend_id,
                                      sock_path=sock, size=mem.size_mib << 20,
                                      disks=_replicator(qmp, copied, sock.parent, status))
                await src.open()
                shared.append(src)
                if oc is not None:
                    src.on_stopped = oc.seal
                try:
                    await _shared_ram_loop(agent, src, cl, ckpt_lock, policy,
                                           max_epochs, oc, wake)
                finally:
                    await src.close()
            if cl is not None and cl.done.done():
                exc = cl.done.exception() if not cl.done.cancelled() else None
                if exc is not None:
                    from ..cluster.errors import PrimaryGoneError

                    if isinstance(exc, PrimaryGoneError):
                        outcome = "released"
                    else:
                        raise exc
                else:
                    outcome = "switched-over" if cl.switchover_result else "ended"
        finally:
            if pacer is not None:
                pacer.cancel()
                await asyncio.gather(pacer, return_exceptions=True)
            if server is not None:
                await server.close()  # lets an answer in flight (switchover) go out
            if cl is not None:
                await cl.close(end=outcome == "done")
            if oc is not None and outcome == "released":
                # the primary died: acks already on their way still release the output
                # of epochs the shadow committed (it resumes from one of them), so that the
                # serial log has no gap; the lease is already released, nothing waits on us
                await asyncio.sleep(0.2)
            await agent.close()
            if oc is not None:
                await oc.close()
            await qmp.close()
            if mets is not None:
                mets.close()
    status({"event": "protect-finished", "outcome": outcome})
    return outcome


def _replicator(qmp: QmpControl, disks: list[DiskSpec], sock_dir: Path,
                status: StatusFn) -> DiskReplicator | None:
    """Replication of the copy-mode disks (None without any); full-copy progress goes to
    ``status`` as ``disk-sync`` events. Raises ConfigError when an image is missing."""
    if not disks:
        return None
    sizes = disk_sizes(tuple(disks))
    return DiskReplicator(qmp, [DiskSource(d.id, n) for d, n in zip(disks, sizes, strict=True)],
                          sock_dir, tag=f"qs{os.getpid()}", on_progress=status)


def _output_waiting(oc: OutputCommit | None, *, take: bool = False) -> bool:
    """Output arrived since the last call (``take``) or is held and not sealed yet."""
    if oc is None:
        return False
    return (take and oc.take_activity()) or any(ch.queue.open_items for ch in oc.channels)


async def _colo_pacer(colo: ColoSource, policy: EpochPolicy, oc: OutputCommit | None,
                      wake: asyncio.Event) -> None:
    """The epoch policy under the COLO source. QEMU's own timer stays at
    ``x-checkpoint-delay = max_ms`` (the idle period: re-setting it would itself start a
    checkpoint on 7.2); shorter epochs are asked for with the notify
    (:meth:`ColoSource.request_checkpoint`): ``min_ms`` after the last checkpoint when
    output waits, else the policy's current length when that is below ``max_ms``.
    ``wake`` is set on new output and after each answer. Runs until cancelled; a failed
    request is logged and retried at the next wake (the COLO session's own errors end
    protection through its task)."""
    loop = asyncio.get_running_loop()
    while True:
        wake.clear()
        after = None
        if colo.answered_at is not None and not (colo.in_checkpoint or colo.holding):
            after = policy.request_after_ms((loop.time() - colo.answered_at) * 1000,
                                            _output_waiting(oc))
        if after is None:
            await wake.wait()  # QEMU's timer, or a checkpoint in flight
            continue
        left = after / 1000
        if left > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await wake.wait()
            continue
        try:
            await colo.request_checkpoint(timeout=_FINAL_CHECKPOINT_TIMEOUT)
        except QmpShadowError as exc:
            log.warning("epoch pacer: checkpoint request failed: %s", exc)
            await wake.wait()


def _with_output(status: StatusFn, policy: EpochPolicy,
                 oc: Callable[[], OutputCommit | None]) -> StatusFn:
    """``status`` with the epoch length and output-commit counters added to epoch events."""
    def both(doc: dict[str, Any]) -> None:
        if doc.get("event") == "epoch":
            o = oc()
            doc = {**doc, "epoch_ms": policy.current_ms,
                   **(o.status() if o is not None else {})}
        status(doc)
    return both


async def _epoch_gap(policy: EpochPolicy, oc: OutputCommit | None, wake: asyncio.Event,
                     done: asyncio.Future[Any] | None) -> None:
    """Wait the policy's next epoch length; output arriving during a long (idle) epoch
    cuts it short, to no less than ``min_ms`` since the last checkpoint."""
    ms = policy.next_ms(_output_waiting(oc, take=True))
    t0 = time.monotonic()
    wake.clear()
    waiters: set[asyncio.Future[Any]] = set() if done is None else {done}
    woke: asyncio.Future[Any] | None = None
    if oc is not None and policy.adaptive and ms > policy.min_ms:
        woke = asyncio.ensure_future(wake.wait())
        waiters.add(woke)
    if waiters:
        await asyncio.wait(waiters, timeout=ms / 1000, return_when=asyncio.FIRST_COMPLETED)
    else:
        await asyncio.sleep(ms / 1000)
    if woke is not None:
        if woke.done() and (done is None or not done.done()):
            rest = policy.wake_after_ms((time.monotonic() - t0) * 1000)
            if rest:
                await asyncio.sleep(rest / 1000)
        woke.cancel()


async def _shared_ram_loop(agent: SourceAgent, src: SharedRamSource,
                           cl: SourceCluster | None, lock: asyncio.Lock,
                           policy: EpochPolicy, max_epochs: int,
                           oc: OutputCommit | None, wake: asyncio.Event) -> None:
    """Checkpoints until ``max_epochs``, or (with a cluster) until protection ends. With
    a cluster, no checkpoint starts while the primary must not run (a checkpoint ends
    with ``cont``), and each one runs under the lock the fencing takes."""
    n = 0
    while not max_epochs or n < max_epochs:
        if cl is not None:
            if cl.done.done():
                return
            if not cl.running.is_set():
                waiter: asyncio.Future[Any] = asyncio.ensure_future(cl.running.wait())
                await asyncio.wait({waiter, cl.done}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
        await agent.prepare()
        async with lock:
            if cl is not None and not cl.running.is_set():
                continue
            ck = asyncio.ensure_future(src.checkpoint(full=agent.need_full))
            if cl is not None:
                # a checkpoint of a primary that died can wait long for its stream
                watch: set[asyncio.Future[Any]] = {ck, cl.done}
                while not ck.done():
                    await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
                    if cl.done.done() and not cl.primary.alive and not ck.done():
                        ck.cancel()
                        await asyncio.gather(ck, return_exceptions=True)
                        return
            try:
                ep = await ck
            except QmpShadowError as exc:
                if cl is not None and (not cl.primary.alive or await cl.primary.wait(0.5)):
                    await asyncio.wait({cl.done}, timeout=2.0)
                    return
                if not isinstance(exc, DiskError):
                    raise
                # the epoch is lost; the source takes a full one next (RAM and disks)
                log.warning("disk capture failed, next epoch full: %s", exc)
                if agent.on_status is not None:
                    agent.on_status({"event": "disk-error", "error": str(exc),
                                     "time": time.time()})
                await asyncio.sleep(policy.min_ms / 1000)
                continue
        await agent.ship(ep)
        if cl is not None:
            cl.note_epoch(ep.number, agent.stats.committed)
        n += 1
        await _epoch_gap(policy, oc, wake,
                         cl.done if cl is not None else None)


async def run_shadow(*, spec: VmSpec, replica_dir: Path, listen: Endpoint, sec: LinkSecurity,
                     control: Path, accel: str, status: StatusFn,
                     ready: Callable[[], None] | None = None,
                     cluster: ClusterOptions | None = None,
                     metrics: str | None = None) -> dict[str, Any]:
    """Run the shadow agent until a promotion (returns its result) or interruption.

    With ``cluster`` the promotion is automatic: on a released lease, or once the lease
    expired with no heartbeat on either path (see qmpshadow.cluster.shadow_side); a manual
    ``promote`` then also bumps and publishes the generation.

    Raises ConfigError / QmpShadowError subclasses.
    """
    choice = detect_accel(accel if accel != "auto" else spec.accel)
    mets = None
    if metrics is not None:
        from .metrics import AgentMetrics

        mets = AgentMetrics("shadow", spec.name, cluster=cluster is not None)
        status = mets.wrap(status)
    replica = Replica.open(replica_dir, durable=True,
                           disks=[d.image("shadow") for d in spec.disks if d.mode == "copy"])
    standby = Standby(spec, RunPaths.create(replica_dir / "standby"),
                      ram_path=replica.ram_path, accel=choice)
    lst: Listener | None = None
    server: ControlServer | None = None
    promoted: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    agent: ShadowAgent | None = None
    sc: Any = None
    try:
        await standby.start()
        await standby.wait_ready(60)
        lst = await listener(listen, sec)
        agent = ShadowAgent(listener=lst, replica=replica, machine_type=standby.machine_type,
                            name=spec.name, on_status=status,
                            on_commit=lambda: standby.prepare(replica))

        async def do_status(_req: dict[str, Any]) -> dict[str, Any]:
            assert agent is not None
            doc = {"epoch": replica.committed_epoch, "generation": replica.generation,
                   "standby": standby.state.value, "source_connected": agent.link is not None,
                   "epochs_committed": agent.epochs_committed, "resyncs": agent.resyncs}
            if sc is not None:
                doc.update(watch=sc.sm.state.value, cluster_generation=sc.sm.generation,
                           broker_connected=sc.bus.connected)
            return doc

        async def promote_now(reason: str) -> dict[str, Any]:
            assert agent is not None
            await agent.stop()
            result = await standby.promote(replica)
            doc = {"event": "promoted", "epoch": result.epoch, "total_ms": result.total_ms,
                   "load_ms": result.load_ms, "running_ms": result.running_ms,
                   "build_ms": result.build_ms, "prepare_ms": result.prepare_ms,
                   "prepare_reused": result.prepare_reused,
                   "connect_ms": result.connect_ms,
                   "send_ms": result.send_ms,
                   "handoff_ms": result.handoff_ms, "resume_ms": result.resume_ms,
                   "resumed_at": result.resumed_at, "pid": result.pid,
                   "format": result.format.name, "reason": reason}
            status(doc)
            return doc

        async def do_promote(_req: dict[str, Any]) -> dict[str, Any]:
            if sc is not None:
                doc: dict[str, Any] = await sc.manual_promote()
            else:
                doc = await promote_now("operator's promote command")
            if not promoted.done():
                promoted.set_result(doc)
            return doc

        if cluster is not None:
            from ..cluster.shadow_side import ShadowCluster

            sc = ShadowCluster(cluster, vm=spec.name, holder=f"{spec.name}@shadow",
                               agent=agent, replica=replica, promote=promote_now,
                               status=status)
            await sc.start()

            def relay(fut: asyncio.Future[dict[str, Any]]) -> None:
                if not fut.cancelled() and fut.exception() is None and not promoted.done():
                    promoted.set_result(fut.result())
            sc.promoted.add_done_callback(relay)

        if mets is not None and metrics is not None:
            shadow_agent = agent

            def age() -> float | None:
                heard = max(shadow_agent.last_frame_at,
                            sc.sm.last_heard if sc is not None else 0.0)
                return time.monotonic() - heard if heard > 0 else None

            def lag() -> float:
                begun = replica.open_epoch
                return max(0, begun - replica.committed_epoch) if begun else 0

            mets.values.update(
                epoch_lag=lag, committed_epoch=lambda: replica.committed_epoch,
                heartbeat_age_seconds=age, epochs=lambda: shadow_agent.epochs_committed,
                bytes_received=lambda: shadow_agent.bytes_received,
                generation=lambda: sc.sm.generation if sc is not None else replica.generation)
            host, port = mets.serve(metrics)
            status({"event": "metrics-listening", "role": "shadow", "host": host,
                    "port": port, "url": f"http://{host}:{port}/metrics"})
        server = ControlServer(control, {"status": do_status, "promote": do_promote})
        await server.start()
        status({"event": "shadow-ready", "vm": spec.name, "listen": str(listen),
                "control": str(control), "epoch": replica.committed_epoch,
                "standby_pid": standby.process.pid})
        if ready:
            ready()
        serve = asyncio.create_task(agent.serve())
        try:
            return await promoted
        finally:
            serve.cancel()
            await asyncio.gather(serve, return_exceptions=True)
            await asyncio.sleep(0.05)  # let the promote answer reach its client
    finally:
        if sc is not None:
            await sc.close()
        if agent is not None:
            with contextlib.suppress(QmpShadowError):
                await agent.stop()
        if server is not None:
            await server.close()
        if lst is not None:
            await lst.close()
        await standby.close()
        replica.close()
        if mets is not None:
            mets.close()
