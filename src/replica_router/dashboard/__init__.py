"""A small local web page showing a cluster's topology and each replica's lag over time.

The page (``index.html``, no external resources) polls ``/api/status`` about once
a second and draws the chart itself. The server samples every replica's lag once
a second into a bounded history, so a page opened (or reloaded) late still shows
the last minutes. The server is the standard library's ``ThreadingHTTPServer`` on
named daemon threads, bound to 127.0.0.1 by default: it shows node names,
addresses and lag, never a DSN or a password.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .._http import http_url, start_serving, stop_serving
from ..metrics import Observable
from ..topology import NodeStatus, Role, Topology

__all__ = ["DashboardServer", "LagHistory", "status_payload"]

log = logging.getLogger("replica_router.dashboard")


class Watched(Observable, Protocol):
    """What the dashboard reads from a ``Cluster``: status, counters and the topology."""

    @property
    def topology(self) -> Topology: ...


HISTORY_SECONDS = 300
SAMPLE_INTERVAL = 1.0


class LagHistory:
    """Each replica's lag, one sample per ``record`` call, the last ``size`` kept.

    A sample is ``{"t": unix time, "lag": {replica: [seconds, bytes]}}``; both are
    null while the replica is unhealthy, so the chart shows a gap, not a stale value.
    """

    def __init__(self, size: int = HISTORY_SECONDS) -> None:
        self._samples: deque[dict[str, Any]] = deque(maxlen=size)

    def record(self, statuses: Sequence[NodeStatus], now: float) -> None:
        lag = {
            node.name: [node.lag_seconds, node.lag_bytes] if node.healthy else [None, None]
            for node in statuses
            if node.role == Role.REPLICA.value
        }
        self._samples.append({"t": now, "lag": lag})  # deque.append is atomic: no lock

    def since(self, t: float) -> list[dict[str, Any]]:
        return [sample for sample in tuple(self._samples) if sample["t"] > t]


def status_payload(
    cluster: Watched,
    *,
    max_lag: float | None = None,
    history: LagHistory | None = None,
    since: float = 0.0,
) -> dict[str, Any]:
    """The JSON document behind ``/api/status`` (display-safe: no DSN, no password).

    ``history`` samples newer than ``since`` are included, so the page asks only
    for what it has not seen yet.
    """
    counters = cluster.counters()
    return {
        "taken_at": time.time(),
        "primary": cluster.topology.primary,
        "max_lag": max_lag,
        "history": history.since(since) if history is not None else [],
        "nodes": [node.as_dict() for node in cluster.status()],
        "counters": {
            "reads": dict(counters.reads),
            "writes": dict(counters.writes),
            "failovers": counters.failovers,
            "fenced_events": counters.fenced_events,
            "fallbacks": dict(counters.fallbacks),
        },
    }


def _page() -> bytes:
    return resources.files(__package__).joinpath("index.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.server.page)
        elif url.path == "/api/status":
            try:
                since = float(parse_qs(url.query).get("since", ["0"])[0])
            except ValueError:
                self._send(HTTPStatus.BAD_REQUEST, "text/plain", b"since: expected a number\n")
                return
            server = self.server
            try:
                payload = status_payload(
                    server.cluster, max_lag=server.max_lag, history=server.history, since=since
                )
            except Exception as exc:
                log.exception("dashboard: reading the cluster's status failed")
                body = json.dumps({"error": type(exc).__name__}).encode()
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", body)
                return
            self._send(HTTPStatus.OK, "application/json", json.dumps(payload).encode())
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard http: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], cluster: Watched, max_lag: float | None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.cluster = cluster
        self.max_lag = max_lag
        self.history = LagHistory()
        self.page = _page()


class DashboardServer:
    """Serves the dashboard for ``cluster`` until ``close()`` (or the ``with`` block ends).

    ``port=0`` picks a free port; read the real one from ``.port`` / ``.url``.
    ``max_lag`` (seconds) draws the routing threshold on the chart.
    """

    def __init__(
        self,
        cluster: Watched,
        *,
        host: str = "127.0.0.1",
        port: int = 8089,
        max_lag: float | None = None,
    ) -> None:
        self._cluster = cluster
        self._address = (host, port)
        self._max_lag = max_lag
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._sampler: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._address[1]

    @property
    def url(self) -> str:
        return http_url(self._address[0], self.port, "/")

    def open(self) -> None:
        """Bind the socket and start serving on a daemon thread (OSError if the port is taken)."""
        if self._httpd is not None:
            return
        httpd = self._httpd = _Server(self._address, self._cluster, self._max_lag)
        self._stopping.clear()
        self._sampler = threading.Thread(
            target=self._sample,
            args=(httpd.history,),
            name=f"replica-router-dashboard-sampler:{self.port}",
            daemon=True,
        )
        self._sampler.start()
        self._thread = start_serving(httpd, f"replica-router-dashboard:{self.port}")
        log.info("dashboard on %s", self.url)

    def _sample(self, history: LagHistory) -> None:
        """Record every replica's lag once a second until ``close()``."""
        while True:
            try:
                history.record(self._cluster.status(), time.time())
            except Exception:
                log.exception("dashboard: sampling the cluster's lag failed")
            if self._stopping.wait(SAMPLE_INTERVAL):
                return

    def close(self, timeout: float = 5.0) -> None:
        httpd, thread, sampler = self._httpd, self._thread, self._sampler
        self._httpd = self._thread = self._sampler = None
        if httpd is None or thread is None or sampler is None:
            return
        self._stopping.set()
        stop_serving(httpd, thread, timeout)
        sampler.join(timeout)

    def __enter__(self) -> DashboardServer:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
