"""Unix-socket links between agents on the same host.

The kernel tells each side who the other is (SO_PEERCRED): both sides check the peer's uid
against ``allowed_uids`` (default: this process's effective uid). The socket file is created
with mode 0600 (``mode``) so other users cannot even connect. No encryption: the bytes never
leave the host.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from qmpshadow.errors import ConfigError, TransportError
from qmpshadow.transport._stream import (
    LinkProtocol,
    PeerCheck,
    StreamLink,
    StreamListener,
    establish,
)
from qmpshadow.transport.base import Link, LinkOptions, PeerIdentity
from qmpshadow.transport.errors import PeerAuthError

__all__ = ["UnixListener", "connect", "listen", "peer_credentials"]

_UCRED = struct.Struct("3i")
#: sun_path holds 108 bytes including the terminating NUL.
MAX_PATH_BYTES = 107


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process on the other end of a unix socket (SO_PEERCRED).

    Raises OSError when ``sock`` is not a connected unix socket.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _uids(allowed: Iterable[int] | None) -> frozenset[int]:
    uids = frozenset({os.geteuid()} if allowed is None else allowed)
    if not uids:
        raise ConfigError("allowed_uids is empty: no peer could ever connect; give at least one")
    return uids


def _check_path(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if len(os.fsencode(p)) > MAX_PATH_BYTES:
        raise ConfigError(
            f"unix socket path {p!r} is {len(os.fsencode(p))} bytes, at most {MAX_PATH_BYTES} "
            "fit in sockaddr_un: use a shorter path (e.g. under /run)"
        )
    return p


def _peer_check(uids: frozenset[int], path: str, side: str) -> PeerCheck:
    def check(transport: asyncio.Transport) -> PeerIdentity:
        sock = transport.get_extra_info("socket")
        pid, uid, _ = peer_credentials(sock)
        if uid not in uids:
            other = "client" if side == "server" else "server"
            raise PeerAuthError(
                f"the {other} on {path} runs as uid {uid} (pid {pid}), expected one of "
                f"{sorted(uids)}: run both agents as the same user or add the uid to "
                "allowed_uids"
            )
        return PeerIdentity(transport="local", address=path, authenticated=True,
                            encrypted=False, uid=uid, pid=pid)

    return check


async def connect(
    path: str | os.PathLike[str],
    *,
    allowed_uids: Iterable[int] | None = None,
    options: LinkOptions | None = None,
) -> Link:
    """Connect to the agent listening on the unix socket ``path``.

    Raises ConfigError (path too long, empty ``allowed_uids``), TransportError (no listener,
    timeout, not a qmpshadow agent), PeerAuthError (the server's uid is not allowed, or the
    server refused this process's uid).
    """
    p = _check_path(path)
    uids = _uids(allowed_uids)
    opts = options or LinkOptions()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if opts.socket_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.socket_buffer)
        async with asyncio.timeout(opts.connect_timeout):
            await loop.sock_connect(sock, p)
        transport, proto = await loop.create_unix_connection(
            lambda: LinkProtocol(read_buffer=opts.read_buffer), sock=sock
        )
    except TimeoutError:
        sock.close()
        raise TransportError(
            f"cannot connect to unix:{p} within {opts.connect_timeout} s: the listener does "
            "not accept (overloaded or stopped?)"
        ) from None
    except OSError as exc:
        sock.close()
        raise TransportError(
            f"cannot connect to unix:{p}: {exc.strerror or exc}; expected an agent listening "
            "there (is it running, and is this its socket path?)"
        ) from None
    return await establish(
        proto, transport, side="client", where=f"unix:{p}", options=opts,
        check_peer=_peer_check(uids, p, "client"),
    )


class UnixListener(StreamListener):
    """A :class:`~qmpshadow.transport.base.Listener` on a unix socket; removes its socket
    file when closed (if it is still the one it created).
    """

    path: Path
    _inode: tuple[int, int] | None = None

    def _after_close(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            self.path.unlink(missing_ok=True)


def _clear_stale(p: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``p``."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{p} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(p)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(p)  # stale: left by a process that died
            return
        raise TransportError(f"cannot probe existing socket {p}: {exc}") from None
    finally:
        probe.close()
    raise TransportError(
        f"another process is listening on {p}: stop it or choose another path"
    )


async def listen(
    path: str | os.PathLike[str],
    *,
    allowed_uids: Iterable[int] | None = None,
    options: LinkOptions | None = None,
    mode: int = 0o600,
    backlog: int = 16,
    max_pending: int = 16,
) -> UnixListener:
    """Listen on the unix socket ``path`` (a stale socket file there is replaced).

    Raises ConfigError (path too long or not a socket, empty ``allowed_uids``) and
    TransportError (another process listens there, cannot bind).
    """
    p = _check_path(path)
    uids = _uids(allowed_uids)
    opts = options or LinkOptions()
    loop = asyncio.get_running_loop()
    check = _peer_check(uids, p, "server")

    async def establisher(proto: LinkProtocol, transport: asyncio.Transport) -> StreamLink:
        return await establish(proto, transport, side="server", where=f"unix:{p}",
                               options=opts, check_peer=check)

    _clear_stale(p)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if opts.socket_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.socket_buffer)
        sock.bind(p)
        os.chmod(p, mode)
        st = os.stat(p)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on unix:{p}: {exc.strerror or exc}") from None
    listener = UnixListener(address=f"unix:{p}", options=opts, establisher=establisher,
                            tls=False, max_pending=max_pending)
    listener.path = Path(p)
    listener._inode = (st.st_dev, st.st_ino)
    try:
        server = await loop.create_unix_server(listener.protocol_factory, sock=sock,
                                               backlog=backlog, start_serving=False)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on unix:{p}: {exc.strerror or exc}") from None
    listener.attach(server)
    await server.start_serving()
    return listener
