"""asyncio QMP control of one QEMU over ``qemu.qmp.QMPClient``.

:class:`QmpControl` adds to qemu.qmp what the rest of qmpshadow relies on:

- ``connect`` retries until the socket answers (QEMU creates it some milliseconds after
  exec) and rolls back cleanly on failure or timeout;
- every failure is one of qmpshadow's errors: QEMU's error replies become
  :class:`~qmpshadow.errors.QmpCommandError` with QMP's error class, lost connections
  :class:`~qmpshadow.errors.QmpError`, deadlines :class:`~qmpshadow.errors.QmpTimeoutError`;
- events go to a bounded per-connection backlog started at connect (see
  :mod:`qmpshadow.qmp.events`), and waiters are woken with an error when QEMU goes away;
- typed helpers for the commands qmpshadow uses, returning plain Python values.

Commands may be issued concurrently from several tasks over one connection.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate, StateError

from qmpshadow.errors import QmpCommandError, QmpError, QmpTimeoutError
from qmpshadow.qmp.events import EventHub, EventPredicate, EventSubscription, QmpEvent
from qmpshadow.qmp.hmp import RamBlockInfo, parse_info_ramblock

log = logging.getLogger(__name__)

#: Default deadline of a QMP command, in seconds. Long-running commands (pmemsave of a
#: large guest, calc-dirty-rate) take their own larger defaults.
DEFAULT_TIMEOUT = 30.0

# Errors of connect(2) that mean "not there yet": QEMU has not created or not yet
# bound/listened on the socket.
_RETRY_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN})


@dataclass(frozen=True, slots=True)
class VmStatus:
    """Result of ``query-status``: QEMU's run state (e.g. "running", "paused",
    "inmigrate", "postmigrate") and whether vCPUs run."""

    status: str
    running: bool


class _State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSING = "closing"


class _Client(QMPClient):
    """QMPClient whose events go to our hub only.

    qemu.qmp's default ``events`` listener queues every event *and* keeps all of them in
    an ever-growing ``history`` list; over thousands of checkpoints (STOP, RESUME,
    MIGRATION per epoch) that is a leak, so dispatch is redirected (``_event_dispatch``
    is the hook qemu.qmp 0.0.6 routes every event through; re-check it when upgrading).
    """

    def __init__(self, name: str, hub: EventHub) -> None:
        super().__init__(name)
        self._hub = hub

    async def _event_dispatch(self, msg: Message) -> None:
        self._hub.publish(msg)


class QmpControl:
    """One QMP connection to one QEMU.

    Use ``await QmpControl.open(path)`` (or ``QmpControl()`` then :meth:`connect`), and
    :meth:`close` or ``async with``. A QMP unix socket serves one client at a time: while
    this object is connected, another client's connection to the same socket hangs
    until this one closes.
    """

    def __init__(self, name: str | None = None, *, event_backlog: int = 1024) -> None:
        self._name = name
        self._event_backlog = event_backlog
        self._state = _State.IDLE
        self._client: _Client | None = None
        self._hub: EventHub | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._watcher_disconnecting = False
        self._socket_path: str | None = None

    # ------------------------------------------------------------------ connection

    @classmethod
    async def open(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        retry_interval: float = 0.05,
        name: str | None = None,
    ) -> QmpControl:
        """Create and :meth:`connect` a control.

        Raises:
            QmpTimeoutError: the socket did not answer within ``timeout``.
            QmpError: the peer is not a QMP server or refused the session.
        """
        control = cls(name)
        await control.connect(socket_path, timeout=timeout, retry_interval=retry_interval)
        return control

    @property
    def socket_path(self) -> str | None:
        """Path of the socket of the current (or last) connection."""
        return self._socket_path

    @property
    def label(self) -> str:
        """How this connection is named in messages."""
        where = self._socket_path or "(not connected)"
        return f"QMP {self._name} at {where}" if self._name else f"QMP at {where}"

    @property
    def connected(self) -> bool:
        """True while the session is up (False after QEMU hung up, before close())."""
        return (
            self._state is _State.CONNECTED
            and self._client is not None
            and self._client.runstate is Runstate.RUNNING
        )

    @property
    def qemu_version(self) -> tuple[int, int, int]:
        """QEMU's (major, minor, micro) from the QMP greeting of this connection.

        Raises:
            QmpError: not connected, or the greeting carried no usable version.
        """
        greeting = self._require("read the greeting").greeting
        qemu = greeting.QMP.version.get("qemu") if greeting is not None else None
        if isinstance(qemu, Mapping):
            major, minor, micro = qemu.get("major"), qemu.get("minor"), qemu.get("micro")
            if isinstance(major, int) and isinstance(minor, int) and isinstance(micro, int):
                return major, minor, micro
        raise QmpError(
            f"{self.label}: expected a QMP greeting with version.qemu.major/minor/micro, "
            f"got {greeting!r}"
        )

    async def connect(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        retry_interval: float = 0.05,
    ) -> None:
        """Connect to a QMP unix socket, retrying until it answers, and negotiate.

        Retries while the socket does not exist or refuses (QEMU still starting) and when
        the peer hangs up before greeting. On any failure the object is back to idle
        with nothing left open.

        Raises:
            QmpTimeoutError: no session within ``timeout`` seconds (the message tells
                whether the socket was missing or connected without a greeting, i.e.
                held by another client).
            QmpError: already connected; or the peer is not a QMP server; or a non-retryable
                socket error (permissions, path too long).
        """
        if self._state is not _State.IDLE:
            raise QmpError(
                f"{self.label}: connect() called while {self._state.value}; expected an "
                "idle control. Call close() first or use another QmpControl"
            )
        path = os.fspath(socket_path)
        self._socket_path = path
        self._state = _State.CONNECTING
        hub = EventHub(self.label, backlog=self._event_backlog)
        client = _Client(self._name or os.path.basename(path), hub)
        last_error: BaseException | None = None
        phase = "waiting for the socket to exist"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    try:
                        try:
                            await loop.sock_connect(sock, path)
                        except OSError as err:
                            if err.errno not in _RETRY_ERRNOS:
                                raise QmpError(
                                    f"{self.label}: cannot connect: {err}; expected a QEMU "
                                    f"QMP unix socket (-qmp unix:{path},server=on)"
                                ) from err
                            last_error = err
                            phase = f"socket not answering ({err.strerror})"
                            sock.close()
                            await asyncio.sleep(retry_interval)
                            continue
                        phase = "connected, waiting for the QMP greeting"
                        # Handing qemu.qmp a connected socket keeps its connect-failure
                        # ERROR logs out of the (normal) retry loop above.
                        await client.connect(sock)
                    except ConnectError as err:
                        sock.close()
                        if isinstance(err.exc, EOFError | ConnectionResetError):
                            # QEMU accepted then hung up: it is exiting, or restarting
                            # its listener. Retry until the deadline.
                            last_error = err
                            phase = "peer hung up before the QMP greeting"
                            await asyncio.sleep(retry_interval)
                            continue
                        raise QmpError(
                            f"{self.label}: QMP session setup failed: {err}; expected a "
                            "QMP greeting and capabilities negotiation from QEMU"
                        ) from err
                    except BaseException:
                        sock.close()
                        raise
                    break
        except TimeoutError as err:
            self._reset()
            hint = ""
            if phase.startswith("connected"):
                hint = (
                    " A QMP socket serves one client at a time: another client probably "
                    "holds it; use the VM's second socket (qmp2.sock) or close the other "
                    "client."
                )
            raise QmpTimeoutError(
                f"{self.label}: no QMP session within {timeout}s ({phase}; last error: "
                f"{last_error!r}). Expected QEMU running with -qmp unix:{path},server=on."
                f"{hint}"
            ) from err
        except BaseException:
            self._reset()
            raise
        self._client = client
        self._hub = hub
        self._state = _State.CONNECTED
        self._watcher_disconnecting = False
        self._watcher = asyncio.create_task(self._watch(client, hub), name=f"{self.label} watch")

    def _reset(self) -> None:
        self._state = _State.IDLE
        self._client = None

    async def _watch(self, client: _Client, hub: EventHub) -> None:
        # The one place that notices QEMU hanging up: it wakes event waiters with an
        # error and completes qemu.qmp's disconnect so no task error goes unretrieved.
        while client.runstate is Runstate.RUNNING:
            await client.runstate_changed()
        self._watcher_disconnecting = True
        reason = "QEMU closed the QMP connection (it exited, was killed or quit)"
        try:
            await client.disconnect()
        except Exception as err:  # the peer's EOF/reset surfaces here; it is the reason
            reason += f": {type(err).__name__}: {err}" if str(err) else f": {type(err).__name__}"
        hub.close(reason, error=True)
        log.debug("%s: %s", self.label, reason)

    async def close(self) -> None:
        """Disconnect; idempotent, never raises (except on cancellation).

        Event waiters fail with :class:`~qmpshadow.errors.QmpError`; subscriptions end.
        """
        client, hub, watcher = self._client, self._hub, self._watcher
        if client is None or self._state is _State.CLOSING:
            return
        self._state = _State.CLOSING
        try:
            if hub is not None:
                hub.close("the connection was closed locally", error=False)
            if watcher is not None and not watcher.done():
                if not self._watcher_disconnecting:
                    watcher.cancel()
                # asyncio.wait rather than await: a cancelled watcher must not look like
                # our own cancellation.
                await asyncio.wait({watcher})
            if client.runstate is not Runstate.IDLE:
                try:
                    await client.disconnect()
                except Exception as err:
                    log.debug("%s: error while disconnecting: %r", self.label, err)
        finally:
            self._client = None
            self._watcher = None
            self._state = _State.IDLE

    async def __aenter__(self) -> QmpControl:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _require(self, what: str) -> _Client:
        client = self._client
        if client is None or self._state is not _State.CONNECTED:
            raise QmpError(
                f"{self.label}: cannot {what}: not connected; expected connect() first"
            )
        if client.runstate is not Runstate.RUNNING:
            raise QmpError(
                f"{self.label}: cannot {what}: QEMU closed the QMP connection (exited, "
                "killed or quit); check the process and its stderr log"
            )
        return client

    # ------------------------------------------------------------------ commands

    async def execute(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run a QMP command and return its ``return`` value (JSON types).

        Raises:
            QmpCommandError: QEMU answered with an error (``error_class``, ``desc``).
            QmpTimeoutError: no answer within ``timeout`` seconds (None: no limit). The
                command may still take effect; its late reply is dropped.
            QmpError: not connected, or the connection was lost before the reply (QMP
                cannot tell whether the command took effect).
        """
        client = self._require(f"execute {command!r}")
        try:
            async with asyncio.timeout(timeout):
                return await client.execute(command, dict(args) if args is not None else None)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, err.error.error.desc) from err
        except TimeoutError as err:
            raise QmpTimeoutError(
                f"{self.label}: QMP command {command!r} got no reply within {timeout}s; "
                "QEMU may be hung or busy (check its stderr log), or raise the timeout"
            ) from err
        except (ExecInterruptedError, StateError) as err:
            raise QmpError(
                f"{self.label}: connection lost before the reply to {command!r} ({err}); "
                "QEMU probably exited or was killed: check the process and its stderr log"
            ) from err
        except QMPError as err:
            raise QmpError(
                f"{self.label}: QMP protocol failure during {command!r}: "
                f"{type(err).__name__}: {err}"
            ) from err

    # ------------------------------------------------------------------ events

    def _require_hub(self, what: str) -> EventHub:
        if self._hub is None or self._state is _State.IDLE:
            raise QmpError(f"{self.label}: cannot {what}: not connected; call connect() first")
        return self._hub

    async def wait_event(
        self,
        name: str | None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        predicate: EventPredicate | None = None,
        since: int | None = None,
    ) -> QmpEvent:
        """Take the oldest not-yet-taken event ``name`` (None: any) received since
        connect that satisfies ``predicate`` (and has ``seq > since``), waiting for it
        if none has come yet. Use ``since=qmp.last_event_seq`` taken *before* issuing a
        command to ignore older events of the same name.

        Raises:
            QmpTimeoutError: no such event within ``timeout`` seconds.
            QmpError: not connected, or the connection closed before the event came.
        """
        hub = self._require_hub(f"wait for event {name}")
        return await hub.wait(name, timeout=timeout, predicate=predicate, since=since)

    @property
    def last_event_seq(self) -> int:
        """``seq`` of the newest event of this connection (0 if none or not connected)."""
        return self._hub.last_seq if self._hub is not None else 0

    def subscribe(
        self, names: str | Iterable[str] | None = None, *, maxsize: int = 4096
    ) -> EventSubscription:
        """Subscribe to events (all, or only ``names``) from now on; see
        :class:`~qmpshadow.qmp.events.EventSubscription`.

        Raises:
            QmpError: not connected.
        """
        hub = self._require_hub("subscribe to events")
        if isinstance(names, str):
            names = (names,)
        return hub.subscribe(names, maxsize)

    def clear_events(self) -> list[QmpEvent]:
        """Drop (and return) backlog events nobody has waited for."""
        return self._hub.clear() if self._hub is not None else []

    # ------------------------------------------------------------------ typed helpers

    async def query_status(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> VmStatus:
        """``query-status``.

        Raises:
            QmpError: as :meth:`execute`, or the reply lacks status/running.
        """
        ret = await self.execute("query-status", timeout=timeout)
        if (
            not isinstance(ret, Mapping)
            or not isinstance(ret.get("status"), str)
            or not isinstance(ret.get("running"), bool)
        ):
            raise QmpError(
                f"{self.label}: query-status: expected {{'status': str, 'running': bool}}, "
                f"got {ret!r}"
            )
        return VmStatus(status=ret["status"], running=ret["running"])

    async def stop(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """``stop`` (pause vCPUs; QEMU emits STOP before replying).

        Raises:
            QmpError: as :meth:`execute`.
        """
        await self.execute("stop", timeout=timeout)

    async def cont(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """``cont`` (resume vCPUs; QEMU emits RESUME).

        Raises:
            QmpCommandError: e.g. while ``inmigrate`` with no incoming migration done.
            QmpError: as :meth:`execute`.
        """
        await self.execute("cont", timeout=timeout)

    async def migrate_set_capabilities(
        self, capabilities: Mapping[str, bool], *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """``migrate-set-capabilities`` from ``{"x-ignore-shared": True, ...}``.

        Raises:
            QmpCommandError: unknown capability (GenericError) or not settable now.
            QmpError: as :meth:`execute`.
        """
        caps = [{"capability": k, "state": bool(v)} for k, v in capabilities.items()]
        await self.execute("migrate-set-capabilities", {"capabilities": caps}, timeout=timeout)

    async def migrate_set_parameters(
        self, *, timeout: float | None = DEFAULT_TIMEOUT, **params: Any
    ) -> None:
        """``migrate-set-parameters``; Python names map to QMP's (``x_checkpoint_delay``
        becomes ``x-checkpoint-delay``).

        Raises:
            QmpCommandError: unknown parameter or invalid value.
            QmpError: as :meth:`execute`.
        """
        args = {k.replace("_", "-"): v for k, v in params.items()}
        await self.execute("migrate-set-parameters", args, timeout=timeout)

    async def migrate(self, uri: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """``migrate`` to ``uri`` (e.g. ``unix:/path``); returns once started. Follow it
        with MIGRATION events or :meth:`query_migrate`.

        Raises:
            QmpCommandError: e.g. a migration is already running, or a blocker.
            QmpError: as :meth:`execute`.
        """
        await self.execute("migrate", {"uri": uri}, timeout=timeout)

    async def migrate_incoming(
        self, uri: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """``migrate-incoming`` (QEMU must have been started with ``-incoming defer``).

        Raises:
            QmpCommandError: not started with ``-incoming defer``, or already incoming.
            QmpError: as :meth:`execute`.
        """
        await self.execute("migrate-incoming", {"uri": uri}, timeout=timeout)

    async def query_migrate(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """``query-migrate`` as a dict (empty before any migration).

        Raises:
            QmpError: as :meth:`execute`.
        """
        return _as_dict(await self.execute("query-migrate", timeout=timeout))

    async def migrate_cancel(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """``migrate_cancel``.

        Raises:
            QmpError: as :meth:`execute`.
        """
        await self.execute("migrate_cancel", timeout=timeout)

    async def pmemsave(
        self,
        addr: int,
        size: int,
        path: str | os.PathLike[str],
        *,
        timeout: float | None = 300.0,
    ) -> None:
        """``pmemsave``: write ``size`` bytes of guest-physical memory at ``addr`` to
        ``path`` (made absolute here: QEMU opens it relative to *its* working directory).

        Raises:
            QmpCommandError: bad range or the file cannot be written by QEMU.
            QmpError: as :meth:`execute`.
        """
        filename = os.path.abspath(os.fspath(path))
        await self.execute(
            "pmemsave", {"val": addr, "size": size, "filename": filename}, timeout=timeout
        )

    async def block_dirty_bitmap_add(
        self,
        node: str,
        name: str,
        *,
        granularity: int | None = None,
        persistent: bool | None = None,
        disabled: bool | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """``block-dirty-bitmap-add``.

        Raises:
            QmpCommandError: unknown node, duplicate name, bad granularity.
            QmpError: as :meth:`execute`.
        """
        args: dict[str, Any] = {"node": node, "name": name}
        if granularity is not None:
            args["granularity"] = granularity
        if persistent is not None:
            args["persistent"] = persistent
        if disabled is not None:
            args["disabled"] = disabled
        await self.execute("block-dirty-bitmap-add", args, timeout=timeout)

    async def block_dirty_bitmap_remove(
        self, node: str, name: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """``block-dirty-bitmap-remove``.

        Raises:
            QmpCommandError: unknown node or bitmap.
            QmpError: as :meth:`execute`.
        """
        await self.execute("block-dirty-bitmap-remove", {"node": node, "name": name},
                           timeout=timeout)

    async def block_dirty_bitmap_clear(
        self, node: str, name: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """``block-dirty-bitmap-clear``.

        Raises:
            QmpCommandError: unknown node or bitmap.
            QmpError: as :meth:`execute`.
        """
        await self.execute("block-dirty-bitmap-clear", {"node": node, "name": name},
                           timeout=timeout)

    async def calc_dirty_rate(
        self,
        seconds: int,
        *,
        sample_pages: int | None = None,
        mode: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """``calc-dirty-rate`` over ``seconds``; poll :meth:`query_dirty_rate` for the
        result (status "measured").

        Raises:
            QmpCommandError: a measurement is already running, or bad mode.
            QmpError: as :meth:`execute`.
        """
        args: dict[str, Any] = {"calc-time": seconds}
        if sample_pages is not None:
            args["sample-pages"] = sample_pages
        if mode is not None:
            args["mode"] = mode
        await self.execute("calc-dirty-rate", args, timeout=timeout)

    async def query_dirty_rate(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """``query-dirty-rate`` as a dict (``status``, ``dirty-rate`` in MiB/s, ...).

        Raises:
            QmpError: as :meth:`execute`.
        """
        return _as_dict(await self.execute("query-dirty-rate", timeout=timeout))

    async def query_stats(
        self,
        target: str,
        *,
        providers: Sequence[Mapping[str, Any]] | None = None,
        vcpus: Sequence[str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """``query-stats`` for ``target`` ("vm", "vcpu", ...). On 7.2 only KVM provides
        statistics: under TCG the result is an empty list.

        Raises:
            QmpCommandError: bad target or provider.
            QmpError: as :meth:`execute`.
        """
        args: dict[str, Any] = {"target": target}
        if providers is not None:
            args["providers"] = [dict(p) for p in providers]
        if vcpus is not None:
            args["vcpus"] = list(vcpus)
        ret = await self.execute("query-stats", args, timeout=timeout)
        if not isinstance(ret, list):
            raise QmpError(f"{self.label}: query-stats: expected a list, got {ret!r}")
        return [_as_dict(r) for r in ret]

    async def human_monitor_command(
        self, command_line: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> str:
        """Run an HMP command and return its text output (CRLF line ends as QEMU sends).

        HMP errors are *not* QMP errors: an unknown or failing HMP command returns its
        error text as output.

        Raises:
            QmpError: as :meth:`execute`, or the reply is not a string.
        """
        ret = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        if not isinstance(ret, str):
            raise QmpError(
                f"{self.label}: human-monitor-command: expected a string, got {ret!r}"
            )
        return ret

    async def info_ramblock(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> list[RamBlockInfo]:
        """RAM blocks from HMP ``info ramblock`` (idstr, page size, offset, lengths).

        Raises:
            QmpError: as :meth:`execute`, or the output does not parse.
        """
        return parse_info_ramblock(await self.human_monitor_command("info ramblock",
                                                                    timeout=timeout))

    async def quit(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """``quit``: QEMU emits SHUTDOWN, replies and exits. A connection lost before the
        reply counts as success (QEMU was on its way out).

        Raises:
            QmpTimeoutError: no reply and no hang-up within ``timeout``.
            QmpError: not connected.
        """
        self._require("quit")
        try:
            await self.execute("quit", timeout=timeout)
        except (QmpCommandError, QmpTimeoutError):
            raise
        except QmpError as err:
            log.debug("%s: connection lost during quit (expected): %s", self.label, err)


def _as_dict(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise QmpError(f"QMP: expected a JSON object in the reply, got {value!r}")
    return dict(value)

