"""What a point lookup costs the server, with and without what a checkout puts before it.

libpq alone, one autocommit connection to a sandbox primary in pipeline mode; the
server's CPU time per operation is its backend's own (``/proc/<pid>/schedstat``),
so the client's speed and the machine's other work do not enter it:

* ``prepared``: the lookup as a held connection runs it once psycopg has prepared it;
* ``unprepared``: the same lookup parsed and planned each time (a session just reset
  with ``DISCARD ALL`` has no prepared statements left);
* ``empty query, Sync, unprepared``: one more statement and Sync ahead of it (the
  protocol's share);
* ``DISCARD ALL, Sync, unprepared``: what ``cluster.read()`` sends after a checkout.

    .venv/bin/python benchmarks/server_cost.py [--rounds 7] [--ops 2000]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import psycopg
from psycopg import pq
from psycopg.pq.abc import PGconn

from replica_router.sandbox import LocalCluster

LOOKUP = b"SELECT * FROM t WHERE id = $1"


def backend_cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def wait_syncs(pgconn: PGconn, syncs: int) -> None:
    seen = 0
    while seen < syncs:
        result = pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.PIPELINE_SYNC:
            seen += 1


def sides(pgconn: PGconn) -> dict[str, Callable[[bytes], None]]:
    def prepared(key: bytes) -> None:
        pgconn.send_query_prepared(b"lookup", [key])
        pgconn.pipeline_sync()
        wait_syncs(pgconn, 1)

    def unprepared(key: bytes) -> None:
        pgconn.send_query_params(LOOKUP, [key])
        pgconn.pipeline_sync()
        wait_syncs(pgconn, 1)

    def after(first: bytes) -> Callable[[bytes], None]:
        def op(key: bytes) -> None:
            pgconn.send_query_params(first, None)
            pgconn.pipeline_sync()
            pgconn.send_query_params(LOOKUP, [key])
            pgconn.pipeline_sync()
            wait_syncs(pgconn, 2)

        return op

    return {
        "prepared": prepared,
        "unprepared": unprepared,
        "empty query, Sync, unprepared": after(b""),
        "DISCARD ALL, Sync, unprepared": after(b"DISCARD ALL"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()

    with LocalCluster(replicas=0) as lc:
        lc.execute("primary", "CREATE TABLE t (id int PRIMARY KEY, v text)")
        lc.execute("primary", "INSERT INTO t SELECT g, 'x' FROM generate_series(0, 999) g")
        with psycopg.connect(lc.primary_dsn, autocommit=True) as conn:
            pgconn = conn.pgconn
            pgconn.prepare(b"lookup", LOOKUP)
            pgconn.enter_pipeline_mode()
            pid = pgconn.backend_pid
            ops = sides(pgconn)
            keys = [str(i % 1000).encode() for i in range(args.ops)]
            per_op: dict[str, list[float]] = {name: [] for name in ops}
            for _ in range(args.rounds):  # interleaved: each side once per round
                for name, op in ops.items():
                    before = backend_cpu_ns(pid)
                    for key in keys:
                        op(key)
                    per_op[name].append((backend_cpu_ns(pid) - before) / args.ops / 1e3)
            pgconn.exit_pipeline_mode()
        version = lc.server_version
    print(f"server CPU per point lookup (its backend), PostgreSQL {version}, "
          f"median of {args.rounds} rounds x {args.ops}")  # fmt: skip
    base = statistics.median(per_op["prepared"])
    for name, values in per_op.items():
        median = statistics.median(values)
        print(f"  {name:<32} {median:6.1f} us   x{median / base:.2f}")


if __name__ == "__main__":
    main()
