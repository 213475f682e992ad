"""What ``RoutedPostgresqlDatabase`` adds to Peewee's ``get_by_id`` and ``create``.

On a LocalCluster (primary + 1 replica), in the same run, interleaved rounds (A B B A):

* ``plain``: Peewee's own ``PostgresqlDatabase`` (psycopg 3 driver, connection held
  open as Peewee does) to the node the routed side uses: the replica for
  ``get_by_id``, the primary for ``create``.
* ``plain, same conn``: a ``PostgresqlDatabase`` whose connection *is* the pooled
  connection the routed side holds (the same server backend: on a small shared VM
  two backends can differ by more than the router costs).
* ``routed``: ``RoutedPostgresqlDatabase(cluster)`` inside ``connection_context()``.
  ``get_by_id`` is routed per statement (``route_read`` keeps the held replica);
  ``create`` is an autocommit INSERT whose WAL position is read right after it on
  the same connection, so the scope's token advances (read-your-writes).
* ``routed, ryw off``: the same with ``Cluster(read_your_writes=None)``.
* ``plain + position`` (``create``): Peewee's own database on a connection of its own
  that reads the WAL position after each statement's commit in the statement's round
  trip, as the routed side does (:func:`~replica_router.connection.run_capturing`),
  with no routing around it: what the token's capture costs alone.
* ``Model.create in db.atomic()``: the same INSERT in a transaction, where the
  position comes back in the COMMIT's own round trip (``commit_and_capture``).

Method of ``vs_proxies.py`` (its helpers): the client pinned to CPU 0, the servers to
CPU 1; per round each side's mean; the ratio is the median over rounds of (side's
mean / base's mean in that round), with the interquartile range. Last, per section,
the client's own work with the server taken out: the held connection is replaced by
a stub that answers at once, on both sides, and the difference is what the router
adds per call whatever the machine's load (best of 9).

With ``--pause-replay`` the write sections run with the replica's replay paused (it
still receives the WAL): pinned so, the replica's processes share the servers' core
with the primary's backend, and its replay of each commit changes what the round
trips after a commit cost (``benchmarks/floors.py`` measures that alone).

    .venv/bin/python benchmarks/peewee_overhead.py [--rounds 100] [--ops 50] [--pause-replay]
"""

from __future__ import annotations

import argparse
import contextvars
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import peewee
import psycopg
from vs_proxies import pin_client, pin_servers, ratio

from replica_router import Cluster
from replica_router.connection import run_capturing
from replica_router.integrations.peewee import RoutedPostgresqlDatabase
from replica_router.sandbox import LocalCluster

ROWS = 1000


def time_ops(op: Callable[[int], object], ops: int) -> float:
    start = time.perf_counter()
    for i in range(ops):
        op(i)
    return (time.perf_counter() - start) / ops


def compare(
    sides: dict[str, Callable[[int], object]], rounds: int, ops: int
) -> dict[str, list[float]]:
    """Per side, the mean seconds per op of each round; rounds interleaved (order
    reversed every round)."""
    for op in sides.values():
        time_ops(op, ops)  # warm up: connections, caches
    samples: dict[str, list[float]] = {name: [] for name in sides}
    items = list(sides.items())
    for i in range(rounds):
        for name, op in items if i % 2 == 0 else reversed(items):
            samples[name].append(time_ops(op, ops))
    return samples


def model(db: peewee.Database) -> Any:
    class User(peewee.Model):
        name = peewee.TextField()

        class Meta:
            database = db
            table_name = "bench_user"

    return User


class _Borrowed(peewee.PostgresqlDatabase):
    """Peewee's own database on a connection it is handed (the routed side's)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._borrowed = conn
        super().__init__("borrowed", prefer_psycopg3=True)

    def _connect(self) -> psycopg.Connection[Any]:
        return self._borrowed

    def _close(self, conn: Any) -> None:
        pass


class _CapturingCursor(psycopg.Cursor[Any]):
    """A psycopg cursor that reads each statement's commit position in its round trip:
    Peewee's own database with it keeps Peewee's whole path (logging, hooks, errors)."""

    def execute(self, query: Any, params: Any = None, **options: Any) -> _CapturingCursor:
        run_capturing(self, query, params, wrote=True)
        return self


class _StubResult:
    ntuples = 1

    def __init__(self, value: bytes) -> None:
        self.value = value

    def get_value(self, row: int, column: int) -> bytes:
        return self.value


class _StubCursor:
    """Answers like a one-row result without a server."""

    description = (("id",), ("name",))
    rowcount = 1
    row: tuple[Any, ...] = (1, "x")
    pgresult = _StubResult(b"1")

    def __init__(self, connection: Any = None) -> None:
        self.connection = connection

    def execute(self, query: Any, params: Any = None, prepare: Any = None) -> _StubCursor:
        if "wal_insert_lsn" in query:
            self.row = ("0/3000000",)
            self.pgresult = _StubResult(b"0/3000000")
        return self

    def fetchone(self) -> tuple[Any, ...]:
        return self.row

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [self.fetchone()]

    def close(self) -> None:
        pass


class _StubConnection:
    """Stands in for a node connection: what is left is the client's own work."""

    broken = closed = False
    autocommit = True

    def __init__(self, real: psycopg.Connection[Any]) -> None:
        self.pgconn = real.pgconn  # transaction status, socket: the idle real connection's

    def cursor(self, **options: Any) -> _StubCursor:
        return _StubCursor(self)

    def execute(self, query: Any, params: Any = None) -> _StubCursor:
        return _StubCursor(self).execute(query, params)


def _stub_capturing(cursor: Any, query: Any, params: Any, *, wrote: bool) -> tuple[bool, int]:
    cursor.execute(query, params)
    return True, 0x3000000


def own_work(
    lease: Any, routed: Any, borrowed: Any, call: Callable[[Any], object]
) -> tuple[float, float]:
    """Best-of-9 client seconds per call with the server taken out: (plain, routed)."""
    real, stub = lease.conn, _StubConnection(lease.conn)
    borrowed._meta.database._borrowed = stub
    borrowed._meta.database.close()
    lease.conn = stub
    # The capture of an autocommit write's position speaks libpq itself: stubbed too.
    routed._meta.database._run_capturing = _stub_capturing
    try:
        plain, mine = float("inf"), float("inf")
        for _ in range(9):  # interleaved, so a busy moment hits both sides
            plain = min(plain, timeit.timeit(lambda: call(borrowed), number=1000) / 1000)
            mine = min(mine, timeit.timeit(lambda: call(routed), number=1000) / 1000)
    finally:
        del routed._meta.database._run_capturing
        lease.conn = real
        borrowed._meta.database.close()
        borrowed._meta.database._borrowed = real
    return plain, mine


def in_atomic(db: peewee.Database, user: Any) -> object:
    with db.atomic():
        return user.create(name="a")


def stub_line(base: float, mine: float) -> str:
    return (
        f"  client work, server stubbed out (best of 9): plain {base * 1e6:.1f} us, "
        f"routed {mine * 1e6:.1f} us, router +{(mine - base) * 1e6:.1f} us per call"
    )


def table(title: str, results: dict[str, list[float]], base: str) -> list[str]:
    """Per side: median us/op, and the median [IQR] of per-round ratios to ``base``
    and to ``plain`` (Peewee's own database on a connection of its own)."""
    head = f"  {'side':<18} {'us/op':>8} {'x ' + base + ' [IQR]':>28} {'x plain [IQR]':>22}"
    lines = [title, head]
    for name, got in results.items():
        cells = []
        for against in (base, "plain"):
            if against not in results:
                cells.append("-")
                continue
            median, q1, q3 = ratio(got, results[against])
            cells.append(f"{median:.3f} [{q1:.3f}-{q3:.3f}]")
        us = statistics.median(got) * 1e6
        lines.append(f"  {name:<18} {us:>8.1f} {cells[0]:>28} {cells[1]:>22}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--ops", type=int, default=50)
    parser.add_argument(
        "--pause-replay",
        action="store_true",
        help="the write sections with the replica's replay paused",
    )
    args = parser.parse_args()

    out: list[str] = []
    pinned = pin_client()
    with LocalCluster(replicas=1) as lc:
        lc.execute("primary", "CREATE TABLE bench_user (id serial PRIMARY KEY, name text)")
        lc.execute(
            "primary",
            f"INSERT INTO bench_user (name) SELECT md5(i::text) FROM generate_series(1, {ROWS}) i",
        )
        lc.wait_replicated()
        with (
            Cluster(lc.primary_dsn, lc.replica_dsns) as cluster,
            Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None) as plain_cluster,
        ):
            routed_db = RoutedPostgresqlDatabase(cluster)
            off_db = RoutedPostgresqlDatabase(plain_cluster)
            routed, off = model(routed_db), model(off_db)

            def reads() -> list[str]:
                with routed_db.connection_context(), off_db.connection_context():
                    routed.get_by_id(1)  # lease the replica link
                    off.get_by_id(1)
                    reader = routed_db._links().reader
                    assert reader is not None and reader.node == "replica1"
                    own = peewee.PostgresqlDatabase(lc.replica_dsns[0], prefer_psycopg3=True)
                    same = _Borrowed(reader.conn)
                    plain, borrowed = model(own), model(same)
                    plain.get_by_id(1)  # its connection open before the servers are pinned
                    pin_servers([lc.directory])
                    results = compare(
                        {
                            "plain": lambda i: plain.get_by_id(i % ROWS + 1),
                            "plain, same conn": lambda i: borrowed.get_by_id(i % ROWS + 1),
                            "routed": lambda i: routed.get_by_id(i % ROWS + 1),
                            "routed, ryw off": lambda i: off.get_by_id(i % ROWS + 1),
                        },
                        args.rounds,
                        args.ops,
                    )
                    base, mine = own_work(reader, routed, borrowed, lambda m: m.get_by_id(1))
                    same.close()
                    own.close()
                    served = {s.name: s.reads for s in cluster.status()}
                    assert served["primary"] == 0, served  # every routed read on the replica
                title = f"Model.get_by_id (replica), {args.rounds} rounds x {args.ops}"
                return [*table(title, results, "plain, same conn"), stub_line(base, mine)]

            def writes() -> list[str]:
                with routed_db.connection_context(), off_db.connection_context():
                    routed.create(name="warm")  # lease the primary link
                    off.create(name="warm")
                    writer = routed_db._links().writer
                    assert writer is not None and writer.node == "primary"
                    own = peewee.PostgresqlDatabase(lc.primary_dsn, prefer_psycopg3=True)
                    same = _Borrowed(writer.conn)
                    capturing = peewee.PostgresqlDatabase(
                        lc.primary_dsn, prefer_psycopg3=True, cursor_factory=_CapturingCursor
                    )
                    plain, borrowed, floor = model(own), model(same), model(capturing)
                    plain.create(name="warm")
                    floor.create(name="warm")
                    if args.pause_replay:
                        lc.pause_replay("replica1")
                    pin_servers([lc.directory])
                    results = compare(
                        {
                            "plain": lambda i: plain.create(name="p"),
                            "plain, same conn": lambda i: borrowed.create(name="s"),
                            "plain + position": lambda i: floor.create(name="f"),
                            "routed": lambda i: routed.create(name="r"),
                            "routed, ryw off": lambda i: off.create(name="o"),
                        },
                        max(args.rounds // 2, 4),
                        args.ops,
                    )
                    atomic = compare(
                        {
                            "plain, same conn": lambda i: in_atomic(same, borrowed),
                            "routed": lambda i: in_atomic(routed_db, routed),
                        },
                        max(args.rounds // 2, 4),
                        args.ops,
                    )
                    base, mine = own_work(writer, routed, borrowed, lambda m: m.create(name="x"))
                    same.close()
                    own.close()
                    capturing.close()
                    assert routed_db.token is not None  # the writes advanced the token
                    if args.pause_replay:
                        lc.resume_replay("replica1")
                rounds = max(args.rounds // 2, 4)
                return [
                    *table(f"Model.create (primary, autocommit), {rounds} rounds", results,
                           "plain, same conn"),
                    stub_line(base, mine),
                    *table(f"Model.create in db.atomic() (primary), {rounds} rounds", atomic,
                           "plain, same conn"),
                ]  # fmt: skip

            # Each in a context of its own: the writes' token must not steer the reads.
            out += contextvars.Context().run(reads)
            out += contextvars.Context().run(writes)
    print("client on CPU 0, servers on CPU 1" if pinned else "not pinned (one CPU)")
    print("\n".join(out))
    print("target: routed / plain <= 1.05")


if __name__ == "__main__":
    main()
