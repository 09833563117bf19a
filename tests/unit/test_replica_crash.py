"""Replica crash safety: a process committing an epoch is SIGKILLed at every step.

Each case forks a child that opens the replica (at epoch N-1), stages epoch N and commits
it with a step hook that SIGKILLs the child at one step (a real kill: no cleanup, no
finally blocks, whatever is in the page cache stays there). The parent reopens the replica
and checks it holds exactly epoch N-1 or exactly epoch N (RAM file, small blocks and device
state byte-identical to the reference built in memory), and N whenever the commit record
had been written (the moment after which an acknowledgement may have gone out).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpshadow.frames.epoch import EpochAssembler
from qmpshadow.shadow.replica import RecoveryAction, Replica
from tests.unit.test_replica import FakeVm, Snapshot, assert_holds, decode, feed, fresh


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _in_child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child; return the signal that ended it (0: clean exit)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 0
        try:
            body()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, f"child failed with exit status {os.WEXITSTATUS(status)}"
    return 0


def _killer(step: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            _kill_self()

    return hook


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, Snapshot, Snapshot,
                                                              list[str]]:
    """A replica at epoch N-1 (``base``), epoch N's frames, both references, N's steps."""
    root = tmp_path_factory.mktemp("crash")
    base = root / "base"
    vm = FakeVm(seed=7)
    with fresh(base, vm) as r:
        data, _ = vm.epoch_bytes(full=True)
        feed(r, data)
        vm.mutate(25, small_pages=3)
        data, before = vm.epoch_bytes()
        feed(r, data)
    vm.mutate(30, small_pages=4)
    data_n, after = vm.epoch_bytes()
    # Learn the step names of this commit (in a scratch copy).
    steps: list[str] = []
    probe = root / "probe"
    shutil.copytree(base, probe)
    with Replica.open(probe, step_hook=steps.append) as r:
        feed(r, data_n)
        assert_holds(r, after)
    shutil.rmtree(probe)
    return base, data_n, before, after, steps


def test_step_names(scenario: tuple[Path, bytes, Snapshot, Snapshot, list[str]]) -> None:
    steps = scenario[4]
    assert steps[:3] == ["commit:begin", "commit:record-written", "commit:record-synced"]
    assert steps[-4:] == ["commit:state-written", "commit:data-synced",
                          "commit:journal-truncated", "commit:done"]
    assert "commit:device-state-written" in steps
    assert sum(s.startswith("commit:applied:") for s in steps) >= 5


def test_kill_at_every_commit_step(
    tmp_path: Path, scenario: tuple[Path, bytes, Snapshot, Snapshot, list[str]]
) -> None:
    base, data_n, before, after, steps = scenario
    for k, step in enumerate(steps):
        d = tmp_path / f"s{k}"
        shutil.copytree(base, d)

        def child(d: Path = d, step: str = step) -> None:
            with Replica.open(d, step_hook=_killer(step)) as r:
                feed(r, data_n)

        assert _in_child(child) == signal.SIGKILL, step
        with Replica.open(d) as r:
            if step == "commit:begin":
                assert r.recovery.action is RecoveryAction.DISCARDED, step
                assert_holds(r, before)
            else:
                assert_holds(r, after)
                done = step in ("commit:journal-truncated", "commit:done")
                want = RecoveryAction.NONE if done else RecoveryAction.REPLAYED
                assert r.recovery.action is want, step
            assert r.open_epoch is None
        shutil.rmtree(d)


def test_kill_while_staging(
    tmp_path: Path, scenario: tuple[Path, bytes, Snapshot, Snapshot, list[str]]
) -> None:
    base, data_n, before, _, _ = scenario
    frames = list(decode(data_n))
    for cut in (1, len(frames) // 2, len(frames) - 2, len(frames) - 1):
        d = tmp_path / f"c{cut}"
        shutil.copytree(base, d)

        def child(d: Path = d, cut: int = cut) -> None:
            with Replica.open(d) as r:
                asm = EpochAssembler(generation=r.generation, last_epoch=r.committed_epoch)
                for f in frames[:cut]:
                    if asm.feed(f) is None:
                        r.stage(f)
                _kill_self()

        assert _in_child(child) == signal.SIGKILL
        with Replica.open(d) as r:
            assert r.recovery.action is RecoveryAction.DISCARDED
            assert_holds(r, before)
        shutil.rmtree(d)


def test_kill_after_commit_returned(
    tmp_path: Path, scenario: tuple[Path, bytes, Snapshot, Snapshot, list[str]]
) -> None:
    """What the agent acknowledges (after commit returned) is never lost."""
    base, data_n, _, after, _ = scenario
    d = tmp_path / "acked"
    shutil.copytree(base, d)

    def child() -> None:
        with Replica.open(d) as r:
            feed(r, data_n)
            _kill_self()

    assert _in_child(child) == signal.SIGKILL
    with Replica.open(d) as r:
        assert r.recovery.action is RecoveryAction.NONE
        assert_holds(r, after)


def test_on_sealed_comes_between_the_record_and_the_apply(
    tmp_path: Path, scenario: tuple[Path, bytes, Snapshot, Snapshot, list[str]]
) -> None:
    """The shadow agent acknowledges in ``on_sealed``: it comes once the commit record is
    synced, before anything is applied, and a kill right there still recovers the epoch."""
    base, data_n, _, after, _ = scenario
    d = tmp_path / "order"
    shutil.copytree(base, d)
    seen: list[str] = []
    with Replica.open(d, step_hook=seen.append) as r:
        feed(r, data_n, on_sealed=lambda: seen.append("sealed"))
        assert_holds(r, after)
    k = seen.index("sealed")
    assert seen[k - 1] == "commit:record-synced" and seen[k + 1].startswith("commit:applied:")
    d = tmp_path / "acked-sealed"
    shutil.copytree(base, d)

    def child() -> None:
        with Replica.open(d) as r:
            feed(r, data_n, on_sealed=_kill_self)

    assert _in_child(child) == signal.SIGKILL
    with Replica.open(d) as r:
        assert r.recovery.action is RecoveryAction.REPLAYED
        assert_holds(r, after)


def test_kill_during_recovery(
    tmp_path: Path, scenario: tuple[Path, bytes, Snapshot, Snapshot, list[str]]
) -> None:
    """Recovery replays through the same steps; killed there too, it still converges."""
    base, data_n, _, after, steps = scenario
    applied = [s for s in steps if s.startswith("commit:applied:")]
    d = tmp_path / "rec"
    shutil.copytree(base, d)

    def first() -> None:
        with Replica.open(d, step_hook=_killer(applied[1])) as r:
            feed(r, data_n)

    def second() -> None:
        Replica.open(d, step_hook=_killer(applied[-1]))

    def third() -> None:
        Replica.open(d, step_hook=_killer("commit:state-written"))

    for body in (first, second, third):
        assert _in_child(body) == signal.SIGKILL
    with Replica.open(d) as r:
        assert r.recovery.action is RecoveryAction.REPLAYED
        assert_holds(r, after)
