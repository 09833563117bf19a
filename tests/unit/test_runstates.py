"""RunStates' split-brain verdicts from query windows (no QEMU: the windows are made up)."""

from __future__ import annotations

from pathlib import Path

from qmpshadow.testing.runstates import RunStates


def states(primary: list[tuple[float, float, bool]],
           shadow: list[tuple[float, float, bool]]) -> RunStates:
    rs = RunStates({"primary": Path("p.sock"), "shadow": Path("s.sock")})
    rs.windows = {"primary": primary, "shadow": shadow}
    rs.samples = {n: [(e, r) for _s, e, r in w] for n, w in rs.windows.items()}
    return rs


def test_stalled_poller_is_no_split_brain() -> None:
    # the poller stalled 400 ms: the old copy's stale "running" is stamped at 1.400, the
    # new copy's first fresh "running" 5 ms later; the windows show they need not overlap
    rs = states(primary=[(0.995, 1.0, True), (1.0, 1.400, True), (1.405, 1.406, False)],
                shadow=[(0.995, 1.0, False), (1.0, 1.4001, False), (1.405, 1.406, True)])
    assert rs.both_seen("primary", "shadow") == 0
    assert rs.overlap("primary", "shadow") == 0.0


def test_both_answered_running_in_one_round_is_split_brain() -> None:
    rs = states(primary=[(1.0, 1.001, True), (1.005, 1.006, True)],
                shadow=[(1.0, 1.0015, False), (1.005, 1.0062, True)])
    assert rs.both_seen("primary", "shadow") == 1
    assert rs.both_seen("shadow", "primary") == 1


def test_a_slow_answer_proves_nothing() -> None:
    # the new copy's query was sent before the old one stopped and answered 400 ms later,
    # "running": of some moment in that span, so it cannot show both ran together
    rs = states(primary=[(1.0, 1.001, True), (1.005, 1.006, False)],
                shadow=[(0.9, 1.3, True), (1.305, 1.306, True)])
    assert rs.both_seen("primary", "shadow") == 0
