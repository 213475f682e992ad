"""Prometheus metrics for a :class:`~replica_router.Cluster` (extra ``prometheus``).

The core keeps its counters as plain ints and its node states in an immutable
snapshot; this module only *reads* them when Prometheus scrapes (a custom
collector), so the query path pays nothing for metrics. Label values are node
names (``primary``, ``replica1``...), never DSNs, so no password can leak into a
label.

Use one of::

    metrics.register(cluster)                  # into prometheus_client's default REGISTRY
    metrics.serve(cluster, port=9187)          # own /metrics server on 127.0.0.1

and, to mount into an ASGI app (FastAPI, Starlette)::

    from prometheus_client import make_asgi_app
    metrics.register(cluster)
    app.mount("/metrics", make_asgi_app())

``prometheus_client`` is imported only when one of these is called.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ._http import http_url, start_serving, stop_serving
from .topology import NodeStatus, Role

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "ClusterCollector",
    "MetricsServer",
    "Observable",
    "register",
    "serve",
    "unregister",
]

log = logging.getLogger("replica_router.metrics")

FALLBACK_REASONS = ("lag", "token", "none_healthy")
_ROLES = tuple(str(role) for role in Role)


class _Counters(Protocol):
    """What ``Cluster.counters()`` returns (a frozen snapshot of plain ints)."""

    @property
    def reads(self) -> Mapping[str, int]: ...
    @property
    def writes(self) -> Mapping[str, int]: ...
    @property
    def failovers(self) -> int: ...
    @property
    def fenced_events(self) -> int: ...
    @property
    def fallbacks(self) -> Mapping[str, int]: ...


class Observable(Protocol):
    """The part of a Cluster the collector reads (``Cluster`` and ``AsyncCluster`` fit)."""

    def status(self) -> Sequence[NodeStatus]: ...
    def counters(self) -> _Counters: ...


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "replica_router.metrics needs prometheus_client: "
            "pip install 'replica-router[prometheus]'"
        ) from exc
    return prometheus_client


class ClusterCollector:
    """A prometheus_client collector reading a cluster's status and counters per scrape."""

    def __init__(self, cluster: Observable) -> None:
        self._cluster = cluster
        self._core = _prometheus().metrics_core

    def describe(self) -> list[Any]:
        """The families we expose (empty of samples), so duplicate registration fails early."""
        return list(self._families([], None))

    def collect(self) -> Iterator[Any]:
        statuses = self._cluster.status()
        counters = self._cluster.counters()
        return self._families(statuses, counters)

    def _families(
        self, statuses: Sequence[NodeStatus], counters: _Counters | None
    ) -> Iterator[Any]:
        core = self._core
        gauge, counter = core.GaugeMetricFamily, core.CounterMetricFamily

        lag_s = gauge(
            "db_replication_lag_seconds",
            "Replication lag per replica in seconds (0 when it replayed all it received)",
            labels=["replica"],
        )
        lag_b = gauge(
            "db_replication_lag_bytes",
            "Replication lag per replica in bytes of WAL (primary's LSN - replica's replay LSN)",
            labels=["replica"],
        )
        healthy = gauge("db_node_healthy", "1 when the node answers its probes", labels=["node"])
        role = gauge(
            "db_node_role",
            "1 for the node's measured role (primary, replica, unknown)",
            labels=["node", "role"],
        )
        fenced = gauge(
            "db_node_fenced",
            "1 when the node claims primary on an older timeline (no reads, no writes)",
            labels=["node"],
        )
        timeline = gauge("db_node_timeline", "The node's WAL timeline", labels=["node"])
        latency = gauge(
            "db_node_probe_latency_seconds", "Smoothed probe round trip", labels=["node"]
        )
        replicas_healthy = gauge(
            "db_replicas_healthy",
            "Replicas that are healthy and not fenced (0: reads fall back to the primary)",
        )
        healthy_count = 0
        for node in statuses:
            name = node.name
            is_replica = node.role == Role.REPLICA.value
            if is_replica and node.lag_seconds is not None:
                lag_s.add_metric([name], node.lag_seconds)
            if is_replica and node.lag_bytes is not None:
                lag_b.add_metric([name], node.lag_bytes)
            healthy.add_metric([name], 1.0 if node.healthy else 0.0)
            for value in _ROLES:
                role.add_metric([name, value], 1.0 if node.role == value else 0.0)
            fenced.add_metric([name], 1.0 if node.fenced else 0.0)
            if node.timeline is not None:
                timeline.add_metric([name], node.timeline)
            if node.latency_ms is not None:
                latency.add_metric([name], node.latency_ms / 1000.0)
            if is_replica and node.healthy and not node.fenced:
                healthy_count += 1
        replicas_healthy.add_metric([], healthy_count)
        yield from (lag_s, lag_b, healthy, role, fenced, timeline, latency, replicas_healthy)

        reads = counter("db_read_route", "Reads routed, per target node", labels=["target"])
        writes = counter("db_write_route", "Writes routed, per target node", labels=["target"])
        failovers = counter("db_failover", "Failovers seen (the node taking writes changed)")
        fences = counter("db_fenced", "Times a node was fenced (two nodes claimed primary)")
        fallbacks = counter(
            "db_consistency_fallback",
            "Reads that could not use a replica, by reason (lag, token, none_healthy)",
            labels=["reason"],
        )
        if counters is not None:
            names = [node.name for node in statuses]
            for family, per_node in ((reads, counters.reads), (writes, counters.writes)):
                # every known node gets a series from the start, so rate() sees the first route
                for name in dict.fromkeys([*names, *per_node]):
                    family.add_metric([name], per_node.get(name, 0))
            failovers.add_metric([], counters.failovers)
            fences.add_metric([], counters.fenced_events)
            for reason in dict.fromkeys([*FALLBACK_REASONS, *counters.fallbacks]):
                fallbacks.add_metric([reason], counters.fallbacks.get(reason, 0))
        yield from (reads, writes, failovers, fences, fallbacks)


def register(cluster: Observable, registry: CollectorRegistry | None = None) -> ClusterCollector:
    """Expose ``cluster`` in ``registry`` (default: prometheus_client's global REGISTRY).

    One cluster per registry: a second registration of the same names raises
    ``ValueError`` (use a separate ``CollectorRegistry`` per cluster).
    """
    prometheus = _prometheus()
    collector = ClusterCollector(cluster)
    (registry if registry is not None else prometheus.REGISTRY).register(collector)
    return collector


def unregister(collector: ClusterCollector, registry: CollectorRegistry | None = None) -> None:
    """Remove a collector added by :func:`register` (e.g. before closing the cluster)."""
    prometheus = _prometheus()
    (registry if registry is not None else prometheus.REGISTRY).unregister(collector)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Scrapes every few seconds would flood stderr; failures still go to our logger."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


class MetricsServer:
    """A ``/metrics`` HTTP endpoint on a named daemon thread: ``open()`` ... ``close()``."""

    def __init__(self, cluster: Observable, *, port: int = 9187, addr: str = "127.0.0.1") -> None:
        prometheus = _prometheus()
        self.registry: CollectorRegistry = prometheus.CollectorRegistry()
        self.collector = register(cluster, self.registry)
        self._prometheus = prometheus
        self._address = (addr, port)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when created with ``port=0`` and open)."""
        return self._httpd.server_port if self._httpd else self._address[1]

    @property
    def url(self) -> str:
        return http_url(self._address[0], self.port, "/metrics")

    def open(self) -> None:
        """Bind the socket (``OSError`` if the port is taken) and serve on a daemon thread."""
        if self._httpd is not None:
            return
        addr, port = self._address
        self._httpd = make_server(
            addr,
            port,
            self._prometheus.make_wsgi_app(self.registry),
            server_class=_ThreadingWSGIServer6 if ":" in addr else _ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self._thread = start_serving(self._httpd, f"replica-router-metrics:{self.port}")
        log.info("serving metrics on %s", self.url)

    def close(self, timeout: float = 5.0) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None and thread is not None:
            stop_serving(httpd, thread, timeout)

    def __enter__(self) -> MetricsServer:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(cluster: Observable, port: int = 9187, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``cluster``'s metrics at ``http://addr:port/metrics`` until ``close()``.

    Like ``prometheus_client.start_http_server`` but bound to 127.0.0.1 by default,
    with its own registry (only this cluster's metrics) and a way to stop it.
    ``port=0`` picks a free port (read it back from ``.port``).
    """
    server = MetricsServer(cluster, port=port, addr=addr)
    server.open()
    return server
