"""What capturing the commit's WAL position costs a write.

Single-row ``INSERT`` + ``COMMIT`` on the sandbox primary, the same connection
for every variant, rounds interleaved (A B B A ...):

* ``commit()``: ``conn.execute(INSERT)``; ``conn.commit()`` (the baseline);
* ``commit_and_capture()``: the same INSERT, then ``COMMIT; SELECT
  pg_current_wal_insert_lsn()`` sent as one message (one round trip);
* ``two round trips``: ``conn.commit()`` then a separate ``SELECT
  pg_current_wal_insert_lsn()`` (what capture would cost done naively);

and end to end through ``cluster.write()`` with ``read_your_writes="lsn"``
(captures) vs ``None`` (plain commit).

Twice: with the sandbox's ``fsync=off`` (a commit costs about one loopback round
trip, so any extra server work shows at its largest), and with ``fsync=on``
(durable commits, as in production).

    .venv/bin/python benchmarks/commit_capture.py [--rounds 40] [--ops 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import psycopg

from replica_router import Cluster
from replica_router.consistency import commit_and_capture
from replica_router.sandbox import LocalCluster

INSERT = "INSERT INTO bench_commit (v) VALUES (%s)"


def time_ops(op: Callable[[int], object], ops: int) -> float:
    started = time.perf_counter()
    for i in range(ops):
        op(i)
    return (time.perf_counter() - started) / ops


def measure(
    variants: dict[str, Callable[[int], object]], rounds: int, ops: int
) -> dict[str, float]:
    for op in variants.values():  # warm up
        time_ops(op, ops)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            samples[name].append(time_ops(variants[name], ops))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--ops", type=int, default=200)
    args = parser.parse_args()

    rows: list[tuple[str, str, float, float]] = []
    with LocalCluster(replicas=1) as lc:
        lc.execute("primary", "CREATE TABLE bench_commit (id bigserial PRIMARY KEY, v int)")
        for fsync in ("off", "on"):
            lc.execute("primary", f"ALTER SYSTEM SET fsync = {fsync}")
            lc.execute("primary", "SELECT pg_reload_conf()")
            rows.extend((f"fsync={fsync}", *row) for row in run(lc, args.rounds, args.ops))
        lc.execute("primary", "ALTER SYSTEM RESET fsync")

    print(f"single-row INSERT + COMMIT, {args.rounds} interleaved rounds x {args.ops}")
    print(f"{'server':<10} {'variant':<22} {'us/commit':>10} {'vs baseline':>12}")
    for mode, name, value, base in rows:
        print(f"{mode:<10} {name:<22} {value * 1e6:>10.1f} {(value / base - 1) * 100:>+11.1f}%")
    print("target: capture adds <= 10% (commit_and_capture() vs commit(); write() lsn vs None)")


def run(lc: LocalCluster, rounds: int, ops: int) -> list[tuple[str, float, float]]:
    with psycopg.connect(lc.primary_dsn) as conn:
        row = conn.execute("SHOW fsync").fetchone()
        assert row is not None
        conn.commit()

        def plain(i: int) -> None:
            conn.execute(INSERT, (i,))
            conn.commit()

        def captured(i: int) -> None:
            conn.execute(INSERT, (i,))
            assert commit_and_capture(conn) is not None

        def naive(i: int) -> None:
            conn.execute(INSERT, (i,))
            conn.commit()
            conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            conn.commit()

        direct = measure(
            {"commit()": plain, "commit_and_capture()": captured, "two round trips": naive},
            rounds,
            ops,
        )

    clusters = {
        "write(), lsn": Cluster(lc.primary_dsn, lc.replica_dsns),
        "write(), None": Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None),
    }
    try:
        for cluster in clusters.values():
            cluster.open()

        def through(cluster: Cluster) -> Callable[[int], None]:
            def op(i: int) -> None:
                with cluster.write() as c:
                    c.execute(INSERT, (i,))

            return op

        routed = measure({name: through(c) for name, c in clusters.items()}, rounds, ops)
    finally:
        for cluster in clusters.values():
            cluster.close()
    return [
        *((n, v, direct["commit()"]) for n, v in direct.items()),
        *((n, v, routed["write(), None"]) for n, v in routed.items()),
    ]


if __name__ == "__main__":
    main()
