"""``replica-router dashboard``: a local web page with the topology and each replica's lag.

Give the nodes' DSNs (roles are measured, not taken from the order), or
``--sandbox [DIR]`` for a sandbox started with ``replica-router sandbox up``. The
page is served on 127.0.0.1:8089 until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from . import description

__all__ = ["register"]

DEFAULT_PORT = 8089


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535 (0: any free one), got {port}")
    return port


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="serve a local web page with the topology and each replica's lag over time",
        description=description(__doc__),
    )
    parser.add_argument("dsn", nargs="*", metavar="DSN", help="one DSN per node (any order)")
    parser.add_argument(
        "--sandbox",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="watch the sandbox in DIR (default: $REPLICA_ROUTER_SANDBOX_DIR or ./.sandbox)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT}; 0: a free one)"
    )
    parser.add_argument(
        "--max-lag", type=float, default=2.0, metavar="S", help="lag (s) a replica may have (2.0)"
    )
    parser.set_defaults(func=_run, _parser=parser)


def _run(args: argparse.Namespace) -> int:
    if bool(args.dsn) == (args.sandbox is not None):
        args._parser.error("give the nodes' DSNs or --sandbox [DIR], not both, not neither")
    if not args.max_lag > 0:
        args._parser.error(f"--max-lag: expected seconds > 0, got {args.max_lag}")
    try:
        nodes = _dsn_nodes(args.dsn) if args.dsn else _sandbox_dsns(args.sandbox)
        return _serve(nodes, args)
    except OSError as exc:  # the port is taken, the address is not ours...
        where = f"{args.host}:{args.port}"
        sys.stderr.write(f"replica-router dashboard: error: cannot listen on {where}: {exc}\n")
        return 1


def _dsn_nodes(dsns: list[str]) -> dict[str, str]:
    """Nodes named ``host:port``, as ``replica-router status`` names them."""
    from .status import node_specs

    return {spec.name: spec.dsn for spec in node_specs(dsns)}


def _sandbox_dsns(directory: str) -> dict[str, str]:
    """Node name -> DSN for a sandbox made by ``replica-router sandbox up``."""
    from ..sandbox import LocalCluster
    from .sandbox import DIR_ENV

    path = Path(directory or os.environ.get(DIR_ENV) or ".sandbox").absolute()
    sandbox = LocalCluster.attach(path)  # reads the state file; starts and stops nothing
    return {name: sandbox.dsn(name) for name in sandbox.node_names}


def _serve(nodes: dict[str, str], args: argparse.Namespace) -> int:
    from ..cluster import Cluster
    from ..dashboard import DashboardServer

    cluster = Cluster(nodes=nodes, max_lag=args.max_lag)
    dashboard = DashboardServer(cluster, host=args.host, port=args.port, max_lag=args.max_lag)
    with contextlib.suppress(KeyboardInterrupt), cluster, dashboard:
        print(f"dashboard on {dashboard.url} (Ctrl-C to stop)", flush=True)
        # a service manager's SIGTERM stops it as cleanly as Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            threading.Event().wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
