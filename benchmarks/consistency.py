"""Consistency checker: does a user read their own write, across processes?

    .venv/bin/python benchmarks/consistency.py             # 10,000 pairs per scenario
    .venv/bin/python benchmarks/consistency.py --pairs 1000 --scenarios lsn,none

A LocalCluster(replicas=2) with replica1's replay paused and replica2 applying
WAL only after a delay (2 s; 7 s in the "-7s" scenarios). Worker processes
(multiprocessing, spawn), each with its own Cluster, run write-then-read pairs:
a worker bumps a user's counter row on the primary and hands the pair -- user,
the value it wrote, the token *as a string*, the write time -- to the next
worker in a ring, which reads the row through its own Cluster, inside
``cluster.session(token=Token.parse(s), user_id=user)``, when the user's next
request is due. A read that returns less than the value written is stale.
("-local" scenarios: the writer reads the pair itself, the best case for the
time window, which lives in one process's memory.)

When is the user's next request due? Uniformly 0 to ``--max-read-delay`` (6 s)
after the write: some come at once (the redirect after a POST), others after the
user has read the page. That is also the only honest way to serve reads from
replicas here: a replica can answer only once it has replayed the user's write,
which takes replica2 its apply delay and replica1 forever.

Every Cluster runs with ``max_lag=None`` so that the consistency mode alone
decides (a ``max_lag`` bound is itself a time window, with the same blind spot).

A second table measures what the token costs a write: single-row INSERT commits
through ``cluster.write()`` with ``read_your_writes="lsn"`` (COMMIT and the WAL
position in one round trip) against ``None`` (plain COMMIT), same run, on a
primary of its own on disk, with fsync off and on.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing as mp
import os
import queue
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from replica_router import Cluster, Token, consistency
from replica_router.sandbox import LocalCluster

USERS_PER_WORKER = 5000  # a user writes rarely: the window is per user
WINDOW_SECONDS = 5.0
DISK_DIR = "/var/tmp"  # disk-backed on Debian, and walkable by the postgres user
T = TypeVar("T")


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str | None  # read_your_writes
    apply_delay: float  # replica2's recovery_min_apply_delay, seconds
    cross_process: bool  # the next worker reads (token as a string), or the writer itself
    note: str


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("lsn", "lsn", 2.0, True, "token string handed to another process"),
        Scenario("lsn-7s", "lsn", 7.0, True, "same, replica2 7 s behind"),
        Scenario("window", "window", 2.0, True, "5 s window; another process reads"),
        Scenario("window-local", "window", 2.0, False, "5 s window; the writer reads"),
        Scenario("window-local-7s", "window", 7.0, False, "same, lag 7 s > window 5 s"),
        Scenario("none", None, 2.0, True, "no read-your-writes"),
    )
}


@dataclass(frozen=True)
class Plan:
    """One worker's share of a scenario (pickled into the spawned process)."""

    index: int
    pairs: int
    rate: float  # this worker's writes per second
    max_read_delay: float
    mode: str | None
    cross_process: bool
    primary_dsn: str = field(repr=False)
    replica_dsns: tuple[str, ...] = field(repr=False)
    ports: dict[int, str] = field(default_factory=dict)  # server port -> node name


@dataclass
class Tally:
    reads: int = 0
    stale: int = 0
    by_node: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)  # read started after its due time

    def add(self, other: Tally) -> None:
        self.reads += other.reads
        self.stale += other.stale
        for node, n in other.by_node.items():
            self.by_node[node] = self.by_node.get(node, 0) + n
        self.latencies_ms += other.latencies_ms
        self.late_ms += other.late_ms


# (read at, user, value written, token string, written at); monotonic clock,
# which is shared by every process on the machine.
Pair = tuple[float, int, int, "str | None", float]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000, help="pairs per scenario")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (>= 2)")
    parser.add_argument("--rate", type=float, default=400.0, help="pairs/s over all workers")
    parser.add_argument("--max-read-delay", type=float, default=6.0, help="seconds")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--commits", type=int, default=3000, help="commits per capture run")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
    if args.pairs < 1 or args.workers < 2 or args.rate <= 0 or args.max_read_delay < 0:
        parser.error("need --pairs >= 1, --workers >= 2, --rate > 0, --max-read-delay >= 0")

    log = Console(stderr=True)
    rows = []
    with LocalCluster(replicas=2) as lc:
        lc.execute(
            lc.primary_name,
            "CREATE TABLE rr_counters (id int PRIMARY KEY, value bigint NOT NULL);"
            "INSERT INTO rr_counters SELECT g, 0 FROM generate_series(0, %s) g"
            % (args.workers * USERS_PER_WORKER - 1),
        )
        ports = {lc.port(name): name for name in lc.node_names}
        for name in names:
            scenario = SCENARIOS[name]
            log.print(f"[bold]{name}[/]: {scenario.note}, {args.pairs:,} pairs ...")
            _reset_replicas(lc, scenario.apply_delay)
            started = time.monotonic()
            tally = _run_scenario(lc, scenario, args, ports)
            rows.append(_row(scenario, tally, time.monotonic() - started))
    log.print(f"[bold]token capture[/]: {args.commits:,} single-row INSERT commits each ...")
    capture = _capture_cost(args.commits)

    if args.json:
        print(json.dumps({"scenarios": rows, "capture": capture}, indent=2))
    else:
        _print_tables(rows, capture, args)
    return 0


def _reset_replicas(lc: LocalCluster, apply_delay: float) -> None:
    """Start from caught-up replicas, then pause replica1 and delay replica2."""
    lc.resume_replay("replica1")
    lc.set_apply_delay("replica2", 0.0)
    lc.wait_replicated(timeout=60)
    if apply_delay:
        lc.pause_replay("replica1")
        lc.set_apply_delay("replica2", apply_delay)


def _run_scenario(
    lc: LocalCluster, scenario: Scenario, args: argparse.Namespace, ports: dict[int, str]
) -> Tally:
    ctx = mp.get_context("spawn")
    inboxes = [ctx.Queue() for _ in range(args.workers)]
    results = ctx.Queue()
    start = ctx.Barrier(args.workers)
    base, extra = divmod(args.pairs, args.workers)
    processes = []
    for i in range(args.workers):
        plan = Plan(
            index=i,
            pairs=base + (i < extra),
            rate=args.rate / args.workers,
            max_read_delay=args.max_read_delay,
            mode=scenario.mode,
            cross_process=scenario.cross_process,
            primary_dsn=lc.primary_dsn,
            replica_dsns=tuple(lc.replica_dsns),
            ports=ports,
        )
        downstream = inboxes[(i + 1) % args.workers]
        process = ctx.Process(
            target=_worker,
            args=(plan, inboxes[i], downstream, results, start),
            name=f"checker-{i}",
        )
        process.start()
        processes.append(process)
    total = Tally()
    failures = []
    for _ in processes:
        outcome = results.get(timeout=900)
        if isinstance(outcome, str):
            failures.append(outcome)
        else:
            total.add(outcome)
    for process in processes:
        process.join(timeout=30)
    if failures:
        raise SystemExit(f"a worker failed:\n{failures[0]}")
    return total


def _worker(plan: Plan, inbox: Any, downstream: Any, results: Any, start: Any) -> None:
    try:
        results.put(_work(plan, inbox, downstream, start))
    except BaseException:  # the parent fails the run with this text
        results.put(traceback.format_exc())


def _isolated(fn: Callable[..., T], *args: Any) -> T:
    """Run one request's worth of work as an independent consistency scope.

    A worker loop is not one unit of work: a session opened directly in it
    would hand every token it saw back to the loop's scope, and each later
    read would wait for all of them.
    """
    with consistency.session(inherit=False):
        return fn(*args)


def _work(plan: Plan, inbox: Any, downstream: Any, start: Any) -> Tally:
    rng = random.Random(plan.index)
    users = range(plan.index * USERS_PER_WORKER, (plan.index + 1) * USERS_PER_WORKER)
    tally = Tally()
    due: list[Pair] = []
    cluster = Cluster(
        primary=plan.primary_dsn,
        replicas=list(plan.replica_dsns),
        read_your_writes=plan.mode,  # type: ignore[arg-type]
        window=WINDOW_SECONDS,
        max_lag=None,
    )
    with cluster:
        start.wait()
        next_write = time.monotonic()
        written = 0
        upstream_open = plan.cross_process  # until the upstream worker sends None
        while True:
            now = time.monotonic()
            if upstream_open:
                upstream_open = _drain(inbox, due, block=0.0)
            if due and due[0][0] <= now:
                _isolated(_read, cluster, plan, tally, heapq.heappop(due))
                continue
            if written < plan.pairs and now >= next_write:
                user = rng.choice(users)
                value, token = _isolated(_write, cluster, user)
                pair = (now + rng.uniform(0, plan.max_read_delay), user, value, token, now)
                if plan.cross_process:
                    downstream.put(pair)
                else:
                    heapq.heappush(due, pair)
                written += 1
                next_write += 1 / plan.rate
                if written == plan.pairs and plan.cross_process:
                    downstream.put(None)
                continue
            if written == plan.pairs and not due and not upstream_open:
                return tally
            wake = min(
                due[0][0] if due else now + 0.05, next_write if written < plan.pairs else now + 0.05
            )
            pause = min(max(wake - now, 0.0), 0.05)
            if upstream_open:
                upstream_open = _drain(inbox, due, block=pause)
            else:
                time.sleep(pause)


def _drain(inbox: Any, due: list[Pair], block: float) -> bool:
    """Schedule the pairs announced so far; False once the upstream worker is done."""
    try:
        item = inbox.get(timeout=block) if block > 0 else inbox.get_nowait()
        while True:
            if item is None:
                return False
            heapq.heappush(due, item)
            item = inbox.get_nowait()
    except queue.Empty:
        return True


def _write(cluster: Cluster, user: int) -> tuple[int, str | None]:
    with cluster.session(user_id=str(user)):
        with cluster.write() as conn:
            row = conn.execute(
                "UPDATE rr_counters SET value = value + 1 WHERE id = %s RETURNING value", (user,)
            ).fetchone()
        token = cluster.token
    assert row is not None
    return int(row[0]), None if token is None else str(token)


def _read(cluster: Cluster, plan: Plan, tally: Tally, pair: Pair) -> None:
    read_at, user, value, token, _ = pair
    tally.late_ms.append((time.monotonic() - read_at) * 1000)
    started = time.perf_counter()
    parsed = None if token is None else Token.parse(token)
    with cluster.session(token=parsed, user_id=str(user)), cluster.read() as conn:
        row = conn.execute(
            "SELECT value, inet_server_port() FROM rr_counters WHERE id = %s", (user,)
        ).fetchone()
    tally.latencies_ms.append((time.perf_counter() - started) * 1000)
    assert row is not None
    node = plan.ports.get(int(row[1]), "?")
    tally.reads += 1
    tally.by_node[node] = tally.by_node.get(node, 0) + 1
    tally.stale += int(row[0]) < value


def _capture_cost(commits: int) -> list[dict[str, Any]]:
    """Median single-row INSERT commit through write(), token capture on and off.

    On a primary of its own on disk (the scenarios' sandbox may live in
    /dev/shm), twice: ``fsync=off`` (the sandbox default and the cheapest commit
    there is, so the capture's fixed cost weighs most) and ``fsync=on`` (a
    durable commit, as in production).
    """
    base_dir = Path(DISK_DIR) / f"rr-capture-{os.getpid()}"
    with LocalCluster(replicas=0, base_dir=base_dir) as lc:
        lc.execute(
            lc.primary_name, "CREATE TABLE rr_inserts (id bigserial PRIMARY KEY, payload text)"
        )
        rows = [_capture_run(lc, commits, "off")]
        lc.execute(lc.primary_name, "ALTER SYSTEM SET fsync = on")
        lc.execute(lc.primary_name, "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while lc.execute(lc.primary_name, "SHOW fsync")[0][0] != "on":
            if time.monotonic() > deadline:
                raise SystemExit("the primary did not take fsync=on")
            time.sleep(0.05)
        rows.append(_capture_run(lc, max(1, commits // 3), "on"))
    return rows


def _capture_run(lc: LocalCluster, commits: int, fsync: str) -> dict[str, Any]:
    clusters = {
        mode: Cluster(primary=lc.primary_dsn, replicas=[], read_your_writes=mode)
        for mode in ("lsn", None)
    }
    timings: dict[str | None, list[float]] = {mode: [] for mode in clusters}
    for cluster in clusters.values():
        cluster.open()
    try:
        for cluster in clusters.values():  # warm the pools and the server's caches
            for _ in range(100):
                _isolated(_insert, cluster)
        for _ in range(commits):  # alternating, so drift and noise hit both alike
            for mode, cluster in clusters.items():
                started = time.perf_counter()
                _isolated(_insert, cluster)
                timings[mode].append((time.perf_counter() - started) * 1e6)
    finally:
        for cluster in clusters.values():
            cluster.close()
    with_token = statistics.median(timings["lsn"])
    without = statistics.median(timings[None])
    return {
        "fsync": fsync,
        "commits": commits,
        "lsn_median_us": round(with_token, 1),
        "none_median_us": round(without, 1),
        "ratio": round(with_token / without, 3),
    }


def _insert(cluster: Cluster) -> None:
    with cluster.write() as conn:
        conn.execute("INSERT INTO rr_inserts (payload) VALUES ('x')")


def _row(scenario: Scenario, tally: Tally, seconds: float) -> dict[str, Any]:
    latencies = sorted(tally.latencies_ms)
    replica_reads = sum(n for node, n in tally.by_node.items() if node != "primary")
    return {
        "scenario": scenario.name,
        "read_your_writes": scenario.mode,
        "apply_delay_s": scenario.apply_delay,
        "cross_process": scenario.cross_process,
        "pairs": tally.reads,
        "stale_reads": tally.stale,
        "replica_share": round(replica_reads / tally.reads, 4) if tally.reads else 0.0,
        "by_node": dict(sorted(tally.by_node.items())),
        "p50_ms": round(statistics.median(latencies), 3) if latencies else None,
        "p99_ms": round(_p99(latencies), 3) if latencies else None,
        "late_p50_ms": round(statistics.median(tally.late_ms), 1) if tally.late_ms else None,
        "late_p99_ms": round(_p99(tally.late_ms), 1) if tally.late_ms else None,
        "seconds": round(seconds, 1),
        "note": scenario.note,
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]


def _print_tables(
    rows: list[dict[str, Any]], capture: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    console = Console(width=max(Console().width, 150))
    table = Table(
        title=(
            f"Write-then-read pairs, {args.workers} processes; each read 0-"
            f"{args.max_read_delay:g} s after its write; replica1 paused, replica2 delayed"
        )
    )
    for column in ("scenario", "read_your_writes", "replica2 delay", "pairs", "stale reads",
                   "replica reads", "p50 ms", "p99 ms", "late p50/p99 ms", "note"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("scenario", "note") else "right")
    for r in rows:
        table.add_row(
            r["scenario"],
            str(r["read_your_writes"]),
            f"{r['apply_delay_s']:g} s",
            f"{r['pairs']:,}",
            f"{r['stale_reads']:,}",
            f"{r['replica_share']:.1%}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['late_p50_ms']:.0f} / {r['late_p99_ms']:.0f}",
            r["note"],
        )
    console.print(table)
    cost = Table(
        title=f"Token capture: single-row INSERT commit through cluster.write() ({DISK_DIR})"
    )
    for column in ("primary fsync", "commits", "lsn (median us)", "None (median us)", "ratio"):
        cost.add_column(column, justify="right")
    for row in capture:
        cost.add_row(
            row["fsync"],
            f"{row['commits']:,}",
            f"{row['lsn_median_us']:.1f}",
            f"{row['none_median_us']:.1f}",
            f"{row['ratio']:.3f}",
        )
    console.print(cost)


if __name__ == "__main__":
    sys.exit(main())
