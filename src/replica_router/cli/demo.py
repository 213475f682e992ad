"""``replica-router demo``: a live cluster, a workload, and replicas misbehaving.

Starts a sandbox (a real primary and two streaming replicas on this machine),
runs writers and readers through a ``Cluster`` and, while a live table shows
each node's role, health, lag and traffic, it:

1. pauses replay on replica1: once its lag passes ``max_lag`` it gets no reads;
2. resumes it: re-admitted as soon as it has caught up;
3. stops replica2 hard (immediate shutdown): reads go on elsewhere;
4. starts it again: re-admitted.

Every writer reads its own row back right after writing it (read-your-writes:
a stale read is counted). The summary shows reads and writes per node, failed
operations and stale reads (both should be 0; the exit code is 1 otherwise).

A query already running on replica2 when it is killed cannot be hidden by any
router (it was sent); the demo's readers retry such a read once, as an
application would, and the summary counts them separately.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..cluster import Cluster
from ..sandbox import LocalCluster
from . import description, seconds_between
from .status import console_for_output, quiet_library_logs, render_table

__all__ = ["register"]

MAX_LAG = 1.0  # seconds; replica1 is skipped once its lag passes this
MONITOR_INTERVAL = 0.25
WRITERS, READERS = 2, 3
PACE = 0.004  # seconds between one worker's operations: a busy app, not a benchmark
TABLE = "replica_router_demo"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="watch reads stay correct while replicas lag and fail (local sandbox)",
        description=description(__doc__),
    )
    parser.add_argument(
        "--duration",
        type=seconds_between(8, 600),
        default=24.0,
        metavar="S",
        help="length of the run (8-600 s)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.set_defaults(func=_demo)


@dataclass
class Tally:
    """What the workload saw, counted by the application side (not the router)."""

    reads: int = 0
    writes: int = 0
    failed: int = 0
    stale: int = 0
    interrupted: int = 0  # in flight on a server that died; retried once by the app
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}")


class Workload:
    """Writer and reader threads; ``stop()`` ends and joins them."""

    def __init__(self, cluster: Cluster, tally: Tally) -> None:
        self.cluster = cluster
        self.tally = tally
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._writer, name=f"demo-writer-{i}", daemon=True)
            for i in range(WRITERS)
        ] + [
            threading.Thread(target=self._reader, name=f"demo-reader-{i}", daemon=True)
            for i in range(READERS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _read(self, query: Callable[[psycopg.Connection[Any]], object]) -> tuple[bool, object]:
        """One read through the cluster; a query cut off in flight is retried once."""
        for attempt in (1, 2):
            block = self.cluster.read()
            try:
                conn = block.__enter__()
            except Exception as exc:  # the router could not place the read at all
                self.tally.fail(exc)
                return False, None
            try:
                result = query(conn)
            except psycopg.OperationalError as exc:
                block.__exit__(type(exc), exc, exc.__traceback__)
                if attempt == 2:
                    self.tally.fail(exc)
                    return False, None
                self.tally.add(interrupted=1)
                continue
            block.__exit__(None, None, None)
            self.tally.add(reads=1)
            return True, result
        raise AssertionError("unreachable")

    def _writer(self) -> None:
        cluster, tally = self.cluster, self.tally
        while not self._stop.wait(PACE):
            with cluster.session():
                try:
                    with cluster.write() as conn:
                        row = conn.execute(
                            f"INSERT INTO {TABLE} (v) VALUES (%s) RETURNING id",
                            (threading.current_thread().name,),
                        ).fetchone()
                except Exception as exc:
                    tally.fail(exc)
                    continue
                tally.add(writes=1)
                new_id = row[0] if row else None

                def read_back(conn: psycopg.Connection[Any], new_id: object = new_id) -> object:
                    return conn.execute(
                        f"SELECT 1 FROM {TABLE} WHERE id = %s", (new_id,)
                    ).fetchone()

                ok, seen = self._read(read_back)
                if ok and seen is None:
                    tally.add(stale=1)

    def _reader(self) -> None:
        while not self._stop.wait(PACE):
            self._read(lambda conn: conn.execute(f"SELECT max(id) FROM {TABLE}").fetchone())


class Show:
    """The live view: elapsed time, the status table, and what just happened."""

    def __init__(self, console: Console, cluster: Cluster, tally: Tally, quiet: bool) -> None:
        self.console = console
        self.cluster = cluster
        self.tally = tally
        self.quiet = quiet
        self.started = time.monotonic()
        self.events: list[str] = []
        self.live: Live | None = None

    def event(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:5.1f} s] {text}"
        self.events.append(line)
        if not self.quiet:
            self.console.print(line, highlight=False, soft_wrap=True)

    def render(self) -> Group:
        tally = self.tally
        head = Text(
            f"{time.monotonic() - self.started:5.1f} s   reads {tally.reads:,}   "
            f"writes {tally.writes:,}   failed {tally.failed}   stale {tally.stale}"
        )
        table = render_table(self.cluster.status(), traffic=True, title="replica-router demo")
        return Group(head, table)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Keep the view fresh until ``predicate`` holds (False after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.refresh()
            time.sleep(0.1)  # display refresh pace
        self.refresh()
        return True

    def until(self, at: float) -> None:
        self.wait(lambda: time.monotonic() - self.started >= at, timeout=at + 1)


def _demo(args: argparse.Namespace) -> int:
    quiet_library_logs()
    console = console_for_output()
    quiet = args.quiet
    if not quiet:
        console.print("starting a sandbox: a primary and 2 streaming replicas ...")
    with LocalCluster(replicas=2) as lc:
        if not quiet:
            console.print(f"running {lc.postgres_description}")
        lc.execute(lc.primary_name, f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, v text)")
        cluster = Cluster(
            lc.primary_dsn, lc.replica_dsns, max_lag=MAX_LAG, monitor_interval=MONITOR_INTERVAL
        )
        with cluster:
            tally = Tally()
            show = Show(console, cluster, tally, quiet)
            workload = Workload(cluster, tally)
            workload.start()
            try:
                if quiet:
                    _script(lc, cluster, show, args.duration)
                else:
                    with Live(show.render(), console=console, refresh_per_second=4) as live:
                        show.live = live
                        _script(lc, cluster, show, args.duration)
                    show.live = None
            finally:
                workload.stop()
            rows = cluster.status()
            counters = cluster.counters()
    return _summary(console, rows, counters.fallbacks, tally)


def _script(lc: LocalCluster, cluster: Cluster, show: Show, duration: float) -> None:
    def state(name: str) -> Any:
        return cluster.topology.by_name[name]

    def over_lag() -> bool:
        lag = state("replica1").lag_seconds
        return lag is not None and lag > MAX_LAG

    show.event(f"workload: {WRITERS} writers (each reads its row back), {READERS} readers")
    show.until(duration * 0.10)
    lc.pause_replay("replica1")
    show.event("replica1: replay paused (WAL still arrives, nothing is applied)")
    if show.wait(over_lag, timeout=15):
        lag = state("replica1").lag_seconds
        show.event(f"replica1: lag {lag:.2f} s > max_lag {MAX_LAG:.2f} s -> skipped for reads")
    show.until(duration * 0.35)
    lc.resume_replay("replica1")
    show.event("replica1: replay resumed")
    if show.wait(lambda: state("replica1").lag_seconds == 0.0, timeout=15):
        show.event("replica1: caught up -> re-admitted")
    show.until(duration * 0.50)
    lc.stop("replica2", mode="immediate")
    show.event("replica2: stopped (immediate shutdown)")
    if show.wait(lambda: not state("replica2").healthy, timeout=15):
        show.event("replica2: unhealthy -> reads go to replica1 (and the primary)")
    show.until(duration * 0.70)
    lc.start("replica2")
    show.event("replica2: started again")
    if show.wait(lambda: state("replica2").healthy, timeout=15):
        show.event("replica2: healthy -> re-admitted")
    show.until(duration)
    show.event("stopping the workload")


def _summary(console: Console, rows: Any, fallbacks: Any, tally: Tally) -> int:
    replica_reads = sum(r.reads for r in rows if r.name != "primary")
    routed_reads = sum(r.reads for r in rows)
    share = replica_reads / routed_reads if routed_reads else 0.0
    ok = tally.failed == 0 and tally.stale == 0
    console.print()
    table = Table(title="summary", title_justify="left")
    table.add_column("node", style="bold")
    table.add_column("reads", justify="right")
    table.add_column("writes", justify="right")
    for row in rows:
        table.add_row(row.name, f"{row.reads:,}", f"{row.writes:,}")
    console.print(table)
    verdict = "[green]OK[/]" if ok else "[red]FAILED[/]"
    console.print(
        f"reads {tally.reads:,} ({share:.0%} served by replicas)   writes {tally.writes:,}   "
        f"failed operations {tally.failed}   stale reads {tally.stale}   {verdict}",
        soft_wrap=True,  # one line, for grep; the terminal wraps it
    )
    if fallbacks:
        detail = ", ".join(f"{k} {v:,}" for k, v in sorted(dict(fallbacks).items()))
        console.print(f"reads sent to the primary instead of a replica: {detail}", soft_wrap=True)
    if tally.interrupted:
        console.print(
            f"{tally.interrupted} read(s) were in flight on replica2 when it was killed; "
            "the demo's app retried them once (the router retries only what was not sent)",
            soft_wrap=True,
        )
    for error in tally.errors:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
    return 0 if ok else 1
