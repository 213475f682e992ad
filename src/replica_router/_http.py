"""What the ``/metrics`` endpoint and the dashboard share: serving on a daemon thread.

Both are small standard-library HTTP servers bound to a local address; each runs
``serve_forever`` on a named daemon thread and stops with an explicit shutdown,
a bounded join and the socket closed.
"""

from __future__ import annotations

import threading
from socketserver import BaseServer

__all__ = ["http_url", "start_serving", "stop_serving"]


def http_url(host: str, port: int, path: str) -> str:
    """``http://host:port/path``, an IPv6 address in brackets."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def start_serving(httpd: BaseServer, name: str) -> threading.Thread:
    """Run ``httpd.serve_forever`` on a daemon thread called ``name``."""
    thread = threading.Thread(target=httpd.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def stop_serving(httpd: BaseServer, thread: threading.Thread, timeout: float) -> None:
    """Stop serving, wait for the thread up to ``timeout`` seconds, release the socket."""
    httpd.shutdown()
    thread.join(timeout)
    httpd.server_close()
