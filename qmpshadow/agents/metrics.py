"""Prometheus metrics of an agent (``--metrics HOST:PORT``).

Each agent gets its own registry and HTTP endpoint (prometheus-client's threaded server,
``/metrics``). Values that exist anyway (bytes on the link, committed epoch, generation,
heartbeat age) are read at scrape time through callables; the pause histogram and the
failover counter are fed from the agent's status events (:meth:`AgentMetrics.wrap`).

Series (every one labelled ``vm`` and ``role`` = source|shadow):

- ``qmpshadow_pause_seconds`` histogram: the primary's pause per checkpoint (source);
- ``qmpshadow_epoch_lag``: epochs captured (source) / begun (shadow) but not committed;
- ``qmpshadow_committed_epoch``: the latest epoch the shadow committed;
- ``qmpshadow_epochs_total``: epochs captured (source) / committed (shadow);
- ``qmpshadow_bytes_shipped_total`` (source) / ``qmpshadow_bytes_received_total``
  (shadow): bytes on the replication link, frame headers included;
- ``qmpshadow_failovers_total{kind}``: promotions (shadow) / handovers (source) by kind:
  ``switchover``, ``release`` (the primary died), ``timeout`` (lease expired), ``manual``;
- ``qmpshadow_heartbeat_age_seconds``: since the peer was last heard (source: the latest
  ack of a renewal; shadow: the latest renewal or frame); NaN before the first;
- ``qmpshadow_generation``: the fencing token this agent holds or knows.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import ConfigError

StatusFn = Callable[[dict[str, Any]], None]
Value = Callable[[], float | None]

PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_GAUGES = {
    "epoch_lag": "Epochs captured (source) or begun (shadow) but not yet committed",
    "committed_epoch": "Latest epoch the shadow committed",
    "heartbeat_age_seconds": "Seconds since the peer agent was last heard",
    "generation": "Fencing token (generation) this agent holds or knows",
    "epoch_ms": "Current epoch length chosen by the epoch policy (source)",
}
_COUNTERS = {
    "epochs": "Epochs captured (source) or committed (shadow)",
    "bytes_shipped": "Bytes sent to the shadow on the replication link",
    "bytes_received": "Bytes received from the source on the replication link",
}


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; port 0 picks a free one). Raises ConfigError."""
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and 0 <= int(port) < 65536:
        return host.strip("[]"), int(port)
    raise ConfigError(f"--metrics expects HOST:PORT (e.g. 127.0.0.1:9108), got {text!r}")


def failover_kind(reason: str) -> str:
    """Classify a promotion/handover reason."""
    r = reason.lower()
    if "switchover" in r:
        return "switchover"
    if "operator" in r or "manual" in r:
        return "manual"
    if "expired" in r:
        return "timeout"
    return "release"


class _Live(Collector):
    def __init__(self, owner: AgentMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        o = self.owner
        labels = ["vm", "role"]
        values = [o.vm, o.role]
        for name, doc in _GAUGES.items():
            fn = o.values.get(name)
            if fn is None:
                continue
            g = GaugeMetricFamily(f"qmpshadow_{name}", doc, labels=labels)
            v = _call(fn)
            g.add_metric(values, math.nan if v is None else float(v))
            yield g
        for name, doc in _COUNTERS.items():
            fn = o.values.get(name)
            if fn is None:
                continue
            c = CounterMetricFamily(f"qmpshadow_{name}", doc, labels=labels)
            v = _call(fn)
            c.add_metric(values, 0.0 if v is None else float(v))
            yield c


def _call(fn: Value) -> float | None:
    try:
        return fn()
    except Exception:  # a scrape must never take the agent down
        return None


class AgentMetrics:
    """The metrics of one agent; ``values`` maps the live series to callables (read in the
    HTTP server's thread: they must only read attributes)."""

    def __init__(self, role: str, vm: str, *, cluster: bool = False) -> None:
        self.role = role
        self.vm = vm
        self.cluster = cluster
        self.registry = CollectorRegistry()
        self.values: dict[str, Value] = {}
        self.pause = Histogram("qmpshadow_pause_seconds", "Primary pause per checkpoint",
                               ["vm", "role"], buckets=PAUSE_BUCKETS,
                               registry=self.registry).labels(vm, role)
        self._failovers = Counter("qmpshadow_failovers", "Promotions (shadow) or handovers "
                                  "(source), by kind", ["vm", "role", "kind"],
                                  registry=self.registry)
        for kind in ("switchover", "release", "timeout", "manual"):
            self._failovers.labels(vm, role, kind)  # exported as 0 from the start
        self.registry.register(_Live(self))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def failover(self, kind: str) -> None:
        self._failovers.labels(self.vm, self.role, kind).inc()

    def observe(self, doc: dict[str, Any]) -> None:
        """Feed one status event of the agent."""
        ev = doc.get("event")
        if ev == "epoch" and self.role == "source":
            pause = doc.get("pause_ms")
            if isinstance(pause, (int, float)):
                self.pause.observe(pause / 1000)
        elif ev == "failover" and self.role == "shadow":
            self.failover(failover_kind(str(doc.get("reason", ""))))
        elif ev == "promoted" and self.role == "shadow" and not self.cluster:
            self.failover("manual")  # without a cluster only the operator promotes
        elif ev == "released" and self.role == "source":
            self.failover("release")
        elif ev == "switchover" and self.role == "source":
            self.failover("switchover")

    def wrap(self, status: StatusFn) -> StatusFn:
        """``status`` that also feeds :meth:`observe`."""
        def both(doc: dict[str, Any]) -> None:
            self.observe(doc)
            status(doc)
        return both

    def serve(self, address: str) -> tuple[str, int]:
        """Start the endpoint; returns the bound (host, port). Raises ConfigError."""
        host, port = parse_address(address)
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}: {exc}") from None
        bound = self._server.server_address
        self.address = (host, int(bound[1]))
        return self.address

    def close(self) -> None:
        """Stop the endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
