"""TCP links: mutual TLS 1.3 between hosts, plain TCP only on loopback when asked for.

Both sides verify the other's certificate against the configured CA, and then its identity:
one of the certificate's SAN DNS names (its CN when it has no SAN) must be among the
configured ``peer_names``. The identity names an agent (``source``, ``shadow``), not a host:
addresses may change, certificates are what is trusted. The server requires a client
certificate. Sockets get TCP_NODELAY and keepalive (plus TCP_USER_TIMEOUT, so a peer that
vanished with unacknowledged data is detected in the same time).

``insecure_loopback=True`` (and ``tls=None``) gives plain TCP, refused unless every address
involved is a loopback address: it exists for tests and single-host benchmarks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpshadow.errors import ConfigError, TransportError
from qmpshadow.transport._stream import (
    LinkProtocol,
    PeerCheck,
    StreamLink,
    StreamListener,
    establish,
    release,
)
from qmpshadow.transport.base import Link, LinkOptions, PeerIdentity
from qmpshadow.transport.errors import PeerAuthError

__all__ = ["KeepAlive", "TcpListener", "TlsConfig", "connect", "listen"]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepAlive:
    """TCP keepalive: probe after ``idle`` s of silence, every ``interval`` s, give up after
    ``count`` unanswered probes. TCP_USER_TIMEOUT is set to the same total, so a dead peer is
    noticed after about ``idle + interval * count`` seconds whether or not data is pending.
    """

    idle: int = 5
    interval: int = 2
    count: int = 3

    def __post_init__(self) -> None:
        """Raises ConfigError for values the kernel refuses."""
        for name, top in (("idle", 32767), ("interval", 32767), ("count", 127)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= top:
                raise ConfigError(
                    f"keepalive {name} must be an integer in [1, {top}], got {value!r}"
                )

    @property
    def user_timeout_ms(self) -> int:
        """The TCP_USER_TIMEOUT these settings imply."""
        return (self.idle + self.interval * self.count) * 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """This agent's TLS identity and whom it accepts.

    ``ca``: PEM bundle of the CA(s) that sign peers' certificates; ``cert``/``key``: this
    agent's certificate (PEM, may include intermediates) and private key; ``peer_names``: the
    identities accepted on the other end (matched against SAN DNS names, case-insensitively,
    no wildcards). Raises ConfigError when ``peer_names`` is empty.
    """

    ca: Path
    cert: Path
    key: Path
    peer_names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = (self.peer_names,) if isinstance(self.peer_names, str) else self.peer_names
        names = tuple(n.strip().lower() for n in names if n.strip())
        if not names:
            raise ConfigError(
                "TlsConfig needs at least one peer name (the certificate identity of the "
                "agent at the other end, e.g. 'shadow')"
            )
        object.__setattr__(self, "peer_names", names)
        for name in ("ca", "cert", "key"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], *, name: str,
                 peers: str | Iterable[str]) -> TlsConfig:
        """The layout ``qmpshadow certs init`` writes: ``ca.pem``, ``NAME.pem``, ``NAME.key``.

        ``peers``: one name or several. Raises ConfigError when ``peers`` is empty.
        """
        d = Path(directory)
        peer_names = (peers,) if isinstance(peers, str) else tuple(peers)
        return cls(ca=d / "ca.pem", cert=d / f"{name}.pem", key=d / f"{name}.key",
                   peer_names=peer_names)

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        server = purpose is ssl.Purpose.CLIENT_AUTH
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        # Identity is checked against peer_names after the handshake (agent names, not host
        # names), the chain by OpenSSL during it.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the CA bundle {self.ca}: {exc}; expected PEM certificates "
                "(qmpshadow certs init DIR writes DIR/ca.pem)"
            ) from None
        try:
            ctx.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load certificate {self.cert} with key {self.key}: {exc}; expected a "
                "PEM certificate and its matching unencrypted PEM key"
            ) from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 server context that requires and verifies a client certificate.

        Raises ConfigError when the CA bundle, certificate or key cannot be loaded.
        """
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        """TLS 1.3 client context that verifies the server's certificate.

        Raises ConfigError when the CA bundle, certificate or key cannot be loaded.
        """
        return self._context(ssl.Purpose.SERVER_AUTH)


def certificate_names(cert: dict[str, Any] | None) -> tuple[str, ...]:
    """Identity names of a peer certificate (``getpeercert()`` form): SAN DNS, else CN."""
    if not cert:
        return ()
    san = tuple(str(v).lower() for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    if san:
        return san
    return tuple(
        str(v).lower() for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"
    )


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _check_mode(tls: TlsConfig | None, insecure_loopback: bool) -> None:
    if tls is not None and insecure_loopback:
        raise ConfigError("give either tls=TlsConfig(...) or insecure_loopback=True, not both")
    if tls is None and not insecure_loopback:
        raise ConfigError(
            "TCP links need mutual TLS: pass tls=TlsConfig(...) (create development "
            "certificates with `qmpshadow certs init DIR --names source,shadow`); plain TCP "
            "is allowed only on loopback with insecure_loopback=True"
        )


def _refuse_non_loopback(what: str, addresses: Iterable[str]) -> None:
    bad = sorted({a for a in addresses if not _is_loopback(a)})
    if bad:
        raise ConfigError(
            f"insecure_loopback refuses {what} {', '.join(bad)}: plain TCP is allowed only "
            "on loopback addresses (127.0.0.0/8, ::1); use tls=TlsConfig(...) for any other "
            "address"
        )


def _tune(sock: Any, keepalive: KeepAlive | None, buffers: int | None) -> None:
    """TCP_NODELAY, keepalive and buffer sizes on a connected or listening TCP socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, keepalive.user_timeout_ms)
    if buffers is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)


def _peer_check(tls: TlsConfig | None, side: str) -> PeerCheck:
    def check(transport: asyncio.Transport) -> PeerIdentity:
        addr = transport.get_extra_info("peername")
        where = _fmt_addr(addr)
        if tls is None:
            host = str(addr[0]) if isinstance(addr, tuple) else ""
            if not _is_loopback(host):
                raise PeerAuthError(
                    f"plain TCP peer {where} is not on loopback: insecure_loopback links "
                    "accept loopback peers only; use TLS"
                )
            return PeerIdentity(transport="tcp", address=where, authenticated=False,
                                encrypted=False)
        names = certificate_names(transport.get_extra_info("peercert"))
        match = next((n for n in names if n in tls.peer_names), None)
        if match is None:
            other = "client" if side == "server" else "server"
            raise PeerAuthError(
                f"the {other} at {where} presented a certificate for {list(names)}, expected "
                f"one of {list(tls.peer_names)}: it is not the configured peer (check "
                "peer_names, or which certificate that agent uses)"
            )
        return PeerIdentity(transport="tcp-tls", address=where, authenticated=True,
                            encrypted=True, name=match)

    return check


async def connect(
    host: str,
    port: int,
    *,
    tls: TlsConfig | None = None,
    insecure_loopback: bool = False,
    options: LinkOptions | None = None,
    keepalive: KeepAlive | None = KeepAlive(),
    sock: socket.socket | None = None,
) -> Link:
    """Connect to a :func:`listen`-ing agent at ``host:port`` and establish a link.

    ``sock``: an unconnected TCP socket to connect with (e.g. created in another network
    namespace, or bound to a source address); it is owned by the link afterwards.
    Raises ConfigError (neither or both of ``tls`` / ``insecure_loopback``, non-loopback
    address with ``insecure_loopback``, unreadable certificates), TransportError (cannot
    connect, timeout, not a qmpshadow agent), PeerAuthError (TLS or identity refused, either
    way).
    """
    _check_mode(tls, insecure_loopback)
    opts = options or LinkOptions()
    ctx = tls.client_context() if tls is not None else None
    loop = asyncio.get_running_loop()
    where = _fmt_addr((host, port))
    try:
        async with asyncio.timeout(opts.connect_timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if insecure_loopback:
                _refuse_non_loopback("address", (str(i[4][0]) for i in infos))
            connected = await _dial(loop, infos, sock, keepalive, opts.socket_buffer, where)
    except TimeoutError:
        if sock is not None:
            sock.close()
        raise TransportError(
            f"cannot connect to {where} within {opts.connect_timeout} s: expected the peer "
            "agent listening there; check the address, routes and firewalls"
        ) from None
    except OSError as exc:  # getaddrinfo
        if sock is not None:
            sock.close()
        raise TransportError(
            f"cannot resolve {host!r}: {exc}; expected a host name or address of the peer"
        ) from None
    except ConfigError:
        if sock is not None:
            sock.close()
        raise
    try:
        transport, proto = await loop.create_connection(
            lambda: LinkProtocol(read_buffer=opts.read_buffer, pause_on_connect=ctx is not None),
            sock=connected,
        )
    except OSError as exc:
        connected.close()
        raise TransportError(f"cannot set up the connection to {where}: {exc}") from None
    peer_addr = transport.get_extra_info("peername")
    if insecure_loopback:
        try:
            _refuse_non_loopback("peer", [str(peer_addr[0])])
        except ConfigError:
            await release(proto, transport)
            raise
    return await establish(
        proto,
        transport,
        side="client",
        where=_fmt_addr(peer_addr),
        options=opts,
        check_peer=_peer_check(tls, "client"),
        tls=ctx,
        server_hostname=None,
    )


async def _dial(
    loop: asyncio.AbstractEventLoop,
    infos: list[Any],
    sock: socket.socket | None,
    keepalive: KeepAlive | None,
    buffers: int | None,
    where: str,
) -> socket.socket:
    errors: list[str] = []
    if sock is not None:
        infos = [i for i in infos if i[0] == sock.family][:1]
        if not infos:
            sock.close()
            raise TransportError(f"{where} has no address of the given socket's family")
    for family, type_, proto, _, addr in infos:
        s = sock if sock is not None else socket.socket(family, type_, proto)
        try:
            s.setblocking(False)
            _tune(s, keepalive, buffers)
            await loop.sock_connect(s, addr)
            return s
        except OSError as exc:
            s.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            errors.append(f"{_fmt_addr(addr)}: {why}")
        except BaseException:
            s.close()
            raise
    raise TransportError(
        f"cannot connect to {where} ({'; '.join(errors)}): expected the peer agent listening "
        "there; is it running, and is this the right address?"
    )


class TcpListener(StreamListener):
    """A :class:`~qmpshadow.transport.base.Listener` on TCP; ``host``/``port`` are the bound
    address (``port`` is the real one when 0 was asked for).
    """

    host: str
    port: int


async def listen(
    host: str,
    port: int,
    *,
    tls: TlsConfig | None = None,
    insecure_loopback: bool = False,
    options: LinkOptions | None = None,
    keepalive: KeepAlive | None = KeepAlive(),
    sock: socket.socket | None = None,
    backlog: int = 16,
    max_pending: int = 16,
) -> TcpListener:
    """Listen on ``host:port`` (port 0: any free port) for :func:`connect`-ing agents.

    ``sock``: a bound TCP socket to listen on instead (e.g. created in another network
    namespace). Raises ConfigError (neither or both of ``tls`` / ``insecure_loopback``, a
    non-loopback address with ``insecure_loopback``, unreadable certificates) and
    TransportError when the address cannot be bound.
    """
    _check_mode(tls, insecure_loopback)
    opts = options or LinkOptions()
    ctx = tls.server_context() if tls is not None else None
    loop = asyncio.get_running_loop()
    check = _peer_check(tls, "server")

    async def establisher(proto: LinkProtocol, transport: asyncio.Transport) -> StreamLink:
        raw = transport.get_extra_info("socket")
        if raw is not None:
            _tune(raw, keepalive, None)
        return await establish(
            proto,
            transport,
            side="server",
            where=_fmt_addr(transport.get_extra_info("peername")),
            options=opts,
            check_peer=check,
            tls=ctx,
        )

    if insecure_loopback:
        if sock is not None:
            _refuse_non_loopback("address", [str(sock.getsockname()[0])])
        else:
            infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            _refuse_non_loopback("address", (str(i[4][0]) for i in infos))
    listener = TcpListener(address="", options=opts, establisher=establisher,
                           tls=ctx is not None, max_pending=max_pending)
    try:
        if sock is not None:
            server = await loop.create_server(listener.protocol_factory, sock=sock,
                                              backlog=backlog, start_serving=False)
        else:
            server = await loop.create_server(listener.protocol_factory, host, port,
                                              backlog=backlog, start_serving=False,
                                              reuse_address=True)
    except OSError as exc:
        raise TransportError(
            f"cannot listen on {_fmt_addr((host, port))}: {exc.strerror or exc}; choose a free "
            "port or an address of this host"
        ) from None
    if opts.socket_buffer is not None:
        for s in server.sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.socket_buffer)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.socket_buffer)
    first = server.sockets[0].getsockname()
    listener.host, listener.port = str(first[0]), int(first[1])
    listener.address = ", ".join(_fmt_addr(s.getsockname()) for s in server.sockets)
    listener.attach(server)
    await server.start_serving()
    return listener
