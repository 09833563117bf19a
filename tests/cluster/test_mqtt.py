"""ClusterBus on a real mosquitto: credentials, retained status, last will, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from qmpshadow.cluster.errors import BrokerError, MessageError
from qmpshadow.cluster.messages import (
    LeaseDoc,
    Message,
    ShadowHeartbeat,
    Status,
    Topics,
    decode,
    encode,
)
from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.cluster.mqtt import BrokerConfig, ClusterBus, backoff_delays
from qmpshadow.errors import ConfigError

TOPICS = Topics("c1", "vm1")


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, Message, bool]] = []
        self.changed = asyncio.Event()

    def __call__(self, suffix: str, msg: Message, retained: bool) -> None:
        self.items.append((suffix, msg, retained))
        self.changed.set()

    async def wait_for(self, pred: object, timeout: float = 10.0) -> tuple[str, Message, bool]:
        assert callable(pred)
        deadline = time.monotonic() + timeout
        while True:
            for item in self.items:
                if pred(*item):
                    return item
            left = deadline - time.monotonic()
            assert left > 0, f"no matching message in {self.items[-5:]}"
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


def test_broker_url_parsing() -> None:
    cfg = BrokerConfig.from_url("mqtt://127.0.0.1:1884", username="u", password="p")
    assert (cfg.host, cfg.port, cfg.username) == ("127.0.0.1", 1884, "u")
    assert BrokerConfig.from_url("mqtt://broker").port == 1883
    for bad in ("http://x:1", "mqtt://u:p@x:1", "mqtt://x:99999", "mqtt://x:1/path", "x:1"):
        with pytest.raises(ConfigError):
            BrokerConfig.from_url(bad)
    with pytest.raises(ConfigError, match="user name"):
        BrokerConfig(host="x", password="p")


def test_backoff_is_capped_and_jittered() -> None:
    import random

    gen = backoff_delays(0.05, 2.0, random.Random(1))
    delays = [next(gen) for _ in range(30)]
    assert all(0.025 <= d <= 2.0 for d in delays)
    assert max(delays[-10:]) > 1.0 and len(set(delays)) == 30


def test_messages_round_trip_and_refusals() -> None:
    hb = ShadowHeartbeat(gen=3, time=1.5, conn="abc", sent_mono=12.25, state="armed",
                         epoch=7, ack_seq=9, ack_session="s")
    assert decode(encode(hb)) == hb
    for bad, what in [(b"[]", "JSON object"), (b'{"v":2}', "schema"),
                      (b'{"v":1,"kind":"nope"}', "kind"),
                      (b'{"v":1,"kind":"lease","gen":1,"time":1}', "expected field 'mode'"),
                      (b'{"v":1,"kind":"lease","gen":"1","time":1}', "gen"),
                      (b'{"v":1,"kind":"renewal","gen":1,"time":1,"seq":0}', "seq"),
                      (b"\xff" * 10, "JSON"), (b"{" * 20000, "at most")]:
        with pytest.raises(MessageError, match=what):
            decode(bad)


async def test_credentials_are_required(broker: Mosquitto, broker_config: BrokerConfig
                                        ) -> None:
    bad = replace(broker_config, password="wrong")
    bus = ClusterBus(bad, TOPICS, "source", holder="h", on_message=Inbox())
    bus.start()
    with pytest.raises(BrokerError, match="refused"):
        await bus.wait_connected(10)
    await bus.close()
    anon = replace(broker_config, username=None, password=None)
    bus = ClusterBus(anon, TOPICS, "source", holder="h", on_message=Inbox())
    bus.start()
    with pytest.raises(BrokerError, match="anonymous"):
        await bus.wait_connected(10)
    await bus.close()


async def test_status_retained_echo_and_clean_offline(broker_config: BrokerConfig) -> None:
    inbox_a, inbox_b = Inbox(), Inbox()
    a = ClusterBus(broker_config, TOPICS, "shadow", holder="a", on_message=inbox_a,
                   generation=lambda: 4)
    a.start()
    assert await a.wait_connected(10)
    lease = LeaseDoc(gen=4, time=time.time(), holder="a", role="source", mode="protected")
    assert await a.publish_wait(TOPICS.lease, lease, retain=True)
    hb = ShadowHeartbeat(gen=4, time=time.time(), conn=a.conn or "", sent_mono=1.0,
                         state="armed")
    assert a.publish(TOPICS.hb("shadow"), hb)
    # the echo of our own heartbeat comes back
    await inbox_a.wait_for(lambda s, m, r: isinstance(m, ShadowHeartbeat))
    # a later subscriber gets the retained status and lease
    b = ClusterBus(broker_config, TOPICS, "source", holder="b", on_message=inbox_b)
    b.start()
    assert await b.wait_connected(10)
    _, st, retained = await inbox_b.wait_for(
        lambda s, m, r: isinstance(m, Status) and m.role == "shadow")
    assert retained and isinstance(st, Status) and st.online and st.conn == a.conn
    assert st.gen == 4
    await inbox_b.wait_for(lambda s, m, r: isinstance(m, LeaseDoc) and r)
    conn = a.conn
    await a.close()
    _, off, _ = await inbox_b.wait_for(
        lambda s, m, r: isinstance(m, Status) and m.role == "shadow" and not m.online)
    assert isinstance(off, Status) and off.conn == conn
    await b.close()


_CHILD = """
import asyncio, sys
from qmpshadow.cluster.messages import Topics
from qmpshadow.cluster.mqtt import BrokerConfig, ClusterBus
async def main():
    cfg = BrokerConfig(host=sys.argv[1], port=int(sys.argv[2]), username=sys.argv[3],
                       password=sys.argv[4])
    bus = ClusterBus(cfg, Topics("c1", "vm1"), "shadow", holder="child",
                     on_message=lambda *a: None)
    bus.start()
    assert await bus.wait_connected(10)
    print(bus.conn, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_last_will_when_the_agent_is_killed(broker: Mosquitto,
                                                  broker_config: BrokerConfig) -> None:
    inbox = Inbox()
    watcher = ClusterBus(broker_config, TOPICS, "source", holder="w", on_message=inbox)
    watcher.start()
    assert await watcher.wait_connected(10)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, broker.host, str(broker.port),
                              broker.username, broker.password], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert child.stdout is not None
        conn = (await asyncio.to_thread(child.stdout.readline)).strip()
        await inbox.wait_for(lambda s, m, r: isinstance(m, Status) and m.online
                             and m.conn == conn)
        t0 = time.monotonic()
        child.send_signal(signal.SIGKILL)
        await inbox.wait_for(lambda s, m, r: isinstance(m, Status) and not m.online
                             and m.conn == conn)
        # a killed process closes its socket: the broker publishes the will at once
        assert time.monotonic() - t0 < 2.0
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        await watcher.close()


async def test_reconnects_after_broker_restart(broker: Mosquitto,
                                               broker_config: BrokerConfig) -> None:
    connected: list[str] = []
    lost: list[str] = []
    bus = ClusterBus(broker_config, TOPICS, "source", holder="h", on_message=Inbox(),
                     on_connected=connected.append, on_disconnected=lost.append)
    bus.start()
    assert await bus.wait_connected(10)
    broker.kill()
    for _ in range(100):
        if lost:
            break
        await asyncio.sleep(0.05)
    assert lost == connected[:1]
    assert not bus.connected
    assert not bus.publish(TOPICS.events, Status(gen=1, time=0.0, role="source", conn="x",
                                                 online=True))
    await asyncio.sleep(1.0)  # a few failed attempts
    await asyncio.to_thread(broker.start)
    for _ in range(200):
        if len(connected) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(connected) == 2 and connected[1] != connected[0]
    await bus.close()
