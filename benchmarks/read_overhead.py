"""What ``cluster.read()`` adds to a read: ``SELECT 1`` through the router vs a raw pool.

On a LocalCluster (primary + 1 replica) both sides read from the same replica:

* ``raw pool``: a ``psycopg_pool.ConnectionPool`` on the replica, configured like
  the router's read pool (autocommit, read-only session, ``check_connection`` on
  checkout); ``with pool.connection() as conn: conn.execute("SELECT 1")``.
* ``cluster.read()``: a ``Cluster`` (defaults: read_your_writes="lsn",
  round_robin, max_lag=2.0) whose only replica is that node.

Both again without the checkout check (``check=None`` on both sides), which
halves the round trips and so makes the router's own share easiest to see.
Many short rounds, interleaved A B B A; each router round is compared with the
raw-pool round next to it (same moment, same load on the machine) and the
ratio reported is the median of those paired ratios, with the interquartile
range. Wall time includes the server; client CPU (this thread's
``thread_time``) is what the router adds in-process.

    .venv/bin/python benchmarks/read_overhead.py [--rounds 300] [--ops 100]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from psycopg_pool import ConnectionPool

from replica_router import Cluster
from replica_router.sandbox import LocalCluster

READ_ONLY = "-c default_transaction_read_only=on"


def raw_pool(dsn: str, check: bool) -> ConnectionPool[Any]:
    pool: ConnectionPool[Any] = ConnectionPool(
        dsn,
        min_size=1,
        max_size=1,
        kwargs={"autocommit": True, "options": READ_ONLY},
        check=ConnectionPool.check_connection if check else None,
        open=False,
    )
    pool.open(wait=True)
    return pool


def time_ops(op: Callable[[], object], ops: int) -> tuple[float, float]:
    """Mean wall and client-CPU seconds per op over ``ops`` calls."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(ops):
        op()
    return (time.perf_counter() - wall) / ops, (time.thread_time() - cpu) / ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--ops", type=int, default=100)
    args = parser.parse_args()

    with LocalCluster(replicas=1) as lc:
        replica = lc.replica_dsns[0]
        rows = []
        for check in (True, False):
            pool = raw_pool(replica, check)
            pool_settings = {"min_size": 1, "max_size": 1} | ({} if check else {"check": None})
            cluster = Cluster(
                lc.primary_dsn, [replica], pool_kwargs={"replica": pool_settings}
            ).open()
            try:

                def via_pool(pool: ConnectionPool[Any] = pool) -> object:
                    with pool.connection() as conn:
                        return conn.execute("SELECT 1").fetchone()

                def via_cluster(cluster: Cluster = cluster) -> object:
                    with cluster.read() as conn:
                        return conn.execute("SELECT 1").fetchone()

                for op in (via_pool, via_cluster):  # warm up both
                    time_ops(op, args.ops)
                samples: dict[str, list[tuple[float, float]]] = {"pool": [], "cluster": []}
                for i in range(args.rounds):
                    order = (("pool", via_pool), ("cluster", via_cluster))
                    for name, op in order if i % 2 == 0 else reversed(order):
                        samples[name].append(time_ops(op, args.ops))
                served = cluster.counters().reads
                assert set(served) == {"replica1"}, served  # every read on the replica
            finally:
                cluster.close()
                pool.close()
            label = "with check" if check else "no check"
            for i, kind in enumerate(("wall", "client CPU")):
                pool_values = [s[i] for s in samples["pool"]]
                router_values = [s[i] for s in samples["cluster"]]
                ratios = sorted(c / p for p, c in zip(pool_values, router_values, strict=True))
                quarter = len(ratios) // 4
                rows.append(
                    (
                        label,
                        kind,
                        statistics.median(pool_values),
                        statistics.median(router_values),
                        statistics.median(ratios),
                        ratios[quarter],
                        ratios[-quarter - 1],
                    )
                )

    print(f"SELECT 1, {args.rounds} interleaved rounds x {args.ops} ops, one replica")
    header = f"{'checkout':<11} {'measure':<11} {'raw pool us':>11} {'read() us':>10}"
    print(f"{header} {'paired ratio':>12} {'IQR':>13}")
    for label, kind, p, c, ratio, low, high in rows:
        print(
            f"{label:<11} {kind:<11} {p * 1e6:>11.1f} {c * 1e6:>10.1f} "
            f"{ratio:>12.3f} {low:>6.3f}-{high:<6.3f}"
        )
    print("target: wall-time ratio <= 1.05")


if __name__ == "__main__":
    main()
