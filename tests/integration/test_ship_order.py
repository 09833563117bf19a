"""Epoch order between the source agent and the shadow agent, on a real local link, a
real replica and the agents' own threads (no QEMU: the epochs are made up, so that
their sizes and the moment they are handed over are the test's).

A delta epoch completes its base epoch and nothing else. Found in CI: a switchover's
final shared-RAM epoch (small) was shipped while the loop's previous epoch (large, its
pages still being encoded in a worker thread) was in flight; the small one overtook it,
the shadow committed it on top of the epoch before, and the promoted guest ran on RAM
that never existed (mism=2016: every page of the overtaken epoch missing).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.agents.source import SourceAgent
from qmpshadow.frames.codec import encode_pages
from qmpshadow.frames.epoch import EpochWriter
from qmpshadow.frames.wire import DeviceStateFormat, RamBlock
from qmpshadow.shadow.replica import Replica
from qmpshadow.source.epoch import CapturedEpoch
from qmpshadow.transport import local

PS = 4096
PAGES = 4096  # 16 MiB
BLOCKS = (RamBlock(idstr="mem", length=PAGES * PS),)


def _epoch(number: int, ram: bytearray, changed: dict[int, bytes], *,
           full: bool = False) -> CapturedEpoch:
    """Epoch ``number`` after writing ``changed`` into the model ``ram``."""
    for i, page in changed.items():
        ram[i * PS : (i + 1) * PS] = page
    main = ({i: bytes(ram[i * PS : (i + 1) * PS]) for i in range(PAGES)} if full
            else dict(changed))
    return CapturedEpoch(number, full=full, base=0 if full else number - 1, blocks=BLOCKS,
                         main_block="mem", page_size=PS, main=main,
                         device_state=b"device state %d" % number, scanned=True)


class _Pair:
    """A shadow agent on a fresh replica and a source agent linked to it, which has
    shipped (and the shadow committed) a full epoch 1 of random pages."""

    def __init__(self, tmp: Path, seed: int) -> None:
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.model = bytearray(PAGES * PS)  # the primary's RAM as the epochs make it
        self.replica = Replica.open(tmp / "replica", durable=False)
        self.events: list[dict[str, object]] = []  # the shadow's
        self.source_events: list[dict[str, object]] = []
        self.source = SourceAgent(connect=lambda: local.connect(tmp / "link.sock"),
                                  page_size=PS, main_pages=PAGES,
                                  on_status=self.source_events.append)
        self._listener: local.UnixListener | None = None
        self._shadow: ShadowAgent | None = None
        self._serve: asyncio.Task[None] | None = None

    @property
    def shadow(self) -> ShadowAgent:
        assert self._shadow is not None
        return self._shadow

    def epoch(self, number: int, changed: dict[int, bytes], *,
              full: bool = False) -> CapturedEpoch:
        return _epoch(number, self.model, changed, full=full)

    def pages(self, indices: range | list[int]) -> dict[int, bytes]:
        return {i: self.rng.randbytes(PS) for i in indices}

    async def __aenter__(self) -> _Pair:
        self._listener = await local.listen(self.tmp / "link.sock")
        self._shadow = ShadowAgent(listener=self._listener, replica=self.replica,
                                   machine_type="pc-i440fx-7.2", on_status=self.events.append)
        self._serve = asyncio.create_task(self._shadow.serve())
        assert await self.source.ship(self.epoch(1, self.pages(range(PAGES)), full=True),
                                      wait=True, timeout=30)
        await self.shadow.wait_committed(1, timeout=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.source.close()
        if self._serve is not None:
            self._serve.cancel()
            await asyncio.gather(self._serve, return_exceptions=True)
        await self.shadow.stop()
        if self._listener is not None:
            await self._listener.close()
        self.replica.close()

    def ram(self) -> bytes:
        return self.replica.ram_path.read_bytes()[: PAGES * PS]

    async def committed(self, upto: int) -> list[int]:
        """The epochs of the shadow's "committed" events, once ``upto`` is among them (the
        replica says an epoch is applied a moment before its agent reports it)."""
        for _ in range(500):
            got = [int(str(e["epoch"])) for e in self.events if e.get("event") == "committed"]
            if upto in got:
                break
            await asyncio.sleep(0.01)
        return got

    def refusals(self) -> list[str]:
        return [str(e["reason"]) for e in self.events if e.get("event") == "resync"]


async def test_epochs_reach_the_shadow_in_capture_order(short_tmp: Path) -> None:
    """A small epoch handed over while a large one is still being encoded goes out after
    it: the replica holds every page of both."""
    async with _Pair(short_tmp, 1) as pair:
        agent, rng = pair.source, pair.rng
        for n in range(2, 8, 2):
            big = pair.epoch(n, pair.pages(rng.sample(range(PAGES), 3000)))
            small = pair.epoch(n + 1, pair.pages([rng.randrange(PAGES)]))
            # in this order, as a loop's ship of epoch n and a switchover's final epoch
            # n + 1 (taken once the loop let go of the checkpoint lock)
            first = asyncio.create_task(agent.ship(big))
            await asyncio.sleep(0)
            assert await agent.ship(small, wait=True, timeout=30), agent.stats
            assert await first is False  # async: not waited for
            await pair.shadow.wait_committed(n + 1, timeout=30)
            assert await pair.committed(n + 1) == list(range(1, n + 2))
            assert pair.ram() == pair.model, n
        assert not pair.refusals()


async def test_a_capture_handed_over_late_is_not_shipped(short_tmp: Path) -> None:
    """A delta whose base did not go out right before it is not shipped, and an epoch
    handed to ship() after a later one is dropped (it is older than what went out): the
    next capture must be full, and the replica never holds a made-up RAM."""
    async with _Pair(short_tmp, 2) as pair:
        agent = pair.source
        held = pair.model[:]
        e2 = pair.epoch(2, pair.pages(range(0, 50)))
        e3 = pair.epoch(3, pair.pages(range(50, 60)))
        assert not await agent.ship(e3, wait=True, timeout=5)  # its base 2 never went
        assert agent.need_full and agent.stats.committed == 1
        assert pair.replica.committed_epoch == 1 and pair.ram() == held
        assert await agent.ship(pair.epoch(4, {}, full=True), wait=True, timeout=30)
        assert await agent.ship(pair.epoch(5, pair.pages([9])), wait=True, timeout=30)
        assert not agent.need_full
        assert not await agent.ship(e2, wait=True, timeout=5)  # older than epoch 5
        assert agent.need_full
        await pair.shadow.wait_committed(5, timeout=30)
        assert pair.ram() == pair.model
        errors = [str(e.get("error")) for e in pair.source_events if e.get("error")]
        assert errors == ["the shadow needs a full epoch; not shipped",
                          "epoch 2 is older than epoch 5, already shipped: not "
                          "shipped, the next epoch is full"], errors
        assert not pair.refusals()


async def test_the_shadow_refuses_a_delta_on_another_base(short_tmp: Path) -> None:
    """The shadow side on its own: a delta against an epoch the replica does not hold is
    refused with one resync request; the rest of it and the deltas behind it (sent before
    the source read the request) are dropped unread, so the source sends one full epoch,
    not one per refused frame. The replica stays at its epoch, byte for byte."""
    async with _Pair(short_tmp, 3) as pair:
        link = pair.source.link
        assert link is not None
        held = pair.model[:]
        # epoch 3 as a delta against epoch 2, which the shadow never got; epoch 4 after it
        for epoch in (3, 4):
            w = EpochWriter(generation=1, epoch=epoch, blocks=BLOCKS, base=epoch - 1)
            for parts in [w.begin(),
                          w.pages(0, 1, encode_pages([7], pair.rng.randbytes(8 * PS), PS)),
                          w.device_state(DeviceStateFormat.IGNORE_SHARED_STREAM, b"x"),
                          w.end()]:
                await link.send(parts)
        for _ in range(200):  # until the shadow's RESYNC_REQUEST reached the source
            if pair.source.need_full and pair.shadow.skipped == 7:
                break
            await asyncio.sleep(0.01)
        assert pair.source.need_full and pair.shadow.skipped == 7
        assert pair.shadow.resyncs == 1, pair.refusals()
        assert "delta against epoch 2" in pair.refusals()[0], pair.events
        assert pair.replica.committed_epoch == 1 and pair.ram() == held
        # the full epoch the source sends next is taken, and nothing asks for another
        assert await pair.source.ship(pair.epoch(5, pair.pages([3, 4]), full=True), wait=True,
                                      timeout=30)
        assert await pair.source.ship(pair.epoch(6, pair.pages([5])), wait=True, timeout=30)
        await pair.shadow.wait_committed(6, timeout=30)
        assert pair.ram() == pair.model and not pair.source.need_full
        assert pair.shadow.resyncs == 1
