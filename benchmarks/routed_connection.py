"""What ``cluster.connection()`` adds to a statement, against a raw psycopg connection.

On a LocalCluster (primary + 1 replica), in the same run, interleaved rounds (A B B A)
so that drift on a busy machine hits every side:

reads (on the replica)
* ``raw``: ``psycopg.connect(replica)`` (autocommit, read-only session, as the router's
  read connections are); ``conn.execute(sql, params).fetchone()``.
* ``routed``: a ``RoutedConnection`` (autocommit) held for the run; the same call.
  Each statement is classified (cached), routed (the held replica is kept while the
  topology snapshot and the scope's mark are unchanged) and counted.
* ``raw, same conn``: the very psycopg connection the routed side holds, used
  directly (the fairest baseline: the same server backend; see below).
* ``read() each``: ``with cluster.read() as c: c.execute(...)`` per statement, i.e.
  what returning the node connection to the pool after every statement would cost.

writes (autocommit ``INSERT``, on the primary)
* ``raw``: ``psycopg.connect(primary)``, autocommit.
* ``routed``: a ``RoutedConnection``; after the INSERT it reads
  ``pg_current_wal_insert_lsn()`` (one more round trip) to advance the token.
* ``routed, ryw off``: ``read_your_writes=None``: no position captured.
* ``raw, pipelined``: the alternative to the extra round trip, ``BEGIN; INSERT;
  COMMIT; SELECT pg_current_wal_insert_lsn()`` in one psycopg pipeline.

Ratios are of the medians of the per-round means (wall); client CPU is this
thread's ``thread_time``. ``read() each`` is compared with ``raw`` in a run of its own,
so the pool's background work after each return cannot fall into the routed rounds.
Last, the router's own work per statement with the server taken out: the held node
connection is replaced by a stub whose ``cursor()``, ``execute()`` and ``fetchone()``
do nothing, and ``routed.execute(...).fetchone()`` is timed against the same calls on
the stub alone (what psycopg's ``Connection.execute`` does), best of 9 — the figure
that does not move with the machine's load.

    .venv/bin/python benchmarks/routed_connection.py [--rounds 200] [--ops 50]
"""

from __future__ import annotations

import argparse
import contextvars
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import psycopg

from replica_router import Cluster
from replica_router.sandbox import LocalCluster

READ_ONLY = "-c default_transaction_read_only=on"
ROWS = 1000


def time_ops(op: Callable[[int], object], ops: int) -> tuple[float, float]:
    """Mean wall and client-CPU seconds per op over ``ops`` calls."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(ops):
        op(i)
    return (time.perf_counter() - wall) / ops, (time.thread_time() - cpu) / ops


def compare(
    sides: dict[str, Callable[[int], object]], rounds: int, ops: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) per side over interleaved rounds (order reversed every round)."""
    for op in sides.values():
        time_ops(op, ops)  # warm up: connections, prepared statements, caches
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    items = list(sides.items())
    for i in range(rounds):
        for name, op in items if i % 2 == 0 else reversed(items):
            samples[name].append(time_ops(op, ops))
    return {
        name: (statistics.median(s[0] for s in got), statistics.median(s[1] for s in got))
        for name, got in samples.items()
    }


class _StubCursor:
    __slots__ = ("connection",)

    def __init__(self, conn: object) -> None:
        self.connection = conn

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> _StubCursor:
        return self

    def fetchone(self) -> tuple[int]:
        return (1,)


class _StubConnection:
    """Stands in for the node connection: what is left is the router's own work."""

    broken = False

    def cursor(self, **kwargs: Any) -> _StubCursor:
        return _StubCursor(self)

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> _StubCursor:
        return self.cursor().execute(query, params, **kwargs)


def own_work(routed: Any, query: str, params: Any) -> list[str]:
    """Nanoseconds the router adds per statement, the server taken out (best of 9)."""
    link = routed._reader
    real, stub = link.conn, _StubConnection()
    names = {"routed": routed, "stub": stub, "q": query, "p": params}

    def best(statement: str) -> float:
        runs = timeit.repeat(statement, globals=names, number=20_000, repeat=9)
        return min(runs) / 20_000 * 1e9

    link.conn = stub
    try:
        base = best("stub.execute(q, p).fetchone()")
        mine = best("routed.execute(q, p).fetchone()")
    finally:
        link.conn = real
    return [f"  router's own work: {mine - base:.0f} ns per statement (stub node: {base:.0f} ns)"]


def table(title: str, results: dict[str, tuple[float, float]], base: str) -> list[str]:
    wall0, cpu0 = results[base]
    lines = [title, f"  {'side':<18} {'wall us':>8} {'ratio':>6} {'cpu us':>7} {'cpu +us':>8}"]
    for name, (wall, cpu) in results.items():
        lines.append(
            f"  {name:<18} {wall * 1e6:>8.1f} {wall / wall0:>6.3f} {cpu * 1e6:>7.1f} "
            f"{(cpu - cpu0) * 1e6:>+8.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--ops", type=int, default=50)
    args = parser.parse_args()

    out: list[str] = []
    with LocalCluster(replicas=1) as lc:
        lc.execute("primary", "CREATE TABLE t (id int PRIMARY KEY, v text)")
        lc.execute(
            "primary", f"INSERT INTO t SELECT i, md5(i::text) FROM generate_series(0, {ROWS - 1}) i"
        )
        lc.execute("primary", "CREATE TABLE w (id bigserial PRIMARY KEY, v int)")
        lc.wait_replicated()
        replica = lc.replica_dsns[0]
        raw_read = psycopg.connect(replica, autocommit=True, options=READ_ONLY)
        raw_write = psycopg.connect(lc.primary_dsn, autocommit=True)
        cluster = Cluster(lc.primary_dsn, [replica]).open()
        plain = Cluster(lc.primary_dsn, [replica], read_your_writes=None).open()
        routed = cluster.connection()
        try:
            for label, query, params in (
                ("SELECT 1", "SELECT 1", None),
                ("point lookup", "SELECT * FROM t WHERE id = %s", True),
            ):

                def raw(i: int, q: Any = query, p: Any = params) -> object:
                    return raw_read.execute(q, (i % ROWS,) if p else None).fetchone()

                def via_routed(i: int, q: Any = query, p: Any = params) -> object:
                    return routed.execute(q, (i % ROWS,) if p else None).fetchone()

                def via_read(i: int, q: Any = query, p: Any = params) -> object:
                    with cluster.read() as conn:
                        return conn.execute(q, (i % ROWS,) if p else None).fetchone()

                routed.execute("SELECT 1")  # lease the read node
                node = routed._reader.conn  # type: ignore[union-attr]

                def same_conn(i: int, q: Any = query, p: Any = params, c: Any = node) -> object:
                    return c.execute(q, (i % ROWS,) if p else None).fetchone()

                # Two comparisons, each A B B A: the pool's background work after each
                # read() return must not land in the routed side's rounds only. "raw,
                # same conn" is the very server connection the routed side holds: two
                # connections' backends can sit on different cores of this 2-core box
                # and differ by 2x, which this side rules out.
                results = compare(
                    {"raw": raw, "raw, same conn": same_conn, "routed": via_routed},
                    args.rounds,
                    args.ops,
                )
                title = f"{label} (replica), {args.rounds} rounds x {args.ops}"
                out += table(title, results, "raw")
                same = results["routed"][0] / results["raw, same conn"][0]
                out.append(f"  routed / raw on the same server connection: {same:.3f}")
                other = compare({"raw": raw, "read() each": via_read}, args.rounds // 2, args.ops)
                out += [
                    line.replace("  raw  ", "  raw' ", 1) for line in table("", other, "raw")[2:]
                ]
                out += own_work(routed, query, (1,) if params else None)
            served = cluster.counters().reads
            assert set(served) == {"replica1"}, served  # every routed read on the replica

            def writes() -> dict[str, tuple[float, float]]:
                routed_w = cluster.connection()
                plain_w = plain.connection()

                def raw_insert(i: int) -> object:
                    return raw_write.execute("INSERT INTO w (v) VALUES (%s)", (i,))

                def routed_insert(i: int) -> object:
                    return routed_w.execute("INSERT INTO w (v) VALUES (%s)", (i,))

                def plain_insert(i: int) -> object:
                    return plain_w.execute("INSERT INTO w (v) VALUES (%s)", (i,))

                def pipelined(i: int) -> object:
                    with raw_write.pipeline():
                        raw_write.execute("BEGIN")
                        raw_write.execute("INSERT INTO w (v) VALUES (%s)", (i,))
                        raw_write.execute("COMMIT")
                        cur = raw_write.execute("SELECT pg_current_wal_insert_lsn()::text")
                    return cur.fetchone()

                try:
                    return compare(
                        {
                            "raw": raw_insert,
                            "routed": routed_insert,
                            "routed, ryw off": plain_insert,
                            "raw, pipelined": pipelined,
                        },
                        max(args.rounds // 3, 4),
                        max(args.ops // 4, 10),
                    )
                finally:
                    routed_w.close()
                    plain_w.close()

            # in a context of its own: the writes' token must not steer the reads above
            results = contextvars.Context().run(writes)
            out += table("autocommit INSERT (primary)", results, "raw")
        finally:
            routed.close()
            cluster.close()
            plain.close()
            raw_read.close()
            raw_write.close()
    print("\n".join(out))
    print("raw': the same raw side, measured again in read() each's own run")
    print("target: routed/raw wall-time ratio <= 1.05 for the reads")


if __name__ == "__main__":
    main()
