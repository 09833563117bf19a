"""Adaptive epoch length (sans-I/O): short epochs while output waits, long ones when idle.

With output commit, output waits on average half an epoch plus the commit round trip, so
epochs must be short while the guest talks; when it does not, long epochs cost nothing
in latency and save checkpoint pauses. The policy is a small state machine fed one bit
per epoch ("did this epoch produce output?") that returns the next epoch's length:
output → ``min_ms`` at once (latency matters from the first frame); ``idle_epochs`` quiet
epochs in a row → the length doubles, up to ``max_ms``. With ``min_ms == max_ms`` the
length is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(slots=True)
class EpochPolicy:
    """Next epoch length from the output activity of the last one.

    Raises ConfigError (at construction) unless 1 <= min_ms <= max_ms.
    """

    min_ms: int
    max_ms: int
    idle_epochs: int = 3
    current_ms: int = field(init=False)
    _quiet: int = field(init=False, default=0)
    shortened: int = field(init=False, default=0)
    lengthened: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ms <= self.max_ms:
            raise ConfigError(f"epoch length: expected 1 <= min ({self.min_ms} ms) <= max "
                              f"({self.max_ms} ms); set --epoch-min-ms/--epoch-max-ms")
        if self.idle_epochs < 1:
            raise ConfigError(f"idle_epochs: expected >= 1, got {self.idle_epochs}")
        self.current_ms = self.max_ms

    @property
    def adaptive(self) -> bool:
        """True when the length can change (min < max)."""
        return self.min_ms < self.max_ms

    def next_ms(self, active: bool) -> int:
        """The next epoch's length in ms, given whether the last epoch produced output."""
        if active:
            self._quiet = 0
            if self.current_ms != self.min_ms:
                self.shortened += 1
            self.current_ms = self.min_ms
        else:
            self._quiet += 1
            if self._quiet >= self.idle_epochs and self.current_ms < self.max_ms:
                self._quiet = 0
                self.current_ms = min(self.max_ms, self.current_ms * 2)
                self.lengthened += 1
        return self.current_ms

    def wake_after_ms(self, elapsed_ms: float) -> float:
        """How long a sleep that output cut short must still last: an epoch is never
        shorter than ``min_ms`` (``elapsed_ms`` since the last checkpoint ended)."""
        return max(0.0, self.min_ms - elapsed_ms)

    def request_after_ms(self, since_ms: float, waiting: bool) -> float | None:
        """Under the COLO source, QEMU's timer makes ``max_ms`` epochs by itself; shorter
        ones are asked for. Returns how long after now to ask for the next checkpoint,
        ``since_ms`` after the last one ended: ``min_ms`` after it when output is
        ``waiting``, else the current length; None when that is ``max_ms`` (the timer's)."""
        ms = self.min_ms if waiting else self.current_ms
        if ms >= self.max_ms:
            return None
        return max(0.0, ms - since_ms)

    def status(self) -> dict[str, int | bool]:
        """For status documents and metrics."""
        return {"epoch_ms": self.current_ms, "epoch_min_ms": self.min_ms,
                "epoch_max_ms": self.max_ms, "adaptive": self.adaptive}
