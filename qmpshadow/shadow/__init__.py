"""The shadow side: the replica of a primary, its promotion stream, the warm standby.

- :mod:`~qmpshadow.shadow.replica`: :class:`Replica`, the RAM file, small blocks and device
  state of the last committed epoch, applied atomically through a write-ahead journal.
- :mod:`~qmpshadow.shadow.promotion`: :func:`build_promotion_stream` (sans-I/O), the
  migration stream that turns the paused shadow QEMU into the primary, validated before use.
- :mod:`~qmpshadow.shadow.standby`: :class:`Standby`, the shadow QEMU waiting on its incoming
  socket (respawned when it exits) and :meth:`Standby.promote`.
- :mod:`~qmpshadow.shadow.errors`: ReplicaError, ReplicaCorruptError, PromotionError,
  PromotionStreamError.

See docs/shadow.md.
"""

from qmpshadow.shadow.errors import (
    PromotionError,
    PromotionStreamError,
    ReplicaCorruptError,
    ReplicaError,
)
from qmpshadow.shadow.promotion import (
    PromotionBuilder,
    PromotionStream,
    TargetBlock,
    build_promotion_stream,
    check_promotion_stream,
)
from qmpshadow.shadow.replica import CommittedDeviceState, Recovery, RecoveryAction, Replica
from qmpshadow.shadow.standby import PromotionResult, Standby, StandbyState

__all__ = [
    "CommittedDeviceState",
    "PromotionBuilder",
    "PromotionError",
    "PromotionResult",
    "PromotionStream",
    "PromotionStreamError",
    "Recovery",
    "RecoveryAction",
    "Replica",
    "ReplicaCorruptError",
    "ReplicaError",
    "Standby",
    "StandbyState",
    "TargetBlock",
    "build_promotion_stream",
    "check_promotion_stream",
]
