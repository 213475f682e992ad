"""AsyncCluster against real servers: the same rules, with async with / await."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from helpers import FAST, async_port_of, run, scratch_table
from replica_router import (
    AsyncCluster,
    ConfigurationError,
    NoReplicaAvailable,
    PrimaryUnavailable,
    Token,
    TokenError,
)
from replica_router.sandbox import LocalCluster


async def read_port(cluster: AsyncCluster, **kwargs: Any) -> int:
    async with cluster.read(**kwargs) as conn:
        return await async_port_of(conn)


@pytest.fixture
def table(replica_cluster: LocalCluster) -> Iterator[str]:
    with scratch_table(replica_cluster, "at", "id int PRIMARY KEY") as name:
        yield name


def test_reads_and_writes_route_and_commit(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None,
                                **FAST) as cluster:  # fmt: skip
            ports = [await read_port(cluster) for _ in range(6)]
            assert set(ports) == {lc.port("replica1"), lc.port("replica2")}
            async with cluster.write() as conn:
                assert await async_port_of(conn) == lc.port("primary")
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
            with pytest.raises(RuntimeError):
                async with cluster.write() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (2)")
                    raise RuntimeError("application error")
            async with cluster.read() as conn:
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    await conn.execute(f"INSERT INTO {table} VALUES (3)")
            assert cluster.counters().writes == {"primary": 2}
            assert [s.in_use for s in cluster.status()] == [0, 0, 0]

    run(main())
    assert lc.execute("primary", f"SELECT id FROM {table}") == [(1,)]


def test_read_your_writes_with_replay_paused(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster

    async def request(cluster: AsyncCluster, row_id: int) -> tuple[int, bool, str]:
        with cluster.session():
            async with cluster.write() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (%s)", (row_id,))
            async with cluster.read() as conn:
                cursor = await conn.execute(f"SELECT 1 FROM {table} WHERE id = %s", (row_id,))
                seen = await cursor.fetchone() is not None
                return await async_port_of(conn), seen, str(cluster.token)

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
            lc.pause_replay("replica1")
            lc.pause_replay("replica2")
            try:
                results = await asyncio.gather(*(request(cluster, i) for i in range(8)))
                assert all(seen for _, seen, _ in results)
                assert {port for port, _, _ in results} == {lc.port("primary")}
                # The token string from one task lets another (fresh) task read the row.
                text = results[0][2]

                async def later() -> int:
                    with cluster.session(token=Token.parse(text)):
                        return await read_port(cluster)

                assert await asyncio.create_task(later()) == lc.port("primary")
                foreign = Token(1, (cluster.system_identifier or 0) + 1)
                with pytest.raises(TokenError), cluster.session(token=foreign):
                    pass
            finally:
                lc.resume_replay("replica1")
                lc.resume_replay("replica2")
                lc.wait_replicated()

    run(main())


def test_a_failing_commit_raises_and_captures_nothing(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    name = f"adef_{uuid.uuid4().hex[:10]}"
    lc.execute("primary", f"CREATE TABLE {name} (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)")

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
            with cluster.session():
                with pytest.raises(psycopg.errors.UniqueViolation):
                    async with cluster.write() as conn:
                        await conn.execute(f"INSERT INTO {name} VALUES (1), (1)")
                assert cluster.token is None
                async with cluster.write() as conn:
                    await conn.execute(f"INSERT INTO {name} VALUES (2)")
                assert cluster.token is not None

    try:
        run(main())
        assert lc.execute("primary", f"SELECT id FROM {name}") == [(2,)]
    finally:
        lc.execute("primary", f"DROP TABLE {name}")


def test_fallback_error_and_wait(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, [], fallback="error", **FAST) as cluster:
            with pytest.raises(NoReplicaAvailable, match="fallback='error'"):
                await read_port(cluster)
        async with AsyncCluster(lc.primary_dsn, [], **FAST) as cluster:
            assert await read_port(cluster) == lc.port("primary")

    run(main())


def test_runtime_changes_and_checks(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns[:1], read_your_writes=None,
                                **FAST) as cluster:  # fmt: skip
            assert await cluster.add_replica(lc.dsn("replica2")) == "replica2"

            seen: set[int] = set()

            async def poll() -> None:
                seen.add(await read_port(cluster))

            deadline = time.monotonic() + 15
            while lc.port("replica2") not in seen:
                assert time.monotonic() < deadline, "reads never reached the added replica"
                await poll()
            await cluster.remove_replica("replica1")
            assert {await read_port(cluster) for _ in range(6)} == {lc.port("replica2")}
            with pytest.raises(ConfigurationError):
                await cluster.remove_replica("primary")
            assert await cluster.check_connections() == {"primary": True, "replica2": True}

    run(main())


@pytest.mark.destructive
def test_primary_down_and_replica_killed(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
            failures = 0
            for i in range(300):
                if i == 50:
                    lc.stop("replica1", mode="immediate")
                if i == 150:
                    lc.stop("primary", mode="immediate")
                try:
                    await read_port(cluster)
                except psycopg.Error:
                    failures += 1
            assert failures == 0
            started = time.monotonic()
            with pytest.raises(PrimaryUnavailable):
                async with cluster.write():
                    pass
            assert time.monotonic() - started < 2.0

    run(main())


def test_a_write_blocks_first_statement_goes_with_its_begin(
    replica_cluster: LocalCluster, table: str, tmp_path: Any
) -> None:
    """As the sync twin: BEGIN and the first statement in one round trip (libpq's
    protocol trace counts the server's ReadyForQuery), the transaction's settings kept."""
    lc = replica_cluster
    trace = tmp_path / "trace"

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
            async with cluster.write() as conn:
                with open(trace, "w") as out:
                    conn.pgconn.trace(out.fileno())
                    cur = await conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (1,))
                    conn.pgconn.untrace()
                assert await cur.fetchone() == (1,)
                assert trace.read_text().count("\tReadyForQuery\t") == 1
                assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            async with cluster.write() as conn:
                await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
                cur = await conn.execute("SHOW transaction_isolation")
                assert await cur.fetchone() == ("repeatable read",)

    run(main())
    assert lc.execute("primary", f"SELECT id FROM {table}") == [(1,)]
