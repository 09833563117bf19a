"""The fencer: a tiny separate process that kills the primary QEMU when its lease runs out.

Why a process: the source agent stops the primary itself (QMP ``stop``) when it cannot
renew its lease, but a *dead* or *frozen* agent renews nothing and stops nothing, and the
primary QEMU would keep running while the shadow promotes. The fencer is the dead-man's
switch for that case. It holds a pidfd of the primary QEMU and reads deadlines from a pipe:

- ``ARM deadline``: kill the primary (SIGKILL through the pidfd) at ``deadline``
  (CLOCK_MONOTONIC, shared by every process of the host) unless a later record comes;
- ``SAFE``: no deadline (the primary is stopped, or no shadow can promote);
- ``EXIT``: leave without killing (clean end of protection);
- end of file while armed (the agent died, e.g. ``kill -9``): kill at once.

It runs in its own session (a Ctrl-C of the agent's terminal does not reach it), imports
nothing but the standard library and logs to stderr. It exits once the primary is gone.

Agent side: :class:`Fencer` starts it, writes records without ever blocking (a pipe that is
full means the fencer is stuck: reported as lost) and reports its death.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["OP_ARM", "OP_EXIT", "OP_SAFE", "RECORD", "Fencer", "main"]

#: One record: operation, deadline in CLOCK_MONOTONIC nanoseconds (ARM only).
RECORD = struct.Struct("<Qq")
OP_ARM = 1
OP_SAFE = 2
OP_EXIT = 3
READY = "fencer ready"


def _log(msg: str) -> None:
    sys.stderr.write(f"{time.time():.6f} fencer[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


def _kill(pidfd: int, pid: int, why: str) -> None:
    t0 = time.monotonic()
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        _log(f"primary pid {pid} already gone ({why})")
        return
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    gone = bool(poller.poll(5000))
    _log(f"killed primary pid {pid}: {why}; "
         f"{'gone' if gone else 'still not gone'} after {(time.monotonic() - t0) * 1000:.1f} ms")


def run(pid: int, fd: int) -> int:
    """The fencer's loop (see the module docstring). Returns the exit status."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        _log(f"cannot watch primary pid {pid}: {exc}")
        return 2
    print(f"{READY} pid={pid}", flush=True)
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    poller.register(pidfd, select.POLLIN)
    deadline: int | None = None
    buf = b""
    while True:
        if deadline is None:
            timeout = None
        else:
            timeout = max(0, -(-(deadline - time.monotonic_ns()) // 1_000_000))
        events = poller.poll(timeout)
        if deadline is not None and time.monotonic_ns() >= deadline:
            _kill(pidfd, pid, "its lease deadline passed without renewal")
            return 0
        for which, _mask in events:
            if which == pidfd:
                _log(f"primary pid {pid} exited")
                return 0
            try:
                data = os.read(fd, 4096)
            except OSError as exc:
                data = b""
                _log(f"reading the agent's pipe failed: {exc}")
            if not data:
                if deadline is not None:
                    _kill(pidfd, pid, "the source agent died while the lease was armed")
                else:
                    _log("the source agent went away while the primary needed no guard")
                return 0
            buf += data
            while len(buf) >= RECORD.size:
                op, value = RECORD.unpack_from(buf)
                buf = buf[RECORD.size:]
                if op == OP_ARM:
                    deadline = value
                elif op == OP_SAFE:
                    deadline = None
                elif op == OP_EXIT:
                    _log("released by the agent (clean end)")
                    return 0
                else:
                    _log(f"unknown record {op}: ignored")


def main(argv: list[str] | None = None) -> int:
    """``python -m qmpshadow.cluster.fencer --pid PID --fd FD``."""
    p = argparse.ArgumentParser(prog="qmpshadow-fencer")
    p.add_argument("--pid", type=int, required=True, help="the primary QEMU's pid")
    p.add_argument("--fd", type=int, required=True, help="read end of the agent's pipe")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    return run(args.pid, args.fd)


class Fencer:
    """The agent's handle on its fencer process (see the module docstring).

    ``on_lost(reason)`` runs (in the event loop) when the fencer dies or stops reading
    while we still rely on it. ``log_path`` receives the fencer's stderr.
    """

    def __init__(self, target_pid: int, *, on_lost: Callable[[str], None],
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.target_pid = target_pid
        self.on_lost = on_lost
        self.log_path = Path(log_path) if log_path is not None else None
        self.proc: asyncio.subprocess.Process | None = None
        self._w: int | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self.armed_until: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the fencer and wait until it watches the primary.

        Raises:
            FencerError: it could not start or did not get ready within ``timeout``.
        """
        from qmpshadow.cluster.errors import FencerError

        r, w = os.pipe()
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmpshadow.cluster.fencer", "--pid",
                str(self.target_pid), "--fd", str(r), pass_fds=(r,),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=log if log is not None else asyncio.subprocess.DEVNULL,
                start_new_session=True)
        except OSError as exc:
            os.close(w)
            raise FencerError(f"cannot start the fencer process: {exc}") from None
        finally:
            os.close(r)
            if log is not None:
                log.close()
        self._w = w
        os.set_blocking(w, False)
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            line = b""
        if not line.decode(errors="replace").startswith(READY):
            await self._abort()
            raise FencerError(f"the fencer did not get ready within {timeout}s for primary pid "
                              f"{self.target_pid} (see {self.log_path or 'its stderr'})")
        self._watch = asyncio.create_task(self._watcher(), name="fencer watch")

    async def _watcher(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        if not self._closing:
            self.on_lost(f"the fencer process exited with status {rc}")

    def _write(self, op: int, value: int = 0) -> None:
        if self._w is None:
            return
        try:
            os.write(self._w, RECORD.pack(op, value))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EPIPE) and not self._closing:
                self.on_lost(f"the fencer stopped reading ({os.strerror(exc.errno or 0)})")
            else:
                raise

    def arm(self, deadline: float) -> None:
        """Kill the primary at ``deadline`` (``time.monotonic()`` seconds) unless re-armed."""
        self.armed_until = deadline
        self._write(OP_ARM, int(deadline * 1e9))

    def safe(self) -> None:
        """No deadline: the primary needs no guard now."""
        self.armed_until = None
        self._write(OP_SAFE)

    async def close(self, *, release: bool = True) -> None:
        """Stop the fencer: with ``release`` it leaves without killing (clean end); without,
        the pipe is just closed (it kills the primary if it is armed)."""
        self._closing = True
        if release:
            with contextlib.suppress(OSError):
                self._write(OP_EXIT)
        if self._w is not None:
            os.close(self._w)
            self._w = None
        if self.proc is not None:
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                await self._abort()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait({self._watch})

    async def _abort(self) -> None:
        if self._w is not None:
            with contextlib.suppress(OSError):
                os.close(self._w)
            self._w = None
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
