"""A source-agent stand-in run as a separate process, so tests can SIGKILL it mid-epoch.

Usage: ``python -m tests.transport._peer SPEC_JSON MODE``. Connects as SPEC says (see
cases.Case.peer_spec), sends EPOCH_BEGIN and two PAGES frames of epoch 1, prints ``sent``,
then in MODE ``mid-frame`` starts a 32 MiB DEVICE_STATE frame and prints ``blocked`` once
the send is stuck part-way (the receiver does not read), or in MODE ``between-frames`` just
waits. Either way it waits to be killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from qmpshadow.frames import EpochWriter, RamBlock, encode_pages
from qmpshadow.frames.wire import DeviceStateFormat
from qmpshadow.transport import Link, LinkOptions, rdma
from tests.transport.cases import connect_spec

PS = 4096


def _blocked(link: Link) -> bool:
    if isinstance(link, rdma.RdmaLink):
        return link.send_waiting
    return bool(link._proto.write_paused)  # type: ignore[attr-defined]


async def main(spec: dict[str, object], mode: str) -> None:
    link = await connect_spec(spec, LinkOptions(write_buffer=64 << 10))
    ram = bytes(range(256)) * (16 * PS // 256)
    w = EpochWriter(generation=1, epoch=1, blocks=(RamBlock(idstr="mem", length=len(ram)),))
    await link.send(w.begin())
    for first in (0, 8):
        idx = list(range(first, first + 8))
        await link.send(w.pages(0, len(idx), encode_pages(idx, ram, PS)))
    print("sent", flush=True)
    if mode == "mid-frame":
        big = asyncio.create_task(
            link.send(w.device_state(DeviceStateFormat.QEMU_SECTIONS, bytes(32 << 20))))
        # Blocked part-way: the transport holds a full write buffer of the frame, and what
        # preceded it went to the kernel (a stream link's protocol pauses writing), or, over
        # RDMA, the peer's ring is full and send() waits for credits (send_waiting).
        async with asyncio.timeout(30):
            while not _blocked(link):
                await asyncio.sleep(0.005)
        print("blocked", flush=True)
        await big
        print("big-done", flush=True)  # only if the receiver read it all: a test failure
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2]))
