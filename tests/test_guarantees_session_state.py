"""Session state: what one user sets never reaches the next, and what a session set
is kept where it runs (issue 11, design rules 5 and 8).

Pools of one connection make "the next user gets the same connection" certain.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import psycopg2.errors
import pytest
from psycopg.rows import dict_row

from helpers import FAST, port_of, run, wait_until
from replica_router import AsyncCluster, Cluster, sources
from replica_router.integrations import psycopg2 as routed
from replica_router.sandbox import LocalCluster

ONE = {"min_size": 1, "max_size": 1}


@pytest.fixture(scope="module")
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    return replica_cluster


@pytest.fixture(scope="module")
def tenant(lc: LocalCluster) -> Iterator[str]:
    """A role a request may switch to (per-tenant roles with row-level security)."""
    name = f"guar_tenant_{uuid.uuid4().hex[:8]}"
    lc.execute("primary", f"CREATE ROLE {name} NOLOGIN")
    lc.wait_replicated()
    yield name
    lc.execute("primary", f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def table(lc: LocalCluster) -> Iterator[str]:
    name = f"guar_state_{uuid.uuid4().hex[:8]}"
    lc.execute("primary", f"CREATE TABLE {name} (id int)")
    lc.wait_replicated()
    yield name
    lc.execute("primary", f"DROP TABLE IF EXISTS {name}")


def one_connection_cluster(lc: LocalCluster, replicas: list[str]) -> Cluster:
    return Cluster(
        lc.primary_dsn,
        replicas,
        max_lag=None,
        pool_kwargs={"primary": ONE, "replica": ONE},
        **FAST,  # type: ignore[arg-type]
    )


def session_facts(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT session_user::text, current_user::text, current_setting('search_path'),"
        " current_setting('default_transaction_read_only'),"
        " current_setting('application_name'),"
        " (SELECT count(*) FROM pg_prepared_statements),"
        " (SELECT count(*) FROM pg_class WHERE relpersistence = 't')"
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_read_connection_carries_no_session_state_to_the_next_user(
    lc: LocalCluster, tenant: str
) -> None:
    """Defect 18: role, session authorization, search_path, GUCs and
    default_transaction_read_only set by one ``cluster.read()`` user are gone for the next."""
    with one_connection_cluster(lc, [lc.dsn("replica1")]) as cluster:
        with cluster.read() as conn:
            clean = session_facts(conn)
        with cluster.read() as conn:
            conn.execute(f"SET SESSION AUTHORIZATION {tenant}")
            conn.execute("SET search_path = pg_catalog")
            conn.execute("SET application_name = 'leaked'")
            conn.execute("SET default_transaction_read_only = off")
            conn.execute("PREPARE guar_leak AS SELECT 1")
        with cluster.read() as conn:
            assert session_facts(conn) == clean


def test_a_write_connection_carries_no_session_state_to_the_next_user(
    lc: LocalCluster, tenant: str
) -> None:
    """Defect 18: the same for ``cluster.write()``, plus SET ROLE, prepared statements
    and temp tables."""
    with one_connection_cluster(lc, []) as cluster:
        with cluster.write() as conn:
            clean = session_facts(conn)
        with cluster.write() as conn:
            conn.execute(f"SET ROLE {tenant}")
            conn.execute("SET search_path = pg_catalog")
            conn.execute("SET application_name = 'leaked'")
            conn.execute("RESET ROLE")  # temp tables need the owner's rights back
            conn.execute("CREATE TEMP TABLE guar_leak (id int)")
            conn.execute("PREPARE guar_leak AS SELECT 1")
            conn.execute(f"SET ROLE {tenant}")
        with cluster.write() as conn:
            assert session_facts(conn) == clean


def test_a_write_inside_cluster_read_never_succeeds_after_another_user_lifted_read_only(
    lc: LocalCluster, table: str
) -> None:
    """Defect 18: with no replica, reads fall back to the primary; a previous user's
    ``SET default_transaction_read_only = off`` must not make a write in
    ``cluster.read()`` succeed there."""
    with one_connection_cluster(lc, []) as cluster:
        with cluster.read() as conn:
            conn.execute("SET default_transaction_read_only = off")
        with cluster.read() as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert lc.execute("primary", f"SELECT count(*) FROM {table}") == [(0,)]


def test_session_authorization_is_kept_for_the_routed_sessions_reads(
    lc: LocalCluster, tenant: str
) -> None:
    """Defect 19: ``SET SESSION AUTHORIZATION`` inside a transaction (on the primary)
    is read back at commit and replayed, like any session setting: the session's
    next read, on a replica, runs as that user."""
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster,  # type: ignore[arg-type]
        cluster.connection() as conn,
    ):
        with conn.transaction():
            conn.execute(f"SET SESSION AUTHORIZATION {tenant}")
        row = conn.execute("SELECT session_user::text, current_user::text").fetchone()
        assert conn.nodes.get("read") in lc.replica_names
        assert row == (tenant, tenant)


def test_psycopg2_autocommit_readonly_refuses_writes(lc: LocalCluster, table: str) -> None:
    """Defect 16: psycopg2 itself refuses a write with ``autocommit=True, readonly=True``
    (it sets ``default_transaction_read_only`` on the session); the adapter must too."""
    lc.execute(
        "primary",
        f"CREATE FUNCTION {table}_volatile() RETURNS int VOLATILE LANGUAGE sql AS 'SELECT 1'",
    )
    lc.wait_replicated()
    plain = psycopg2.connect(lc.primary_dsn)
    try:
        plain.set_session(readonly=True, autocommit=True)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            plain.cursor().execute(f"INSERT INTO {table} VALUES (1)")
    finally:
        plain.close()
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:  # type: ignore[arg-type]
        conn = routed.connect(cluster)
        try:
            conn.set_session(readonly=True, autocommit=True)
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
            # one the classifier calls a write that only reads runs once, on the read link
            cur = conn.cursor()
            cur.execute(f"SELECT {table}_volatile()")
            assert cur.fetchone() == (1,)
            assert "write" not in conn.nodes
        finally:
            conn.close()
            routed.close_pools(cluster)
    assert lc.execute("primary", f"SELECT count(*) FROM {table}") == [(0,)]


def test_a_serializable_read_only_transaction_runs_on_the_primary(lc: LocalCluster) -> None:
    """Defect 14: a hot standby refuses SERIALIZABLE; such a transaction runs on the
    primary (RoutedConnection)."""
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:  # type: ignore[arg-type]
        with cluster.connection(read_only=True) as conn:
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            with conn.transaction():
                assert port_of(conn) == lc.port("primary")
        with cluster.connection() as conn:
            conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY")
            assert port_of(conn) == lc.port("primary")
            conn.execute("COMMIT")


def test_a_psycopg2_serializable_read_only_transaction_runs_on_the_primary(
    lc: LocalCluster,
) -> None:
    """Defect 14, psycopg2 adapter."""
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:  # type: ignore[arg-type]
        conn = routed.connect(cluster)
        try:
            conn.set_session(isolation_level="SERIALIZABLE", readonly=True)
            cur = conn.cursor()
            cur.execute("SELECT inet_server_port()")
            assert cur.fetchone() == (lc.port("primary"),)
            conn.commit()
        finally:
            conn.close()
            routed.close_pools(cluster)


@pytest.mark.destructive
def test_a_plain_set_works_after_the_held_replica_died(fresh_replica_cluster: LocalCluster) -> None:
    """Defect 15: the session's read link is on a replica that is killed; a plain SET
    is recorded and works, and the next read runs elsewhere with it applied."""
    lc = fresh_replica_cluster
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster,  # type: ignore[arg-type]
        cluster.connection() as conn,
    ):
        conn.execute("SELECT 1")
        held = conn.nodes["read"]
        lc.stop(held, mode="immediate")
        wait_until(lambda: not cluster.topology.by_name[held].healthy, what=f"{held} down")
        conn.execute("SET application_name = 'after-the-crash'")
        row = conn.execute("SELECT current_setting('application_name')").fetchone()
        assert row == ("after-the-crash",)
        assert conn.nodes["read"] != held


def test_the_reset_keeps_what_the_connection_was_opened_with(lc: LocalCluster) -> None:
    """Defect 18 (the other side): the reset goes back to the connect-time session
    (``connect_kwargs`` options, the read pool's read-only default), and puts back
    psycopg's client-side settings a user changed."""
    with Cluster(
        lc.primary_dsn,
        [lc.dsn("replica1")],
        pool_kwargs={"primary": ONE, "replica": ONE},
        connect_kwargs={"options": "-c work_mem=7MB"},
        **FAST,  # type: ignore[arg-type]
    ) as cluster:
        for _ in range(2):
            with cluster.read() as conn:
                row = conn.execute(
                    "SELECT current_setting('work_mem'),"
                    " current_setting('default_transaction_read_only')"
                ).fetchone()
                assert row == ("7MB", "on")
                conn.execute("SET work_mem = '9MB'")
                conn.row_factory = dict_row
        for _ in range(2):
            with cluster.write() as conn:
                assert conn.execute("SELECT current_setting('work_mem')").fetchone() == ("7MB",)
                conn.execute("SET work_mem = '9MB'")
                conn.commit()


def test_an_async_connection_carries_no_session_state_to_the_next_user(
    lc: LocalCluster, tenant: str
) -> None:
    """Defect 18, ``AsyncCluster``: the same reset on the async pools."""

    async def main() -> tuple[Any, Any]:
        async with AsyncCluster(
            lc.primary_dsn,
            [lc.dsn("replica1")],
            max_lag=None,
            pool_kwargs={"primary": ONE, "replica": ONE},
            **FAST,  # type: ignore[arg-type]
        ) as cluster:
            async with cluster.read() as conn:
                await conn.execute(f"SET SESSION AUTHORIZATION {tenant}")
                await conn.execute("SET search_path = pg_catalog")
            async with cluster.read() as conn:
                cur = await conn.execute(
                    "SELECT session_user::text, current_setting('search_path')"
                )
                read = await cur.fetchone()
            async with cluster.write() as conn:
                await conn.execute(f"SET ROLE {tenant}")
            async with cluster.write() as conn:
                cur = await conn.execute("SELECT current_user::text")
                write = await cur.fetchone()
            return read, write

    read, write = run(main())
    [(me,)] = lc.execute("primary", "SELECT current_user::text")
    assert read == (me, '"$user", public')
    assert write == (me,)


def test_psycopg_prepared_statements_survive_the_reset(lc: LocalCluster) -> None:
    """Defect 18 (the other side): psycopg prepares a query run often; after the reset
    deallocated it, psycopg prepares it again instead of failing on a missing one."""
    with one_connection_cluster(lc, [lc.dsn("replica1")]) as cluster:
        for _ in range(4):
            with cluster.read() as conn:
                for _ in range(7):  # past psycopg's prepare_threshold (5)
                    assert conn.execute("SELECT 42").fetchone() == (42,)


def backend_activity(lc: LocalCluster, node: str, pid: int) -> tuple[str, Any]:
    row = lc.execute(node, f"SELECT query, query_start FROM pg_stat_activity WHERE pid = {pid}")
    assert row, f"backend {pid} is gone"
    return row[0][0], row[0][1]


@pytest.mark.parametrize("purpose", ["read", "write"])
def test_the_reset_goes_with_the_next_users_first_statement(
    lc: LocalCluster, purpose: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hot paths: nothing is sent when a connection comes back nor when it is handed
    out again; the next user's first statement carries the reset (one round trip, not
    a reset of its own first), and that statement already sees a reset session."""
    settled: list[object] = []
    monkeypatch.setattr(sources, "settle_reset", settled.append)  # never a reset on its own
    node = "replica1" if purpose == "read" else "primary"
    replicas = [lc.dsn("replica1")] if purpose == "read" else []
    with one_connection_cluster(lc, replicas) as cluster:
        block = cluster.read if purpose == "read" else cluster.write
        with block() as conn:
            pid = conn.info.backend_pid
            conn.execute("SET search_path = pg_catalog")
            conn.execute("SELECT 'the user''s last query'")
        last = backend_activity(lc, node, pid)  # the block's last statement
        assert last[0] != "DISCARD ALL"
        with block() as conn:
            assert conn.info.backend_pid == pid
            assert backend_activity(lc, node, pid) == last  # nothing sent on return or checkout
            path = conn.execute("SELECT current_setting('search_path')").fetchone()
        assert path == ('"$user", public',)
        assert settled == []


@pytest.mark.parametrize("first", ["transaction", "copy", "pipeline", "client cursor"])
def test_the_reset_goes_first_whatever_the_first_use(lc: LocalCluster, first: str) -> None:
    """A first use other than a statement on the block's own cursor class still finds
    the session reset: the connection sends the reset it owes before any I/O."""
    with one_connection_cluster(lc, [lc.dsn("replica1")]) as cluster:
        with cluster.read() as conn:
            pid = conn.info.backend_pid
            conn.execute("SET search_path = pg_catalog")
        with cluster.read() as conn:
            assert conn.info.backend_pid == pid
            query = "SELECT current_setting('search_path')"
            if first == "transaction":
                with conn.transaction():
                    path = conn.execute(query).fetchone()
            elif first == "copy":
                with conn.cursor().copy(f"COPY ({query}) TO STDOUT") as copy:
                    path = tuple(next(iter(copy.rows())))
            elif first == "pipeline":
                with conn.pipeline():
                    cursor = conn.execute(query)
                path = cursor.fetchone()
            else:
                path = psycopg.ClientCursor(conn).execute(query).fetchone()
        assert path == ('"$user", public',)


def test_a_waiting_async_checkout_gets_the_connection_owing_its_reset(
    lc: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hot paths, under contention: a checkout waiting for the only connection gets it
    straight from the block that hands it back, nothing sent by the returning task; the
    waiter's first statement carries the reset (no round trip of its own), so the
    session is still reset before its query."""
    settled: list[str] = []
    settle = sources.asettle_reset

    async def recording(conn: Any) -> None:
        task = asyncio.current_task()
        settled.append(task.get_name() if task is not None else "")
        await settle(conn)

    monkeypatch.setattr(sources, "asettle_reset", recording)

    async def main() -> tuple[int, int, Any, list[str]]:
        async with AsyncCluster(
            lc.primary_dsn,
            [lc.dsn("replica1")],
            max_lag=None,
            pool_kwargs={"primary": ONE, "replica": ONE},
            **FAST,  # type: ignore[arg-type]
        ) as cluster:
            source: Any = cluster._sources[("replica1", "read")]

            async def waiter() -> tuple[int, Any]:
                async with cluster.read() as conn:
                    cur = await conn.execute("SELECT current_setting('search_path')")
                    return conn.info.backend_pid, await cur.fetchone()

            async with cluster.read() as conn:
                first = conn.info.backend_pid
                await conn.execute("SET search_path = pg_catalog")
                waiting = asyncio.create_task(waiter(), name="waiter")
                while not (source._asking or getattr(source, "_waiting", None)):
                    await asyncio.sleep(0.001)  # poll: the waiter is queued for a connection
                settled.clear()
            second, path = await waiting
            return first, second, path, list(settled)

    first, second, path, settled = run(main())
    assert second == first  # the same connection, handed over
    assert path == ('"$user", public',)  # reset before the waiter's first query
    assert settled == []  # with that query, not in a round trip of its own


def test_a_waiting_async_checkout_cancelled_as_it_is_handed_a_connection_passes_it_on(
    lc: LocalCluster,
) -> None:
    """The connection handed to a checkout whose task is cancelled before it resumes
    is not lost: the next checkout gets it, reset."""

    async def main() -> tuple[int, int, Any]:
        async with AsyncCluster(
            lc.primary_dsn,
            [lc.dsn("replica1")],
            max_lag=None,
            pool_kwargs={"primary": ONE, "replica": ONE},
            checkout_timeout=2.0,
            **FAST,  # type: ignore[arg-type]
        ) as cluster:
            source: Any = cluster._sources[("replica1", "read")]

            async def waiter() -> None:
                async with cluster.read():
                    pass

            async with cluster.read() as conn:
                first = conn.info.backend_pid
                await conn.execute("SET search_path = pg_catalog")
                waiting = asyncio.create_task(waiter())
                while not (source._asking or getattr(source, "_waiting", None)):
                    await asyncio.sleep(0.001)  # poll: the waiter is queued for a connection
            waiting.cancel()  # handed the connection, not yet resumed
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            async with cluster.read() as conn:
                cur = await conn.execute("SELECT current_setting('search_path')")
                return first, conn.info.backend_pid, await cur.fetchone()

    first, again, path = run(main())
    assert again == first  # the replica's only connection, not a fallback to the primary
    assert path == ('"$user", public',)


class _TaggedConnection(psycopg.Connection[Any]):
    """A user's own connection class."""


def test_a_users_connection_class_still_gets_the_reset(lc: LocalCluster) -> None:
    """``pool_kwargs={"replica": {"connection_class": ...}}``: the pool's connections are
    the user's class and still owe their reset, which the next user's first statement
    carries."""
    settings = {**ONE, "connection_class": _TaggedConnection}
    with Cluster(
        lc.primary_dsn,
        [lc.dsn("replica1")],
        max_lag=None,
        pool_kwargs={"primary": ONE, "replica": settings},
        **FAST,  # type: ignore[arg-type]
    ) as cluster:
        with cluster.read() as conn:
            assert isinstance(conn, _TaggedConnection)
            assert isinstance(conn, sources.PooledConnection)
            conn.execute("SET search_path = pg_catalog")
        with cluster.read() as conn:
            path = conn.execute("SELECT current_setting('search_path')").fetchone()
    assert path == ('"$user", public',)


def test_a_pools_configure_runs_after_the_reset(lc: LocalCluster) -> None:
    """A pool with a ``configure`` callback resets at checkout (the callback must run
    after the reset): the next user finds the previous one's settings gone and the
    callback's in place."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET application_name = 'configured'")

    with Cluster(
        lc.primary_dsn,
        [lc.dsn("replica1")],
        max_lag=None,
        pool_kwargs={"primary": ONE, "replica": {**ONE, "configure": configure}},
        **FAST,  # type: ignore[arg-type]
    ) as cluster:
        with cluster.read() as conn:
            conn.execute("SET search_path = pg_catalog")
            conn.execute("SET application_name = 'the last user'")
        with cluster.read() as conn:
            row = conn.execute(
                "SELECT current_setting('search_path'), current_setting('application_name')"
            ).fetchone()
    assert row == ('"$user", public', "configured")
