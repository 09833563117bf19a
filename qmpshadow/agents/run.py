"""Long-running entry points of ``qmpshadow protect`` / ``shadow`` / ``promote``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, QmpShadowError
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
from .shadow import ShadowAgent
from .source import SourceAgent

log = logging.getLogger(__name__)
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


def connector(ep: Endpoint, sec: LinkSecurity) -> Callable[[], Awaitable[Link]]:
    """A ``connect()`` for the source agent."""
    if ep.kind == "unix":
        return lambda: local.connect(ep.path)
    tls = sec.tls()
    return lambda: tcp.connect(ep.host, ep.port, tls=tls,
                               insecure_loopback=tls is None)


async def listener(ep: Endpoint, sec: LinkSecurity) -> Listener:
    """The shadow agent's listener."""
    if ep.kind == "unix":
        return await local.listen(ep.path)
    tls = sec.tls()
    return await tcp.listen(ep.host, ep.port, tls=tls, insecure_loopback=tls is None)


async def run_protect(*, spec: VmSpec, qmp_path: str, to: Endpoint, sec: LinkSecurity,
                      source: str, ack: str, interval_ms: int, status: StatusFn,
                      max_epochs: int = 0, generation: int = 1) -> None:
    """Protect a running primary until interrupted (or ``max_epochs`` epochs).

    Raises ConfigError for an unusable spec/source, QmpShadowError subclasses otherwise.
    """
    if source == "auto":
        source = "shared-ram" if spec.memory.backend == "file" else "colo"
    qmp = await QmpControl.open(qmp_path, timeout=10)
    mem = spec.memory
    pages = (mem.size_mib << 20) // 4096
    agent = SourceAgent(connect=connector(to, sec), page_size=4096, main_pages=pages,
                        generation=generation, keep_mirror=source == "colo",
                        wait_ack=ack == "sync", name=spec.name, on_status=status)
    status({"event": "protect", "vm": spec.name, "source": source, "ack": ack,
            "interval_ms": interval_ms, "to": str(to)})
    with tempfile.TemporaryDirectory(prefix="qmpshadow-src-") as tmp:
        sock = Path(tmp) / "stream.sock"
        try:
            if source == "colo":
                done = asyncio.Event()

                async def sink(ep: Any) -> None:
                    await agent.ship(ep)
                    if max_epochs and ep.number >= max_epochs:
                        done.set()

                colo = ColoSource(qmp, main_block=mem.backend_id, sock_path=sock, sink=sink,
                                  ack_mode=ack, checkpoint_delay_ms=interval_ms)
                task = asyncio.create_task(colo.run())
                waiter = asyncio.create_task(done.wait())
                finished, _ = await asyncio.wait({task, waiter},
                                                 return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if task in finished:
                    task.result()
                else:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await qmp.execute("x-colo-lost-heartbeat")
            elif source == "shared-ram":
                if mem.backend != "file" or mem.mem_path is None:
                    raise ConfigError("the shared-ram source needs memory.backend = 'file' "
                                      "with mem_path in the VM spec")
                src = SharedRamSource(qmp, mem_path=mem.mem_path, main_block=mem.backend_id,
                                      sock_path=sock)
                await src.open()
                try:
                    n = 0
                    while not max_epochs or n < max_epochs:
                        await agent.prepare()
                        ep = await src.checkpoint(full=agent.need_full)
                        await agent.ship(ep)
                        n += 1
                        await asyncio.sleep(interval_ms / 1000)
                finally:
                    await src.close()
            else:
                raise ConfigError(f"--source must be auto, colo or shared-ram, got {source!r}")
        finally:
            await agent.close()
            await qmp.close()


async def run_shadow(*, spec: VmSpec, replica_dir: Path, listen: Endpoint, sec: LinkSecurity,
                     control: Path, accel: str, status: StatusFn,
                     ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the shadow agent until a promotion (returns its result) or interruption.

    Raises ConfigError / QmpShadowError subclasses.
    """
    choice = detect_accel(accel if accel != "auto" else spec.accel)
    replica = Replica.open(replica_dir, durable=True)
    standby = Standby(spec, RunPaths.create(replica_dir / "standby"),
                      ram_path=replica.ram_path, accel=choice)
    lst: Listener | None = None
    server: ControlServer | None = None
    promoted: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    agent: ShadowAgent | None = None
    try:
        await standby.start()
        await standby.wait_ready(60)
        lst = await listener(listen, sec)
        agent = ShadowAgent(listener=lst, replica=replica, machine_type=standby.machine_type,
                            name=spec.name, on_status=status,
                            on_commit=lambda: standby.prepare(replica))

        async def do_status(_req: dict[str, Any]) -> dict[str, Any]:
            assert agent is not None
            return {"epoch": replica.committed_epoch, "generation": replica.generation,
                    "standby": standby.state.value, "source_connected": agent.link is not None,
                    "epochs_committed": agent.epochs_committed, "resyncs": agent.resyncs}

        async def do_promote(_req: dict[str, Any]) -> dict[str, Any]:
            assert agent is not None
            await agent.stop()
            result = await standby.promote(replica)
            doc = {"event": "promoted", "epoch": result.epoch, "total_ms": result.total_ms,
                   "load_ms": result.load_ms, "pid": result.pid,
                   "format": result.format.name}
            status(doc)
            if not promoted.done():
                promoted.set_result(doc)
            return doc

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
        if agent is not None:
            with contextlib.suppress(QmpShadowError):
                await agent.stop()
        if server is not None:
            await server.close()
        if lst is not None:
            await lst.close()
        await standby.close()
        replica.close()
