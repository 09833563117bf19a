"""ColoCapture (the COLO source's sans-I/O core) on a synthetic COLO stream."""

from __future__ import annotations

import pytest

from qmpshadow.migstream.constants import RamFlag
from qmpshadow.migstream.events import RamXbzrle
from qmpshadow.source.colo import Answer, ColoCapture, EpochReady, Received
from tests import synth


def stream() -> bytes:
    # the synthetic precopy stream has an XBZRLE page, which a COLO secondary refuses:
    # a full page (naming its block, as the records after it continue it) instead
    evs = [synth.records(2, [(RamFlag.PAGE, e.offset, e.block, b"\x33" * synth.PS)])
           if isinstance(e, RamXbzrle) else e
           for e in synth.precopy_events(colo=True, checkpoints=3)]
    return synth.stream_bytes(evs)


def epochs(cap: ColoCapture, data: bytes, step: int) -> list[EpochReady]:
    out: list[EpochReady] = []
    for i in range(0, len(data), step):
        cap.receive_data(data[i : i + step])
        while (item := cap.next_event()) is not None:
            if isinstance(item, EpochReady):
                out.append(item)
            else:
                assert isinstance(item, Answer)
    return out


@pytest.mark.parametrize("step", [1, 977, 1 << 20])
def test_deferred_pages_equal_copied_pages(step: int) -> None:
    data = stream()
    now = epochs(ColoCapture("pc.ram"), data, step)
    later = epochs(ColoCapture("pc.ram", defer_pages=True), data, step)
    assert len(now) == len(later) == 4  # the initial stream and 3 checkpoints
    # deferred: nothing copied until take_pages, which may come after later input
    assert all(not r.epoch.main and not r.epoch.small for r in later)
    for r in later:
        r.take_pages()
        r.take_pages()  # idempotent
    for a, b in zip(now, later, strict=True):
        assert a.answers == b.answers
        ea, eb = a.epoch, b.epoch
        assert (ea.number, ea.full, ea.reported_pages) == (eb.number, eb.full, eb.reported_pages)
        assert ea.main == eb.main and ea.main
        assert ea.small == eb.small
        assert ea.device_state == eb.device_state


def test_early_ack_comes_with_the_last_byte_of_the_device_state() -> None:
    """``Received`` (the async answer) only once the whole checkpoint is here: at the same
    byte as its EpochReady without early_ack, never before; EpochReady still follows."""
    data = stream()

    def feed(cap: ColoCapture) -> list[tuple[int, str, int]]:
        seen = []
        for i in range(len(data)):
            cap.receive_data(data[i : i + 1])
            while (item := cap.next_event()) is not None:
                if isinstance(item, Received):
                    seen.append((i, "received", item.number))
                elif isinstance(item, EpochReady):
                    seen.append((i, "ready", item.epoch.number))
        return seen

    plain = feed(ColoCapture("pc.ram"))
    early = feed(ColoCapture("pc.ram", early_ack=True))
    ready_at = {n: i for i, kind, n in plain}
    received = [(i, n) for i, kind, n in early if kind == "received"]
    assert [n for _i, n in received] == [2, 3, 4]  # the checkpoints, not the initial stream
    assert all(i == ready_at[n] for i, n in received)
    assert [(i, n) for i, kind, n in early if kind == "ready"] == [
        (i, n) for i, _kind, n in plain]
    order = [(kind, n) for _i, kind, n in early]
    assert all(order.index(("received", n)) + 1 == order.index(("ready", n))
               for _i, n in received)
