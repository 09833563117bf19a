"""The MQTT side of the cluster layer, on aiomqtt (>=2.5,<3).

:class:`ClusterBus` keeps one connection to the broker for one agent (role ``source`` or
``shadow``) of one VM: it connects with capped, jittered exponential backoff, announces
itself with a retained ``online`` status on ``hb/<role>`` whose last will (retained) says
``online: false`` for the same connection id, subscribes to the VM's whole topic tree and
hands every decoded message to a callback. Publishing never blocks the caller:
:meth:`ClusterBus.publish` queues the message in a task and drops heartbeats when too many
are pending (a cut network must not stall the failover logic).

Each connection gets a fresh random id (``conn``): it names the connection in status, last
will and heartbeats, which is what the lease logic keys on. The MQTT client id is fixed per
cluster/VM/role, so a reconnect takes the old session over and the broker publishes the
old connection's last will before the new one's ``online``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from qmpshadow.cluster.errors import BrokerError, MessageError
from qmpshadow.cluster.messages import Message, Status, Topics, decode, encode
from qmpshadow.errors import ConfigError

__all__ = ["BrokerConfig", "ClusterBus", "backoff_delays"]

log = logging.getLogger(__name__)

#: Heartbeats (QoS 0) are dropped while this many publishes are still pending.
MAX_PENDING = 64

OnMessage = Callable[[str, Message, bool], None]
OnConn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the broker is and how to log in.

    ``keepalive_s`` is the MQTT keepalive (the broker publishes a silent client's last will
    after more than ``keepalive_s * 3 // 2`` s); ``connect_timeout_s`` bounds one attempt;
    reconnects wait ``backoff_min_s`` doubling up to ``backoff_max_s``, each jittered.

    Raises:
        ConfigError: a value is out of range.
    """

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 1
    connect_timeout_s: float = 3.0
    backoff_min_s: float = 0.05
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("broker host: expected a host name or address, got ''")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port: expected 1-65535, got {self.port}")
        if not 1 <= self.keepalive_s <= 3600:
            raise ConfigError(f"MQTT keepalive: expected 1-3600 s, got {self.keepalive_s}")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ConfigError(f"reconnect backoff: expected 0 < min <= max, got "
                              f"{self.backoff_min_s}, {self.backoff_max_s}")
        if self.password is not None and self.username is None:
            raise ConfigError("an MQTT password needs a user name (--mqtt-user)")

    @classmethod
    def from_url(cls, url: str, *, username: str | None = None, password: str | None = None,
                 keepalive_s: int = 1) -> BrokerConfig:
        """``mqtt://HOST[:PORT]`` (credentials come separately, never in the URL).

        Raises:
            ConfigError: another scheme, credentials or a path in the URL, a bad port.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"--broker: expected mqtt://HOST:PORT, got {url!r} ({exc})"
                              ) from None
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ConfigError(f"--broker: expected mqtt://HOST:PORT, got {url!r} (mqtts is not "
                              "supported yet)")
        if parts.username or parts.password:
            raise ConfigError("--broker: put credentials in --mqtt-user and "
                              "--mqtt-password-file, not in the URL")
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"--broker: expected mqtt://HOST:PORT without a path, got {url!r}")
        return cls(host=parts.hostname, port=port or 1883, username=username,
                   password=password, keepalive_s=keepalive_s)


def backoff_delays(low: float, high: float, rng: random.Random | None = None
                   ) -> Iterator[float]:
    """Reconnect delays: ``low`` doubling up to ``high``, each drawn in [d/2, d]."""
    rng = rng or random.Random()
    d = low
    while True:
        yield rng.uniform(d / 2, d)
        d = min(high, d * 2)


class ClusterBus:
    """One agent's connection to the broker (see the module docstring).

    ``on_message(suffix, message, retained)`` gets every valid message of the VM's tree
    (``suffix`` is ``hb/source``, ``lease``, ...), own messages included (the shadow uses
    the echo of its heartbeats). ``on_connected(conn)`` runs once subscribed,
    ``on_disconnected(conn)`` when that connection is lost. ``generation()`` gives the
    generation to put in status messages, ``holder`` this agent's name.
    """

    def __init__(self, config: BrokerConfig, topics: Topics, role: str, *, holder: str,
                 on_message: OnMessage, on_connected: OnConn | None = None,
                 on_disconnected: OnConn | None = None,
                 generation: Callable[[], int] = lambda: 0) -> None:
        self.config = config
        self.topics = topics
        self.role = role
        self.holder = holder
        self.on_message = on_message
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.generation = generation
        self.client_id = f"qmpshadow-{topics.cluster}-{topics.vm}-{role}"
        self.conn: str | None = None
        self.connects = 0
        self.refused_messages = 0
        self.last_error: str = ""
        self._client: aiomqtt.Client | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._closing = False
        self._connected_once = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self.conn is not None

    def _status(self, conn: str, online: bool) -> Status:
        return Status(gen=self.generation(), time=time.time(), role=self.role, conn=conn,
                      online=online, holder=self.holder)

    def start(self) -> None:
        """Run :meth:`run` in a task (stopped by :meth:`close`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(),
                                                                name=f"mqtt {self.role}")

    async def wait_connected(self, timeout: float) -> bool:
        """Wait for the first successful connection; False after ``timeout``.

        Raises:
            BrokerError: the broker refused our credentials (see :meth:`run`).
        """
        waiter = asyncio.ensure_future(self._connected_once.wait())
        watch: set[asyncio.Future[object]] = {waiter}  # type: ignore[arg-type]
        if self._task is not None:
            watch.add(self._task)  # type: ignore[arg-type]
        try:
            await asyncio.wait(watch, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise exc
        return self._connected_once.is_set()

    async def run(self) -> None:
        """Stay connected until cancelled or :meth:`close`.

        Raises:
            BrokerError: the broker refused our credentials (or protocol) on the first
                attempt: a configuration error, not a network one.
        """
        delays = backoff_delays(self.config.backoff_min_s, self.config.backoff_max_s)
        while not self._closing:
            try:
                await self._session()
                delays = backoff_delays(self.config.backoff_min_s, self.config.backoff_max_s)
            except MqttConnectError as exc:
                self.last_error = str(exc)
                rc = getattr(exc.rc, "value", exc.rc)
                if self.connects == 0 and rc in (4, 5, 134, 135):
                    raise BrokerError(
                        f"broker {self.config.host}:{self.config.port} refused "
                        f"{self.config.username or 'anonymous'!s}: {exc}; expected valid "
                        "--mqtt-user / --mqtt-password-file for this broker") from None
                log.warning("broker refused the connection: %s", exc)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                log.info("broker connection lost or failed: %s", exc)
            if self._closing:
                return
            await asyncio.sleep(next(delays))

    async def _session(self) -> None:
        cfg = self.config
        conn = secrets.token_hex(6)
        will = aiomqtt.Will(self.topics.hb(self.role), encode(self._status(conn, False)),
                            qos=1, retain=True)
        client = aiomqtt.Client(cfg.host, cfg.port, username=cfg.username,
                                password=cfg.password, identifier=self.client_id,
                                will=will, keepalive=cfg.keepalive_s, clean_session=True,
                                timeout=cfg.connect_timeout_s)
        try:
            async with client:
                self._client = client
                await client.publish(self.topics.hb(self.role),
                                     encode(self._status(conn, True)), qos=1, retain=True)
                await client.subscribe(self.topics.all, qos=1)
                self.conn = conn
                self.connects += 1
                self._connected_once.set()
                log.info("connected to broker %s:%d as %s (connection %s)", cfg.host,
                         cfg.port, self.client_id, conn)
                if self.on_connected is not None:
                    self.on_connected(conn)
                async for message in client.messages:
                    self._dispatch(message)
        finally:
            was = self.conn
            self._client = None
            self.conn = None
            if was is not None and self.on_disconnected is not None:
                self.on_disconnected(was)

    def _dispatch(self, message: aiomqtt.Message) -> None:
        suffix = self.topics.suffix(str(message.topic))
        if suffix is None:
            return
        payload = message.payload
        if not isinstance(payload, (bytes, bytearray)):
            payload = str(payload).encode()
        try:
            msg = decode(payload, where=f"MQTT {suffix}")
        except MessageError as exc:
            self.refused_messages += 1
            if self.refused_messages <= 10 or self.refused_messages % 1000 == 0:
                log.warning("ignored a malformed cluster message: %s", exc)
            return
        self.on_message(suffix, msg, bool(message.retain))

    def publish(self, topic: str, msg: Message, *, qos: int = 0, retain: bool = False,
                timeout: float = 2.0) -> bool:
        """Queue ``msg``; False when not connected or (QoS 0) too many are pending."""
        client = self._client
        if client is None or self.conn is None:
            return False
        if qos == 0 and len(self._pending) >= MAX_PENDING:
            return False
        task = asyncio.get_running_loop().create_task(
            self._publish(client, topic, encode(msg), qos, retain, timeout))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int,
                       retain: bool, timeout: float) -> None:
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        except aiomqtt.MqttError as exc:
            log.debug("publish on %s failed: %s", topic, exc)

    async def publish_wait(self, topic: str, msg: Message, *, qos: int = 1,
                           retain: bool = False, timeout: float = 2.0) -> bool:
        """Publish and wait for the broker's acknowledgement (QoS 1); False on failure."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, encode(msg), qos=qos, retain=retain, timeout=timeout)
        except aiomqtt.MqttError as exc:
            log.info("publish on %s failed: %s", topic, exc)
            return False
        return True

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) for queued publishes."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)

    async def close(self, *, offline: bool = True) -> None:
        """Say ``online: false`` (retained) unless told not to, and disconnect."""
        self._closing = True
        client, conn = self._client, self.conn
        if client is not None and conn is not None and offline:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.topics.hb(self.role),
                                     encode(self._status(conn, False)), qos=1, retain=True,
                                     timeout=1.0)
        await self.flush()
        for task in list(self._pending):
            task.cancel()
        runner, self._task = self._task, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait({runner})
            if not runner.cancelled() and runner.exception() is not None:
                log.debug("broker task ended with %r", runner.exception())
