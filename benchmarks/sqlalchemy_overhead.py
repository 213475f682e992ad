"""What ``RoutingSession`` adds to an ORM point lookup and an ORM insert + commit.

On a LocalCluster (primary + 1 replica), in the same run, interleaved rounds (A B B A),
each op a whole session (``with Session() as s: ...``), so that every op pays the
checkout, the routing decision and the return:

* ``plain``: ``sqlalchemy.orm.Session`` bound to one ``create_engine()`` Engine
  (psycopg dialect, QueuePool) to the node the routed side uses: the replica for
  ``s.get(Item, id)``, the primary for ``s.add(Item(...)); s.commit()``.
* ``plain, cluster engine``: a plain Session bound to the engine replica-router
  made for that node (the cluster's pooled connections: the same server backends as
  the routed side; on this small shared VM two backends can differ by more than the
  router costs).
* ``routed``: ``sessionmaker(cluster)``: the routing decision per transaction, the
  checkout from the cluster's pool, and on commit the WAL position captured in the
  COMMIT's round trip (``COMMIT; SELECT pg_current_wal_insert_lsn()``).

Last, the routing decision alone, no server: a new session's ``get_bind()`` for the
lookup's statement (``cluster.route_read()``, the statement's verdict, the engine),
against a plain Session's ``get_bind()``, best of 9 -- the figure that does not move
with the machine's load.

Both sides check each connection they take (``pool_pre_ping=True`` on the plain
engine, the cluster's check on checkout), as seed 004's engines do; ``--no-ping``
turns both off. Ratios are of the medians of the per-round means (wall).

    .venv/bin/python benchmarks/sqlalchemy_overhead.py [--rounds 100] [--ops 40] [--no-ping]
"""

from __future__ import annotations

import argparse
import contextvars
import timeit
from typing import Any

import psycopg
import sqlalchemy as sa
from routed_connection import compare, table
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from replica_router import Cluster
from replica_router.integrations.sqlalchemy import engines, pool_settings, sessionmaker
from replica_router.sandbox import LocalCluster

ROWS = 1000


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    v: Mapped[str]


def plain_engine(dsn: str, ping: bool) -> sa.Engine:
    return sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), pool_pre_ping=ping
    )


def own_work(routed: Any, engine: sa.Engine) -> list[str]:
    """Nanoseconds per session for the routing decision, the server taken out (best of 9)."""
    names = {"routed": routed, "Session": Session, "engine": engine, "Item": Item}
    setup = "q = sa.select(Item).where(Item.id == 1)"
    names["sa"] = sa

    def best(statement: str) -> float:
        runs = timeit.repeat(statement, setup, globals=names, number=5_000, repeat=9)
        return min(runs) / 5_000 * 1e9

    plain = best("Session(engine).get_bind(clause=q)")
    mine = best("routed().get_bind(clause=q)")
    return [f"  routing decision: {mine - plain:.0f} ns per session transaction "
            f"(a plain Session's get_bind: {plain:.0f} ns)"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--ops", type=int, default=40)
    parser.add_argument("--no-ping", action="store_true", help="no connection check on either side")
    args = parser.parse_args()
    ping = not args.no_ping

    out: list[str] = []
    with LocalCluster(replicas=1) as lc:
        setup = plain_engine(lc.primary_dsn, ping)
        Base.metadata.create_all(setup)
        with Session(setup) as s:
            s.add_all(Item(v=str(i)) for i in range(ROWS))
            s.commit()
        lc.wait_replicated()
        pools = (
            {} if ping else {"pool_kwargs": {r: pool_settings() for r in ("primary", "replica")}}
        )
        cluster = Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **pools).open()
        try:
            routed = sessionmaker(cluster)
            with routed() as s:  # make the engines the routed side uses
                s.get(Item, 1)
                s.add(Item(v="warm"))
                s.commit()
            own = engines(cluster)
            replica_engine = plain_engine(lc.replica_dsns[0], ping)
            primary_engine = plain_engine(lc.primary_dsn, ping)

            def lookups(factory: Any) -> Any:
                def op(i: int) -> object:
                    with factory() as s:
                        return s.get(Item, i % ROWS + 1)

                return op

            def inserts(factory: Any) -> Any:
                def op(i: int) -> object:
                    with factory() as s:
                        s.add(Item(v="x"))
                        s.commit()
                    return None

                return op

            def plain(engine: sa.Engine) -> Any:
                return lambda: Session(engine)

            results = compare(
                {
                    "plain": lookups(plain(replica_engine)),
                    "plain, cluster engine": lookups(plain(own[("replica1", "read")])),
                    "routed": lookups(routed),
                },
                args.rounds,
                args.ops,
            )
            out += table(
                f"ORM point lookup s.get() (replica), {args.rounds} x {args.ops}", results, "plain"
            )
            served = cluster.counters().reads
            assert set(served) <= {"replica1", "primary"} and served.get("replica1"), served

            def writes() -> dict[str, tuple[float, float]]:
                return compare(
                    {
                        "plain": inserts(plain(primary_engine)),
                        "plain, cluster engine": inserts(plain(own[("primary", "write")])),
                        "routed": inserts(routed),
                    },
                    max(args.rounds // 2, 4),
                    max(args.ops // 2, 10),
                )

            out += own_work(routed, replica_engine)

            # its own context: the inserts' token must not steer the lookups' scope
            out += table(
                "ORM insert + commit (primary)", contextvars.Context().run(writes), "plain"
            )
        finally:
            cluster.close()
    print("\n".join(out))
    print(f"connection check on both sides: {'yes' if ping else 'no'}")
    print("target: routed / plain wall-time ratio <= 1.05")


if __name__ == "__main__":
    main()
