"""Acceptance: bits flipped on the wire are refused by the frame checksum, the link is
resynchronised with a full epoch, and the replica never holds one bad byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.agents.source import SourceAgent
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.testguest import wait_for_counter
from qmpshadow.shadow.replica import Replica
from qmpshadow.source.shared_ram import SharedRamSource
from qmpshadow.transport import tcp
from tests.integration.conftest import LaunchVm
from tests.integration.shadowkit import (
    MIB,
    PS,
    checkpoint_with_dump,
    differing_pages,
    dirtier_spec,
    read_file_ram,
)

pytestmark = [pytest.mark.qemu]


class FlippingRelay:
    """TCP relay that flips one bit at ``flip_at[i]`` bytes into connection i's forward
    direction (None: leave that connection alone)."""

    def __init__(self, target_port: int, flip_at: list[int | None]) -> None:
        self.target_port = target_port
        self.flip_at = flip_at
        self.connections = 0
        self.flipped = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        idx = self.connections
        self.connections += 1
        flip = self.flip_at[idx] if idx < len(self.flip_at) else None
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       flip: int | None) -> None:
            seen = 0
            try:
                while data := await src.read(65536):
                    if flip is not None and seen <= flip < seen + len(data):
                        buf = bytearray(data)
                        buf[flip - seen] ^= 0x10
                        data = bytes(buf)
                        self.flipped += 1
                    seen += len(data)
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(r, uw, flip), pump(ur, w, None))


async def test_bit_flips_are_refused_and_resynced(launch_vm: LaunchVm, short_tmp: Path,
                                                  tcg: AccelChoice) -> None:
    mem_path = short_tmp / "p.ram"
    vm = await launch_vm(dirtier_spec("bf", mem_path=mem_path, pages=32, delay_us=500),
                         accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = Replica.open(short_tmp / "replica", durable=False)
    listener = await tcp.listen("127.0.0.1", 0, insecure_loopback=True)
    port = listener.port  # type: ignore[attr-defined]
    shadow = ShadowAgent(listener=listener, replica=replica, machine_type="pc-i440fx-7.2")
    serve = asyncio.create_task(shadow.serve())
    # first link: a flip inside epoch 1's pages; second link: a flip late in its stream
    relay = FlippingRelay(port, [300_000, 6_500_000, None])
    rport = await relay.start()
    agent = SourceAgent(connect=lambda: tcp.connect("127.0.0.1", rport, insecure_loopback=True),
                        page_size=PS, main_pages=(MIB << 20) // PS, wait_ack=True,
                        ack_timeout=3.0)
    src = SharedRamSource(vm.qmp, mem_path=mem_path, main_block="mem",
                          sock_path=short_tmp / "d.sock")
    await src.open()
    committed_seen: list[int] = []
    try:
        for n in range(1, 9):
            await agent.prepare()
            dump = short_tmp / f"d{n}.ram"
            before = replica.committed_epoch
            ep = await checkpoint_with_dump(src, vm, dump, full=agent.need_full)
            acked = agent.stats.committed
            await agent.ship(ep)
            if agent.stats.committed > acked:  # acked when durable, applied after
                await shadow.wait_committed(n)
            after = replica.committed_epoch
            assert after >= before  # never goes backwards
            committed_seen.append(after)
            if after == n:  # this epoch committed: the replica must equal the primary
                bad = differing_pages(read_file_ram(replica.ram_path), dump)
                assert not bad, (n, len(bad))
            else:
                assert after == before, "a refused epoch must leave the replica as it was"
            dump.unlink()
            await asyncio.sleep(0.2)
        assert relay.flipped >= 2, relay.flipped
        assert relay.connections >= 3  # the link was re-established after each corruption
        assert shadow.resyncs + agent.stats.resyncs >= 1 or relay.connections >= 3
        assert replica.committed_epoch == 8, committed_seen
        assert committed_seen.count(0) >= 1  # epoch 1 was refused
    finally:
        await agent.close()
        await src.close()
        serve.cancel()
        await shadow.stop()
        await listener.close()
        if relay.server is not None:
            relay.server.close()
        replica.close()
