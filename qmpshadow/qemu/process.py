"""asyncio lifecycle of one QEMU process: launch, readiness, stop, kill, cleanup.

:class:`QemuProcess` launches QEMU from an argv (see :mod:`qmpshadow.qemu.argv`) with
stdout and stderr appended to the run directory's ``stderr.log``, and is ready once its
QMP socket (``qmp.sock``) greets: it then owns that connection as :attr:`QemuProcess.qmp`
(a QMP unix socket serves one client at a time, so other clients use ``qmp2.sock``).
If QEMU exits while starting, :class:`~qmpshadow.errors.QemuExitedError` carries its exit
code and the tail of its stderr, which names the offending option.

As an async context manager it SIGKILLs QEMU on exit and waits until the process is
reaped, so a failing test leaves no zombie or orphan behind; :meth:`QemuProcess.stop`
is the graceful path (QMP ``quit``, then SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from qmpshadow.errors import QemuError, QemuExitedError, QmpError
from qmpshadow.qemu.argv import RunPaths
from qmpshadow.qmp.control import QmpControl

_PR_SET_PDEATHSIG = 1
_TAIL_LINES = 20
_TAIL_BYTES = 8192


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one we may not signal counts as
    alive). Never raises."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        return state != "Z"
    return True


async def kill_and_wait(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL ``pid`` (not a child of ours: no waitpid) and wait up to ``timeout`` seconds
    until it is gone or a zombie. Never raises."""
    if pid <= 0 or not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _pdeathsig_preexec() -> Callable[[], None]:
    # Resolved in the parent: the child between fork and exec should only make the call.
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died before prctl took effect: then nobody would kill us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class QemuProcess:
    """One QEMU process and its owned QMP connection.

    ``start_timeout`` bounds exec-to-QMP-greeting. ``die_with_parent`` makes the kernel
    SIGKILL QEMU when the launching thread dies (for tests and throwaway VMs; never
    for a primary that must outlive its agent).
    """

    def __init__(
        self,
        argv: Sequence[str],
        run: RunPaths,
        *,
        name: str | None = None,
        start_timeout: float = 10.0,
        die_with_parent: bool = False,
    ) -> None:
        if not argv:
            raise QemuError("QemuProcess: expected a QEMU command line, got an empty argv")
        self.argv: tuple[str, ...] = tuple(argv)
        self.run = run
        self.name = name or run.root.name
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QmpControl | None = None
        self._log_offset = 0
        self._cleaned = False

    # ------------------------------------------------------------------ properties

    def __repr__(self) -> str:
        state = "not started"
        if self._proc is not None:
            rc = self._proc.returncode
            state = f"pid {self._proc.pid}" + ("" if rc is None else f", exited {rc}")
        return f"<QemuProcess {self.name} {state}>"

    @property
    def pid(self) -> int:
        """QEMU's pid.

        Raises:
            QemuError: not started.
        """
        return self._require_proc().pid

    @property
    def returncode(self) -> int | None:
        """Exit status once reaped (negative: killed by that signal), else ``None``."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def started(self) -> bool:
        """True once the process was spawned (even if it has exited since)."""
        return self._proc is not None

    @property
    def running(self) -> bool:
        """True from a successful start until QEMU has been reaped."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def qmp(self) -> QmpControl:
        """The QMP connection on ``qmp.sock`` owned by this process object.

        Raises:
            QemuError: not started.
        """
        if self._qmp is None:
            raise QemuError(f"{self.name}: no QMP connection; expected start() first")
        return self._qmp

    def _require_proc(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise QemuError(f"{self.name}: QEMU not started; expected start() first")
        return self._proc

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Launch QEMU and wait until its QMP socket greets.

        Raises:
            QemuExitedError: QEMU exited during start (exit code and stderr tail attached).
            QemuError: already started; the binary cannot be executed; or QEMU did not
                answer QMP within ``start_timeout`` (it is killed then).
        """
        if self._proc is not None:
            raise QemuError(f"{self.name}: start() called twice; expected a fresh QemuProcess")
        self.run.root.mkdir(parents=True, exist_ok=True)
        # Stale sockets would make the readiness probe talk to nobody (ECONNREFUSED) until
        # QEMU replaces them; a stale pidfile would mislead operators.
        self._remove_runtime_files()
        with open(self.run.stderr_log, "ab") as log_file:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            header = f"--- qmpshadow {stamp} exec: {shlex.join(self.argv)}\n"
            log_file.write(header.encode())
            log_file.flush()
            self._log_offset = log_file.tell()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    # Own session: a Ctrl-C meant for the agent must not reach the VM.
                    start_new_session=True,
                    preexec_fn=_pdeathsig_preexec() if self.die_with_parent else None,
                )
            except OSError as err:
                raise QemuError(
                    f"{self.name}: cannot execute {self.argv[0]!r}: {err}; expected a QEMU "
                    "binary (Debian: apt-get install qemu-system-x86)"
                ) from err
        try:
            await self._wait_ready()
        except BaseException:
            await self._abort()
            raise

    async def _wait_ready(self) -> None:
        proc = self._require_proc()
        qmp = QmpControl(f"{self.name}")
        connect = asyncio.create_task(
            qmp.connect(self.run.qmp_sock, timeout=self.start_timeout, retry_interval=0.02)
        )
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connect, exited):
                if not task.done():
                    task.cancel()
            await asyncio.wait({connect, exited})
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            self._qmp = qmp
            return
        await qmp.close()
        # A QEMU that dies makes connect fail too; it may not be reaped yet (the child
        # watcher takes tens of ms), so give the exit a moment to show before blaming QMP.
        if proc.returncode is not None or await self._wait_for(proc, 0.5):
            raise self._exited_error("exited during start")
        err = connect.exception() if not connect.cancelled() else None
        raise QemuError(
            f"{self.name}: QEMU (pid {proc.pid}) did not answer QMP on {self.run.qmp_sock} "
            f"within {self.start_timeout}s: {err}. It is killed; stderr tail:\n"
            f"{self.stderr_tail()}"
        ) from err

    def _exited_error(self, what: str) -> QemuExitedError:
        rc = self.returncode
        tail = self.stderr_tail()
        how = f"with status {rc}" if rc is None or rc >= 0 else f"by signal {-rc}"
        return QemuExitedError(
            f"{self.name}: QEMU {what} {how}; expected it to keep running. Its stderr "
            f"({self.run.stderr_log}) ends with:\n{tail or '(nothing)'}",
            returncode=rc,
            stderr_tail=tail,
        )

    async def _abort(self) -> None:
        self.kill()
        proc = self._proc
        if proc is not None:
            await proc.wait()
        await self._cleanup()

    def stderr_tail(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines QEMU wrote to stderr.log since this launch."""
        try:
            with open(self.run.stderr_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                start = max(self._log_offset, end - _TAIL_BYTES)
                f.seek(start)
                data = f.read()
        except OSError:
            return ""
        text = data.decode(errors="replace").rstrip("\n")
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ stop

    def kill(self) -> None:
        """Send SIGKILL now; does not wait for reaping (20-70 ms here) — await
        :meth:`wait` for that. No-op when not running."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def wait(self) -> int:
        """Wait until QEMU exits and is reaped, then clean up; returns the exit status.

        Raises:
            QemuError: not started.
        """
        rc = await self._require_proc().wait()
        await self._cleanup()
        return rc

    async def stop(self, timeout: float = 10.0) -> int:
        """Stop QEMU: QMP ``quit``, then SIGTERM, then SIGKILL, each given ``timeout``
        seconds to take effect; returns the exit status.

        Raises:
            QemuError: not started.
        """
        proc = self._require_proc()
        if proc.returncode is None and self._qmp is not None and self._qmp.connected:
            # A failed quit is not an error here: the signals below take over.
            with contextlib.suppress(QmpError):
                await self._qmp.quit(timeout=timeout)
            if await self._wait_for(proc, timeout):
                return await self.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            if await self._wait_for(proc, timeout):
                break
        return await self.wait()

    @staticmethod
    async def _wait_for(proc: asyncio.subprocess.Process, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            return False
        return True

    async def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self._qmp is not None:
            await self._qmp.close()
        self._remove_runtime_files()

    def _remove_runtime_files(self) -> None:
        # QEMU removes these itself on a clean exit, never after SIGKILL.
        for path in (self.run.qmp_sock, self.run.qmp2_sock, self.run.pidfile):
            with contextlib.suppress(FileNotFoundError):
                Path(path).unlink()

    # ------------------------------------------------------------------ context manager

    async def __aenter__(self) -> QemuProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is None:
            return
        # SIGKILL first (synchronous): even if the wait below is cancelled, QEMU dies.
        self.kill()
        await self.wait()


async def launch(
    argv: Sequence[str],
    run: RunPaths,
    *,
    name: str | None = None,
    start_timeout: float = 10.0,
    die_with_parent: bool = False,
) -> QemuProcess:
    """Create and start a :class:`QemuProcess`.

    Raises:
        QemuExitedError: QEMU exited during start.
        QemuError: QEMU could not be executed or did not answer QMP in time.
    """
    process = QemuProcess(
        argv, run, name=name, start_timeout=start_timeout, die_with_parent=die_with_parent
    )
    await process.start()
    return process
