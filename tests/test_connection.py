"""RoutedConnection against real servers: where each statement runs, checked server-side.

Every placement is verified by the server itself (``inet_server_port()`` compared with
the sandbox's ports), never by asking the router where it thinks it sent something.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from helpers import FAST, port_of, replica_ports, scratch_table, wait_until
from replica_router import Cluster, Intent
from replica_router._connection_base import query_text
from replica_router.classify import Statement
from replica_router.connection import run_capturing
from replica_router.lsn import parse_lsn
from replica_router.sandbox import LocalCluster
from replica_router.session import (
    ROUTE_BEGIN_READ,
    ROUTE_BEGIN_WRITE,
    ROUTE_READ,
    ROUTE_SETTING,
    ROUTE_WRITE,
    begin_sql,
    route,
    writes_data,
)

# One connection per pool, so a test can see that what it left behind was cleaned.
SINGLE = {"pool_kwargs": {"primary": {"max_size": 1}, "replica": {"max_size": 1}}}


@pytest.fixture
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    return replica_cluster


@pytest.fixture
def cluster(lc: LocalCluster) -> Iterator[Cluster]:
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST, **SINGLE) as c:  # type: ignore[arg-type]
        yield c


@pytest.fixture
def table(lc: LocalCluster) -> Iterator[str]:
    with scratch_table(lc, "rc", "id int PRIMARY KEY, v text") as name:
        yield name


# -- pure decisions (no server) ----------------------------------------------------------


def st(
    intent: Intent = Intent.READ,
    reason: str = "SELECT",
    transaction: Any = None,
    session: frozenset[Any] = frozenset(),
    statements: int = 1,
) -> Statement:
    return Statement(intent, reason, transaction, session, statements)


def test_route_autocommit_reads_writes_and_settings() -> None:
    common = {"autocommit": True, "read_only": None, "pinned": False}
    assert route(st(), **common) == ROUTE_READ  # type: ignore[arg-type]
    assert route(st(Intent.WRITE, "INSERT"), **common) == ROUTE_WRITE  # type: ignore[arg-type]
    plain_set = st(Intent.WRITE, "SET", session=frozenset({"set"}))
    assert route(plain_set, **common) == ROUTE_SETTING  # type: ignore[arg-type]
    # set_config() in a query, or SET among other statements: run on the primary, read back
    in_query = st(Intent.WRITE, "calls set_config()", session=frozenset({"set"}))
    assert route(in_query, **common) == ROUTE_WRITE  # type: ignore[arg-type]
    several = st(Intent.WRITE, "statement 1 of 2: SET", session=frozenset({"set"}), statements=2)
    assert route(several, **common) == ROUTE_WRITE  # type: ignore[arg-type]
    # a read that leaves session state (PREPARE of a read, DECLARE WITH HOLD) pins: primary
    prepared = st(Intent.READ, "PREPARE of a read", session=frozenset({"prepare"}))
    assert route(prepared, **common) == ROUTE_WRITE  # type: ignore[arg-type]
    assert route(st(), autocommit=True, read_only=None, pinned=True) == ROUTE_WRITE


def test_route_transactions() -> None:
    begin = st(Intent.WRITE, "transaction control: BEGIN", "begin")
    begin_ro = st(Intent.WRITE, "transaction control: BEGIN READ ONLY", "begin_read_only")
    set_ro = st(Intent.WRITE, "SET TRANSACTION", "set_read_only")
    for autocommit in (True, False):
        assert route(begin, autocommit=autocommit, read_only=None, pinned=False) == (
            ROUTE_BEGIN_WRITE
        )
        assert route(begin_ro, autocommit=autocommit, read_only=None, pinned=False) == (
            ROUTE_BEGIN_READ
        )
        assert route(begin, autocommit=autocommit, read_only=True, pinned=False) == (
            ROUTE_BEGIN_READ
        )
        # a pinned session's transactions run where its state is
        assert route(begin_ro, autocommit=autocommit, read_only=True, pinned=True) == (
            ROUTE_BEGIN_WRITE
        )
    # not autocommit: every statement opens a transaction; a SELECT does not make it read-only
    assert route(st(), autocommit=False, read_only=None, pinned=False) == ROUTE_BEGIN_WRITE
    assert route(st(), autocommit=False, read_only=True, pinned=False) == ROUTE_BEGIN_READ
    assert route(set_ro, autocommit=False, read_only=None, pinned=False) == ROUTE_BEGIN_READ
    # SET TRANSACTION READ ONLY outside a transaction does nothing: not a declaration
    assert route(set_ro, autocommit=True, read_only=None, pinned=False) == ROUTE_WRITE


def test_route_serializable_transactions_to_the_primary() -> None:
    """A hot standby refuses SERIALIZABLE even when read-only (defect 14): the session's
    isolation level, ``BEGIN ... SERIALIZABLE`` or ``SET TRANSACTION ... SERIALIZABLE``."""
    begin_ro = st(Intent.WRITE, "transaction control: BEGIN READ ONLY", "begin_read_only")
    begin_ser = st(Intent.WRITE, "transaction control: BEGIN SERIALIZABLE", "begin_serializable")
    set_ser = st(Intent.WRITE, "SET TRANSACTION", "set_serializable")
    for autocommit in (True, False):
        assert (
            route(begin_ro, autocommit=autocommit, read_only=True, pinned=False, serializable=True)
            == ROUTE_BEGIN_WRITE
        )
        assert (
            route(begin_ser, autocommit=autocommit, read_only=True, pinned=False)
            == ROUTE_BEGIN_WRITE
        )
    assert (
        route(st(), autocommit=False, read_only=True, pinned=False, serializable=True)
        == ROUTE_BEGIN_WRITE
    )
    assert route(set_ser, autocommit=False, read_only=True, pinned=False) == ROUTE_BEGIN_WRITE


def test_writes_data_and_begin_sql() -> None:
    assert writes_data(st(Intent.WRITE, "INSERT"))
    assert writes_data(st(Intent.WRITE, "transaction control: COMMIT PREPARED", "commit_prepared"))
    assert not writes_data(st())
    assert not writes_data(st(Intent.WRITE, "SET LOCAL"))
    assert not writes_data(st(Intent.WRITE, "transaction control: COMMIT", "commit"))
    assert begin_sql(None, None, None) == "BEGIN"
    assert begin_sql("SERIALIZABLE", True, True) == (
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"
    )
    assert begin_sql(None, False, False) == "BEGIN READ WRITE NOT DEFERRABLE"


def test_query_text_of_psycopg_query_types() -> None:
    assert query_text(b"SELECT 1") == "SELECT 1"
    composed = sql.SQL("SELECT * FROM {} WHERE id = {}").format(
        sql.Identifier("t"), sql.Placeholder()
    )
    assert query_text(composed) == 'SELECT * FROM "t" WHERE id = %s'
    with pytest.raises(TypeError, match=r"str, bytes or psycopg\.sql\.Composable"):
        query_text(42)


# -- autocommit: statement by statement ---------------------------------------------------


def test_reads_go_to_replicas_and_writes_to_the_primary(lc: LocalCluster, table: str) -> None:
    primary = lc.port("primary")
    # Without read-your-writes, so that every read may go to a replica right after a write.
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None, **FAST) as cluster,  # type: ignore[arg-type]
        cluster.connection() as conn,
    ):
        assert port_of(conn) in replica_ports(lc)
        for i in range(5):
            cur = conn.execute(
                f"INSERT INTO {table} VALUES (%s, 'x') RETURNING inet_server_port()", (i,)
            )
            assert cur.fetchone() == (primary,)
            assert port_of(conn) in replica_ports(lc)
        # writes the classifier catches: row locks, side-effect functions, writable CTEs
        assert (
            port_of(conn, f"SELECT inet_server_port() FROM {table} LIMIT 1 FOR UPDATE") == primary
        )
        assert port_of(conn, "SELECT inet_server_port() + 0 * txid_current()") == primary
        cte = (
            f"WITH d AS (DELETE FROM {table} WHERE id = 4 RETURNING id) "
            "SELECT inet_server_port() FROM d"
        )
        assert port_of(conn, cte) == primary
        lc.wait_replicated()  # no read-your-writes here: let the replicas have the DELETE
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (4,)
        assert not conn.pinned
        counters = cluster.counters()  # every statement counted once, where it ran
        assert sum(counters.reads.values()) == 7 and set(counters.reads) <= set(lc.replica_names)
        assert counters.writes == {"primary": 8}


def test_node_connections_are_held_while_open_and_returned_on_close(
    cluster: Cluster, table: str
) -> None:
    conn = cluster.connection()
    assert conn.nodes == {}  # nothing is leased before the first statement
    conn.execute("SELECT 1")
    conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    held = conn.nodes
    assert set(held) == {"read", "write"} and held["write"] == "primary"
    assert cluster.in_use(held["read"]) == 1 and cluster.in_use("primary") == 1
    conn.close()
    assert conn.closed
    assert cluster.in_use(held["read"]) == 0 and cluster.in_use("primary") == 0
    # the write pool's only connection is usable (and transactional again) after the return
    with cluster.write() as w:
        assert not w.autocommit
        assert w.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)


def test_unparsable_sql_goes_to_the_primary_and_raises_the_servers_error(
    cluster: Cluster,
) -> None:
    with cluster.connection() as conn:
        before = cluster.counters().writes.get("primary", 0)
        with pytest.raises(psycopg.errors.SyntaxError, match="syntax error"):
            conn.execute("SELEC 1 FROM")
        assert conn.nodes == {"write": "primary"}
        assert cluster.counters().writes.get("primary", 0) == before + 1
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on


def test_closed_connection_and_cursor_raise(cluster: Cluster) -> None:
    conn = cluster.connection()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.close()
    with pytest.raises(psycopg.InterfaceError, match="cursor is closed"):
        cur.fetchone()
    conn.close()
    conn.close()  # idempotent
    for call in (lambda: conn.execute("SELECT 1"), conn.cursor, conn.transaction, conn.commit):
        with pytest.raises(psycopg.InterfaceError, match="connection is closed") as info:
            call()
        assert isinstance(info.value, psycopg.OperationalError)  # what psycopg itself raises


# -- transactions ---------------------------------------------------------------------------


def test_a_transaction_starting_with_a_select_never_leaves_the_primary(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    primary = lc.port("primary")
    with cluster.connection() as conn:
        with conn.transaction():
            first = port_of(conn)
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            assert port_of(conn) == first == primary
            with conn.transaction():  # a savepoint, same node
                conn.execute(f"UPDATE {table} SET v = 'b'")
                assert port_of(conn) == primary
        # autocommit again after the block: reads go back to replicas (once they replayed it)
        wait_until(lambda: port_of(conn) in replica_ports(lc), what="reads back on replicas")
    with cluster.write() as w:
        assert w.execute(f"SELECT v FROM {table}").fetchall() == [("b",)]


def test_not_autocommit_pins_each_transaction_to_the_primary(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    primary = lc.port("primary")
    with cluster.connection(autocommit=False) as conn:
        assert port_of(conn) == primary  # a SELECT opens the transaction; it may write later
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert port_of(conn) == primary
        conn.commit()
        assert port_of(conn) == primary
        conn.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        conn.rollback()
        assert port_of(conn) == primary
    # the with block committed the last (read-only) transaction; row 2 was rolled back
    with cluster.write() as w:
        assert w.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]


def test_begin_statements_open_pinned_transactions(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    primary = lc.port("primary")
    with cluster.connection() as conn:
        conn.execute("BEGIN")
        assert port_of(conn) == primary
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert port_of(conn) == primary
        conn.execute("COMMIT")
        assert cluster.token is not None  # the COMMIT statement advanced the token
        wait_until(lambda: port_of(conn) in replica_ports(lc), what="reads back on replicas")
        conn.execute("BEGIN READ ONLY")
        ro = port_of(conn)
        assert ro in replica_ports(lc)
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
        assert port_of(conn) == ro
        conn.execute("ROLLBACK")


def test_read_only_transactions_run_on_one_replica(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    with cluster.connection() as conn:
        conn.read_only = True
        with conn.transaction():
            first = port_of(conn)
            assert first in replica_ports(lc)
            for _ in range(5):
                assert port_of(conn) == first
            # a write inside it is refused by the server, as in any read-only transaction
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            raise psycopg.Rollback
        # session state cannot be taken inside it: it would be left behind on a replica
        with (
            pytest.raises(psycopg.NotSupportedError, match="read-only transaction"),
            conn.transaction(),
        ):
            conn.execute("SELECT pg_advisory_lock(1)")
    with cluster.connection(autocommit=False) as conn:
        conn.execute("SET TRANSACTION READ ONLY")  # first statement: declares it
        assert port_of(conn) in replica_ports(lc)
        conn.commit()


def test_transaction_blocks_follow_psycopg(cluster: Cluster, table: str) -> None:
    with cluster.connection() as conn:
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            with conn.transaction() as inner:
                conn.execute(f"INSERT INTO {table} VALUES (2, 'b')")
                raise psycopg.Rollback(inner)  # only the savepoint is undone
        with pytest.raises(ZeroDivisionError), conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (3, 'c')")
            raise ZeroDivisionError
        with conn.transaction(force_rollback=True):
            conn.execute(f"INSERT INTO {table} VALUES (4, 'd')")
        with conn.transaction() as outer:
            conn.execute(f"INSERT INTO {table} VALUES (5, 'e')")
            with conn.transaction():
                raise psycopg.Rollback(outer)  # unwinds both blocks, no error
        with conn.transaction(), pytest.raises(psycopg.ProgrammingError, match="forbidden"):
            conn.commit()
        assert conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall() == [(1,)]


def test_context_manager_commits_or_rolls_back(cluster: Cluster, table: str) -> None:
    with cluster.connection(autocommit=False) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    with pytest.raises(ZeroDivisionError), cluster.connection(autocommit=False) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        raise ZeroDivisionError
    assert conn.closed
    with cluster.connection() as conn:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {table} VALUES (3, 'c')")  # committed on exit
    with cluster.write() as w:
        assert w.execute(f"SELECT id FROM {table} ORDER BY id").fetchall() == [(1,), (3,)]
    assert cluster.in_use("primary") == 0


# -- session state --------------------------------------------------------------------------


def test_set_is_replayed_on_every_node_the_session_uses(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    schema = f"s_{uuid.uuid4().hex[:8]}"
    lc.execute("primary", f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.only_here (x int)")
    lc.execute("primary", f"INSERT INTO {schema}.only_here VALUES (7)")
    lc.wait_replicated()
    try:
        with cluster.connection() as conn:
            conn.execute("SET statement_timeout = '4s'")
            conn.execute(f"SET search_path = {schema}, public")
            reader = port_of(conn)
            assert reader in replica_ports(lc)
            assert conn.execute("SHOW statement_timeout").fetchone() == ("4s",)
            assert conn.execute("SELECT x FROM only_here").fetchone() == (7,)  # on the replica
            assert port_of(conn) == reader
            # the primary's connection gets the same settings before its first statement
            cur = conn.execute(
                f"INSERT INTO public.{table} VALUES (1, current_setting('statement_timeout')) "
                "RETURNING v, inet_server_port(), current_setting('search_path')"
            )
            assert cur.fetchone() == ("4s", lc.port("primary"), f"{schema}, public")
            conn.execute("RESET statement_timeout")
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
            cur = conn.execute(
                f"INSERT INTO public.{table} VALUES (2, current_setting('statement_timeout'))"
                " RETURNING v"
            )
            assert cur.fetchone() == ("0",)  # the RESET reached the primary's connection too
        # set_config(..., false) and SET inside a committed transaction are read back
        with cluster.connection() as conn:
            conn.execute("SELECT set_config('application_name', 'rr-test', false)")
            with conn.transaction():
                conn.execute("SET work_mem = '7MB'")
            with conn.transaction():
                conn.execute("SET work_mem = '9MB'")
                raise psycopg.Rollback  # undone, on the node and in what is replayed
            assert port_of(conn) in replica_ports(lc)
            assert conn.execute("SHOW application_name").fetchone() == ("rr-test",)
            assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
    finally:
        lc.execute("primary", f"DROP SCHEMA {schema} CASCADE")
    # each node's single pooled connection came back clean (DISCARD ALL)
    for name in lc.node_names:
        lease = cluster._checkout(name, "read")
        try:
            settings = lease.conn.execute(
                "SELECT current_setting('statement_timeout'), current_setting('work_mem'),"
                " current_setting('application_name'), current_setting('search_path'),"
                " current_setting('default_transaction_read_only')"
            ).fetchone()
        finally:
            cluster._checkin(lease)
        assert settings is not None
        assert settings[:2] == ("0", "4MB") and settings[2] != "rr-test"
        assert settings[3] == '"$user", public' and settings[4] == "on"
    with cluster.write() as w:
        row = w.execute("SELECT current_setting('statement_timeout'), current_setting('work_mem')")
        assert row.fetchone() == ("0", "4MB")


def test_temp_tables_pin_the_session_to_the_primary(lc: LocalCluster, cluster: Cluster) -> None:
    primary = lc.port("primary")
    with cluster.connection() as conn:
        assert port_of(conn) in replica_ports(lc)
        conn.execute("CREATE TEMP TABLE scratch (id int)")
        assert conn.pinned and "read" not in conn.nodes
        conn.execute("INSERT INTO scratch VALUES (1), (2)")
        assert conn.execute("SELECT count(*) FROM scratch").fetchone() == (2,)  # a read: here
        assert port_of(conn) == primary
        conn.read_only = True
        with conn.transaction():  # even a read-only transaction stays with the state
            assert port_of(conn) == primary
    with cluster.write() as w:  # the pool's connection came back without the temp table
        assert w.execute("SELECT to_regclass('pg_temp.scratch')").fetchone() == (None,)


def test_listen_pins_and_receives_notifications(lc: LocalCluster, cluster: Cluster) -> None:
    channel = f"ch_{uuid.uuid4().hex[:8]}"
    with cluster.connection() as conn:
        with pytest.raises(psycopg.ProgrammingError, match="LISTEN"):
            conn.notifies(timeout=0)
        conn.execute(f"LISTEN {channel}")
        assert conn.pinned
        assert port_of(conn) == lc.port("primary")
        lc.execute("primary", f"NOTIFY {channel}, 'hello'")
        received = list(conn.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload) for n in received] == [(channel, "hello")]


def test_session_advisory_locks_pin_and_are_released_on_close(
    lc: LocalCluster, cluster: Cluster
) -> None:
    key = int(uuid.uuid4().int % 1_000_000)
    primary = lc.port("primary")
    other = psycopg.connect(lc.primary_dsn, autocommit=True)
    try:
        with cluster.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            assert conn.pinned and port_of(conn) == primary
            assert other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (False,)
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
    finally:
        other.close()


def test_prepare_pins_and_execute_finds_it(lc: LocalCluster, cluster: Cluster) -> None:
    with cluster.connection() as conn:
        conn.execute("PREPARE two AS SELECT 2, inet_server_port()")
        assert conn.execute("EXECUTE two").fetchone() == (2, lc.port("primary"))


# -- read-your-writes -------------------------------------------------------------------------


@pytest.mark.slow
def test_writes_advance_the_token_and_reads_see_them_with_replay_paused(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE ryw (id int PRIMARY KEY)")
    lc.wait_replicated()
    for name in lc.replica_names:
        lc.pause_replay(name)
    # max_lag=None: the paused replicas still serve reads that carry no token
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:  # type: ignore[arg-type]
        with cluster.session(), cluster.connection() as conn:
            assert cluster.token is None
            conn.execute("INSERT INTO ryw VALUES (1)")  # autocommit write
            first = cluster.token
            assert first is not None
            assert conn.execute("SELECT count(*) FROM ryw").fetchone() == (1,)
            with conn.transaction():  # transaction: captured with the COMMIT
                conn.execute("INSERT INTO ryw VALUES (2)")
            second = cluster.token
            assert second is not None and second.lsn > first.lsn
            assert conn.execute("SELECT array_agg(id ORDER BY id) FROM ryw").fetchone() == ([1, 2],)
            cur = conn.cursor()
            cur.executemany("INSERT INTO ryw VALUES (%s)", [(3,), (4,)])
            third = cluster.token
            assert third is not None and third.lsn > second.lsn
            assert conn.execute("SELECT count(*) FROM ryw").fetchone() == (4,)
            # a write the server refuses (duplicate key) moves nothing
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("INSERT INTO ryw VALUES (1)")
            assert cluster.token == third

        # without the token (a unit of work of its own) a replica serves the read, and it
        # has none of the rows: the replicas really are behind
        with cluster.session(inherit=False), cluster.connection() as conn:
            query = "SELECT count(*), inet_server_port() <> %s FROM ryw"
            assert conn.execute(query, (lc.port("primary"),)).fetchone() == (0, True)
        # the token crosses to another thread as a string
        token = str(third)
        seen: list[Any] = []

        def reader() -> None:
            with cluster.session(token=token), cluster.connection() as conn:
                seen.append(conn.execute("SELECT count(*) FROM ryw").fetchone())

        thread = threading.Thread(target=reader)
        thread.start()
        thread.join(10)
        assert seen == [(4,)]


def test_the_held_replica_is_left_when_it_falls_behind(
    lc: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=0.5, **FAST) as cluster,  # type: ignore[arg-type]
        cluster.connection() as conn,
    ):
        assert port_of(conn) in replica_ports(lc)
        held = conn.nodes["read"]
        other = next(n for n in lc.replica_names if n != held)
        paused(held)
        lc.execute("primary", f"INSERT INTO {table} VALUES (1, 'a')")  # the held one lags now

        def moved() -> bool:
            return port_of(conn) == lc.port(other)

        wait_until(moved, what="reads to leave the lagging replica")
        assert conn.nodes["read"] == other


# -- the cursor surface -------------------------------------------------------------------


def test_cursor_api(cluster: Cluster, table: str) -> None:
    with cluster.connection() as conn:
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"v{i}") for i in range(10)]
            )
            assert cur.rowcount == 10
            cur.execute(f"SELECT id, v FROM {table} ORDER BY id")
            assert [c.name for c in cur.description or ()] == ["id", "v"]
            assert cur.rowcount == 10
            assert cur.fetchone() == (0, "v0")
            assert cur.fetchmany(2) == [(1, "v1"), (2, "v2")]
            cur.arraysize = 3
            assert cur.fetchmany() == [(3, "v3"), (4, "v4"), (5, "v5")]
            assert list(cur) == [(i, f"v{i}") for i in range(6, 10)]
            assert cur.fetchone() is None
            cur.execute(f"UPDATE {table} SET v = 'w' WHERE id < 4")
            assert cur.rowcount == 4 and cur.statusmessage == "UPDATE 4"
            cur.execute(f"SELECT v FROM {table} WHERE id = %(id)s", {"id": 3})
            assert cur.fetchall() == [("w",)]
            returned = conn.cursor()
            returned.executemany(
                f"INSERT INTO {table} VALUES (%s, 'r') RETURNING id", [(20,), (21,)], returning=True
            )
            assert returned.fetchone() == (20,)
            assert returned.nextset() and returned.fetchone() == (21,)
        assert cur.closed
        with pytest.raises(psycopg.ProgrammingError, match="no result"):
            conn.cursor().fetchone()
        with pytest.raises(psycopg.NotSupportedError, match="named"):
            conn.cursor("server_side")


def test_row_factory(cluster: Cluster) -> None:
    with cluster.connection(row_factory=dict_row) as conn:
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        cur = conn.cursor(row_factory=psycopg.rows.namedtuple_row)
        row = cur.execute("SELECT 2 AS two").fetchone()
        assert row.two == 2
        cur.row_factory = psycopg.rows.tuple_row
        assert cur.execute("SELECT 3").fetchone() == (3,)
        conn.row_factory = psycopg.rows.tuple_row
        assert conn.execute("SELECT 4").fetchone() == (4,)


def test_results_stay_readable_after_the_next_statement_went_elsewhere(
    cluster: Cluster, table: str
) -> None:
    with cluster.connection() as conn:
        read = conn.execute("SELECT generate_series(1, 3)")
        write = conn.execute(f"INSERT INTO {table} VALUES (1, 'a') RETURNING id")
        assert read.fetchall() == [(1,), (2,), (3,)]
        assert write.fetchall() == [(1,)]


def test_an_autocommit_write_hands_its_results_to_the_cursor_prepared_or_not(
    cluster: Cluster, table: str
) -> None:
    # The position is read in the statement's round trip, written on libpq: the
    # statement sent unprepared, prepared, or prepared by psycopg once used enough.
    with cluster.session(), cluster.connection() as conn:
        tokens = []
        for i, prepare in enumerate((False, None, None, None, None, None, None, True)):
            cur = conn.execute(
                f"INSERT INTO {table} VALUES (%s, 'a'), (%s, 'b') RETURNING id",
                (2 * i, 2 * i + 1), prepare=prepare,
            )  # fmt: skip
            assert cur.fetchall() == [(2 * i,), (2 * i + 1,)]
            assert (cur.rowcount, cur.statusmessage) == (2, "INSERT 0 2")
            assert cur.description is not None and cur.description[0].name == "id"
            tokens.append(cluster.token)
        assert all(t is not None for t in tokens)
        lsns = [t.lsn for t in tokens]  # type: ignore[union-attr]
        assert lsns == sorted(set(lsns))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {table} VALUES (0, 'c')")
        cur = conn.execute(f"UPDATE {table} SET v = 'z' WHERE id < 0")
        assert (cur.rowcount, cur.statusmessage) == (0, "UPDATE 0")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (16,)


@pytest.mark.parametrize("threshold", [5, None])
def test_the_position_query_is_prepared_and_asked_again_when_the_server_lost_it(
    lc: LocalCluster, table: str, threshold: int | None
) -> None:
    """After an autocommit write, the position query is a prepared statement (planned
    once per connection), unless preparing is off (a pooler in transaction mode); one
    the server no longer has fails, and the position is asked for again, unprepared."""
    with psycopg.connect(lc.primary_dsn, autocommit=True, prepare_threshold=threshold) as conn:
        cursor = conn.cursor()
        _, first = run_capturing(cursor, f"INSERT INTO {table} VALUES (1, 'a')", None, wrote=True)
        statements = [s for (s,) in conn.execute("SELECT statement FROM pg_prepared_statements")]
        assert any("pg_current_wal_insert_lsn" in s for s in statements) == (threshold is not None)
        conn.pgconn.exec_(b"DEALLOCATE ALL")  # behind psycopg's back: its cache still names it
        _, second = run_capturing(cursor, f"INSERT INTO {table} VALUES (2, 'b')", None, wrote=True)
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        assert first is not None and second is not None
        assert first < second <= parse_lsn(row[0])
        assert cursor.rowcount == 1


def test_attributes_cannot_change_inside_a_transaction(cluster: Cluster) -> None:
    with cluster.connection() as conn:
        assert conn.autocommit and conn.read_only is None
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            row = conn.execute("SHOW transaction_isolation").fetchone()
            assert row == ("repeatable read",)
            for attribute, value in (("autocommit", False), ("read_only", True)):
                with pytest.raises(psycopg.ProgrammingError, match="can't change"):
                    setattr(conn, attribute, value)
        assert "RoutedConnection open autocommit" in repr(conn)


def test_composed_queries_are_classified_and_routed(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    with cluster.connection() as conn:
        read = sql.SQL("SELECT inet_server_port() FROM {}").format(sql.Identifier(table))
        assert conn.execute(read).fetchall() == []
        assert port_of(conn, b"SELECT inet_server_port()") in replica_ports(lc)  # type: ignore[arg-type]
        insert = sql.SQL("INSERT INTO {} VALUES (%s, 'a') RETURNING inet_server_port()").format(
            sql.Identifier(table)
        )
        assert conn.execute(insert, (1,)).fetchone() == (lc.port("primary"),)


@pytest.mark.slow
@pytest.mark.destructive
def test_a_replica_killed_under_a_read_loop_fails_no_read(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster,  # type: ignore[arg-type]
        cluster.connection() as conn,
    ):
        served: list[int] = [port_of(conn)]
        victim = conn.nodes["read"]
        lc.stop(victim, mode="immediate")
        for _ in range(200):
            served.append(port_of(conn))  # an error here fails the test
        assert served[0] == lc.port(victim)
        assert served[-1] != lc.port(victim)
        assert conn.nodes["read"] != victim


def test_a_read_a_replica_refuses_runs_on_the_primary_and_volatility_is_relearned(
    lc: LocalCluster, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A function learned STABLE, re-created VOLATILE (and writing) by someone else."""
    fn = f"rr_turncoat_{uuid.uuid4().hex[:8]}"
    lc.execute("primary", f"CREATE FUNCTION {fn}() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1'")
    lc.wait_replicated()
    call = f"SELECT {fn}(), inet_server_port()"
    try:
        with (
            Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None, **FAST) as cluster,  # type: ignore[arg-type]
            cluster.connection() as conn,
        ):
            assert conn.execute(call).fetchone()[1] in replica_ports(lc)  # type: ignore[index]
            lc.execute(
                "primary",
                f"CREATE OR REPLACE FUNCTION {fn}() RETURNS int LANGUAGE sql VOLATILE "
                f"AS 'INSERT INTO {table} SELECT coalesce(max(id), 999) + 1, ''w'' "
                f"FROM {table} RETURNING 7'",
            )
            lc.wait_replicated()
            # The stale classification sends it to a replica, which refuses it: it runs
            # on the primary instead, once, and the router learns the new volatility.
            assert conn.execute(call).fetchone() == (7, lc.port("primary"))
            assert "refused a statement classified as a read" in caplog.text
            assert cluster.classifier.classify(call) is Intent.WRITE
            assert conn.execute(call).fetchone() == (7, lc.port("primary"))
        rows = lc.execute("primary", f"SELECT count(*) FROM {table} WHERE id >= 1000")
        assert rows == [(2,)]
    finally:
        lc.execute("primary", f"DROP FUNCTION {fn}()")


def test_function_volatility_is_learned_and_settings_override_it(
    lc: LocalCluster,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    stable, volatile = f"rr_stable_{suffix}", f"rr_volatile_{suffix}"
    lc.execute(
        "primary",
        f"CREATE FUNCTION {stable}() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';"
        f"CREATE FUNCTION {volatile}() RETURNS int LANGUAGE sql AS 'SELECT 2'",
    )
    lc.wait_replicated()
    call_stable = f"SELECT {stable}(), inet_server_port()"
    call_volatile = f"SELECT {volatile}(), inet_server_port()"
    try:
        with (
            Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None, **FAST) as cluster,  # type: ignore[arg-type]
            cluster.connection() as conn,
        ):
            assert conn.execute(call_stable).fetchone()[1] in replica_ports(lc)  # type: ignore[index]
            assert conn.execute(call_volatile).fetchone() == (2, lc.port("primary"))
        with (
            Cluster(
                lc.primary_dsn,
                lc.replica_dsns,
                read_your_writes=None,
                read_only_functions=[volatile],
                write_functions=[stable],
                **FAST,  # type: ignore[arg-type]
            ) as cluster,
            cluster.connection() as conn,
        ):
            assert conn.execute(call_stable).fetchone() == (1, lc.port("primary"))
            assert conn.execute(call_volatile).fetchone()[1] in replica_ports(lc)  # type: ignore[index]
    finally:
        lc.execute("primary", f"DROP FUNCTION {stable}(); DROP FUNCTION {volatile}()")


# -- COPY (issue 12 item 3) -----------------------------------------------------------------


def test_copy_to_stdout_reads_on_a_replica_and_copy_from_stdin_writes_on_the_primary(
    lc: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    """``cursor.copy()`` is routed like the statement: a COPY out of a read goes to a
    replica, a COPY in goes to the primary and the token follows it, so a read of the
    same scope finds the rows while the replicas do not have them."""
    for name in lc.replica_names:
        paused(name)
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster,  # type: ignore[arg-type]
        cluster.session(),
        cluster.connection() as conn,
    ):
        cur = conn.cursor()
        with cur.copy("COPY (SELECT inet_server_port()) TO STDOUT") as copy:
            rows = list(copy.rows())
        assert int(rows[0][0]) in replica_ports(lc)
        assert cluster.token is None
        with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            copy.write_row((1, "a"))
            copy.write_row((2, "b"))
        assert cluster.token is not None
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)
    assert lc.execute("primary", f"SELECT count(*) FROM {table}") == [(2,)]


def test_a_failed_copy_leaves_the_connection_usable(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """A COPY the server rejects half-way, or one sent with ``execute()``, fails with
    its error; the routed connection goes on working, nothing was written."""
    with cluster.connection() as conn:
        cur = conn.cursor()
        bad = pytest.raises(psycopg.errors.InvalidTextRepresentation)
        with bad, cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            copy.write_row((1, "a"))
            copy.write_row(("not a number", "b"))
        with pytest.raises(psycopg.ProgrammingError):
            conn.execute(f"COPY {table} FROM STDIN")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute(f"INSERT INTO {table} VALUES (3, 'c')")
        # COPY inside a transaction: committed with it
        with conn.transaction(), cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            copy.write_row((4, "d"))
    assert lc.execute("primary", f"SELECT array_agg(id ORDER BY id) FROM {table}") == [([3, 4],)]


# -- conn.pipeline(), conn.info, conn.adapters (issue 12 item 3) ---------------------------


def test_a_pipeline_reads_on_a_replica_until_its_first_write_then_stays_on_the_primary(
    lc: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    """Statements are queued (psycopg's pipeline mode) on one node at a time: the
    reads on a replica, the first write moves the block to the primary, where a later
    read sees it; the token advances once the block ends."""
    for name in lc.replica_names:
        paused(name)
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster,  # type: ignore[arg-type]
        cluster.session(),
        cluster.connection() as conn,
    ):
        with conn.pipeline() as p:
            before = conn.execute("SELECT inet_server_port()")
            assert p.node in lc.replica_names
            assert conn.info.pipeline_status == psycopg.pq.PipelineStatus.ON  # queued
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            assert p.node == "primary"
            conn.cursor().executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(2, "b"), (3, "c")])
            seen = conn.execute(f"SELECT count(*) FROM {table}")  # a read after a write
            assert p.node == "primary"
            assert cluster.token is None  # nothing committed yet: the Sync is at the end
        row = before.fetchone()
        assert row is not None and row[0] in replica_ports(lc)
        assert seen.fetchone() == (3,)
        assert cluster.token is not None
        # The replicas do not have the rows: the scope's reads now need the primary.
        assert port_of(conn) == lc.port("primary")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (3,)


def parity_run(conn: Any, table: str, steps: list[str | None]) -> tuple[str | None, Any]:
    """Run ``steps`` (SQL; None: ``sync()``) in ``conn.pipeline()``: (the error class
    raised, the rows left in the table)."""
    error = None
    try:
        with conn.pipeline() as p:
            for step in steps:
                if step is None:
                    p.sync()
                else:
                    conn.execute(step.format(table=table))
    except psycopg.Error as exc:
        error = type(exc).__name__
    rows = conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone()
    conn.execute(f"DELETE FROM {table}")
    return error, rows


@pytest.mark.parametrize(
    "steps",
    [
        [  # a failure rolls back the implicit transaction up to the Sync; after it, aborted
            "INSERT INTO {table} VALUES (1, 'a')",
            "INSERT INTO {table} VALUES (1, 'dup')",
            "INSERT INTO {table} VALUES (2, 'b')",
        ],
        [  # what a sync committed stays
            "INSERT INTO {table} VALUES (1, 'a')",
            None,
            "INSERT INTO {table} VALUES (1, 'dup')",
            "INSERT INTO {table} VALUES (2, 'b')",
        ],
        [  # a failed read before the first write: the write is never sent
            "SELECT 1/0",
            "INSERT INTO {table} VALUES (1, 'a')",
        ],
        [
            "INSERT INTO {table} VALUES (1, 'a')",
            None,
            "INSERT INTO {table} VALUES (2, 'b')",
        ],
    ],
)
def test_pipeline_results_and_errors_are_psycopgs(
    lc: LocalCluster, cluster: Cluster, table: str, steps: list[str | None]
) -> None:
    """The same steps on a plain psycopg connection to the primary and on a routed
    connection: the same error, the same rows committed; the routed connection goes on."""
    with psycopg.connect(lc.primary_dsn, autocommit=True) as plain:
        expected = parity_run(plain, table, steps)
    with cluster.connection() as conn:
        assert parity_run(conn, table, steps) == expected
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_failed_pipeline_leaves_no_result_for_the_next_statement(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """An error in a pipeline's primary part after a sync: psycopg stops reading at the
    error, and whether the rest of the block's answers had arrived by then varies; a
    connection left with them is not used again (the next statement would read them as
    its own). Repeated, since the timing decides."""
    steps = [
        "INSERT INTO {table} VALUES (1, 'a')",
        None,
        "INSERT INTO {table} VALUES (1, 'dup')",
        "INSERT INTO {table} VALUES (2, 'b')",
    ]
    with cluster.session(), cluster.connection() as conn:
        for _ in range(25):
            assert parity_run(conn, table, steps) == ("UniqueViolation", ([1],))
            assert cluster.token is not None
            cur = conn.execute(f"INSERT INTO {table} VALUES (7, 'x') RETURNING id, v")
            assert cur.fetchall() == [(7, "x")]
            conn.execute(f"DELETE FROM {table}")


def test_a_pipeline_in_a_transaction_runs_on_its_node_and_commits_with_it(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    with cluster.session(), cluster.connection() as conn:
        with conn.transaction(), conn.pipeline():
            for i in range(3):
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'x')", (i,))
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
        assert cluster.token is not None
        # transaction() inside a pipeline is a sync point; a failure rolls it back
        with (
            pytest.raises(psycopg.errors.UniqueViolation),
            conn.pipeline(),
            conn.transaction(),
        ):
            conn.execute(f"INSERT INTO {table} VALUES (10, 'y')")
            conn.execute(f"INSERT INTO {table} VALUES (0, 'dup')")
        conn.autocommit = False  # the block's first statement opens the transaction
        with conn.pipeline():
            conn.execute(f"INSERT INTO {table} VALUES (20, 'z')")
        conn.commit()
    assert lc.execute("primary", f"SELECT array_agg(id ORDER BY id) FROM {table}") == [
        ([0, 1, 2, 20],)
    ]


def test_info_tells_the_node_the_last_statement_ran_on(lc: LocalCluster, cluster: Cluster) -> None:
    with cluster.connection() as conn:
        with pytest.raises(psycopg.ProgrammingError, match="no node connection yet"):
            conn.info  # noqa: B018
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert conn.info.port in replica_ports(lc)
        assert (conn.info.backend_pid,) == pid
        assert conn.info.server_version >= 130000
        with conn.transaction():  # no write: the scope needs no primary afterwards
            conn.execute("SELECT 1")
            assert conn.info.port == lc.port("primary")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("SELECT 1")
        assert conn.info.port in replica_ports(lc)
        assert "password" not in conn.info.dsn
    with pytest.raises(psycopg.InterfaceError):
        conn.info  # noqa: B018


class _Upper(psycopg.adapt.Loader):
    def load(self, data: Any) -> str:
        return bytes(data).decode().upper()


def test_adapters_apply_on_every_node_and_only_to_this_connection(
    lc: LocalCluster, cluster: Cluster, table: str
) -> None:
    """``conn.adapters`` registrations (a loader, a dumper, ``register_enum(info, conn)``)
    apply to statements on a replica and on the primary, and never to the pooled node
    connections' other users."""
    import enum

    from psycopg.types.enum import EnumInfo, register_enum

    class Mood(enum.Enum):
        happy = "happy"
        sad = "sad"

    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

    class PointDumper(psycopg.adapt.Dumper):
        def dump(self, obj: Any) -> bytes:
            return f"{obj.x}-{obj.y}".encode()

    kind = f"mood_{uuid.uuid4().hex[:8]}"
    lc.execute("primary", f"CREATE TYPE {kind} AS ENUM ('happy', 'sad')")
    lc.wait_replicated()
    try:
        with cluster.session(inherit=False), cluster.write() as plain:  # not this scope's
            info = EnumInfo.fetch(plain, kind)
        assert info is not None
        with cluster.connection() as conn:
            conn.adapters.register_loader("text", _Upper)
            conn.adapters.register_dumper(Point, PointDumper)
            register_enum(info, conn, Mood)
            assert conn.execute("SELECT 'abc'::text, inet_server_port()").fetchone() == (
                "ABC",
                conn.info.port,
            )
            assert conn.info.port in replica_ports(lc)
            assert conn.execute(f"SELECT 'sad'::{kind}").fetchone() == (Mood.sad,)
            conn.execute(f"INSERT INTO {table} VALUES (1, %s) RETURNING v", (Point(3, 4),))
            with conn.transaction():  # the primary
                row = conn.execute(f"SELECT v, 'happy'::{kind} FROM {table}").fetchone()
                assert row == ("3-4", Mood.happy)
            cur = conn.cursor()
            with cur.copy("COPY (SELECT 'x'::text) TO STDOUT") as copy:
                copy.set_types(["text"])
                assert list(copy.rows()) == [("X",)]
        with cluster.read() as other, cluster.write() as primary:  # the pools' connections
            for node in (other, primary):
                assert node.execute(f"SELECT 'abc'::text, 'sad'::{kind}").fetchone() == (
                    "abc",
                    "sad",
                )
    finally:
        lc.execute("primary", f"DROP TYPE IF EXISTS {kind}")
