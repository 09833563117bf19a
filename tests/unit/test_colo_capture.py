"""ColoCapture (the COLO source's sans-I/O core) on a synthetic COLO stream."""

from __future__ import annotations

import pytest

from qmpshadow.migstream.constants import RamFlag
from qmpshadow.migstream.events import RamXbzrle
from qmpshadow.source.colo import Answer, ColoCapture, EpochReady
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
