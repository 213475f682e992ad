"""``replica-router sandbox``: a local primary + replicas that outlive the command.

``up`` starts a :class:`~replica_router.sandbox.LocalCluster` in a directory
(``--dir``, ``$REPLICA_ROUTER_SANDBOX_DIR`` or ``./.sandbox``) and leaves it
running; the state file there lets the other sub-commands, run from any shell,
find and operate it until ``down`` removes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import description

__all__ = ["register"]

DIR_ENV = "REPLICA_ROUTER_SANDBOX_DIR"
_DEFAULT_DIR = ".sandbox"


def _default_dir() -> str:
    return os.environ.get(DIR_ENV) or _DEFAULT_DIR


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        default=None,
        metavar="D",
        help=f"sandbox directory (default: ${DIR_ENV} or ./{_DEFAULT_DIR})",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = subparsers.add_parser(
        "sandbox",
        help="run a local primary + streaming replicas",
        description=description(__doc__),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    up = actions.add_parser("up", parents=[common], help="start a sandbox and leave it running")
    up.add_argument("--replicas", type=_non_negative_int, default=2, metavar="N")
    up.add_argument("--sync", action="store_true", help="replicas are synchronous standbys")
    up.add_argument(
        "--synchronous-commit",
        default="on",
        choices=("on", "remote_apply", "remote_write", "local", "off"),
    )
    up.add_argument(
        "--bindir",
        default=None,
        metavar="B",
        help="PostgreSQL server programs to run (default: $PG_BINDIR, the system's, the wheel's)",
    )
    up.add_argument(
        "--pgbouncer",
        default=None,
        choices=("transaction", "session"),
        help="a PgBouncer in front of every node, in this pool mode",
    )
    up.set_defaults(func=_up)

    status = actions.add_parser("status", parents=[common], help="show the nodes and their lag")
    status.set_defaults(func=_status)

    lag = actions.add_parser("lag", parents=[common], help="pause, resume or delay replay")
    lag.add_argument("node")
    how = lag.add_mutually_exclusive_group(required=True)
    how.add_argument("--pause", action="store_true", help="stop applying WAL")
    how.add_argument("--resume", action="store_true", help="apply WAL again")
    how.add_argument("--delay", type=_seconds, metavar="S", help="apply each commit S s late")
    lag.set_defaults(func=_lag)

    for name, func, text in (
        ("kill", _kill, "stop a node at once (immediate shutdown)"),
        ("start", _start, "start a stopped node"),
        ("promote", _promote, "promote a replica and re-point the others"),
        ("rejoin", _rejoin, "bring a node back as a replica of the primary (pg_rewind)"),
    ):
        sub = actions.add_parser(name, parents=[common], help=text)
        sub.add_argument("node")
        sub.set_defaults(func=func)

    down = actions.add_parser("down", parents=[common], help="stop the sandbox, delete its files")
    down.set_defaults(func=_down)


# -- commands ----------------------------------------------------------------------


def _directory(args: argparse.Namespace) -> Path:
    return Path(args.dir or _default_dir()).absolute()


def _up(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster

    started = time.monotonic()
    cluster = LocalCluster(
        replicas=args.replicas,
        sync=args.sync,
        synchronous_commit=args.synchronous_commit,
        base_dir=_directory(args),
        bindir=args.bindir,
        pgbouncer=args.pgbouncer,
    ).open()
    try:
        seconds = time.monotonic() - started
        report = _describe(cluster)
        report["startup_seconds"] = round(seconds, 3)
        cluster.detach()
    except BaseException:
        cluster.close()
        raise
    if args.json:
        _print_json(report)
    else:
        _print_up(report)
    return 0


def _status(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster

    report = _describe(LocalCluster.attach(_directory(args)))
    if args.json:
        _print_json(report)
    else:
        _print_nodes(report)
    return 0


def _lag(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster

    cluster = LocalCluster.attach(_directory(args))
    if args.pause:
        cluster.pause_replay(args.node)
        done = f"replay paused on {args.node}"
    elif args.resume:
        cluster.resume_replay(args.node)
        done = f"replay resumed on {args.node}"
    else:
        cluster.set_apply_delay(args.node, args.delay)
        done = f"{args.node} applies commits {args.delay:g} s late"
    return _done(args, done, cluster)


def _kill(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster

    cluster = LocalCluster.attach(_directory(args))
    if not cluster.is_running(args.node):
        return _done(args, f"{args.node} was not running", cluster)
    cluster.stop(args.node, mode="immediate")
    return _done(args, f"{args.node} stopped (immediate)", cluster)


def _start(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster

    cluster = LocalCluster.attach(_directory(args))
    if cluster.is_running(args.node):
        return _done(args, f"{args.node} was already running", cluster)
    cluster.start(args.node)
    return _done(args, f"{args.node} started", cluster)


def _promote(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster

    cluster = LocalCluster.attach(_directory(args))
    cluster.promote(args.node)
    return _done(args, f"{args.node} promoted; the other replicas follow it", cluster)


def _rejoin(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster

    cluster = LocalCluster.attach(_directory(args))
    cluster.rejoin(args.node)
    return _done(args, f"{args.node} rejoined as a replica of {cluster.primary_name}", cluster)


def _down(args: argparse.Namespace) -> int:
    from ..sandbox import LocalCluster
    from ..sandbox._state import STATE_FILE, reap_orphans

    directory = _directory(args)
    reaped = [str(p) for p in reap_orphans()]
    if not (directory / STATE_FILE).exists():
        message = f"no sandbox in {directory}"
    else:
        LocalCluster.attach(directory).close()
        message = f"sandbox in {directory} stopped and removed"
    if args.json:
        _print_json({"directory": str(directory), "message": message, "reaped": reaped})
    else:
        _console().print(message)
    return 0


# -- output ------------------------------------------------------------------------


def _describe(cluster: Any) -> dict[str, Any]:
    """What the nodes are and how they are doing, measured now (never the password)."""
    from ..dsn import redact

    primary = cluster.primary_name
    primary_lsn = None
    if cluster.is_running(primary):
        primary_lsn = cluster.execute(primary, "SELECT pg_current_wal_lsn()::text")[0][0]
    nodes = []
    for name in cluster.node_names:
        node: dict[str, Any] = {
            "name": name,
            "port": cluster.port(name),
            "dsn": redact(cluster.dsn(name)),
            "running": cluster.is_running(name),
            "configured_as": "replica" if name in cluster.replica_names else "primary",
            "role": None,
            "replay_lsn": None,
            "lag_bytes": None,
            "replay_paused": None,
            "apply_delay": None,
            "streaming_from": None,
        }
        if node["running"]:
            _measure(cluster, name, primary_lsn, node)
        nodes.append(node)
    return {
        "directory": str(cluster.directory),
        "postgresql": {
            "version": cluster.server_version,
            "bindir": str(cluster.bindir),
            "description": cluster.postgres_description,
        },
        "primary": primary,
        "primary_dsn": redact(cluster.primary_dsn),
        "replica_dsns": [redact(d) for d in cluster.replica_dsns],
        "system_identifier": cluster.system_identifier,
        "nodes": nodes,
    }


def _measure(cluster: Any, name: str, primary_lsn: str | None, node: dict[str, Any]) -> None:
    import psycopg

    try:
        (row,) = cluster.execute(
            name,
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text,"
            " current_setting('recovery_min_apply_delay'),"
            " CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END,"
            " %s::pg_lsn - pg_last_wal_replay_lsn(),"
            " (SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            (primary_lsn,),
        )
    except psycopg.Error as exc:
        node["error"] = str(exc).strip().splitlines()[0]
        return
    in_recovery, replay_lsn, delay, paused, lag, sender_port = row
    node["role"] = "replica" if in_recovery else "primary"
    if in_recovery:
        by_port = {cluster.port(n): n for n in cluster.node_names}
        node["streaming_from"] = by_port.get(sender_port)
        node["replay_lsn"] = replay_lsn
        node["replay_paused"] = bool(paused)
        node["apply_delay"] = delay
        node["lag_bytes"] = None if lag is None else max(0, int(lag))


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _print_nodes(report: dict[str, Any]) -> None:
    from ._tables import node_table, with_errors

    columns = ("node", "port", "state", "role", "streams from", "replay LSN", "lag bytes", "replay")
    whole = {"port", "replay LSN", "lag bytes"}
    table = node_table(f"sandbox {report['directory']}", columns, whole=whole)
    for node in report["nodes"]:
        if not node["running"]:
            state = "[red]stopped[/red]"
        elif "error" in node:
            state = "[red]error[/red]"
        else:
            state = "[green]running[/green]"
        replay = ""
        if node["replay_paused"]:
            replay = "[yellow]paused[/yellow]"
        elif node["apply_delay"] not in (None, "0"):
            replay = f"delay {node['apply_delay']}"
        table.add_row(
            node["name"],
            str(node["port"]),
            state,
            node["role"] or node["configured_as"],
            node["streaming_from"] or "",
            node["replay_lsn"] or "",
            "" if node["lag_bytes"] is None else str(node["lag_bytes"]),
            replay,
        )
    console = _console()
    errors = [(node["name"], node["error"]) for node in report["nodes"] if "error" in node]
    console.print(with_errors(table, errors), soft_wrap=False)
    for node in report["nodes"]:
        console.print(f"{node['name']:<10} {node['dsn']}")


def _print_up(report: dict[str, Any]) -> None:
    console = _console()
    _print_nodes(report)
    console.print(f"running {report['postgresql']['description']}")
    console.print(f"ready in {report['startup_seconds']:.2f} s; the servers keep running.")
    console.print(f"export DATABASE_URL='{report['primary_dsn']}'")
    console.print(f"export DATABASE_REPLICA_URLS='{','.join(report['replica_dsns'])}'")
    console.print(
        "stop it with: replica-router sandbox down" + _dir_hint(report["directory"]),
    )


def _dir_hint(directory: str) -> str:
    return "" if Path(_default_dir()).absolute() == Path(directory) else f" --dir {directory}"


def _done(args: argparse.Namespace, message: str, cluster: Any) -> int:
    if args.json:
        report = _describe(cluster)
        report["message"] = message
        _print_json(report)
    else:
        _console().print(message)
    return 0
