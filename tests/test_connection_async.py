"""AsyncRoutedConnection against real servers: the sync rules with async with / await."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import FAST, async_port_of, run, scratch_table
from replica_router import AsyncCluster
from replica_router.classify import Classifier
from replica_router.sandbox import LocalCluster
from replica_router.session import uses_copy


@pytest.fixture
def table(replica_cluster: LocalCluster) -> Iterator[str]:
    with scratch_table(replica_cluster, "arc", "id int PRIMARY KEY, v text") as name:
        yield name


def test_async_routing_transactions_and_session_state(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    primary = lc.port("primary")
    replicas = {lc.port(n) for n in lc.replica_names}

    async def main() -> None:
        # max_lag=None: a replica first measured while replaying the fixture's DDL is
        # not "2 s behind" (its last replayed commit may be older than that)
        cluster = AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST)  # type: ignore[arg-type]
        async with cluster:
            async with cluster.connection() as conn:
                assert await async_port_of(conn) in replicas
                await conn.execute("SET statement_timeout = '5s'")
                cur = await conn.execute("SHOW statement_timeout")
                assert await cur.fetchone() == ("5s",)
                cur = await conn.execute(
                    f"INSERT INTO {table} VALUES (1, current_setting('statement_timeout')) "
                    "RETURNING v, inet_server_port()"
                )
                assert await cur.fetchone() == ("5s", primary)
                assert cluster.token is not None
                # the read right after the write sees it (token), wherever it runs
                cur = await conn.execute(f"SELECT count(*) FROM {table}")
                assert await cur.fetchone() == (1,)
                async with conn.transaction():
                    first = await async_port_of(conn)
                    await conn.execute(f"UPDATE {table} SET v = 'b'")
                    assert await async_port_of(conn) == first == primary
                    async with conn.transaction() as inner:
                        await conn.execute(f"INSERT INTO {table} VALUES (2, 'x')")
                        raise psycopg.Rollback(inner)
                await conn.set_read_only(True)
                lc.wait_replicated()  # so that a replica has this scope's writes
                async with conn.transaction():
                    ro = await async_port_of(conn)
                    assert ro in replicas
                    assert await async_port_of(conn) == ro
                await conn.set_read_only(None)
                cur = conn.cursor(row_factory=dict_row)
                await cur.executemany(f"INSERT INTO {table} VALUES (%s, 'm')", [(10,), (11,)])
                assert cur.rowcount == 2
                await cur.execute(f"SELECT id, v FROM {table} ORDER BY id")
                assert await cur.fetchmany(2) == [{"id": 1, "v": "b"}, {"id": 10, "v": "m"}]
                assert [row async for row in cur] == [{"id": 11, "v": "m"}]
                await conn.execute("CREATE TEMP TABLE scratch (x int)")
                assert conn.pinned and await async_port_of(conn) == primary
            assert conn.closed and cluster.in_use("primary") == 0
            with pytest.raises(psycopg.InterfaceError, match="closed"):
                await conn.execute("SELECT 1")
            async with cluster.connection(autocommit=False) as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (20, 'c')")
            with pytest.raises(ZeroDivisionError):
                async with cluster.connection(autocommit=False) as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (21, 'r')")
                    raise ZeroDivisionError
            async with cluster.write() as w:
                cur = await w.execute(f"SELECT id FROM {table} ORDER BY id")
                assert await cur.fetchall() == [(1,), (10,), (11,), (20,)]

    run(main())


def test_async_tasks_route_independently(replica_cluster: LocalCluster, table: str) -> None:
    """Each task has its own scope: one task's write does not pull another's reads."""
    lc = replica_cluster

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:  # type: ignore[arg-type]

            async def task(i: int) -> tuple[int, int]:
                async with cluster.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, 't')", (i,))
                    cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE id = %s", (i,))
                    row = await cur.fetchone()
                    assert row is not None
                    return i, int(row[0])

            results = await asyncio.gather(*(task(i) for i in range(8)))
            assert sorted(results) == [(i, 1) for i in range(8)]  # each read saw its own write

    run(main())


def test_async_copy_is_routed_and_advances_the_token(
    replica_cluster: LocalCluster, table: str
) -> None:
    """``cursor.copy()`` on the asyncio routed connection (the source of the sync one)."""
    lc = replica_cluster
    replicas = {lc.port(n) for n in lc.replica_names}

    async def main() -> None:
        cluster = AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST)  # type: ignore[arg-type]
        async with cluster, cluster.connection() as conn:
            with cluster.session():
                cur = conn.cursor()
                async with cur.copy("COPY (SELECT inet_server_port()) TO STDOUT") as copy:
                    rows = [row async for row in copy.rows()]
                assert int(rows[0][0]) in replicas
                async with cur.copy(f"COPY {table} (id) FROM STDIN") as copy:
                    await copy.write_row((7,))
                assert cluster.token is not None

    run(main())
    assert lc.execute("primary", f"SELECT count(*) FROM {table}") == [(1,)]


def test_uses_copy_names_the_copy_protocol_forms() -> None:
    classifier = Classifier()
    forms = {
        "COPY t FROM STDIN": True,
        "COPY t TO STDOUT": True,
        "COPY (SELECT 1) TO STDOUT": True,
        "COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT": True,
        "COPY t FROM '/tmp/x'": False,
        "COPY t TO '/tmp/x'": False,
        "COPY t FROM PROGRAM 'cat'": False,
        "SELECT 1": False,
    }
    assert {sql: uses_copy(classifier.analyze(sql)) for sql in forms} == forms


def test_async_pipeline_info_and_adapters(replica_cluster: LocalCluster, table: str) -> None:
    """``conn.pipeline()``, ``conn.info`` and ``conn.adapters`` on the asyncio routed
    connection: reads queued on a replica, the first write moves the block to the
    primary (a later read sees it), the token advances at its end; an error aborts
    the rest as in psycopg; a loader registered on the connection applies on every
    node and not to the pools' connections."""
    lc = replica_cluster
    replicas = {lc.port(n) for n in lc.replica_names}

    class Upper(psycopg.adapt.Loader):
        def load(self, data: Any) -> str:
            return bytes(data).decode().upper()

    async def main() -> None:
        cluster = AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST)  # type: ignore[arg-type]
        async with cluster, cluster.connection() as conn:
            with pytest.raises(psycopg.ProgrammingError):
                conn.info  # noqa: B018
            with cluster.session():
                async with conn.pipeline() as p:
                    before = await conn.execute("SELECT inet_server_port()")
                    assert conn.info.pipeline_status == psycopg.pq.PipelineStatus.ON
                    assert conn.info.port in replicas and p.node != "primary"
                    await conn.execute(f"INSERT INTO {table} (id) VALUES (1)")
                    seen = await conn.execute(f"SELECT count(*) FROM {table}")
                    assert p.node == "primary" and cluster.token is None
                assert (await before.fetchone())[0] in replicas  # type: ignore[index]
                assert await seen.fetchone() == (1,)
                assert cluster.token is not None
                with pytest.raises(psycopg.errors.UniqueViolation):
                    async with conn.pipeline():
                        await conn.execute(f"INSERT INTO {table} (id) VALUES (2)")
                        await conn.execute(f"INSERT INTO {table} (id) VALUES (1)")
                        await conn.execute(f"INSERT INTO {table} (id) VALUES (3)")
                conn.adapters.register_loader("text", Upper)
                cur = await conn.execute("SELECT 'abc'::text, inet_server_port()")
                assert await cur.fetchone() == ("ABC", conn.info.port)
                async with conn.transaction():
                    cur = await conn.execute("SELECT 'def'::text")
                    assert await cur.fetchone() == ("DEF",)
                    assert conn.info.port == lc.port("primary")
            async with cluster.read() as other:
                cur = await other.execute("SELECT 'abc'::text")
                assert await cur.fetchone() == ("abc",)

    run(main())
    assert lc.execute("primary", f"SELECT array_agg(id) FROM {table}") == [([1],)]
