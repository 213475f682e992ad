"""What the node monitor costs: probes/s per node, server queries/s, CPU share.

On a LocalCluster(replicas=2) the Monitor runs at the default interval (0.5 s)
for ``--seconds``; the process does nothing else meanwhile, so the process CPU
time over the window is the monitor's (its loop thread plus the short-lived
per-node probe threads). Server queries are counted on every node from its
log, with ``log_statement = 'all'`` set for the sandbox's role (the statistics
views flush a long-lived session's counters too lazily for a 10 s window).

Baselines, same run, same interval: seed 004's monitor loop (one thread, nodes
one after another, a reused connection per node, its naive lag query), and the
same loop opening a new connection for every check (what many hand-rolled
health checks do).

    .venv/bin/python benchmarks/monitor_cost.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

from replica_router.dsn import parse_dsn
from replica_router.events import EventBus
from replica_router.monitor import Monitor
from replica_router.sandbox import LocalCluster
from replica_router.topology import NodeSpec, Role

INTERVAL = 0.5
SEED_LAG_SQL = "SELECT EXTRACT(EPOCH FROM (now() - pg_last_xact_replay_timestamp())) AS lag_seconds"
# With log_statement = 'all' the server logs each simple-protocol statement and
# each extended-protocol execute once.
_STATEMENT_LINE = re.compile(rb"LOG:  (?:statement|execute [^:]*): ")


@dataclass
class Result:
    label: str
    seconds: float
    checks_per_node: float  # probes (or checks) per second per node
    queries_per_node: float  # server transactions per second per node
    cpu_percent: float  # process CPU time / wall time (one core = 100%)
    loop_thread_percent: float | None  # the loop thread alone, where measurable


def log_offsets(lc: LocalCluster) -> dict[str, int]:
    return {name: os.path.getsize(lc.log_path(name)) for name in lc.node_names}


def statements_logged(lc: LocalCluster, since: dict[str, int]) -> int:
    """Statements the servers logged (log_statement = 'all') after ``since``."""
    total = 0
    for name in lc.node_names:
        with open(lc.log_path(name), "rb") as f:
            f.seek(since[name])
            total += len(_STATEMENT_LINE.findall(f.read()))
    return total


def thread_cpu_seconds(ident: int) -> float:
    """CPU time of one thread of this process (ns resolution, Linux)."""
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def measure(
    lc: LocalCluster,
    label: str,
    seconds: float,
    run: Callable[[], tuple[Callable[[], int], Callable[[], None], int | None]],
) -> Result:
    """``run()`` starts the workload and returns (checks so far, stop, loop thread id).

    The window starts once the workload is past its start-up (connections).
    """
    checks, stop, loop_tid = run()
    try:
        time.sleep(1.0)  # past start-up
        offsets, wall_before = log_offsets(lc), time.monotonic()
        cpu_before, checks_before = time.process_time(), checks()
        thread_before = thread_cpu_seconds(loop_tid) if loop_tid else 0.0
        time.sleep(seconds)
        cpu = time.process_time() - cpu_before
        thread_cpu = thread_cpu_seconds(loop_tid) - thread_before if loop_tid else None
        done = checks() - checks_before
        queries, wall = statements_logged(lc, offsets), time.monotonic() - wall_before
    finally:
        stop()
    nodes = len(lc.node_names)
    return Result(
        label=label,
        seconds=wall,
        checks_per_node=done / nodes / wall,
        queries_per_node=queries / nodes / wall,
        cpu_percent=100.0 * cpu / wall,
        loop_thread_percent=None if thread_cpu is None else 100.0 * thread_cpu / wall,
    )


def run_monitor(lc: LocalCluster) -> tuple[Callable[[], int], Callable[[], None], int | None]:
    specs = [
        NodeSpec(
            name=n,
            dsn=lc.dsn(n),
            info=parse_dsn(lc.dsn(n), field=n),
            role=Role.PRIMARY if n == lc.primary_name else Role.REPLICA,
        )
        for n in lc.node_names
    ]
    monitor = Monitor(specs, interval=INTERVAL, events=EventBus())
    monitor.start()
    loop = next(t for t in threading.enumerate() if t.name == monitor.name)

    def probes() -> int:
        return sum(s.probes for s in monitor.probe_stats().values())

    return probes, monitor.stop, loop.ident


def run_seed_loop(
    lc: LocalCluster, *, reconnect: bool
) -> tuple[Callable[[], int], Callable[[], None], int | None]:
    stop = threading.Event()
    count = [0]
    conns: dict[str, psycopg.Connection[TupleRow]] = {}

    def check(name: str) -> None:
        if reconnect:
            with psycopg.connect(lc.dsn(name), autocommit=True) as conn:
                conn.execute(SEED_LAG_SQL).fetchone()
            return
        if name not in conns:
            conns[name] = psycopg.connect(lc.dsn(name), autocommit=True)
        conns[name].execute(SEED_LAG_SQL).fetchone()

    def loop() -> None:
        while not stop.is_set():
            for name in lc.node_names:
                check(name)
                count[0] += 1
            stop.wait(INTERVAL)

    thread = threading.Thread(target=loop, name="seed-monitor", daemon=True)
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join(5)
        for conn in conns.values():
            conn.close()

    return (lambda: count[0]), halt, thread.ident


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with LocalCluster(replicas=2) as lc:
        role = lc.execute(lc.primary_name, "SELECT current_user")[0][0]
        lc.execute(lc.primary_name, f"ALTER ROLE \"{role}\" SET log_statement = 'all'")
        lc.wait_replicated()  # new sessions on every node now log their statements
        results = [
            measure(lc, "replica-router Monitor", args.seconds, lambda: run_monitor(lc)),
            measure(
                lc,
                "baseline: seed 004 loop, reused conn",
                args.seconds,
                lambda: run_seed_loop(lc, reconnect=False),
            ),
            measure(
                lc,
                "baseline: seed 004 loop, new conn/check",
                args.seconds,
                lambda: run_seed_loop(lc, reconnect=True),
            ),
        ]
    print(
        f"LocalCluster(replicas=2): 3 nodes, interval {INTERVAL} s, {args.seconds:g} s per row, "
        f"{os.cpu_count()} CPUs"
    )
    header = (
        f"{'monitor':<40} {'probes/s/node':>13} {'queries/s/node':>14} "
        f"{'CPU % (process)':>15} {'CPU % (loop thr)':>16}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        thread = "-" if r.loop_thread_percent is None else f"{r.loop_thread_percent:.2f}"
        print(
            f"{r.label:<40} {r.checks_per_node:>13.2f} {r.queries_per_node:>14.2f} "
            f"{r.cpu_percent:>15.2f} {thread:>16}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
