"""Read-your-writes on every path: the token follows what the primary committed.

Each test writes through the public API with replay paused on every replica, then
reads: a read that honours the scope's token must see the row (only the primary
has it), a read that lost the token lands on a replica that cannot have it. So
each test fails exactly when the token did not advance (issue 11, design rule 1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import pytest

from helpers import FAST, commit_record_end, replay_paused, run, scratch_table
from replica_router import (
    AsyncCluster,
    Cluster,
    ConsistencyTimeout,
    NoReplicaAvailable,
    Token,
    TokenError,
)
from replica_router.asgi import ConsistencyMiddleware
from replica_router.integrations import psycopg2 as routed
from replica_router.lsn import format_lsn
from replica_router.sandbox import LocalCluster


@pytest.fixture(scope="module")
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    return replica_cluster


@pytest.fixture
def table(lc: LocalCluster) -> Iterator[str]:
    with scratch_table(lc, "guar_tok", "id int PRIMARY KEY") as name:
        yield name


@pytest.fixture
def cluster(lc: LocalCluster) -> Iterator[Cluster]:
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as c:  # type: ignore[arg-type]
        yield c
    routed.close_pools(c)


@pytest.fixture
def paused(lc: LocalCluster, table: str) -> Iterator[None]:
    """Replay paused on every replica, after ``table`` exists everywhere."""
    with replay_paused(lc):
        yield
    lc.wait_replicated()


def seen(cluster: Cluster, table: str, row_id: int) -> bool:
    """Whether a read in the current scope sees row ``row_id``."""
    with cluster.read() as conn:
        return conn.execute(f"SELECT 1 FROM {table} WHERE id = %s", (row_id,)).fetchone() == (1,)


def committed(lc: LocalCluster, table: str, row_id: int) -> bool:
    return lc.execute("primary", f"SELECT count(*) FROM {table} WHERE id = {row_id}") == [(1,)]


# -- defect 3: commits the block made itself -------------------------------------------------


@pytest.mark.usefixtures("paused")
def test_a_commit_inside_a_write_block_advances_the_token(cluster: Cluster, table: str) -> None:
    """Defect 3: ``conn.commit()`` inside ``cluster.write()`` is a commit on the primary."""
    with cluster.write() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        conn.commit()
    assert seen(cluster, table, 1)


@pytest.mark.usefixtures("paused")
def test_a_transaction_block_inside_a_write_block_advances_the_token(
    cluster: Cluster, table: str
) -> None:
    """Defect 3: ``with conn.transaction()`` inside ``cluster.write()`` commits on its exit."""
    with cluster.write() as conn, conn.transaction():
        conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert seen(cluster, table, 2)


@pytest.mark.usefixtures("paused")
def test_a_write_block_that_commits_then_raises_still_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """Defect 3: the commit happened; the later exception does not undo it."""
    with pytest.raises(RuntimeError, match="after the commit"), cluster.write() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (3)")
        conn.commit()
        raise RuntimeError("after the commit")
    assert committed(lc, table, 3)
    assert seen(cluster, table, 3)


def end_backend(lc: LocalCluster, pid: int) -> None:
    """Terminate one backend and wait until it is gone."""
    assert lc.execute("primary", f"SELECT pg_terminate_backend({pid})") == [(True,)]
    gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
    for _ in range(500):
        if lc.execute("primary", gone) == [(0,)]:
            return
    raise AssertionError(f"backend {pid} still there")


@pytest.mark.usefixtures("paused")
def test_a_write_block_whose_connection_dies_after_its_commit_still_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """Rule 1: the block committed on its own and its connection then died, so the
    position cannot be asked there; any position read on the primary after the commit
    covers it (asked on another connection), and a read in the scope sees the row."""
    with cluster.session(inherit=False):
        with cluster.write() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (5)")
            conn.commit()
            end_backend(lc, conn.info.backend_pid)
        assert committed(lc, table, 5)
        assert cluster.token is not None
        assert seen(cluster, table, 5)


@pytest.mark.usefixtures("paused")
def test_a_commit_inside_an_async_write_block_advances_the_token(
    lc: LocalCluster, table: str
) -> None:
    """Defect 3, asyncio: the same commit on an ``AsyncCluster``."""

    async def main() -> bool:
        cluster = AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST)  # type: ignore[arg-type]
        async with cluster:
            async with cluster.write() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (4)")
                await conn.commit()
            async with cluster.read() as conn:
                cur = await conn.execute(f"SELECT 1 FROM {table} WHERE id = 4")
                return await cur.fetchone() == (1,)

    assert run(main())


# -- defect 5: writes the classifier takes for reads --------------------------------------------


@pytest.fixture
def writing_view(lc: LocalCluster, table: str) -> Iterator[str]:
    """A view whose SELECT inserts into ``table`` (through a VOLATILE function)."""
    suffix = uuid.uuid4().hex[:8]
    func, view = f"guar_ins_{suffix}", f"guar_view_{suffix}"
    lc.execute(
        "primary",
        f"CREATE FUNCTION {func}() RETURNS int VOLATILE LANGUAGE sql "
        f"AS 'INSERT INTO {table} VALUES (5) RETURNING id'",
    )
    lc.execute("primary", f"CREATE VIEW {view} AS SELECT {func}() AS id")
    lc.wait_replicated()
    yield view
    lc.execute("primary", f"DROP VIEW IF EXISTS {view}")
    lc.execute("primary", f"DROP FUNCTION IF EXISTS {func}()")


def test_a_view_that_writes_inside_a_routed_transaction_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str, writing_view: str
) -> None:
    """Defect 5: the transaction ran on the primary and committed a row; what the
    classifier thought of its SELECT does not matter."""
    with replay_paused(lc):
        with cluster.connection(autocommit=False) as conn:
            conn.execute(f"SELECT * FROM {writing_view}")
            conn.commit()
        assert committed(lc, table, 5)
        assert seen(cluster, table, 5)


def test_a_view_that_writes_in_psycopg2_default_mode_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str, writing_view: str
) -> None:
    """Defect 5, psycopg2's default transactional mode."""
    with replay_paused(lc):
        conn = routed.connect(cluster)
        try:
            conn.cursor().execute(f"SELECT * FROM {writing_view}")
            conn.commit()
        finally:
            conn.close()
        assert committed(lc, table, 5)
        assert seen(cluster, table, 5)


def test_a_function_redeclared_volatile_after_it_was_learned_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """Defect 5: volatility learned at open() is stale once the function is replaced."""
    func = f"guar_relearn_{uuid.uuid4().hex[:8]}"
    lc.execute("primary", f"CREATE FUNCTION {func}() RETURNS int STABLE LANGUAGE sql AS 'SELECT 1'")
    lc.wait_replicated()
    try:
        with cluster.connection() as conn:
            conn.execute(f"SELECT {func}()")  # learned STABLE
        lc.execute(
            "primary",
            f"CREATE OR REPLACE FUNCTION {func}() RETURNS int VOLATILE LANGUAGE sql "
            f"AS 'INSERT INTO {table} VALUES (6) RETURNING id'",
        )
        lc.wait_replicated()
        with replay_paused(lc):
            with cluster.connection(autocommit=False) as conn:
                conn.execute(f"SELECT {func}()")
                conn.commit()
            assert committed(lc, table, 6)
            assert seen(cluster, table, 6)
    finally:
        lc.execute("primary", f"DROP FUNCTION IF EXISTS {func}()")


# -- defects 6 and 7: COMMIT inside a string, partial commits -----------------------------------


@pytest.mark.usefixtures("paused")
def test_a_multi_statement_string_ending_in_commit_advances_the_token(
    cluster: Cluster, table: str
) -> None:
    """Defect 6: ``BEGIN; INSERT ...; COMMIT`` sent as one string in autocommit."""
    with cluster.connection() as conn:
        conn.execute(f"BEGIN; INSERT INTO {table} VALUES (7); COMMIT")
    assert seen(cluster, table, 7)


@pytest.mark.usefixtures("paused")
def test_a_commit_statement_inside_a_transaction_string_advances_the_token(
    cluster: Cluster, table: str
) -> None:
    """Defect 6: ``INSERT ...; COMMIT`` with ``autocommit=False`` commits the transaction."""
    with cluster.connection(autocommit=False) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (8); COMMIT")
    assert seen(cluster, table, 8)


def test_a_string_that_commits_then_fails_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """Defect 7: the INSERT committed before the division failed."""
    with replay_paused(lc):
        with cluster.connection() as conn, pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(f"INSERT INTO {table} VALUES (9); COMMIT; SELECT 1/0")
        assert committed(lc, table, 9)
        assert seen(cluster, table, 9)


def test_psycopg2_executemany_failing_midway_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """Defect 7: rows 10 and 11 committed one by one before row 10 again failed."""
    with replay_paused(lc):
        conn = routed.connect(cluster, autocommit=True)
        try:
            with pytest.raises(psycopg2.errors.UniqueViolation):
                conn.cursor().executemany(f"INSERT INTO {table} VALUES (%s)", [(10,), (11,), (10,)])
        finally:
            conn.close()
        assert committed(lc, table, 11)
        assert seen(cluster, table, 11)


def test_a_commit_in_a_string_that_leaves_a_failed_transaction_advances_the_token(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """Defect 7: the COMMIT happened; the connection can only say where once the failed
    transaction after it is rolled back."""
    with replay_paused(lc):
        with cluster.connection(autocommit=False) as conn:
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute(f"INSERT INTO {table} VALUES (14); COMMIT; BEGIN; SELECT 1/0")
            conn.rollback()
        assert committed(lc, table, 14)
        assert seen(cluster, table, 14)


def test_transactions_that_wrote_nothing_on_the_primary_leave_the_token(
    cluster: Cluster, table: str
) -> None:
    """Design rule 1, the other side: the server says these transactions changed no
    data (no transaction id was assigned), so the token stays where it was."""
    with cluster.session():
        with cluster.connection(autocommit=False) as conn:
            conn.execute(f"SELECT count(*) FROM {table}")
            conn.commit()
        conn2 = routed.connect(cluster)
        try:
            conn2.cursor().execute(f"SELECT count(*) FROM {table}")
            conn2.commit()
        finally:
            conn2.close()
        with cluster.connection() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (15) ON CONFLICT DO NOTHING")
            token = cluster.token
            assert token is not None
            with conn.transaction():
                conn.execute(f"SELECT count(*) FROM {table}")
        assert cluster.token == token


def test_an_autocommit_write_token_is_at_or_past_its_commit_record(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """Issue 16: the position that comes back in the statement's own round trip is read
    after its commit (a position read inside its implicit transaction is before the
    commit record). Checked against the primary's WAL itself (pg_walinspect)."""
    try:
        lc.execute("primary", "CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    except Exception as exc:  # a server without the contrib modules
        pytest.skip(f"pg_walinspect is not available: {exc}")
    start = lc.execute("primary", "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    with cluster.session(inherit=False), cluster.connection() as conn:
        row = conn.execute(
            f"INSERT INTO {table} VALUES (16) RETURNING pg_current_xact_id()::text"
        ).fetchone()
        token = cluster.token
    assert row is not None and token is not None
    assert commit_record_end(lc, start, row[0]) <= token.lsn


# -- defect 8: request state made at the scope boundary -----------------------------------------


# Each runs in a fresh context (no session: the caller has no scope before the copy).


@pytest.mark.usefixtures("paused")
def test_a_write_in_to_thread_reaches_the_callers_scope(cluster: Cluster, table: str) -> None:
    """Defect 8: ``asyncio.to_thread`` copies the context; the write must still count."""

    def write() -> None:
        with cluster.write() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (12)")

    async def main() -> bool:
        await asyncio.to_thread(write)
        return seen(cluster, table, 12)

    assert run(main())


@pytest.mark.usefixtures("paused")
def test_a_write_in_a_thread_pool_executor_reaches_the_callers_scope(
    cluster: Cluster, table: str
) -> None:
    """Defect 8: an executor's worker thread runs in a context of its own."""

    def body() -> bool:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(_insert, cluster, table, 14).result()
        return seen(cluster, table, 14)

    assert contextvars.Context().run(body)


@pytest.mark.usefixtures("paused")
def test_a_write_in_a_copied_context_reaches_the_callers_scope(
    cluster: Cluster, table: str
) -> None:
    """Defect 8: ``contextvars.copy_context().run``, the copy every framework makes."""

    def body() -> bool:
        contextvars.copy_context().run(_insert, cluster, table, 15)
        return seen(cluster, table, 15)

    assert contextvars.Context().run(body)


@pytest.mark.usefixtures("paused")
def test_a_session_in_a_thread_keeps_its_writes_to_itself(cluster: Cluster, table: str) -> None:
    """The root scope is only for code outside every session: a thread's own unit of
    work (``session(inherit=False)``) hands nothing to it."""

    def job() -> None:
        with cluster.session(inherit=False):
            _insert(cluster, table, 16)
            assert seen(cluster, table, 16)  # the job reads its own write

    def body() -> bool:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(job).result()
        return seen(cluster, table, 16)

    assert not contextvars.Context().run(body)  # a paused replica served it: no token


def _insert(cluster: Cluster, table: str, row_id: int) -> None:
    with cluster.write() as conn:
        conn.execute(f"INSERT INTO {table} VALUES ({row_id})")


# -- defect 9: the monotonic floor rises when a read is served -----------------------------------


def _routed_read(driver: str, cluster: Cluster, sql: str) -> tuple[Any, Any]:
    """A routed connection of ``driver`` that ran one read: (connection, its row)."""
    if driver == "psycopg":
        conn: Any = cluster.connection()
        return conn, conn.execute(sql).fetchone()
    conn = routed.connect(cluster, autocommit=True)
    cursor = conn.cursor()
    cursor.execute(sql)
    return conn, cursor.fetchone()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_monotonic_read_never_goes_back_while_a_routed_read_is_held(
    lc: LocalCluster, table: str, driver: str
) -> None:
    """Defect 9: once a routed read saw the row on replica1, no read of the scope may
    be served by replica2, which has not replayed it (psycopg and psycopg2 alike)."""
    with Cluster(
        lc.primary_dsn,
        lc.replica_dsns,
        max_lag=None,
        read_your_writes=None,
        monotonic_reads=True,
        **FAST,  # type: ignore[arg-type]
    ) as cluster:
        lc.pause_replay("replica2")
        try:
            lc.execute("primary", f"INSERT INTO {table} VALUES (13)")
            lc.wait_replicated()  # replica1 only: replica2 is paused
            held: Any = None
            for _ in range(10):  # round robin: one of the first two lands on replica1
                sql = f"SELECT count(*) FROM {table} WHERE id = 13"
                conn, row = _routed_read(driver, cluster, sql)
                if conn.nodes.get("read") == "replica1":
                    assert row == (1,)
                    held = conn
                    break
                conn.close()
            assert held is not None, "no routed read landed on replica1"
            try:
                later = [seen(cluster, table, 13) for _ in range(4)]
            finally:
                held.close()
            assert all(later), f"a later read went back in time: {later}"
        finally:
            lc.resume_replay("replica2")
            lc.wait_replicated()
    routed.close_pools(cluster)


# -- defects 20 and 21: what an unreached token does --------------------------------------------


def far_future(lc: LocalCluster) -> Token:
    return Token(2**62, lc.system_identifier)


def test_fallback_error_with_an_unreached_token_raises_consistency_timeout(
    lc: LocalCluster,
) -> None:
    """Defect 20: docs/consistency.md promises ``ConsistencyTimeout``, a subclass of
    ``NoReplicaAvailable``, so handlers written from either name catch it."""
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, fallback="error", **FAST) as cluster,  # type: ignore[arg-type]
        cluster.session(token=far_future(lc)),
    ):
        with pytest.raises(ConsistencyTimeout), cluster.read():
            pass
        with pytest.raises(NoReplicaAvailable):
            cluster.route_read()


def test_fallback_wait_with_an_unreached_token_reads_the_primary_after_the_timeout(
    lc: LocalCluster,
) -> None:
    """Defect 21: a token no replica reaches within ``consistency_timeout`` reads the
    primary while it is up; only ``fallback="error"`` raises."""
    with (
        Cluster(
            lc.primary_dsn,
            lc.replica_dsns,
            fallback="wait",
            consistency_timeout=0.2,
            **FAST,  # type: ignore[arg-type]
        ) as cluster,
        cluster.session(token=far_future(lc)),
    ):
        with cluster.read() as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert cluster.route_read() == "primary"


# -- defect 22: tokens are ASCII --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["1.\u212a.1", "1.1.\u212a", "1.\u017f.1", "1.1.\u017f", "1.\u0131.1", "1.1.\u0131"],
    ids=["kelvin-sid", "kelvin-lsn", "long-s-sid", "long-s-lsn", "dotless-i-sid", "dotless-i-lsn"],
)
def test_a_token_with_non_ascii_letters_is_a_token_error(text: str) -> None:
    """Defect 22: K (U+212A), ſ and ı match ``[0-9a-z]`` only case-insensitively;
    they are not base-36 digits and must be rejected as a malformed token."""
    with pytest.raises(TokenError):
        Token.parse(text)


def test_a_token_still_round_trips_in_either_case() -> None:
    """Defect 22 (the other side): the fix must not reject real tokens."""
    token = Token(0x16B374D848, 7311111111111111111)
    assert Token.parse(str(token)) == token
    assert Token.parse(str(token).upper()) == token
    assert format_lsn(Token.parse(str(token)).lsn) == "16/B374D848"


# -- defect 11: a token in any cookie header ------------------------------------------------


def test_the_asgi_middleware_finds_the_token_in_any_cookie_header(lc: LocalCluster) -> None:
    """Defect 11: HTTP/2 clients may send one ``cookie`` header per cookie; the token
    in the first of them is the request's token."""
    token = Token(0x3000060, lc.system_identifier)
    seen_tokens: list[Token | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen_tokens.append(cluster.token)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call() -> None:
        middleware = ConsistencyMiddleware(app, cluster=cluster)
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [(b"cookie", f"rr_token={token}".encode()), (b"cookie", b"theme=dark")],
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        await middleware(scope, receive, send)

    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:  # type: ignore[arg-type]
        run(call())
    assert seen_tokens == [token]
