"""Replication links between agents: one interface, several transports.

- :mod:`~qmpshadow.transport.base`: :class:`Link`, :class:`Listener`, :class:`LinkState`,
  :class:`PeerIdentity`, :class:`LinkOptions` (transport-neutral).
- :mod:`~qmpshadow.transport.tcp`: TCP with mutual TLS 1.3 (``TlsConfig``), or plain TCP on
  loopback only (``insecure_loopback=True``).
- :mod:`~qmpshadow.transport.local`: unix sockets, peer checked by SO_PEERCRED uid.
- :mod:`~qmpshadow.transport.reconnect`: capped, jittered backoff.
- :mod:`~qmpshadow.transport.certs`: development CA and agent certificates.
- :mod:`~qmpshadow.transport.errors`: how a link ends (closed, dropped, integrity, auth).

See docs/transport.md.
"""

from __future__ import annotations

from qmpshadow.transport.base import (
    Link,
    LinkOptions,
    LinkState,
    LinkStats,
    Listener,
    ListenerStats,
    PeerIdentity,
)
from qmpshadow.transport.errors import (
    LinkClosedError,
    LinkDroppedError,
    LinkIntegrityError,
    PeerAuthError,
    TransportError,
)
from qmpshadow.transport.reconnect import Backoff, reconnect

__all__ = [
    "Backoff",
    "Link",
    "LinkClosedError",
    "LinkDroppedError",
    "LinkIntegrityError",
    "LinkOptions",
    "LinkState",
    "LinkStats",
    "Listener",
    "ListenerStats",
    "PeerAuthError",
    "PeerIdentity",
    "TransportError",
    "reconnect",
]
