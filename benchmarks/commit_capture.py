"""What capturing the commit's WAL position costs a write.

Single-row ``INSERT`` + ``COMMIT`` (psycopg's BEGIN, INSERT, COMMIT: three round
trips) on the sandbox primary, the same connection for every variant, rounds
interleaved (A B C C B A ...):

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

Besides wall time it reports CPU per commit: the client thread's
(``thread_time``) and the server backend's (``/proc/<pid>/schedstat``, run time
in ns). CPU is what capture adds; unlike wall time on a shared 2-core machine, it
does not move with other load.

    .venv/bin/python benchmarks/commit_capture.py [--rounds 30] [--ops 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from replica_router import Cluster
from replica_router.consistency import commit_and_capture
from replica_router.sandbox import LocalCluster

INSERT = "INSERT INTO bench_commit (v) VALUES (%s)"
Sample = tuple[float, float, float]  # wall, client CPU, server CPU (seconds per op)


def backend_cpu(pid: int) -> float:
    """Seconds the server backend ``pid`` has run on a CPU (0 when unreadable)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def time_ops(op: Callable[[int], object], ops: int, pid: int) -> Sample:
    wall, cpu, server = time.perf_counter(), time.thread_time(), backend_cpu(pid)
    for i in range(ops):
        op(i)
    return (
        (time.perf_counter() - wall) / ops,
        (time.thread_time() - cpu) / ops,
        (backend_cpu(pid) - server) / ops,
    )


def measure(
    variants: dict[str, tuple[Callable[[int], object], int]], rounds: int, ops: int
) -> dict[str, Sample]:
    for op, pid in variants.values():  # warm up
        time_ops(op, ops, pid)
    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            op, pid = variants[name]
            samples[name].append(time_ops(op, ops, pid))
    return {
        name: (
            statistics.median(s[0] for s in values),
            statistics.median(s[1] for s in values),
            statistics.median(s[2] for s in values),
        )
        for name, values in samples.items()
    }


def run(lc: LocalCluster, rounds: int, ops: int) -> list[tuple[str, Sample, Sample]]:
    with psycopg.connect(lc.primary_dsn) as conn:
        pid = conn.info.backend_pid

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
            {
                "commit()": (plain, pid),
                "commit_and_capture()": (captured, pid),
                "two round trips": (naive, pid),
            },
            rounds,
            ops,
        )

    one = {"primary": {"min_size": 1, "max_size": 1}}
    clusters = {
        "write(), lsn": Cluster(lc.primary_dsn, lc.replica_dsns, pool_kwargs=one),
        "write(), None": Cluster(
            lc.primary_dsn, lc.replica_dsns, read_your_writes=None, pool_kwargs=one
        ),
    }
    try:
        variants: dict[str, tuple[Callable[[int], object], int]] = {}
        for name, cluster in clusters.items():
            cluster.open()
            with cluster.write() as c:
                backend = c.info.backend_pid  # the only connection of its write pool

            def op(i: int, cluster: Cluster = cluster) -> None:
                with cluster.write() as c:
                    c.execute(INSERT, (i,))

            variants[name] = (op, backend)
        routed = measure(variants, rounds, ops)
    finally:
        for cluster in clusters.values():
            cluster.close()
    return [
        *((n, v, direct["commit()"]) for n, v in direct.items()),
        *((n, v, routed["write(), None"]) for n, v in routed.items()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ops", type=int, default=200)
    args = parser.parse_args()

    rows: list[tuple[str, str, Sample, Sample]] = []
    with LocalCluster(replicas=1) as lc:
        lc.execute("primary", "CREATE TABLE bench_commit (id bigserial PRIMARY KEY, v int)")
        for fsync in ("off", "on"):
            lc.execute("primary", f"ALTER SYSTEM SET fsync = {fsync}")
            lc.execute("primary", "SELECT pg_reload_conf()")
            rows.extend((f"fsync={fsync}", *row) for row in run(lc, args.rounds, args.ops))
        lc.execute("primary", "ALTER SYSTEM RESET fsync")

    print(f"single-row INSERT + COMMIT, {args.rounds} interleaved rounds x {args.ops}")
    print(
        f"{'server':<10} {'variant':<21} {'wall us':>8} {'vs base':>8} "
        f"{'client CPU us':>13} {'server CPU us':>13} {'CPU vs base':>11}"
    )
    for mode, name, (wall, client, server), (b_wall, b_client, b_server) in rows:
        cpu_change = (client + server) / (b_client + b_server) - 1 if b_client + b_server else 0
        print(
            f"{mode:<10} {name:<21} {wall * 1e6:>8.1f} {(wall / b_wall - 1) * 100:>+7.1f}% "
            f"{client * 1e6:>13.1f} {server * 1e6:>13.1f} {cpu_change * 100:>+10.1f}%"
        )
    print("target: capture adds <= 10% (commit_and_capture() vs commit(); write() lsn vs None)")


if __name__ == "__main__":
    main()
