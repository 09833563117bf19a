"""Errors of the shadow side: the replica, the promotion stream, the standby.

- :class:`ReplicaError`: the replica was used out of order (an epoch staged twice, a commit
  without a staged epoch, a frame of another generation or block table, a retired replica),
  or a file of it could not be written. The message says what to do (abort the epoch and
  ask for a resync, reset, or reopen).
- :class:`ReplicaCorruptError`: the replica's state file does not verify; the directory
  cannot be trusted and must be rebuilt by a full resync.
- :class:`PromotionStreamError`: no valid promotion stream can be built from the replica
  (nothing committed, an unusable device state, a block table the shadow QEMU does not
  have). Raised *before* anything is sent: the warm standby is untouched.
- :class:`PromotionError`: sending the stream or starting the promoted VM failed (the
  shadow QEMU refused the stream and exited, or did not run after ``cont``).
"""

from __future__ import annotations

from qmpshadow.errors import QmpShadowError

__all__ = [
    "PromotionError",
    "PromotionStreamError",
    "ReplicaCorruptError",
    "ReplicaError",
]


class ReplicaError(QmpShadowError):
    """The replica was misused or could not write its files (see the message)."""


class ReplicaCorruptError(ReplicaError):
    """A replica file that must verify does not (checksum, format, missing fields).

    ``path`` is the offending file. Remove the replica directory and resynchronise.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{message} ({path})")
        self.path = path


class PromotionError(QmpShadowError):
    """Promotion failed after the stream was handed to the shadow QEMU.

    ``stderr_tail`` carries the end of the shadow QEMU's log when it exited (a refused
    stream makes QEMU exit; its log names the section it choked on).
    """

    def __init__(self, message: str, *, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


class PromotionStreamError(PromotionError):
    """The promotion stream could not be built or does not validate; nothing was sent."""
