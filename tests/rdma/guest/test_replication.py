"""Replication over RDMA: epochs recorded from a real primary on the HOST, replayed in the
guest through an RDMA link into a ShadowAgent's replica, and through a TCP link into a
second one; both must equal the primary's RAM at every committed epoch and each other.

The host (test_in_guest.py, via tests/rdma/record.py) runs the dirtier primary under TCG
with a shared-RAM source and an EpochEncoder, saves the frames of 5 epochs and a digest of
a pmemsave taken in each checkpoint, and shares them over 9p (``QMPSHADOW_RDMA_EPOCHS``).
The replay is the source agent's side of the protocol: HELLO, the epoch's frames as
recorded, wait for the ACK. Per transport:

1. epochs 1 (full), 2, 3 (deltas) are committed; the replica equals the primary each time;
2. epoch 4 is cut in the middle (the link aborted after half its frames): the replica
   stays at epoch 3, byte for byte (never a half-applied epoch);
3. a new link (new session, as after a reconnect) carries epoch 5, a full epoch: the
   replica equals the primary at epoch 5.

Results (digests per transport) go to ``QMPSHADOW_RDMA_RESULTS`` when set, for the host to
compare against its own records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qmpshadow.agents.shadow import ShadowAgent
from qmpshadow.frames.wire import Ack, Feature, Hello, ResyncRequest, Role
from qmpshadow.shadow.replica import Replica
from qmpshadow.transport import Link, LinkOptions, Listener, rdma, tcp
from tests.rdma.record import ram_digest

EPOCHS_DIR = os.environ.get("QMPSHADOW_RDMA_EPOCHS")
RESULTS = os.environ.get("QMPSHADOW_RDMA_RESULTS")

pytestmark = pytest.mark.skipif(
    not EPOCHS_DIR, reason="no recorded epochs (QMPSHADOW_RDMA_EPOCHS): the host test "
    "tests/rdma/test_in_guest.py records them")

Connect = Callable[[str, int], Awaitable[Link]]
OPTS = LinkOptions(read_buffer=2 << 20, write_buffer=2 << 20)


def _load() -> tuple[dict[str, Any], list[list[bytes]]]:
    assert EPOCHS_DIR is not None
    index = json.loads((Path(EPOCHS_DIR) / "index.json").read_text())
    raw = (Path(EPOCHS_DIR) / "frames.bin").read_bytes()
    epochs: list[list[bytes]] = []
    at = 0
    for ep in index["epochs"]:
        frames = []
        for n in ep["frames"]:
            frames.append(raw[at : at + n])
            at += n
        epochs.append(frames)
    assert at == len(raw)
    return index, epochs


def _replica_ram(replica: Replica, mib: int) -> bytes:
    with open(replica.ram_path, "rb") as f:
        return f.read(mib << 20)


async def _hello(link: Link) -> None:
    await link.send_frame(Hello(generation=1, epoch=0, session_id=os.urandom(16),
                                role=Role.SOURCE, page_size=4096, features=Feature.DELTA,
                                max_payload=link.options.max_payload, name="replay"))


async def _ship(link: Link, frames: list[bytes], epoch: int) -> None:
    for f in frames:
        await link.send(f)
    while True:
        got = await asyncio.wait_for(link.receive(), 120)
        if isinstance(got, ResyncRequest):
            pytest.fail(f"the shadow asked for a resync at epoch {epoch}: {got.message}")
        if isinstance(got, Ack) and got.epoch == epoch:
            return


async def _replicate(name: str, listen: Callable[[], Awaitable[Listener]], connect: Connect,
                     tmp: Path) -> dict[str, Any]:
    index, epochs = _load()
    mib = index["ram_mib"]
    want = {e["epoch"]: e["ram_sha256"] for e in index["epochs"]}
    numbers = [e["epoch"] for e in index["epochs"]]
    replica = Replica.open(tmp / f"replica-{name}", durable=False)
    listener = await listen()
    host, port = listener.host, listener.port  # type: ignore[attr-defined]
    shadow = ShadowAgent(listener=listener, replica=replica, machine_type="pc-i440fx-7.2")
    serve = asyncio.create_task(shadow.serve())
    out: dict[str, Any] = {"transport": name, "committed": {}}
    t0 = time.monotonic()
    try:
        # session 1: epochs 1..3 committed, epoch 4 cut in the middle
        link = await connect(host, port)
        await _hello(link)
        for ep_frames, n in zip(epochs[:3], numbers[:3], strict=True):
            await _ship(link, ep_frames, n)
            await shadow.wait_committed(n)  # acked when durable, applied after
            assert replica.committed_epoch == n
            got = ram_digest(_replica_ram(replica, mib))
            assert got == want[n], f"{name}: replica differs from the primary at epoch {n}"
            out["committed"][n] = got
        half = epochs[3][: len(epochs[3]) // 2]
        for f in half:
            await link.send(f)
        await asyncio.sleep(0.5)  # let the shadow stage what arrived
        link.abort()
        for _ in range(600):
            if shadow.link is None:
                break
            await asyncio.sleep(0.05)
        assert shadow.link is None, "the shadow did not notice the dropped link"
        assert replica.committed_epoch == numbers[2]
        assert ram_digest(_replica_ram(replica, mib)) == want[numbers[2]], (
            f"{name}: a half-sent epoch changed the replica")
        out["after_cut"] = replica.committed_epoch
        # session 2 (a reconnect): the full epoch 5
        link = await connect(host, port)
        await _hello(link)
        await _ship(link, epochs[4], numbers[4])
        await shadow.wait_committed(numbers[4])
        assert replica.committed_epoch == numbers[4]
        ram = _replica_ram(replica, mib)
        got = ram_digest(ram)
        assert got == want[numbers[4]], f"{name}: replica differs from the primary after resync"
        out["committed"][numbers[4]] = got
        out["ram_sha256_full"] = hashlib.sha256(ram).hexdigest()  # hole included
        dev = replica.device_state
        assert dev is not None
        out["device_sha256"] = hashlib.sha256(dev.data).hexdigest()
        out["small_sha256"] = {b.idstr: hashlib.sha256(replica.small_block(b.idstr)).hexdigest()
                               for b in replica.blocks if b.idstr != replica.shared_block.idstr}
        out["epochs_committed_by_agent"] = shadow.epochs_committed
        out["seconds"] = round(time.monotonic() - t0, 2)
        link.abort()
    finally:
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
        await shadow.stop()
        await listener.close()
        replica.close()
    return out


async def test_replica_over_rdma_equals_replica_over_tcp(tmp_path: Path) -> None:
    async def rdma_listen() -> Listener:
        return await rdma.listen("127.0.0.1", 0, insecure_loopback=True, options=OPTS)

    async def rdma_connect(host: str, port: int) -> Link:
        return await rdma.connect(host, port, insecure_loopback=True, options=OPTS)

    async def tcp_listen() -> Listener:
        return await tcp.listen("127.0.0.1", 0, insecure_loopback=True, options=OPTS)

    async def tcp_connect(host: str, port: int) -> Link:
        return await tcp.connect(host, port, insecure_loopback=True, options=OPTS)

    over_rdma = await _replicate("rdma", rdma_listen, rdma_connect, tmp_path)
    over_tcp = await _replicate("tcp", tcp_listen, tcp_connect, tmp_path)
    for key in ("committed", "after_cut", "ram_sha256_full", "device_sha256", "small_sha256"):
        assert over_rdma[key] == over_tcp[key], key
    if RESULTS:
        Path(RESULTS).write_text(json.dumps({"rdma": over_rdma, "tcp": over_tcp}, indent=1))
