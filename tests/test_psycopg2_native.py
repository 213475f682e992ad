"""The psycopg2 adapter's connection is psycopg2's (issue 12, item 2): what code
written for psycopg2 uses works on it, each statement on the right node."""

from __future__ import annotations

import gc
import io
import json
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest
from psycopg.conninfo import make_conninfo

from helpers import FAST, HUNG_BOUND, replica_ports, scratch_table, within
from replica_router import Cluster
from replica_router.integrations import psycopg2 as routed
from replica_router.sandbox import LocalCluster


@pytest.fixture
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    return replica_cluster


@pytest.fixture
def cluster(lc: LocalCluster) -> Iterator[Cluster]:
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as c:  # type: ignore[arg-type]
        yield c
    routed.close_pools(c)


@pytest.fixture
def items(lc: LocalCluster) -> Iterator[str]:
    with scratch_table(lc, "items", "id serial PRIMARY KEY, name text") as name:
        yield name


def port(cur: Any) -> int:
    cur.execute("SELECT inet_server_port()")
    return int(cur.fetchone()[0])


def test_it_is_a_psycopg2_connection_made_by_psycopg2_connect(
    lc: LocalCluster, cluster: Cluster
) -> None:
    conn = psycopg2.connect(
        connection_factory=routed.connection_factory(cluster, autocommit=True),
        cursor_factory=psycopg2.extras.RealDictCursor,
    )
    assert isinstance(conn, psycopg2.extensions.connection)
    assert isinstance(conn, routed.RoutedConnection)
    cur = conn.cursor()
    assert isinstance(cur, psycopg2.extensions.cursor)
    assert isinstance(cur, psycopg2.extras.RealDictCursor)
    cur.execute("SELECT inet_server_port() AS port, 1 AS one")
    row = cur.fetchone()
    assert row["port"] in replica_ports(lc) and row["one"] == 1  # a replica, a dict row
    cur.execute("SELECT generate_series(1, 3) AS n")
    assert [r["n"] for r in cur] == [1, 2, 3]
    dict_cur = conn.cursor(cursor_factory=psycopg2.extras.DictCursor)
    dict_cur.execute("SELECT 7 AS seven")
    assert dict_cur.fetchone()["seven"] == 7
    nt = conn.cursor(cursor_factory=psycopg2.extras.NamedTupleCursor)
    nt.execute("SELECT 8 AS eight")
    assert nt.fetchone().eight == 8
    conn.close()
    assert conn.closed
    assert cluster.in_use("primary") == 0


def test_connection_attributes(lc: LocalCluster, items: str) -> None:
    password = "s3cr3t-pw"  # trust authentication: accepted and ignored by the servers
    primary = make_conninfo(lc.primary_dsn, password=password)
    with Cluster(primary, lc.replica_dsns, max_lag=None, **FAST) as cluster:  # type: ignore[arg-type]
        conn = routed.connect(cluster)
        assert conn.server_version == int(lc.execute("primary", "SHOW server_version_num")[0][0])
        assert conn.server_version >= 100000
        assert conn.encoding == "UTF8"
        assert password not in conn.dsn and "port=" in conn.dsn
        assert password not in repr(conn)
        assert conn.info.server_version == conn.server_version
        assert conn.info.port == lc.port("primary")
        assert conn.get_backend_pid() == conn.info.backend_pid
        assert conn.status == psycopg2.extensions.STATUS_READY
        ready = psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert conn.info.transaction_status == ready
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {items} (name) VALUES ('a')")
        assert conn.status == psycopg2.extensions.STATUS_BEGIN  # psycopg2's default mode
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        conn.commit()
        assert conn.status == psycopg2.extensions.STATUS_READY
        # set_isolation_level: psycopg2's meaning of each value
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        assert conn.autocommit
        with cluster.session(inherit=False):  # a scope without the write's token
            assert port(cur) in replica_ports(lc)  # autocommit reads: a replica
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE)
        assert not conn.autocommit
        assert conn.isolation_level == psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE
        cur.execute("SHOW transaction_isolation")
        assert cur.fetchone() == ("serializable",)
        assert conn.status == psycopg2.extensions.STATUS_BEGIN
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED)
        assert conn.status == psycopg2.extensions.STATUS_READY  # it rolled back
        with pytest.raises(ValueError, match="between 0 and 4"):
            conn.set_isolation_level(7)
        with pytest.raises(psycopg2.NotSupportedError):
            conn.tpc_begin(conn.xid(1, "a", "b"))
        conn.close()
        routed.close_pools(cluster)


def test_execute_values_runs_on_the_primary_and_advances_the_token(
    lc: LocalCluster, cluster: Cluster, items: str, paused: Callable[[str], None]
) -> None:
    for name in lc.replica_names:
        paused(name)
    with cluster.session(inherit=False):
        conn = routed.connect(cluster, autocommit=True)
        cur = conn.cursor()
        psycopg2.extras.execute_values(
            cur, f"INSERT INTO {items} (name) VALUES %s", [("a",), ("b",), ("c",)]
        )
        first = cluster.token
        assert first is not None
        assert conn.nodes["write"] == "primary"
        rows = psycopg2.extras.execute_values(
            cur,
            f"INSERT INTO {items} (name) VALUES %s RETURNING name, inet_server_port()",
            [("d",), ("e",)],
            fetch=True,
        )
        assert rows == [("d", lc.port("primary")), ("e", lc.port("primary"))]
        second = cluster.token
        assert second is not None and second.lsn > first.lsn
        psycopg2.extras.execute_batch(cur, f"INSERT INTO {items} (name) VALUES (%s)", [("f",)])
        cur.execute(f"SELECT count(*) FROM {items}")  # replay is paused: the primary
        assert cur.fetchone() == (6,)
        conn.close()


def test_copy_to_reads_on_a_replica_copy_from_writes_on_the_primary(
    lc: LocalCluster, cluster: Cluster, items: str
) -> None:
    lc.execute("primary", f"INSERT INTO {items} (name) VALUES ('x'), ('y')")
    lc.wait_replicated()
    with cluster.session(inherit=False):
        conn = routed.connect(cluster, autocommit=True)
        cur = conn.cursor()
        out = io.StringIO()
        cur.copy_expert("COPY (SELECT inet_server_port()) TO STDOUT", out)
        assert int(out.getvalue()) in replica_ports(lc)
        out = io.StringIO()
        cur.copy_to(out, items, columns=["name"])
        assert sorted(out.getvalue().split()) == ["x", "y"]
        assert conn.nodes["read"] in lc.replica_names
        assert cluster.token is None  # no write yet
        cur.copy_from(io.StringIO("z\n"), items, columns=["name"])
        assert conn.nodes["write"] == "primary"
        first = cluster.token
        assert first is not None
        cur.copy_expert(f"COPY {items} (name) FROM STDIN", io.StringIO("w\nv\n"))
        assert cur.rowcount == 2
        second = cluster.token
        assert second is not None and second.lsn > first.lsn
        out = io.StringIO()  # the token: read where the copies are
        cur.copy_expert(f"COPY (SELECT count(*) FROM {items}) TO STDOUT", out)
        assert out.getvalue() == "5\n"
        conn.close()


def test_callproc_goes_where_its_function_may_run(
    lc: LocalCluster, cluster: Cluster, items: str
) -> None:
    fn = f"rr_add_{uuid.uuid4().hex[:8]}"
    writer = f"rr_put_{uuid.uuid4().hex[:8]}"
    lc.execute(
        "primary",
        f"CREATE FUNCTION {fn}(a int, b int) RETURNS TABLE (total int, port int) "
        "LANGUAGE sql STABLE AS 'SELECT a + b, inet_server_port()'",
    )
    lc.execute(
        "primary",
        f"CREATE FUNCTION {writer}(n text) RETURNS int LANGUAGE sql VOLATILE "
        f"AS 'INSERT INTO {items} (name) VALUES (n) RETURNING inet_server_port()'",
    )
    lc.wait_replicated()
    try:
        with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as fresh:  # type: ignore[arg-type]
            conn = routed.connect(fresh, autocommit=True)  # learns the volatilities
            cur = conn.cursor()
            assert cur.callproc(fn, (2, 3)) == (2, 3)
            total, where = cur.fetchone()
            assert total == 5 and where in replica_ports(lc)
            assert cur.callproc(fn, {"b": 4, "a": 1}) is None
            assert cur.fetchone()[0] == 5
            with fresh.session():
                cur.callproc(writer, ["from callproc"])
                assert cur.fetchone() == (lc.port("primary"),)
                assert fresh.token is not None
            conn.close()
            routed.close_pools(fresh)
    finally:
        lc.execute("primary", f"DROP FUNCTION {fn}(int, int)")
        lc.execute("primary", f"DROP FUNCTION {writer}(text)")


def test_typecasters_registered_on_the_connection_apply_to_replica_reads(
    lc: LocalCluster, cluster: Cluster
) -> None:
    conn = routed.connect(cluster, autocommit=True)
    value = uuid.uuid4()
    cur = conn.cursor()
    cur.execute("SELECT %s::text::uuid, inet_server_port()", (str(value),))
    uuid_oid = 2950
    if uuid_oid not in psycopg2.extensions.string_types:  # e.g. Django registers it globally
        assert cur.fetchone()[0] == str(value)  # psycopg2's default: a string
    psycopg2.extras.register_uuid(conn_or_curs=conn)
    cur = conn.cursor()
    cur.execute(
        "SELECT %s::text::uuid, ARRAY[%s::text::uuid], inet_server_port()", (str(value),) * 2
    )
    got, array, where = cur.fetchone()
    assert where in replica_ports(lc)
    assert got == value and isinstance(got, uuid.UUID) and array == [value]
    psycopg2.extras.register_default_jsonb(conn, loads=lambda s: ("loaded", json.loads(s)))
    cur.execute("SELECT '{\"a\": 1}'::jsonb, inet_server_port()")
    loaded, where = cur.fetchone()
    assert loaded == ("loaded", {"a": 1}) and where in replica_ports(lc)
    # on one cursor only
    plain = routed.connect(cluster, autocommit=True)
    one, other = plain.cursor(), plain.cursor()
    psycopg2.extras.register_default_json(one, loads=lambda s: "mine")
    one.execute("SELECT '[1]'::json")
    other.execute("SELECT '[1]'::json")
    assert (one.fetchone(), other.fetchone()) == (("mine",), ([1],))
    plain.close()
    conn.close()


def test_client_side_scroll_and_named_cursors(
    lc: LocalCluster, cluster: Cluster, items: str
) -> None:
    lc.execute(
        "primary", f"INSERT INTO {items} (name) SELECT 'n' || g FROM generate_series(1, 5) g"
    )
    lc.wait_replicated()
    conn = routed.connect(cluster, autocommit=True)
    cur = conn.cursor()
    cur.execute(f"SELECT name FROM {items} ORDER BY id")
    cur.scroll(3, mode="absolute")
    assert cur.fetchone() == ("n4",)
    cur.scroll(-3)
    assert cur.fetchone() == ("n2",)
    assert cur.rownumber == 2
    with pytest.raises(psycopg2.ProgrammingError, match="out of bounds"):
        cur.scroll(10)
    # A named cursor needs a transaction, as in psycopg2.
    with pytest.raises(psycopg2.ProgrammingError, match="outside of transactions"):
        conn.cursor("c0").execute("SELECT 1")
    conn.autocommit = False
    named = conn.cursor("c1", scrollable=True)
    assert named.name == "c1" and named.scrollable
    named.execute(f"SELECT name, inet_server_port() FROM {items} ORDER BY id")
    assert [r[0] for r in named.fetchmany(2)] == ["n1", "n2"]
    named.scroll(0, mode="absolute")
    assert named.fetchone()[0] == "n1"
    named.scroll(1)
    rest = named.fetchall()
    assert [r[0] for r in rest] == ["n3", "n4", "n5"]
    assert {r[1] for r in rest} == {lc.port("primary")}  # psycopg2's default mode
    named.close()
    conn.commit()
    # In a read-only transaction: on a replica, iterated in itersize batches.
    conn.set_session(readonly=True)
    named = conn.cursor("c2", cursor_factory=psycopg2.extras.RealDictCursor)
    named.itersize = 2
    named.execute(f"SELECT name, inet_server_port() AS port FROM {items} ORDER BY id")
    rows = list(named)
    assert [r["name"] for r in rows] == ["n1", "n2", "n3", "n4", "n5"]
    assert {r["port"] for r in rows} <= replica_ports(lc)
    conn.rollback()
    # WITH HOLD in autocommit: the cursor outlives its transaction, the session pins.
    conn.set_session(readonly=False, autocommit=True)
    held = conn.cursor("c3", withhold=True)
    held.execute(f"SELECT name FROM {items} ORDER BY id")
    assert held.fetchone() == ("n1",)
    assert conn.pinned
    assert held.fetchone() == ("n2",)
    held.close()
    conn.close()


def test_a_failed_statement_leaves_the_connection_usable(
    lc: LocalCluster, cluster: Cluster, items: str
) -> None:
    conn = routed.connect(cluster, autocommit=True)
    cur = conn.cursor()
    with pytest.raises(psycopg2.ProgrammingError, match="copy_from"):
        cur.execute(f"COPY {items} FROM STDIN")
    with pytest.raises(psycopg2.ProgrammingError, match="copy_to"):
        cur.execute(f"COPY {items} TO STDOUT")
    with pytest.raises(psycopg2.errors.BadCopyFileFormat):
        cur.copy_from(io.StringIO("1\tone\ttoo many\n"), items)
    with pytest.raises(psycopg2.errors.UndefinedTable):
        cur.copy_to(io.StringIO(), "rr_no_such_table")
    assert port(cur) in replica_ports(lc)
    cur.execute(f"INSERT INTO {items} (name) VALUES ('ok') RETURNING inet_server_port()")
    assert cur.fetchone() == (lc.port("primary"),)
    conn.autocommit = False
    with pytest.raises(psycopg2.errors.DivisionByZero):
        cur.execute("SELECT 1/0")
    with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
        cur.execute("SELECT 1")
    conn.rollback()
    cur.execute(f"SELECT count(*) FROM {items}")
    assert cur.fetchone() == (1,)
    conn.close()


@pytest.mark.destructive
def test_a_read_in_flight_on_a_hung_replica_moves_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10: the cluster abandons the adapter's node connections too (the
    read, which changed nothing, then runs again where reads go now)."""
    lc = fresh_replica_cluster
    nodes = {"primary": lc.primary_dsn, "replica1": lc.dsn("replica1")}
    with Cluster(nodes=nodes, max_lag=None) as cluster:  # type: ignore[arg-type]
        conn = routed.connect(cluster, autocommit=True)
        cur = conn.cursor()
        assert port(cur) == lc.port("replica1")
        frozen("replica1")
        done, outcome = within(HUNG_BOUND + 1.0, lambda: port(cur))
        assert done, "the read on the hung replica never returned"
        assert outcome == lc.port("primary") or isinstance(outcome, psycopg2.OperationalError)
        conn.close()
    routed.close_pools(cluster)


def test_peewee_on_psycopg2_through_the_connection_factory(
    lc: LocalCluster, cluster: Cluster, items: str
) -> None:
    peewee = pytest.importorskip("peewee")
    db = peewee.PostgresqlDatabase("ignored", connection_factory=routed.connection_factory(cluster))

    class Item(peewee.Model):
        name = peewee.TextField()

        class Meta:
            database = db
            table_name = items

    with cluster.session(inherit=False):
        db.connect()
        assert db.server_version >= 100000
        Item.create(name="peewee")
        assert cluster.token is not None
        assert [i.name for i in Item.select()] == ["peewee"]
        db.close()


def test_a_connection_dropped_without_close_gives_its_nodes_back(
    lc: LocalCluster, cluster: Cluster, items: str
) -> None:
    """As psycopg2 closes a connection that is garbage collected: what it held no longer
    counts as in use, and nothing the cluster keeps holds it alive."""
    conn = routed.connect(cluster, autocommit=True)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {items} (name) VALUES ('w')")  # the write link: its own
    with cluster.session(inherit=False):
        assert port(cur) in replica_ports(lc)  # a read link from the idle lists
    assert cluster.in_use("primary") == 1 and sum(cluster.in_use(n) for n in lc.replica_names) == 1
    gone = weakref.ref(conn)
    del conn, cur
    gc.collect()
    assert gone() is None
    assert cluster.in_use("primary") == 0
    assert all(cluster.in_use(n) == 0 for n in lc.replica_names)
