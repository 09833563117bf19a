"""Decisions of a migration, free of I/O: when to switch to postcopy, when to give up, and
how to roll back.

:class:`Supervisor` is fed the source's progress (and whether the destination QEMU still
lives) at every poll and answers with a :class:`Decision`. :func:`plan_rollback` turns the
state found after a failure into the ordered steps that leave the source running. The
asyncio shell (:mod:`qmpshadow.migration.orchestrator`) only executes what these say, so the
policy is tested without QEMU (``tests/unit/test_migration_*.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .options import MigrateOptions
from .progress import POSTCOPY_STATES, PRECOPY_STATES, Progress, describe


class Action(enum.Enum):
    """What the shell does after a poll."""

    WAIT = "wait"  # keep polling
    START_POSTCOPY = "start-postcopy"  # issue migrate-start-postcopy, keep polling
    SUCCEEDED = "succeeded"  # the source completed: finish on the destination
    ABORT = "abort"  # cancel and roll back (qmpshadow's decision)
    FAILED = "failed"  # QEMU failed or was cancelled by someone else: roll back
    LOST = "lost"  # failure after the postcopy switch: no rollback possible


@dataclass(frozen=True, slots=True)
class Decision:
    """An :class:`Action` and, for the failing ones, the reason in words."""

    action: Action
    reason: str = ""


class Supervisor:
    """Decides from successive :class:`~qmpshadow.migration.progress.Progress` values.

    ``start`` is the monotonic time of the ``migrate`` command. Time is always passed in,
    never read, so tests drive it.
    """

    def __init__(self, options: MigrateOptions, start: float) -> None:
        self.options = options
        self.start = start
        self.postcopy_requested = False
        self._last_moved: tuple[int, int, int, str] | None = None
        self._last_move_time = start
        self.last: Progress | None = None

    @property
    def in_postcopy(self) -> bool:
        """True once the source reported a postcopy state."""
        return self.last is not None and self.last.status in POSTCOPY_STATES

    def observe(self, now: float, progress: Progress, *,
                dest_exit: int | None = None) -> Decision:
        """The decision after one poll.

        ``dest_exit`` is the destination QEMU's exit status when it has exited (negative:
        killed by that signal), else None.
        """
        postcopy_seen = self.in_postcopy or progress.status in POSTCOPY_STATES
        self.last = progress
        status = progress.status
        if dest_exit is not None:
            how = _exit_words(dest_exit)
            qemu = f" (the source reports: {progress.error})" if progress.error else ""
            if postcopy_seen:
                return Decision(Action.LOST, f"the destination QEMU {how} after the switch "
                                f"to postcopy{qemu}")
            if status == "completed":
                return Decision(Action.ABORT, f"the destination QEMU {how} just as the "
                                "source completed; it cannot have started the guest")
            return Decision(Action.ABORT,
                            f"the destination QEMU {how} during the migration{qemu}")
        if status == "completed":
            return Decision(Action.SUCCEEDED)
        if status == "failed":
            why = progress.error or "QEMU gave no reason"
            if postcopy_seen:
                return Decision(Action.LOST, f"the migration failed after the switch to "
                                f"postcopy: {why}")
            return Decision(Action.FAILED, f"QEMU reports the migration failed: {why}")
        if status in ("cancelling", "cancelled"):
            return Decision(Action.FAILED, "the migration was cancelled outside qmpshadow "
                            "(someone sent migrate_cancel)")
        if status == "none":
            return Decision(Action.FAILED, "the source reports no migration (status none) "
                            "after migrate was accepted")
        if status == "colo":
            return Decision(Action.FAILED, "the source entered COLO mode (x-colo is on): "
                            "that is not a migration; turn x-colo off")
        if status == "postcopy-paused":
            return Decision(Action.LOST, "postcopy paused: the link to the destination "
                            "failed after the switch to postcopy")
        elapsed = now - self.start
        moved = progress.moved
        if moved != self._last_moved:
            self._last_moved = moved
            self._last_move_time = now
        if status in POSTCOPY_STATES:
            # Past the point of no return: only completion or loss. Stalls are reported
            # by QEMU as postcopy-paused (handled above).
            return Decision(Action.WAIT)
        if now - self._last_move_time >= self.options.stall_timeout:
            return Decision(Action.ABORT, (
                f"no progress for {now - self._last_move_time:.0f} s (status {status}, "
                f"{progress.transferred} bytes transferred): the link to the destination is "
                "cut or the destination hangs"))
        if elapsed >= self.options.timeout:
            hint = ""
            if progress.dirty_rate and progress.mbps and progress.dirty_rate * 8 / 1e6 >= (
                    progress.mbps * 0.9):
                hint = ("; the guest dirties memory about as fast as it is sent: raise "
                        "--bandwidth or --downtime-limit, or use --auto-converge or "
                        "--postcopy-after")
            return Decision(Action.ABORT, (
                f"not completed within the timeout of {self.options.timeout:g} s "
                f"({describe(progress)}){hint}"))
        after = self.options.postcopy_after
        if (after is not None and not self.postcopy_requested and status == "active"
                and progress.passes >= after):
            self.postcopy_requested = True
            return Decision(Action.START_POSTCOPY,
                            f"pass {progress.passes} reached (--postcopy-after {after})")
        if status in PRECOPY_STATES:
            return Decision(Action.WAIT)
        return Decision(Action.WAIT)


def _exit_words(rc: int) -> str:
    if rc < 0:
        return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


class Step(enum.Enum):
    """Rollback steps, in the order they are executed."""

    CANCEL = "cancel"  # migrate_cancel on the source
    KILL_DESTINATION = "kill-destination"  # SIGKILL and reap the destination
    WAIT_SETTLED = "wait-settled"  # until the source leaves its in-flight states
    CONT_SOURCE = "cont-source"  # cont the source if it was running before and is not
    RESTORE_SETTINGS = "restore-settings"  # capabilities/parameters as they were


def plan_rollback(*, source_status: str | None, destination_alive: bool) -> list[Step]:
    """Steps that leave the source running and the destination gone.

    ``source_status`` is the source's migration status (None: unknown, e.g. the query
    failed). The destination is always killed *before* the source may be continued, so two
    copies of the guest never run. Continuing the source is decided afterwards, from its
    run state (QEMU restarts the vCPUs itself on cancel/failure when they ran before; only a
    source that *completed* stays in postmigrate and needs ``cont``).
    """
    steps: list[Step] = []
    if source_status is None or source_status in PRECOPY_STATES or source_status == "cancelling":
        steps.append(Step.CANCEL)
    if destination_alive:
        steps.append(Step.KILL_DESTINATION)
    steps += [Step.WAIT_SETTLED, Step.CONT_SOURCE, Step.RESTORE_SETTINGS]
    return steps
