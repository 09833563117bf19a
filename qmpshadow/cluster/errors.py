"""Errors of the cluster layer (leases, heartbeats, fencing, MQTT).

All derive from :class:`~qmpshadow.errors.QmpShadowError`; ``asyncio.CancelledError`` is
never wrapped.
"""

from __future__ import annotations

from qmpshadow.errors import QmpShadowError


class ClusterError(QmpShadowError):
    """The cluster layer failed: broker unusable, fencer lost, bad cluster message."""


class BrokerError(ClusterError):
    """The MQTT broker refused us (credentials, protocol) or cannot be used as configured."""


class MessageError(ClusterError):
    """A cluster message (MQTT payload) is malformed: what was expected and what came."""


class FencerError(ClusterError):
    """The fencer process could not be started, or died while it guarded the primary."""


class DeposedError(ClusterError):
    """A newer generation (fencing token) exists: this primary was replaced and must stay
    stopped. ``generation`` is ours, ``current`` the newer one seen."""

    def __init__(self, generation: int, current: int, *, seen: str = "") -> None:
        where = f" ({seen})" if seen else ""
        super().__init__(
            f"generation {current} is current{where}, this primary holds generation "
            f"{generation}: it was replaced by a promotion and must not run again. Its QEMU "
            "was stopped; protect the new primary instead (with --generation "
            f"{current} or later)"
        )
        self.generation = generation
        self.current = current


class PrimaryGoneError(ClusterError):
    """The protected primary QEMU exited (or was fenced and handed over); the lease was
    released so that the shadow takes over."""


class SwitchoverError(ClusterError):
    """A planned switchover was refused or failed; the message says in which state it left
    the primary (still running, resuming, or stopped for good after the release)."""
