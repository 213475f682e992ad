"""Peewee's asyncio API (playhouse.pwasyncio) through AsyncRoutedPostgresqlDatabase, on
real servers with replay paused wherever staleness would show."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import peewee
import pytest
from playhouse.pool import MaxConnectionsExceeded
from playhouse.pwasyncio import AsyncModel, MissingGreenletBridge

from helpers import FAST, replay_paused, replica_ports, run, scratch_table
from replica_router import AsyncCluster
from replica_router.integrations.peewee_asyncio import AsyncRoutedPostgresqlDatabase
from replica_router.sandbox import LocalCluster

Body = Callable[[AsyncRoutedPostgresqlDatabase, Any], Awaitable[None]]


@pytest.fixture
def table(replica_cluster: LocalCluster) -> Iterator[str]:
    with scratch_table(replica_cluster, "pwa", "id serial PRIMARY KEY, name text") as name:
        yield name


def on_cluster(lc: LocalCluster, table: str, body: Body, **options: Any) -> None:
    """Run ``body(db, User)`` on an open AsyncCluster, in a fresh event loop."""

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
            db = AsyncRoutedPostgresqlDatabase(cluster, **options)
            meta = type("Meta", (), {"database": db, "table_name": table})
            user = type("User", (AsyncModel,), {"Meta": meta, "name": peewee.TextField()})
            try:
                await body(db, user)
            finally:
                await db.close_pool()

    run(main())


async def port(db: AsyncRoutedPostgresqlDatabase) -> int:
    """The port of the server a read through ``db`` ran on (routed like a select)."""
    row = (await db.aexecute_sql("SELECT inet_server_port()")).fetchone()
    return int(row[0])


async def eventually(predicate: Callable[[], bool], what: str = "the condition") -> None:
    """Poll ``predicate`` on the loop (the cluster's monitor runs on it too) for 15 s."""
    for _ in range(300):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def until_a_replica_reads(lc: LocalCluster, db: AsyncRoutedPostgresqlDatabase) -> None:
    ports = replica_ports(lc)
    for _ in range(300):
        if await port(db) in ports:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no read went to a replica")


def test_selects_go_to_a_replica_and_a_create_is_read_back_on_the_primary(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster

    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        await until_a_replica_reads(lc, db)
        assert await db.count(user.select()) == 0
        with replay_paused(lc):
            made = await user.acreate(name="Ada")
            assert db.token is not None  # the commit advanced the scope's token
            assert (await user.aget_by_id(made.id)).name == "Ada"  # only the primary has it
            assert await port(db) == lc.port("primary")
            with db.session(inherit=False):  # another request: no token, a replica
                assert await port(db) in replica_ports(lc)
                assert await user.aget_or_none(user.id == made.id) is None
                assert await db.list(user.select()) == []

    on_cluster(lc, table, body)


def test_atomic_and_savepoints_keep_everything_on_the_primary_and_commit_advances_the_token(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster

    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        await until_a_replica_reads(lc, db)
        with replay_paused(lc), db.session(inherit=False):
            async with db.atomic():
                assert await port(db) == lc.port("primary")
                made = await user.acreate(name="in-tx")
                assert db.token is None  # nothing committed yet
                async with db.atomic():  # a savepoint
                    assert (await user.aget_by_id(made.id)).name == "in-tx"
                    await db.aexecute(user.update(name="deeper").where(user.id == made.id))
                    assert await port(db) == lc.port("primary")
            assert db.token is not None  # the COMMIT's round trip brought its position
            assert (await user.aget_by_id(made.id)).name == "deeper"
            with pytest.raises(peewee.IntegrityError):
                async with db.atomic():
                    await user.acreate(id=made.id, name="twice")
            assert await db.count(user.select()) == 1  # rolled back, on the primary

    on_cluster(lc, table, body)


@pytest.mark.parametrize("how", ["raw_update", "execute_sql_insert", "for_update", "insert_many"])
def test_writes_and_locking_reads_run_on_the_primary(
    replica_cluster: LocalCluster, table: str, how: str
) -> None:
    lc = replica_cluster
    primary = lc.port("primary")

    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        await until_a_replica_reads(lc, db)
        with replay_paused(lc), db.session(inherit=False):
            if how == "raw_update":
                query = user.raw(f"UPDATE {table} SET name = 'x' RETURNING inet_server_port()")
                await db.list(query)
                row = (await db.aexecute_sql(f"INSERT INTO {table} (name) VALUES ('a')")).rowcount
                assert row == 1
            elif how == "execute_sql_insert":
                sql = f"INSERT INTO {table} (name) VALUES ('a') RETURNING inet_server_port()"
                assert (await db.aexecute_sql(sql)).fetchone()[0] == primary
            elif how == "for_update":
                async with db.atomic():
                    await db.list(user.select().for_update())
                    assert await port(db) == primary
                await db.aexecute(user.insert(name="a"))
            else:
                await db.aexecute(user.insert_many([{"name": "a"}, {"name": "b"}]))
            assert db.token is not None
            assert await db.count(user.select()) >= 1  # read back: only the primary has it

    on_cluster(lc, table, body)


def test_tasks_never_share_links_and_see_only_their_own_writes(
    replica_cluster: LocalCluster, table: str
) -> None:
    """Eight tasks interleave on one loop, each a unit of work (``async with db``): the
    writers read their rows back (on the primary, replay paused), the others read on a
    replica; no two tasks ever hold the same backend."""
    lc = replica_cluster

    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        await until_a_replica_reads(lc, db)
        await db.aclose()
        held: dict[int, int] = {}  # task -> the backend it holds while all tasks hold theirs
        ports: dict[int, list[int]] = {}
        together = asyncio.Barrier(8)

        async def work(i: int) -> None:
            async with db:
                for step in range(5):
                    if i % 2 == 0:
                        made = await user.acreate(name=f"t{i}-{step}")
                        assert (await user.aget_by_id(made.id)).name == f"t{i}-{step}"
                    ports.setdefault(i, []).append(await port(db))
                    await asyncio.sleep(0)
                await together.wait()  # every task holds its links now
                held[i] = (await db.aexecute_sql("SELECT pg_backend_pid()")).fetchone()[0]
                await together.wait()

        with replay_paused(lc):
            await asyncio.gather(*(work(i) for i in range(8)))
        for i, seen in ports.items():
            if i % 2 == 0:
                assert set(seen) == {lc.port("primary")}
            else:
                assert set(seen) <= replica_ports(lc)  # no other task's token steered it
        assert len(set(held.values())) == 8  # eight tasks, eight backends at once
        assert sum(db.cluster.in_use(n) for n in lc.node_names) == 0  # all given back

    on_cluster(lc, table, body)


def test_a_task_that_ends_holding_links_gives_them_back(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster

    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        cluster = db.cluster

        async def leave_them() -> None:
            await user.acreate(name="x")  # the primary link
            await db.count(user.select())  # and a read link
            assert sum(cluster.in_use(n) for n in lc.node_names) == 2

        await asyncio.create_task(leave_them())
        await eventually(lambda: sum(cluster.in_use(n) for n in lc.node_names) == 0, "release")

        async with db:
            await user.acreate(name="y")
            assert cluster.in_use("primary") == 1
        assert db.is_closed()
        assert sum(cluster.in_use(n) for n in lc.node_names) == 0

    on_cluster(lc, table, body)


def test_max_connections_waits_on_the_loop_then_raises(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster

    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        done = asyncio.Event()

        async def hold() -> None:
            await db.run(db.connection)  # the one primary link allowed
            await done.wait()
            await db.aclose()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        wait = asyncio.create_task(db.run(db.connection))  # waits up to timeout, on the loop
        await asyncio.sleep(0.05)
        assert not wait.done()
        done.set()
        await holder
        await asyncio.wait_for(wait, 5)  # the link came free
        await db.aclose()

        strict = AsyncRoutedPostgresqlDatabase(db.cluster, max_connections=1, timeout=None)
        await strict.run(strict.connection)
        with pytest.raises(MaxConnectionsExceeded):
            await asyncio.create_task(strict.run(strict.connection))
        await strict.aclose()

    on_cluster(lc, table, body, max_connections=1, timeout=5)


def test_sync_calls_outside_the_bridge_say_how_to_run_them(
    replica_cluster: LocalCluster, table: str
) -> None:
    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        with pytest.raises(MissingGreenletBridge, match=r"await db\.run"):
            db.execute_sql("SELECT 1")
        assert await db.acheck_connections() == dict.fromkeys(replica_cluster.node_names, True)
        assert (await db.run(db.check_connections)).keys() == set(replica_cluster.node_names)

    on_cluster(replica_cluster, table, body)


def test_add_and_remove_replicas_at_run_time(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster

    async def body(db: AsyncRoutedPostgresqlDatabase, user: Any) -> None:
        removed = lc.replica_names[0]
        await db.aremove_replica(removed)
        assert removed not in {s.name for s in db.status()}
        for _ in range(20):
            assert await port(db) != lc.port(removed)
        name = await db.aadd_replica(lc.dsn(removed), name=removed)
        assert name == removed
        await eventually(lambda: any(s.name == removed and s.healthy for s in db.status()))

    on_cluster(lc, table, body)


def on_fresh_cluster(
    lc: LocalCluster, body: Callable[[AsyncRoutedPostgresqlDatabase], Any]
) -> None:
    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
            db = AsyncRoutedPostgresqlDatabase(cluster)
            try:
                await body(db)
            finally:
                await db.close_pool()

    run(main())


@pytest.mark.slow
@pytest.mark.destructive
def test_after_a_replica_restart_no_stale_socket_error_reaches_the_caller(
    make_replica_cluster: Any,
) -> None:
    lc = make_replica_cluster(replicas=1)
    replica, primary = lc.port("replica1"), lc.port("primary")

    async def body(db: AsyncRoutedPostgresqlDatabase) -> None:
        async with db:
            await until_a_replica_reads(lc, db)
            lc.stop("replica1", mode="immediate")
            lc.start("replica1")
            for _ in range(5):  # the held link and the pool's idle ones are all dead
                assert await port(db) in {replica, primary}
            await until_a_replica_reads(lc, db)
        assert db.cluster.in_use("replica1") == 0

    on_fresh_cluster(lc, body)


@pytest.mark.slow
@pytest.mark.destructive
def test_a_held_link_to_a_demoted_primary_never_runs_another_statement(
    make_replica_cluster: Any,
) -> None:
    lc = make_replica_cluster(replicas=1)
    table = "pwa_fence"
    lc.execute("primary", f"CREATE TABLE {table} (id serial PRIMARY KEY, name text)")
    lc.wait_replicated()

    async def body(db: AsyncRoutedPostgresqlDatabase) -> None:
        meta = type("Meta", (), {"database": db, "table_name": table})
        user = type("User", (AsyncModel,), {"Meta": meta, "name": peewee.TextField()})
        async with db:
            await user.acreate(name="before")  # holds a link to the old primary
            lc.wait_replicated()
            with pytest.raises(peewee.OperationalError, match="no longer the primary"):
                async with db.atomic():
                    await user.acreate(name="lost")
                    lc.promote("replica1")  # the old primary keeps running: split brain
                    await eventually(lambda: db.cluster.topology.primary == "replica1", "follow")
            await user.acreate(name="after")  # outside a transaction: the new primary

    on_fresh_cluster(lc, body)
    assert lc.execute("primary", f"SELECT name FROM {table} ORDER BY id") == [("before",)]
    assert lc.execute("replica1", f"SELECT name FROM {table} ORDER BY id") == [
        ("before",),
        ("after",),
    ]
