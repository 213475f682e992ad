"""Failover timeline on real servers: kill -> detected -> promoted -> first write.

Every run gets a fresh sandbox (primary + 2 streaming replicas) and a write loop
(one thread, one INSERT per transaction through ``cluster.write()``,
``write_timeout=10``). Scenarios:

* ``promote``: ``failover="promote"``, ``monitor_interval=0.5``,
  ``failure_threshold=3``; the primary is killed (``stop(mode="immediate")``).
  Times from the kill.
* ``follow``: ``failover="follow"`` (the default), same settings; the primary is
  killed, and one second later replica1 is promoted by hand (what an HA manager
  does). Times from the moment ``pg_promote(wait => true)`` returned.
* ``split``: ``failover="follow"``; replica1 is promoted while the old primary
  keeps running (an HA manager that could not stop it). Times from the
  promotion; ``stray`` counts acknowledged writes that still landed on the old
  primary after the promotion (the split-brain window before detection).
* ``seed``: the baseline, measured in the same run - seed 004's
  ``FailoverManager`` (``SELECT 1`` every 2 s, 3 failures, then
  ``replicas.pop(0)`` becomes the write target without being promoted), driving
  the same write loop with plain psycopg connections.

    .venv/bin/python benchmarks/failover.py [--runs 3] [--scenarios promote,follow,split,seed]

For comparison, the AWS Advanced Python Wrapper documents 15-41 s to detect a
failed node with its default failure-detection settings (not measured here).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg

from replica_router import Cluster
from replica_router.events import Event, FailoverDetected, NodeStateChanged
from replica_router.sandbox import LocalCluster

SETTINGS = {"monitor_interval": 0.5, "failure_threshold": 3, "write_timeout": 10.0}
DEADLINE = 20.0  # give up on a run after this long without a write


@dataclass
class Timeline:
    """Seconds from the scenario's origin (kill or promotion); None = never seen."""

    detected: float | None = None
    promoted: float | None = None
    first_write: float | None = None
    stray: int | None = None


@dataclass
class WriteLoop:
    """INSERTs with increasing ids until stopped; remembers when each was
    acknowledged, and by which server (its port)."""

    write: Callable[[int], int]
    acks: list[tuple[int, float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> WriteLoop:
        self.thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                port = self.write(i)
            except psycopg.Error:
                time.sleep(0.01)  # a benchmark's retry pace, not synchronisation
                continue
            self.acks.append((i, time.monotonic(), port))

    def first_after(self, moment: float, *, not_on: int, timeout: float = DEADLINE) -> float | None:
        """When the first write after ``moment`` was acknowledged by another server
        than port ``not_on`` (one in flight at the kill may still land on it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [t for _, t, port in list(self.acks) if t > moment and port != not_on]
            if later:
                return later[0]
            time.sleep(0.005)
        return None

    def wait_for_acks(self, count: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while len(self.acks) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the write loop made no progress")
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(15)


class Marks:
    """When the cluster's events happened (time.monotonic() on the monitor thread)."""

    def __init__(self, primary: str) -> None:
        self.primary = primary
        self.detected: float | None = None
        self.failover: float | None = None
        self.promoted: float | None = None

    def on_event(self, event: Event) -> None:
        now = time.monotonic()
        if (
            isinstance(event, NodeStateChanged)
            and event.name == self.primary
            and not event.new.healthy
            and self.detected is None
        ):
            self.detected = now
        elif isinstance(event, FailoverDetected) and self.failover is None:
            self.failover = now


class _PromotedLog(logging.Handler):
    """Catches the moment pg_promote returned ("failover: promoted <node>")."""

    def __init__(self, marks: Marks) -> None:
        super().__init__(logging.WARNING)
        self.marks = marks

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("failover: promoted ") and self.marks.promoted is None:
            self.marks.promoted = time.monotonic()


INSERT = "INSERT INTO bench VALUES (%s) RETURNING inet_server_port()"


def _port(row: tuple[int] | None) -> int:
    assert row is not None
    return int(row[0])


def _since(origin: float, moment: float | None) -> float | None:
    return None if moment is None else moment - origin


def _router(lc: LocalCluster, failover: str) -> tuple[Cluster, Marks, WriteLoop]:
    lc.execute("primary", "CREATE TABLE bench (id int PRIMARY KEY)")
    lc.wait_replicated()
    cluster = Cluster(lc.primary_dsn, lc.replica_dsns, failover=failover, **SETTINGS)  # type: ignore[arg-type]
    marks = Marks("primary")
    cluster.events.subscribe(marks.on_event)
    cluster.open()

    def write(i: int) -> int:
        with cluster.write() as conn:
            return _port(conn.execute(INSERT, (i,)).fetchone())

    loop = WriteLoop(write).start()
    loop.wait_for_acks(20)
    return cluster, marks, loop


def run_promote(lc: LocalCluster) -> Timeline:
    cluster, marks, loop = _router(lc, "promote")
    failover_log = logging.getLogger("replica_router.failover")
    handler = _PromotedLog(marks)
    failover_log.addHandler(handler)
    try:
        killed = time.monotonic()
        lc.stop("primary", mode="immediate")
        first = loop.first_after(killed, not_on=lc.port("primary"))
        return Timeline(
            detected=_since(killed, marks.detected),
            promoted=_since(killed, marks.promoted),
            first_write=_since(killed, first),
        )
    finally:
        failover_log.removeHandler(handler)
        loop.finish()
        cluster.close()


def run_follow(lc: LocalCluster) -> Timeline:
    cluster, marks, loop = _router(lc, "follow")
    try:
        lc.stop("primary", mode="immediate")
        time.sleep(1.0)  # the HA manager's own detection time (not ours to measure)
        lc.execute("replica1", "SELECT pg_promote(wait => true)")
        promoted = time.monotonic()
        first = loop.first_after(promoted, not_on=lc.port("primary"))
        return Timeline(
            detected=_since(promoted, marks.failover), first_write=_since(promoted, first)
        )
    finally:
        loop.finish()
        cluster.close()


def run_split(lc: LocalCluster) -> Timeline:
    cluster, marks, loop = _router(lc, "follow")
    try:
        lc.execute("replica1", "SELECT pg_promote(wait => true)")
        promoted = time.monotonic()
        first_new = loop.first_after(promoted, not_on=lc.port("primary"))
        loop.finish()
        after = [i for i, t, _ in loop.acks if t > promoted]
        stray = lc.execute("primary", "SELECT count(*) FROM bench WHERE id = ANY(%s)", (after,))
        return Timeline(
            detected=_since(promoted, marks.failover),
            first_write=_since(promoted, first_new),
            stray=int(stray[0][0]),
        )
    finally:
        loop.finish()
        cluster.close()


class SeedFailoverManager:
    """Seed 004's FailoverManager, with DSNs in place of SQLAlchemy engines."""

    def __init__(self, primary: str, replicas: Sequence[str], check_interval: float = 2.0) -> None:
        self.replicas = list(replicas)
        self.check_interval = check_interval
        self.current_primary = primary
        self.promoted_at: float | None = None

    def health_check(self) -> bool:
        try:
            with psycopg.connect(self.current_primary, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def promote_replica(self) -> bool:
        if not self.replicas:
            return False
        self.current_primary = self.replicas.pop(0)  # "in practice, you'd check ..."
        self.promoted_at = time.monotonic()
        return True

    def run_monitor(self, stop: threading.Event) -> None:
        consecutive_failures = 0
        while not stop.wait(self.check_interval):
            if self.health_check():
                consecutive_failures = 0
            else:
                consecutive_failures += 1
                if consecutive_failures >= 3:
                    self.promote_replica()
                    consecutive_failures = 0


def run_seed(lc: LocalCluster) -> Timeline:
    lc.execute("primary", "CREATE TABLE bench (id int PRIMARY KEY)")
    lc.wait_replicated()
    manager = SeedFailoverManager(lc.primary_dsn, lc.replica_dsns)
    stop = threading.Event()
    monitor = threading.Thread(target=manager.run_monitor, args=(stop,), daemon=True)
    monitor.start()

    def write(i: int) -> int:
        with psycopg.connect(manager.current_primary, connect_timeout=2) as conn:
            return _port(conn.execute(INSERT, (i,)).fetchone())

    loop = WriteLoop(write).start()
    try:
        loop.wait_for_acks(20)
        killed = time.monotonic()
        lc.stop("primary", mode="immediate")
        first = loop.first_after(killed, not_on=lc.port("primary"))
        return Timeline(
            detected=_since(killed, manager.promoted_at),
            promoted=None,
            first_write=_since(killed, first),
        )
    finally:
        loop.finish()
        stop.set()
        monitor.join(5)


SCENARIOS: dict[str, tuple[Callable[[LocalCluster], Timeline], str]] = {
    "promote": (run_promote, 'failover="promote": primary killed (from the kill)'),
    "follow": (run_follow, "follow: killed, promoted by hand 1 s later (from pg_promote)"),
    "split": (run_split, "follow: promoted while the old primary runs (from pg_promote)"),
    "seed": (run_seed, "seed 004 FailoverManager (2 s x 3, pop(0)) (from the kill)"),
}


def _cell(values: list[float | None]) -> str:
    seen = [v for v in values if v is not None]
    if not seen:
        return "never"
    text = f"{statistics.median(seen):.2f} (max {max(seen):.2f})"
    return text if len(seen) == len(values) else f"{text}, never in {len(values) - len(seen)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default="promote,follow,split,seed")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or args.runs < 1:
        parser.error(f"unknown scenarios {unknown} (known: {', '.join(SCENARIOS)})")
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)  # a failover is noisy on purpose
    logging.getLogger("replica_router").setLevel(logging.CRITICAL)
    failover_log = logging.getLogger("replica_router.failover")
    failover_log.setLevel(logging.WARNING)  # the "promoted" line marks the moment
    failover_log.propagate = False
    results: dict[str, list[Timeline]] = {}
    for name in names:
        run, _ = SCENARIOS[name]
        for i in range(args.runs):
            with LocalCluster(replicas=2) as lc:
                timeline = run(lc)
            results.setdefault(name, []).append(timeline)
            print(f"# {name} run {i + 1}: {timeline}", flush=True)

    print()
    print(
        f"Failover timeline, seconds (median and max of {args.runs} runs; "
        "monitor_interval=0.5, failure_threshold=3)"
    )
    print()
    print("| scenario | detected | promoted | first write | stray writes on old primary |")
    print("|---|---|---|---|---|")
    for name, timelines in results.items():
        strays = [t.stray for t in timelines if t.stray is not None]
        print(
            f"| {SCENARIOS[name][1]} "
            f"| {_cell([t.detected for t in timelines])} "
            f"| {_cell([t.promoted for t in timelines]) if name == 'promote' else '-'} "
            f"| {_cell([t.first_write for t in timelines])} "
            f"| {max(strays) if strays else '-'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
