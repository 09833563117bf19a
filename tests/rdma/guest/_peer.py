"""An RDMA source stand-in run as a separate process, so tests can SIGKILL it.

Usage: ``python3 -m tests.rdma.guest._peer HOST PORT MODE``. Connects (plain TCP control
link on loopback), sends EPOCH_BEGIN and two PAGES frames of epoch 1, prints ``sent``; then
in MODE ``mid-frame`` starts a 32 MiB DEVICE_STATE frame and prints ``blocked`` once that
send waits for the receiver (part of the frame is in the receiver's ring); in MODE
``between-frames`` it just waits; in MODE ``receiver`` it only receives, never reading
after the first frame. It waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys

from qmpshadow.frames import EpochWriter, RamBlock, encode_pages
from qmpshadow.frames.wire import DeviceStateFormat
from qmpshadow.transport import LinkOptions, rdma

PS = 4096


async def main(host: str, port: int, mode: str) -> None:
    opts = LinkOptions(read_buffer=64 << 10, write_buffer=64 << 10)
    link = await rdma.connect(host, port, insecure_loopback=True, options=opts)
    assert isinstance(link, rdma.RdmaLink)
    if mode == "receiver":
        await link.receive()
        print("got-one", flush=True)
        await asyncio.sleep(3600)
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
        async with asyncio.timeout(30):
            while not link.send_waiting:
                await asyncio.sleep(0.005)
        print("blocked", flush=True)
        await big
        print("big-done", flush=True)  # only if the receiver read it all: a test failure
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
