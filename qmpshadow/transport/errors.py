"""Errors of the replication links: subclasses of :class:`~qmpshadow.errors.TransportError`.

The layer above tells the ways a link can end apart by class:

- :class:`LinkClosedError`: closed on purpose, by this side or by the peer between two frames.
- :class:`LinkDroppedError`: the connection was lost (reset, timeout, or closed in the middle
  of a frame, whose bytes are dropped, never delivered).
- :class:`LinkIntegrityError`: TLS refused received bytes (altered in transit).
- :class:`PeerAuthError`: the peer could not be authenticated, or refused this side.
- a :class:`~qmpshadow.errors.FrameError` (not a TransportError) from the frame decoder:
  the bytes arrived but are corrupt (checksum) or malformed.

After any of them the link is over; the shadow agent reconnects and resynchronises with a
full epoch.
"""

from __future__ import annotations

from qmpshadow.errors import TransportError

__all__ = [
    "LinkClosedError",
    "LinkDroppedError",
    "LinkIntegrityError",
    "PeerAuthError",
    "TransportError",
]


class LinkClosedError(TransportError):
    """The link was closed on purpose: locally (``by_peer`` False) or by the peer at a frame
    boundary (``by_peer`` True). Nothing partial was delivered.
    """

    def __init__(self, message: str, *, by_peer: bool) -> None:
        super().__init__(message)
        self.by_peer = by_peer


class LinkDroppedError(TransportError):
    """The connection was lost: reset, keepalive/user timeout, or closed inside a frame.

    ``partial_bytes`` counts the bytes of an incomplete frame that were dropped (0 when the
    loss happened between frames).
    """

    def __init__(self, message: str, *, partial_bytes: int = 0) -> None:
        super().__init__(message)
        self.partial_bytes = partial_bytes


class LinkIntegrityError(TransportError):
    """TLS refused a received record (bad MAC or malformed record): bytes were altered in
    transit. The link is closed; no byte of the record was delivered.
    """


class PeerAuthError(TransportError):
    """The peer could not be authenticated (TLS handshake failed: no, expired or foreign
    certificate; certificate name or SO_PEERCRED uid not allowed) or it refused this side.
    Retrying does not help until the certificates or the allowed peers are fixed.
    """
