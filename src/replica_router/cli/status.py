"""``replica-router status DSN...``: roles, health and lag of a real deployment.

Each DSN (or libpq multi-host URL) is probed with the same query the router's
monitor uses; roles are measured, not assumed from the order given. Nodes are
named ``host:port``; passwords never appear. An unreachable node is shown with
the first line of its (redacted) error; ``--json`` has all of it. Exit code 0
when at least one node answered, 1 when none did, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from ..cluster import node_status
from ..dsn import parse_dsn, split_hosts
from ..events import EventBus
from ..monitor import Monitor
from ..topology import NodeSpec, NodeStatus, Topology
from . import description, seconds_between
from ._tables import node_table, with_errors

__all__ = [
    "console_for_output",
    "node_specs",
    "quiet_library_logs",
    "register",
    "render_status",
    "render_table",
    "statuses",
]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show role, health and lag of each node",
        description=description(__doc__),
    )
    parser.add_argument("dsns", nargs="+", metavar="DSN", help="node DSNs or a multi-host URL")
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=seconds_between(0.1, 3600),
        default=1.0,
        metavar="S",
        help="refresh every S seconds",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_status)


def node_specs(dsns: Sequence[str]) -> list[NodeSpec]:
    """One spec per host, named ``host:port``; ``ConfigurationError`` names the argument."""
    specs: list[NodeSpec] = []
    seen: set[str] = set()
    for i, dsn in enumerate(dsns):
        for j, one in enumerate(split_hosts(dsn, field=f"DSN {i + 1}")):
            info = parse_dsn(one, field=f"DSN {i + 1}" + (f" host {j + 1}" if j else ""))
            if info.address not in seen:
                seen.add(info.address)
                specs.append(NodeSpec(info.address, one, info))
    return specs


def statuses(specs: Sequence[NodeSpec], topology: Topology) -> list[NodeStatus]:
    """Status rows for ``specs`` from a monitor snapshot (errors are already redacted)."""
    rows = []
    for spec in specs:
        state = topology.by_name.get(spec.name)
        rows.append(node_status(spec, state, error=state.last_error if state else None))
    return rows


def _first_line(error: str | None) -> str:
    if not error:
        return ""
    line = error.strip().splitlines()[0]
    return line.removeprefix("OperationalError: ").removeprefix("connection failed: ")


def console_for_output() -> Console:
    """Rich's console; wide enough for the table when writing to a file or CI log,
    unless ``COLUMNS`` says how wide."""
    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(width=160)


def quiet_library_logs() -> None:
    """The table shows node failures; don't also print them as stray log warnings."""
    for name in ("replica_router", "psycopg"):
        logging.getLogger(name).addHandler(logging.NullHandler())


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(
    rows: Sequence[NodeStatus], *, traffic: bool = False, title: str | None = None
) -> Table:
    """The status table the ``status`` and ``demo`` commands show (errors: see
    :func:`render_status`)."""
    headers = ["node", "role", "ok", "lag s", "lag bytes", "replay LSN", "TL"]
    headers += ["reads", "writes", "in use"] if traffic else ["latency ms"]
    right = {"lag s", "lag bytes", "replay LSN", "TL", "reads", "writes", "in use", "latency ms"}
    table = node_table(title, headers, right=right)
    for row in rows:
        role = "fenced" if row.fenced else row.role
        role_style = {"primary": "cyan", "replica": "green", "fenced": "red"}.get(role, "yellow")
        cells = [
            row.name,
            f"[{role_style}]{role}[/]",
            "[green]yes[/]" if row.healthy else "[red]no[/]",
            _number(row.lag_seconds, 2),
            "-" if row.lag_bytes is None else f"{row.lag_bytes:,}",
            row.replay_lsn or "-",
            "-" if row.timeline is None else str(row.timeline),
        ]
        if traffic:
            cells += [f"{row.reads:,}", f"{row.writes:,}", str(row.in_use)]
        else:
            cells.append(_number(row.latency_ms, 1))
        table.add_row(*cells)
    return table


def render_status(rows: Sequence[NodeStatus]) -> RenderableType:
    """The ``status`` table, each failing node's error below it."""
    errors = [(r.name, _first_line(r.last_error)) for r in rows if r.last_error]
    return with_errors(render_table(rows), errors)


def _status(args: argparse.Namespace) -> int:
    specs = node_specs(args.dsns)
    quiet_library_logs()
    monitor = Monitor(
        specs, interval=args.interval, events=EventBus(), name="replica-router-status"
    )
    console = console_for_output()
    try:
        topology = monitor.refresh()
        if not args.watch:
            rows = statuses(specs, topology)
            _show(console, rows, as_json=args.json)
            return 0 if any(r.healthy for r in rows) else 1
        monitor.start()
        return _watch(console, monitor, specs, args)
    except KeyboardInterrupt:
        return 0
    finally:
        monitor.stop()


def _show(console: Console, rows: Sequence[NodeStatus], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.as_dict() for r in rows]), flush=True)
    else:
        console.print(render_status(rows))


def _watch(
    console: Console, monitor: Monitor, specs: Sequence[NodeSpec], args: argparse.Namespace
) -> int:
    """Refresh until Ctrl-C. JSON: one line per refresh (for jq); not a terminal: one
    table per refresh (a log keeps the history); a terminal: one table, redrawn."""
    if args.json or not console.is_terminal:
        while True:
            _show(console, statuses(specs, monitor.topology), as_json=args.json)
            time.sleep(args.interval)
    with Live(render_status(statuses(specs, monitor.topology)), console=console) as live:
        while True:
            time.sleep(args.interval)
            live.update(render_status(statuses(specs, monitor.topology)))
