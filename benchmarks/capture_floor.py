"""What reading the WAL position after a commit costs, on libpq alone and in a write() block.

First without the router: held autocommit connections to a sandbox primary, both
statements prepared, libpq's pipeline mode driven directly (the shape
``connection.run_capturing`` sends):

* ``plain``: the INSERT and a Sync (its commit), one wait;
* ``captured``: the INSERT, a Sync, ``SELECT pg_current_wal_insert_lsn()``, a Sync,
  one wait: the position is at or past the commit record because it is read after
  the Sync.

and, through the router, ``with cluster.write() as c: c.execute(INSERT)`` (the reset
and BEGIN go with the INSERT, the position query with the COMMIT) against psycopg's
``with conn.transaction(): conn.execute(INSERT)``.

Twice, on one ``LocalCluster(replicas=1)``: with the replica replaying, and with its
replay paused (``pg_wal_replay_pause()``: it still receives the WAL). The method of
``vs_proxies.py`` (its helpers): the client on CPU 0, every server process on CPU 1,
rounds interleaved, the median of per-round ratios with the interquartile range.

Why both: pinned so, the replica's processes share the servers' core with the
primary's backend, and the figures depend on what they do there: with the replay
running, a side that still has something to answer after its commit (the position
query) loses against one that has not. A replica on a host of its own shares no core
with the primary; ``benchmarks/vs_proxies.py`` and ``benchmarks/peewee_overhead.py``
measure with the replay running, as the issue's method has it.

    .venv/bin/python benchmarks/capture_floor.py [--rounds 40] [--ops 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import psycopg
from psycopg import pq
from psycopg.pq.abc import PGconn
from vs_proxies import pin_client, pin_servers, ratio

from replica_router import Cluster
from replica_router.sandbox import LocalCluster

_SYNC = pq.ExecStatus.PIPELINE_SYNC
INSERT = "INSERT INTO w (v) VALUES (%s)"


def held(dsn: str) -> PGconn:
    """An autocommit connection in pipeline mode with the two statements prepared."""
    conn = psycopg.connect(dsn, autocommit=True)
    pgconn = conn.pgconn
    pgconn.prepare(b"ins", b"INSERT INTO w (v) VALUES ($1)")
    pgconn.prepare(b"pos", b"SELECT pg_current_wal_insert_lsn()")
    pgconn.enter_pipeline_mode()
    return pgconn


def wait_syncs(pgconn: PGconn, syncs: int) -> None:
    seen = 0
    while seen < syncs:
        result = pgconn.get_result()
        if result is not None and result.status == _SYNC:
            seen += 1


def plain_side(pgconn: PGconn) -> Callable[[], None]:
    def op() -> None:
        pgconn.send_query_prepared(b"ins", [b"x"])
        pgconn.pipeline_sync()
        wait_syncs(pgconn, 1)

    return op


def captured_side(pgconn: PGconn) -> Callable[[], None]:
    def op() -> None:
        pgconn.send_query_prepared(b"ins", [b"x"])
        pgconn.pipeline_sync()  # the commit
        pgconn.send_query_prepared(b"pos", None)
        pgconn.pipeline_sync()
        wait_syncs(pgconn, 2)

    return op


def per_op(op: Callable[[], None], ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        op()
    return (time.perf_counter() - start) / ops


def compare(sides: dict[str, Callable[[], None]], rounds: int, ops: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in sides}
    for op in sides.values():
        per_op(op, ops)  # warm
    for i in range(rounds):
        for name in sides if i % 2 == 0 else reversed(list(sides)):
            out[name].append(per_op(sides[name], ops))
    return out


Pair = tuple[str, Callable[[], None], Callable[[], None]]  # (what, baseline, side)


def pairs(lc: LocalCluster, cluster: Cluster) -> list[Pair]:
    """(what, baseline, side): the pipeline on libpq alone, then a ``write()`` block
    against psycopg's own ``transaction()`` (its COMMIT carries the position query)."""
    plain, captured = held(lc.primary_dsn), held(lc.primary_dsn)
    raw = psycopg.connect(lc.primary_dsn, autocommit=True)

    def raw_transaction() -> None:
        with raw.transaction():
            raw.execute(INSERT, ("x",))

    def write_block() -> None:
        with cluster.write() as conn:
            conn.execute(INSERT, ("x",))

    return [
        ("INSERT, Sync, position, Sync (libpq)", plain_side(plain), captured_side(captured)),
        ("cluster.write() vs raw transaction()", raw_transaction, write_block),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--ops", type=int, default=50)
    args = parser.parse_args()

    pinned = pin_client()
    lines = []
    with LocalCluster(replicas=1) as lc:
        lc.execute("primary", "CREATE TABLE w (id serial PRIMARY KEY, v text)")
        lc.wait_replicated()
        with Cluster(lc.primary_dsn, lc.replica_dsns) as cluster:
            compared = pairs(lc, cluster)
            servers = pin_servers([lc.directory]) if pinned else 0
            for replay in ("replaying", "paused"):
                if replay == "paused":
                    lc.pause_replay("replica1")
                for what, base, side in compared:
                    results = compare({"base": base, "side": side}, args.rounds, args.ops)
                    median, q1, q3 = ratio(results["side"], results["base"])
                    lines.append(
                        f"replica {replay:<9}  {what:<38} "
                        f"{statistics.median(results['base']) * 1e6:6.1f} -> "
                        f"{statistics.median(results['side']) * 1e6:6.1f} us  "
                        f"x{median:.3f} [{q1:.3f}-{q3:.3f}]"
                    )
            lc.resume_replay("replica1")
    print(
        f"autocommit INSERT, {args.rounds} rounds x {args.ops}; "
        + (f"client on CPU 0, {servers} server processes on CPU 1" if pinned else "not pinned")
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
