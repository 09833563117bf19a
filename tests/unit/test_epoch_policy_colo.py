"""The epoch policy's COLO side (sans-I/O): when the agent asks QEMU for a checkpoint."""

from __future__ import annotations

from qmpshadow.output.policy import EpochPolicy


def test_output_waiting_asks_min_ms_after_the_last_checkpoint() -> None:
    p = EpochPolicy(50, 400)
    assert p.request_after_ms(10, waiting=True) == 40
    assert p.request_after_ms(80, waiting=True) == 0  # overdue: now, never negative


def test_idle_at_max_leaves_it_to_qemus_timer() -> None:
    p = EpochPolicy(50, 400)
    assert p.current_ms == 400
    assert p.request_after_ms(10, waiting=False) is None


def test_after_output_the_length_grows_back_to_max_when_idle() -> None:
    p = EpochPolicy(50, 400, idle_epochs=1)
    p.next_ms(True)  # an epoch with output: the next ones are short
    assert p.request_after_ms(0, waiting=False) == 50
    p.next_ms(False)
    assert p.request_after_ms(30, waiting=False) == 70  # 100 ms epochs now
    p.next_ms(False)
    p.next_ms(False)  # 200, then 400: QEMU's timer again
    assert p.current_ms == 400 and p.request_after_ms(0, waiting=False) is None


def test_fixed_length_never_asks() -> None:
    p = EpochPolicy(200, 200)
    assert p.request_after_ms(500, waiting=True) is None
