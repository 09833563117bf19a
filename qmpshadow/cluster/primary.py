"""The primary QEMU as a process: find its pid from its QMP socket, watch it exit, kill it.

The source agent attaches to a primary it did not start, so it learns the pid from the
kernel: ``SO_PEERCRED`` of a connection to the QMP unix socket names the process that
listens on it. A pidfd then tells the moment the process is gone (readable on exit, no
polling, no pid reuse) and kills it without racing a recycled pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from qmpshadow.cluster.errors import ClusterError

__all__ = ["PrimaryProcess", "pid_of_socket"]

_UCRED = struct.Struct("3i")


def pid_of_socket(path: str | os.PathLike[str], *, timeout: float = 5.0) -> int:
    """Pid of the process listening on unix socket ``path`` (``SO_PEERCRED``).

    Connects and closes at once (a QMP server then sees a client that left before its
    greeting; do it before opening the real QMP session).

    Raises:
        ClusterError: nothing listens there, or the kernel gave no credentials.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
            raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError as exc:
            raise ClusterError(f"cannot learn the primary's pid from its QMP socket {path}: "
                               f"{exc}; expected a running QEMU listening there") from None
    pid = int(_UCRED.unpack(raw)[0])
    if pid <= 0:
        raise ClusterError(f"the kernel gave no peer pid for {path} (got {pid})")
    return pid


class PrimaryProcess:
    """A pidfd on the primary QEMU; ``on_exit()`` runs in the loop once it is gone.

    Raises (constructor):
        ClusterError: the process does not exist (anymore).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise ClusterError(f"cannot watch primary pid {pid}: {exc}") from None
        self.exited_at: float | None = None  # time.time() when seen gone
        self._callbacks: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited = asyncio.Event()

    @property
    def cmdline(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.exited_at is None and not self._readable()

    def _readable(self) -> bool:
        import select

        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def watch(self, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit`` (once) in the running loop when the process is gone."""
        self._callbacks.append(on_exit)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.pidfd, self._fire)

    def _fire(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.pidfd)
        if self.exited_at is None:
            self.exited_at = time.time()
        self._exited.set()
        for cb in self._callbacks:
            cb()
        self._callbacks.clear()

    async def wait(self, timeout: float | None = None) -> bool:
        """True once gone; False after ``timeout``."""
        if not self.alive:
            return True
        if self._loop is None:
            self.watch(lambda: None)
        try:
            async with asyncio.timeout(timeout):
                await self._exited.wait()
        except TimeoutError:
            return False
        return True

    async def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL it and wait until it is gone (True) or ``timeout`` passed (False)."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        return await self.wait(timeout)

    def close(self) -> None:
        if self._loop is not None and self.exited_at is None:
            self._loop.remove_reader(self.pidfd)
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
