"""Delta frames between the source and the shadow agent.

- :mod:`~qmpshadow.frames.wire`: the frame format (sans-I/O encoder and decoder).
- :mod:`~qmpshadow.frames.codec`: page records (ZERO / FULL / DELTA) and the sender's cache.
- :mod:`~qmpshadow.frames.pagehash`: keyed per-page xxh3 and the unchanged filter.
- :mod:`~qmpshadow.frames.epoch`: one epoch's frames, counts and digest, both sides.

The hot loops have Cython twins; ``codec.IMPLEMENTATION`` and ``pagehash.IMPLEMENTATION``
say whether the compiled ones are live. See docs/frames.md.
"""

from __future__ import annotations

from qmpshadow.frames.codec import PageCache, apply_pages, encode_pages, max_pages_per_frame
from qmpshadow.frames.epoch import EpochAssembler, EpochComplete, EpochWriter
from qmpshadow.frames.pagehash import UnchangedFilter
from qmpshadow.frames.wire import (
    CLOSED,
    NEED_DATA,
    Ack,
    DeviceState,
    EpochBegin,
    EpochEnd,
    Frame,
    FrameDecoder,
    Heartbeat,
    Hello,
    Pages,
    RamBlock,
    ResyncRequest,
    SmallBlock,
    check_generation,
    encode_frame,
    encode_frame_parts,
)

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "Ack",
    "DeviceState",
    "EpochAssembler",
    "EpochBegin",
    "EpochComplete",
    "EpochEnd",
    "EpochWriter",
    "Frame",
    "FrameDecoder",
    "Heartbeat",
    "Hello",
    "PageCache",
    "Pages",
    "RamBlock",
    "ResyncRequest",
    "SmallBlock",
    "UnchangedFilter",
    "apply_pages",
    "check_generation",
    "encode_frame",
    "encode_frame_parts",
    "encode_pages",
    "max_pages_per_frame",
]
