"""The destination QEMU of a migration: started ``-S -incoming defer`` from the VM spec, on
this host or inside a network namespace, and left running when qmpshadow exits.

It is launched with :class:`subprocess.Popen` rather than asyncio's subprocess API on
purpose: asyncio kills a child that is still running when its transport is garbage
collected (measured: an ``asyncio.create_subprocess_exec`` child is SIGKILLed when
``asyncio.run`` returns), and after a successful migration the destination *is* the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from qmpshadow.errors import ConfigError, QemuError, QemuExitedError, QmpError
from qmpshadow.qemu.argv import RunPaths, primary_argv
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qmp.control import QmpControl

_TAIL_BYTES = 8192


def destination_spec(spec: VmSpec, *, mem_path: str | os.PathLike[str] | None) -> VmSpec:
    """The spec the destination is started from.

    A serial log path of the source's spec is replaced by the destination run directory's
    ``serial.log`` (two QEMUs must not write one file; QEMU truncates it on open). A
    ``file`` RAM backend needs its own file on this host (``mem_path``).

    Raises:
        ConfigError: a file backend without ``mem_path``, or ``mem_path`` is the source's
            RAM file.
    """
    changes: dict[str, object] = {}
    if not isinstance(spec.serial, bool):
        changes["serial"] = True
    mem = spec.memory
    if mem.backend == "file":
        if mem_path is None:
            raise ConfigError(
                f"memory: the VM's RAM is the shared file {mem.mem_path}; the destination "
                "on this host needs a file of its own: pass --dest-mem-path (e.g. "
                f"/dev/shm/{spec.name}.dest.ram)")
        new = Path(mem_path)
        if mem.mem_path is not None and _same_path(new, mem.mem_path):
            raise ConfigError(
                f"--dest-mem-path {new} is the source's RAM file; expected a different "
                "file (the destination would overwrite the running guest's memory)")
        changes["memory"] = type(mem)(size_mib=mem.size_mib, backend="file",
                                      backend_id=mem.backend_id, mem_path=new)
    elif mem_path is not None:
        raise ConfigError(
            "--dest-mem-path: only meaningful for a VM whose spec has memory.backend = "
            "'file'; this one has 'ram'. Drop the option")
    return spec.replace(**changes) if changes else spec


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a.absolute() == b.absolute()


def destination_argv(spec: VmSpec, run: RunPaths, *, accel: str,
                     netns: str | None = None) -> list[str]:
    """QEMU command line of the destination (``ip netns exec NAME`` prefixed with a netns).

    Raises:
        ConfigError: ``accel`` is not 'kvm' or 'tcg'.
    """
    argv = primary_argv(spec, run, accel=accel, incoming=True)
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return argv


class Destination:
    """One destination QEMU process and its QMP connection on ``qmp.sock``.

    :meth:`start` launches and waits for QMP; :meth:`kill` ends it (rollback);
    :meth:`detach` lets it live on after qmpshadow exits (success).
    """

    def __init__(self, argv: Sequence[str], run: RunPaths, *, netns: str | None = None,
                 name: str = "destination") -> None:
        self.argv = tuple(argv)
        self.run = run
        self.netns = netns
        self.name = name
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QmpControl | None = None
        self._log_offset = 0
        self.detached = False
        self.killed = False  # by kill(), rather than exiting on its own

    @property
    def pid(self) -> int | None:
        """The QEMU pid (``ip netns exec`` execs QEMU, so it is QEMU's own)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def qmp(self) -> QmpControl:
        """The QMP connection.

        Raises:
            QemuError: not started.
        """
        if self._qmp is None:
            raise QemuError(f"{self.name}: not started; expected start() first")
        return self._qmp

    def poll(self) -> int | None:
        """Exit status once QEMU exited (reaping it), else None."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self._proc is not None and self._proc.poll() is None

    async def start(self, timeout: float = 30.0) -> None:
        """Launch QEMU and connect to its QMP socket.

        Raises:
            QemuExitedError: QEMU (or ``ip netns exec``) exited during start; the message
                carries its stderr tail.
            QemuError: it could not be executed or did not answer QMP within ``timeout``
                (it is killed then).
        """
        self.run.root.mkdir(parents=True, exist_ok=True)
        for path in (self.run.qmp_sock, self.run.qmp2_sock, self.run.pidfile):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with open(self.run.stderr_log, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"--- qmpshadow {stamp} exec: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True)  # a Ctrl-C for qmpshadow must not reach it
            except OSError as err:
                raise QemuError(f"{self.name}: cannot execute {self.argv[0]!r}: {err}; "
                                "expected QEMU (and iproute2 for --dest-netns)") from err
        try:
            await self._connect(timeout)
        except BaseException:
            await self.kill()
            raise

    async def _connect(self, timeout: float) -> None:
        qmp = QmpControl(self.name)
        connect = asyncio.create_task(
            qmp.connect(self.run.qmp_sock, timeout=timeout, retry_interval=0.02))
        try:
            while not connect.done():
                if self.poll() is not None:
                    connect.cancel()
                    await asyncio.wait({connect})
                    raise self.exited_error("exited during start")
                await asyncio.wait({connect}, timeout=0.02)
        except BaseException:
            if not connect.done():
                connect.cancel()
                await asyncio.wait({connect})
            raise
        try:
            connect.result()
        except QmpError as err:
            if self.poll() is not None:
                raise self.exited_error("exited during start") from err
            raise QemuError(
                f"{self.name}: QEMU (pid {self.pid}) did not answer QMP on "
                f"{self.run.qmp_sock} within {timeout}s: {err}. stderr tail:\n"
                f"{self.stderr_tail()}") from err
        self._qmp = qmp

    def exited_error(self, what: str) -> QemuExitedError:
        """An error describing the exit (status and stderr tail)."""
        rc = self.poll()
        tail = self.stderr_tail()
        how = "(still running)" if rc is None else (
            f"with status {rc}" if rc >= 0 else f"by signal {-rc}")
        return QemuExitedError(
            f"{self.name}: QEMU {what} {how}. Its stderr ({self.run.stderr_log}) ends "
            f"with:\n{tail or '(nothing)'}", returncode=rc, stderr_tail=tail)

    def stderr_tail(self, lines: int = 15) -> str:
        """The last lines QEMU wrote since this launch."""
        try:
            with open(self.run.stderr_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                f.seek(max(self._log_offset, end - _TAIL_BYTES))
                data = f.read()
        except OSError:
            return ""
        text = data.decode(errors="replace").rstrip("\n")
        return "\n".join(text.splitlines()[-lines:])

    async def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL QEMU, wait until it is reaped, close QMP; returns its exit status.

        Never raises for a process that is already gone.
        """
        proc = self._proc
        if self._qmp is not None:
            await self._qmp.close()
        if proc is None:
            return None
        if proc.poll() is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for path in (self.run.qmp_sock, self.run.qmp2_sock, self.run.pidfile):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return proc.poll()

    async def detach(self) -> None:
        """Close QMP and let QEMU live on: nothing here kills it any more, and it survives
        qmpshadow's exit (re-parented to init). A caller that stays alive and later wants it
        gone calls :meth:`kill`, which also reaps it."""
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        self.detached = True
