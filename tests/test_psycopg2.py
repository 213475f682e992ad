"""psycopg2 path against real servers: seeds 000 and 001 with a Cluster, placement server-side."""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest
from psycopg2 import sql

from helpers import FAST, replica_ports, scratch_table
from replica_router import Cluster
from replica_router.integrations import psycopg2 as routed
from replica_router.sandbox import LocalCluster


def port(cur: Any) -> int:
    cur.execute("SELECT inet_server_port()")
    return int(cur.fetchone()[0])


@pytest.fixture
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    return replica_cluster


@pytest.fixture
def cluster(lc: LocalCluster) -> Iterator[Cluster]:
    """Each test is a unit of work of its own, as a request is: code outside every
    session shares the process's root scope, so an earlier test's writes to this
    sandbox would otherwise send its first reads to the primary until the monitor
    saw the replicas replay them."""
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as c, c.session(inherit=False):  # type: ignore[arg-type]
        yield c
    routed.close_pools(c)


@pytest.fixture
def users(lc: LocalCluster) -> Iterator[str]:
    with scratch_table(lc, "users", "id serial PRIMARY KEY, name text, email text") as name:
        yield name


def test_seed_001_with_autocommit_splits_reads_and_writes(
    lc: LocalCluster, cluster: Cluster, users: str
) -> None:
    conn = routed.connect(cluster, autocommit=True)
    # the seed's code, unchanged but for the table name
    cursor = conn.cursor()
    cursor.execute(f"SELECT * FROM {users};")
    result = cursor.fetchall()
    assert result == []
    assert conn.nodes["read"] in lc.replica_names  # the SELECT ran on a replica
    cursor.execute(f"INSERT INTO {users} (name, email) VALUES ('John Doe', 'john@example.com')")
    conn.commit()
    assert conn.nodes["write"] == "primary"
    # ... and checked by the servers themselves
    cursor.execute(f"INSERT INTO {users} (name) VALUES ('x') RETURNING inet_server_port()")
    assert cursor.fetchone() == (lc.port("primary"),)
    with routed.connect(cluster, autocommit=True) as fresh:  # no token of ours in a new scope?
        pass
    conn.close()
    assert conn.closed
    with cluster.write() as w:
        assert w.execute(f"SELECT name FROM {users} ORDER BY id").fetchall() == [
            ("John Doe",),
            ("x",),
        ]
    assert fresh.closed == 0  # psycopg2's "with conn" does not close


def test_seed_001_default_keeps_each_transaction_on_the_primary(
    lc: LocalCluster, cluster: Cluster, users: str
) -> None:
    conn = routed.connect(cluster)
    cursor = conn.cursor()
    cursor.execute(f"SELECT * FROM {users};")
    assert cursor.fetchall() == []
    assert port(cursor) == lc.port("primary")  # psycopg2 opened a transaction: it may write
    cursor.execute(f"INSERT INTO {users} (name, email) VALUES ('John Doe', 'john@example.com')")
    assert port(cursor) == lc.port("primary")
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    conn.commit()
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    cursor.execute(f"INSERT INTO {users} (name) VALUES ('rolled back')")
    conn.rollback()
    conn.close()
    with cluster.write() as w:
        assert w.execute(f"SELECT name FROM {users}").fetchall() == [("John Doe",)]


def test_seed_000_read_only_connection_reads_from_a_replica(
    lc: LocalCluster, cluster: Cluster, users: str
) -> None:
    lc.execute("primary", f"INSERT INTO {users} (name) VALUES ('a'), ('b')")
    lc.wait_replicated()
    read_only_conn = routed.connect(cluster, readonly=True)

    def fetch_data(connection: Any) -> Any:  # the seed's function
        cursor = connection.cursor()
        cursor.execute(f"SELECT name, inet_server_port() FROM {users} ORDER BY name")
        data = cursor.fetchall()
        cursor.close()
        return data

    data = fetch_data(read_only_conn)
    assert [row[0] for row in data] == ["a", "b"]
    assert {row[1] for row in data} <= replica_ports(lc)
    # still one transaction on one replica; a write inside it is refused by the server
    cur = read_only_conn.cursor()
    first = port(cur)
    assert port(cur) == first
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        cur.execute(f"INSERT INTO {users} (name) VALUES ('no')")
    read_only_conn.rollback()
    read_only_conn.set_session(readonly=False)
    assert port(cur) == lc.port("primary")
    read_only_conn.close()


def test_with_conn_is_a_transaction_and_does_not_close(
    lc: LocalCluster, cluster: Cluster, users: str
) -> None:
    conn = routed.connect(cluster, autocommit=True)
    with conn, conn.cursor() as cur:
        first = port(cur)
        cur.execute(f"INSERT INTO {users} (name) VALUES ('kept')")
        assert port(cur) == first == lc.port("primary")  # a SELECT first, still one node
    assert cur.closed and not conn.closed
    with pytest.raises(ZeroDivisionError), conn:
        conn.cursor().execute(f"INSERT INTO {users} (name) VALUES ('undone')")
        raise ZeroDivisionError
    with conn.cursor() as cur:
        cur.execute(f"SELECT name FROM {users}")
        assert cur.fetchall() == [("kept",)]
    conn.close()


def test_session_state_replayed_or_pinned(lc: LocalCluster, cluster: Cluster) -> None:
    conn = routed.connect(cluster, autocommit=True)
    cur = conn.cursor()
    cur.execute("SET statement_timeout = '3s'")
    cur.execute("SHOW statement_timeout")
    assert cur.fetchone() == ("3s",)
    assert port(cur) in replica_ports(lc)
    cur.execute("CREATE TEMP TABLE scratch (x int)")
    cur.execute("INSERT INTO scratch VALUES (1)")
    cur.execute(
        "SELECT count(*), inet_server_port(), current_setting('statement_timeout') FROM scratch"
    )
    assert cur.fetchone() == (1, lc.port("primary"), "3s")  # pinned; the SET was replayed there
    channel = f"ch_{uuid.uuid4().hex[:8]}"
    cur.execute(f"LISTEN {channel}")
    lc.execute("primary", f"NOTIFY {channel}, 'hi'")
    deadline = time.monotonic() + 5
    while not conn.notifies and time.monotonic() < deadline:
        select.select([conn], [], [], 0.5)
        conn.poll()
    assert [(n.channel, n.payload) for n in conn.notifies] == [(channel, "hi")]
    conn.close()


def test_token_advances_and_reads_see_writes_with_replay_paused(
    lc: LocalCluster, cluster: Cluster, users: str, paused: Callable[[str], None]
) -> None:
    for name in lc.replica_names:
        paused(name)
    with cluster.session():
        conn = routed.connect(cluster, autocommit=True)
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {users} (name) VALUES ('one')")
        first = cluster.token
        assert first is not None
        cur.execute(f"SELECT count(*) FROM {users}")
        assert cur.fetchone() == (1,)
        conn.autocommit = False
        cur.execute(f"INSERT INTO {users} (name) VALUES ('two')")
        conn.commit()
        second = cluster.token
        assert second is not None and second.lsn > first.lsn
        conn.autocommit = True
        cur.execute(f"SELECT count(*) FROM {users}")
        assert cur.fetchone() == (2,)
        conn.close()


def test_cursor_api_and_errors(lc: LocalCluster, cluster: Cluster, users: str) -> None:
    conn = routed.connect(cluster, autocommit=True)
    cur = conn.cursor()
    cur.executemany(f"INSERT INTO {users} (name) VALUES (%s)", [(f"n{i}",) for i in range(6)])
    assert cur.rowcount == 6
    cur.execute(f"SELECT name FROM {users} ORDER BY id")
    assert [d.name for d in cur.description] == ["name"]
    assert cur.rowcount == 6
    assert cur.fetchone() == ("n0",)
    assert cur.fetchmany(2) == [("n1",), ("n2",)]
    assert list(cur) == [("n3",), ("n4",), ("n5",)]
    assert cur.mogrify("SELECT %s", (5,)) == b"SELECT 5"
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(users))
    cur.execute(query)
    assert cur.fetchone() == (6,)
    dict_cur = conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
    dict_cur.execute("SELECT 1 AS one")
    assert dict_cur.fetchone() == {"one": 1}
    with pytest.raises(psycopg2.errors.SyntaxError):
        cur.execute("SELEC 1 FROM")
    assert conn.nodes.get("write") == "primary"
    cur.close()
    with pytest.raises(psycopg2.InterfaceError, match="cursor already closed"):
        cur.fetchone()
    conn.close()
    assert conn.closed
    with pytest.raises(psycopg2.InterfaceError, match="connection already closed"):
        conn.cursor()
    assert cluster.in_use("primary") == 0


def test_a_read_a_replica_refuses_runs_on_the_primary(lc: LocalCluster, users: str) -> None:
    """A function learned STABLE, re-created VOLATILE (and writing) by someone else."""
    fn = f"rr_turncoat_{uuid.uuid4().hex[:8]}"
    lc.execute("primary", f"CREATE FUNCTION {fn}() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1'")
    lc.wait_replicated()
    call = f"SELECT {fn}(), inet_server_port()"
    try:
        with Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None, **FAST) as cluster:  # type: ignore[arg-type]
            conn = routed.connect(cluster, autocommit=True)
            cur = conn.cursor()
            cur.execute(call)
            assert cur.fetchone()[1] in replica_ports(lc)
            lc.execute(
                "primary",
                f"CREATE OR REPLACE FUNCTION {fn}() RETURNS int LANGUAGE sql VOLATILE "
                f"AS 'INSERT INTO {users} (name) VALUES (''w'') RETURNING 7'",
            )
            lc.wait_replicated()
            cur.execute(call)  # refused by the replica: run on the primary instead
            assert cur.fetchone() == (7, lc.port("primary"))
            cur.execute(call)  # and now known to be a write
            assert cur.fetchone() == (7, lc.port("primary"))
            conn.close()
            routed.close_pools(cluster)
        assert lc.execute("primary", f"SELECT count(*) FROM {users}") == [(2,)]
    finally:
        lc.execute("primary", f"DROP FUNCTION {fn}()")
