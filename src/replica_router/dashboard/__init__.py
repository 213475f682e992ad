"""A small local web page showing a cluster's topology and each replica's lag over time.

The page (``index.html``, no external resources) polls ``/api/status`` about once
a second and draws the chart itself. The server is the standard library's
``ThreadingHTTPServer`` on a named daemon thread, bound to 127.0.0.1 by default:
it shows node names, addresses and lag, never a DSN or a password.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Any, Protocol

from ..metrics import Observable
from ..topology import Topology

__all__ = ["DashboardServer", "status_payload"]

log = logging.getLogger("replica_router.dashboard")


class Watched(Observable, Protocol):
    """What the dashboard reads from a ``Cluster``: status, counters and the topology."""

    @property
    def topology(self) -> Topology: ...


def status_payload(cluster: Watched, *, max_lag: float | None = None) -> dict[str, Any]:
    """The JSON document behind ``/api/status`` (display-safe: no DSN, no password)."""
    counters = cluster.counters()
    return {
        "taken_at": time.time(),
        "primary": cluster.topology.primary,
        "max_lag": max_lag,
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
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.server.page)
        elif path == "/api/status":
            try:
                payload = status_payload(self.server.cluster, max_lag=self.server.max_lag)
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

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._address[1]

    @property
    def url(self) -> str:
        host = self._address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def open(self) -> None:
        """Bind the socket and start serving on a daemon thread (OSError if the port is taken)."""
        if self._httpd is not None:
            return
        self._httpd = _Server(self._address, self._cluster, self._max_lag)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            name=f"replica-router-dashboard:{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("dashboard on %s", self.url)

    def close(self, timeout: float = 5.0) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None or thread is None:
            return
        httpd.shutdown()
        thread.join(timeout)
        httpd.server_close()

    def __enter__(self) -> DashboardServer:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
