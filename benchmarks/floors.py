"""What the guarantees' own statements cost on libpq alone: the floors under the hot paths.

Without the router, libpq's pipeline mode driven directly on held connections (the
shapes the router sends), so that no implementation keeping the guarantee can do less;
each against libpq without the guarantee and against psycopg on a held connection (the
issues' own baseline):

* the reset before a read (issue 11 rule 5: no session state, prepared statements
  included, passes to the next user of a pooled connection), on the replica:
  ``unprepared`` (the lookup parsed and planned, as on a session just reset),
  ``empty query, Sync, unprepared`` (the protocol's share) and ``DISCARD ALL, Sync,
  unprepared`` (what ``cluster.read()`` sends after a checkout), against ``prepared``
  and ``psycopg, held`` (see :func:`lookup_sides`);
* the position after an autocommit write, on the primary: ``plain``, the INSERT and a
  Sync (its commit), and psycopg's own INSERT, against ``captured``, the INSERT, a
  Sync, ``SELECT pg_current_wal_insert_lsn()``, a Sync, one wait (both statements
  prepared): the position is at or past the commit record because it is read after
  the Sync;
* a ``write()`` block's messages (:func:`write_block_messages`) against psycopg's
  ``with conn.transaction(): conn.execute(INSERT)``;

and, through the router, ``with cluster.write() as c: c.execute(INSERT)`` (the reset
and BEGIN go with the INSERT, the position query with the COMMIT) against psycopg's
``with conn.transaction(): conn.execute(INSERT)``.

The writes twice, on one ``LocalCluster(replicas=1)``: with the replica replaying, and
with its replay paused (``pg_wal_replay_pause()``: it still receives the WAL). The
method of ``vs_proxies.py`` (its helpers): the client on CPU 0, every server process on
CPU 1, rounds interleaved, the median of per-round ratios with the interquartile range.

Why both: pinned so, the replica's processes share the servers' core with the
primary's backend, and the figures depend on what they do there: with the replay
running, a side that still has something to answer after its commit (the position
query) loses against one that has not. A replica on a host of its own shares no core
with the primary; ``benchmarks/vs_proxies.py`` and ``benchmarks/peewee_overhead.py``
measure with the replay running, as the issue's method has it.

    .venv/bin/python benchmarks/floors.py [--rounds 40] [--ops 50]
"""

from __future__ import annotations

import argparse
import itertools
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
LOOKUP = b"SELECT * FROM t WHERE id = $1"
PSYCOPG_LOOKUP = "SELECT * FROM t WHERE id = %s"
WRITE_STATEMENTS = {
    b"ins": b"INSERT INTO w (v) VALUES ($1)",
    b"pos": b"SELECT pg_current_wal_insert_lsn()",
}
ROWS = 1000


def held(dsn: str, prepared: dict[bytes, bytes]) -> PGconn:
    """An autocommit connection in pipeline mode with ``prepared`` (name: SQL) prepared."""
    pgconn = psycopg.connect(dsn, autocommit=True).pgconn
    for name, sql in prepared.items():
        pgconn.prepare(name, sql)
    pgconn.enter_pipeline_mode()
    return pgconn


def wait_syncs(pgconn: PGconn, syncs: int) -> None:
    """Read the results up to the ``syncs``-th Sync; an error is raised, not timed."""
    seen = 0
    while seen < syncs:
        result = pgconn.get_result()
        if result is None:
            continue
        if result.status == _SYNC:
            seen += 1
        elif result.status == pq.ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(result)


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


LookupSide = tuple[int, Callable[[int], None]]  # (its backend's pid, run the lookup of a key)


def lookup_sides(dsn: str) -> dict[str, LookupSide]:
    """The point lookup through psycopg on a held connection (the issues' baseline,
    which psycopg prepares after its fifth run), and on libpq alone: prepared,
    unprepared, after an empty query and a Sync (the protocol's share), and after
    ``DISCARD ALL`` and a Sync (what ``cluster.read()`` sends after a checkout). Each
    side has a connection of its own: a reset on a shared one would drop the prepared
    side's statement."""
    keys = [str(key).encode() for key in range(ROWS + 1)]
    conn = psycopg.connect(dsn, autocommit=True)
    prepared = held(dsn, {b"get": LOOKUP})

    def run_psycopg(key: int) -> None:
        conn.execute(PSYCOPG_LOOKUP, (key,)).fetchone()

    def run_prepared(key: int) -> None:
        prepared.send_query_prepared(b"get", [keys[key]])
        prepared.pipeline_sync()
        wait_syncs(prepared, 1)

    def unprepared_after(first: bytes | None) -> LookupSide:
        pgconn = held(dsn, {})

        def run(key: int) -> None:
            if first is not None:
                pgconn.send_query_params(first, None)
                pgconn.pipeline_sync()  # as the router sends it: the reset cannot be undone
            pgconn.send_query_params(LOOKUP, [keys[key]])
            pgconn.pipeline_sync()
            wait_syncs(pgconn, 1 if first is None else 2)

        return pgconn.backend_pid, run

    return {
        "psycopg, held": (conn.info.backend_pid, run_psycopg),
        "prepared": (prepared.backend_pid, run_prepared),
        "unprepared": unprepared_after(None),
        "empty query, Sync, unprepared": unprepared_after(b""),
        "DISCARD ALL, Sync, unprepared": unprepared_after(b"DISCARD ALL"),
    }


def cycling(run: Callable[[int], None]) -> Callable[[], None]:
    """``run`` over the keys 1..ROWS in turn, one per call."""
    keys = itertools.count()
    return lambda: run(next(keys) % ROWS + 1)


def write_block_messages(dsn: str) -> Callable[[], None]:
    """What a ``write()`` block sends, on libpq alone: ``DISCARD ALL``, a Sync, BEGIN
    and the INSERT unprepared (a reset session has no prepared statements), a Sync, one
    wait; then ``COMMIT; SELECT pg_current_wal_insert_lsn()`` as one message, one wait."""
    pgconn = psycopg.connect(dsn, autocommit=True).pgconn

    def op() -> None:
        pgconn.enter_pipeline_mode()
        pgconn.send_query_params(b"DISCARD ALL", None)
        pgconn.pipeline_sync()
        pgconn.send_query_params(b"BEGIN", None)
        pgconn.send_query_params(WRITE_STATEMENTS[b"ins"], [b"x"])
        pgconn.pipeline_sync()
        wait_syncs(pgconn, 2)
        pgconn.exit_pipeline_mode()
        pgconn.send_query(b"COMMIT; SELECT pg_current_wal_insert_lsn()")
        while pgconn.get_result() is not None:
            pass

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
    """(what, baseline, side): the pipeline on libpq alone; then against psycopg's own
    ``transaction()``, a ``write()`` block's messages on libpq alone and the block
    itself (its COMMIT carries the position query)."""
    plain, captured = held(lc.primary_dsn, WRITE_STATEMENTS), held(lc.primary_dsn, WRITE_STATEMENTS)
    raw = psycopg.connect(lc.primary_dsn, autocommit=True)

    def raw_transaction() -> None:
        with raw.transaction():
            raw.execute(INSERT, ("x",))

    def write_block() -> None:
        with cluster.write() as conn:
            conn.execute(INSERT, ("x",))

    def raw_insert() -> None:
        raw.execute(INSERT, ("x",))

    return [
        ("INSERT, Sync, position, Sync (libpq)", plain_side(plain), captured_side(captured)),
        ("the same against psycopg's own INSERT", raw_insert, captured_side(captured)),
        (
            "write()'s messages (libpq) vs raw transaction()",
            raw_transaction,
            write_block_messages(lc.primary_dsn),
        ),
        ("cluster.write() vs raw transaction()", raw_transaction, write_block),
    ]


def row(what: str, base: list[float], side: list[float]) -> str:
    median, q1, q3 = ratio(side, base)
    return (
        f"{what:<62} {statistics.median(base) * 1e6:6.1f} -> "
        f"{statistics.median(side) * 1e6:6.1f} us  x{median:.3f} [{q1:.3f}-{q3:.3f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--ops", type=int, default=50)
    args = parser.parse_args()

    pinned = pin_client()
    lines = []
    with LocalCluster(replicas=1) as lc:
        lc.execute("primary", "CREATE TABLE w (id serial PRIMARY KEY, v text)")
        lc.execute("primary", "CREATE TABLE t (id int PRIMARY KEY, v text)")
        lc.execute(
            "primary", f"INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, {ROWS}) i"
        )
        lc.wait_replicated()
        with Cluster(lc.primary_dsn, lc.replica_dsns) as cluster:
            lookups = {
                name: cycling(run) for name, (_, run) in lookup_sides(lc.replica_dsns[0]).items()
            }
            compared = pairs(lc, cluster)
            servers = pin_servers([lc.directory]) if pinned else 0
            results = compare(lookups, args.rounds, args.ops)
            for against in ("prepared", "psycopg, held"):
                for name in (
                    "unprepared",
                    "empty query, Sync, unprepared",
                    "DISCARD ALL, Sync, unprepared",
                ):
                    lines.append(
                        row(f"lookup: {name} vs {against}", results[against], results[name])
                    )
            for replay in ("replaying", "paused"):
                if replay == "paused":
                    lc.pause_replay("replica1")
                for what, base, side in compared:
                    results = compare({"base": base, "side": side}, args.rounds, args.ops)
                    lines.append(
                        row(f"replica {replay:<9} {what}", results["base"], results["side"])
                    )
            lc.resume_replay("replica1")
    print(
        f"{args.rounds} rounds x {args.ops}; "
        + (f"client on CPU 0, {servers} server processes on CPU 1" if pinned else "not pinned")
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
