"""What capturing the commit's WAL position costs a write.

Single-row ``INSERT`` + ``COMMIT`` (psycopg's BEGIN, INSERT, COMMIT: three round
trips) on a sandbox primary, one connection for the direct variants:

* ``commit()``: ``conn.execute(INSERT)``; ``conn.commit()`` (the baseline);
* ``commit_and_capture()``: the same INSERT, then ``COMMIT; SELECT
  pg_current_wal_insert_lsn()`` sent as one message (one round trip);
* ``two round trips``: ``conn.commit()`` then a separate ``SELECT
  pg_current_wal_insert_lsn()`` (what capture costs done naively);

and end to end through ``cluster.write()`` with ``read_your_writes="lsn"``
(captures) against ``None`` (plain commit).

Two servers: the sandbox's default, in RAM (``/dev/shm``) with ``fsync=off``, where
a commit costs one loopback round trip and nothing else, so any extra server work
shows at its largest; and one on disk with ``fsync=on`` (durable commits, as in
production; ``--disk-dir``, default a temp dir).

Rounds are interleaved and each variant's round is compared with the baseline
round next to it (same moment, same load); the table gives the median of those
paired ratios and their interquartile range, plus client CPU (this thread's
``thread_time``) and server CPU (the backend's ``/proc/<pid>/schedstat``) per
commit.

    .venv/bin/python benchmarks/commit_capture.py [--rounds 200] [--ops 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from replica_router import Cluster
from replica_router.consistency import commit_and_capture
from replica_router.sandbox import LocalCluster

INSERT = "INSERT INTO bench_commit (v) VALUES (%s)"
Sample = tuple[float, float, float]  # wall, client CPU, server CPU (seconds per op)
Variant = tuple[Callable[[int], object], int]  # the operation, its server backend's pid


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


def measure(variants: dict[str, Variant], rounds: int, ops: int) -> dict[str, list[Sample]]:
    for op, pid in variants.values():  # warm up
        time_ops(op, ops, pid)
    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            op, pid = variants[name]
            samples[name].append(time_ops(op, ops, pid))
    return samples


Row = tuple[str, float, float, float, float, float]  # name, wall, ratio, q1, q3, CPU change


def summarize(samples: dict[str, list[Sample]], baseline: str) -> list[Row]:
    base = samples[baseline]
    base_cpu = statistics.median(s[1] + s[2] for s in base)
    rows = []
    for name, values in samples.items():
        ratios = sorted(v[0] / b[0] for v, b in zip(values, base, strict=True))
        quarter = len(ratios) // 4
        cpu = statistics.median(s[1] + s[2] for s in values)
        rows.append(
            (
                name,
                statistics.median(s[0] for s in values),
                statistics.median(ratios),
                ratios[quarter],
                ratios[-quarter - 1],
                cpu / base_cpu - 1 if base_cpu else 0.0,
            )
        )
    return rows


def run(lc: LocalCluster, rounds: int, ops: int) -> list[Row]:
    lc.execute("primary", "CREATE TABLE bench_commit (id bigserial PRIMARY KEY, v int)")
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
        "write(), None": Cluster(
            lc.primary_dsn, lc.replica_dsns, read_your_writes=None, pool_kwargs=one
        ),
        "write(), lsn": Cluster(lc.primary_dsn, lc.replica_dsns, pool_kwargs=one),
    }
    try:
        variants: dict[str, Variant] = {}
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
    return summarize(direct, "commit()") + summarize(routed, "write(), None")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--ops", type=int, default=50)
    parser.add_argument("--disk-dir", default=None, help="where the on-disk sandbox goes")
    args = parser.parse_args()

    results: list[tuple[str, Row]] = []
    with LocalCluster(replicas=1) as lc:
        results += [("RAM, fsync=off", row) for row in run(lc, args.rounds, args.ops)]
    with tempfile.TemporaryDirectory(dir=args.disk_dir, prefix="rr-commit-") as base:
        Path(base).chmod(0o777)  # the servers may run as another OS user
        with LocalCluster(replicas=1, base_dir=base) as lc:
            lc.execute("primary", "ALTER SYSTEM SET fsync = on")
            lc.execute("primary", "SELECT pg_reload_conf()")
            results += [("disk, fsync=on", row) for row in run(lc, args.rounds, args.ops)]

    print(f"single-row INSERT + COMMIT, {args.rounds} interleaved rounds x {args.ops}")
    print(
        f"{'server':<15} {'variant':<21} {'wall us':>8} {'paired ratio':>12} {'IQR':>13} "
        f"{'CPU (client+server)':>19}"
    )
    for server, (name, wall, ratio, low, high, cpu) in results:
        print(
            f"{server:<15} {name:<21} {wall * 1e6:>8.1f} {ratio:>12.3f} "
            f"{low:>6.3f}-{high:<6.3f} {cpu * 100:>+18.1f}%"
        )
    print("target: capture adds <= 10% (commit_and_capture() vs commit(); write() lsn vs None)")


if __name__ == "__main__":
    main()
