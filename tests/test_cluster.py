"""Cluster against real servers: routing, fallbacks, failures, runtime changes, config."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from helpers import FAST, port_of, read_port, scratch_table, wait_until
from replica_router import (
    Cluster,
    ConfigurationError,
    ConsistencyTimeout,
    Error,
    NoReplicaAvailable,
    PrimaryUnavailable,
)
from replica_router.events import ConsistencyFallback, EventBus, RouteDecision
from replica_router.sandbox import LocalCluster
from replica_router.topology import Role


def node_of(lc: LocalCluster, port: int) -> str:
    return next(name for name in lc.node_names if lc.port(name) == port)


@pytest.fixture
def table(replica_cluster: LocalCluster) -> Iterator[str]:
    with scratch_table(replica_cluster, "t", "id int PRIMARY KEY, v text") as name:
        yield name


def replica_lags(cluster: Cluster, name: str, seconds: float) -> bool:
    state = cluster.topology.by_name[name]
    return state.lag_seconds is not None and state.lag_seconds > seconds


# -- basic routing --------------------------------------------------------------------------


def test_reads_spread_over_replicas_and_writes_go_to_the_primary(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None, **FAST) as cluster:
        ports = [read_port(cluster) for _ in range(10)]
        assert sorted({node_of(lc, p) for p in ports}) == ["replica1", "replica2"]
        assert ports.count(lc.port("replica1")) == 5  # round robin
        with cluster.write() as conn:
            assert port_of(conn) == lc.port("primary")
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        counters = cluster.counters()
        assert counters.reads == {"replica1": 5, "replica2": 5}
        assert counters.writes == {"primary": 1}
        assert all(cluster.in_use(n) == 0 for n in cluster.node_names)
    assert lc.execute("primary", f"SELECT v FROM {table}") == [("a",)]


def test_nothing_starts_before_open_and_use_before_open_is_an_error(
    replica_cluster: LocalCluster,
) -> None:
    before = threading.active_count()
    cluster = Cluster(replica_cluster.primary_dsn, replica_cluster.replica_dsns)
    assert threading.active_count() == before
    assert [s.role for s in cluster.status()] == ["unknown"] * 3
    with pytest.raises(Error, match="not open"), cluster.read():
        pass
    with pytest.raises(Error, match="not open"), cluster.write():
        pass


def test_write_commits_on_exit_and_rolls_back_on_error(
    replica_cluster: LocalCluster, table: str
) -> None:
    with Cluster(replica_cluster.primary_dsn, replica_cluster.replica_dsns, **FAST) as cluster:
        with cluster.write() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
        with pytest.raises(RuntimeError), cluster.write() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (2, 'lost')")
            raise RuntimeError("application error")
        with cluster.write() as conn:  # a failed statement the block swallowed: rolled back
            conn.execute(f"INSERT INTO {table} VALUES (3, 'lost too')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(f"INSERT INTO {table} VALUES (1, 'duplicate')")
        with cluster.write() as conn:  # the pooled connection is clean again
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            conn.execute(f"INSERT INTO {table} VALUES (4, 'kept too')")
    rows = replica_cluster.execute("primary", f"SELECT id FROM {table} ORDER BY id")
    assert rows == [(1,), (4,)]


def _round_trips(conn: psycopg.Connection[Any], block: Callable[[], object], path: Any) -> int:
    """How many times the server said it was ready for a query while ``block`` ran on
    ``conn`` (libpq's protocol trace): one per round trip."""
    with open(path, "w") as trace:
        conn.pgconn.trace(trace.fileno())
        try:
            block()
        finally:
            conn.pgconn.untrace()
    return sum("\tReadyForQuery\t" in line for line in path.read_text().splitlines())


def test_a_connection_handed_back_keeps_none_of_its_transaction_settings(
    replica_cluster: LocalCluster,
) -> None:
    """psycopg keeps isolation level, read only, deferrable and the cursor class on the
    connection object: the next user of the pooled connection gets the defaults."""
    lc = replica_cluster
    one = {"primary": {"min_size": 1, "max_size": 1}}
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST, pool_kwargs=one) as cluster:
        with cluster.write() as conn:
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            conn.read_only = True
            conn.deferrable = True
            conn.cursor_factory = psycopg.ClientCursor
            backend = conn.info.backend_pid
        with cluster.write() as conn:
            assert conn.info.backend_pid == backend  # the same connection, reused
            assert (conn.isolation_level, conn.read_only, conn.deferrable) == (None, None, None)
            assert conn.execute("SHOW transaction_read_only").fetchone() == ("off",)
            assert not isinstance(conn.cursor(), psycopg.ClientCursor)


def test_a_write_blocks_first_statement_goes_with_its_begin(
    replica_cluster: LocalCluster, table: str, tmp_path: Any
) -> None:
    """BEGIN and the block's first statement in one round trip (the transaction's
    settings included); later statements, errors and psycopg's own paths as psycopg."""
    lc = replica_cluster
    trace = tmp_path / "trace"
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        with cluster.write() as conn:
            insert = f"INSERT INTO {table} VALUES (%s, 'a') RETURNING id"
            assert _round_trips(conn, lambda: conn.execute(insert, (1,)), trace) == 1
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            assert _round_trips(conn, lambda: conn.execute(insert, (2,)), trace) == 1
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)
        with cluster.write() as conn:
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            conn.read_only = True
            row = conn.execute("SHOW transaction_isolation").fetchone()
            assert row == ("serializable",)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(f"INSERT INTO {table} VALUES (3, 'b')")
        with cluster.write() as conn:  # an error in the first statement: as psycopg's
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(f"INSERT INTO {table} VALUES (1, 'dup')")
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with cluster.write() as conn, pytest.raises(psycopg.errors.ActiveSqlTransaction):
            conn.execute("VACUUM")  # psycopg's BEGIN came first here too
        with cluster.write() as conn:
            cur = conn.cursor(binary=True)
            cur.execute(insert, (4,))
            assert cur.fetchone() == (4,)
            conn.cursor().executemany(f"INSERT INTO {table} VALUES (%s, 'm')", [(5,), (6,)])
        with cluster.write() as conn:
            assert type(conn.cursor()).__name__ == "BeginningCursor"
        assert type(conn.cursor()) is psycopg.Cursor  # given back as the pool made it
    rows = lc.execute("primary", f"SELECT id FROM {table} ORDER BY id")
    assert rows == [(1,), (2,), (4,), (5,), (6,)]


def test_a_write_inside_read_fails_the_same_way_on_replica_and_primary(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
        cluster.read() as conn,
    ):
        conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
    with Cluster(lc.primary_dsn, [], **FAST) as primary_only:
        with primary_only.read() as conn:
            assert port_of(conn) == lc.port("primary")
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        with primary_only.read() as conn:  # the failed statement did not poison the pool
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert lc.execute("primary", f"SELECT count(*) FROM {table}") == [(0,)]


def test_read_block_may_use_a_transaction_and_gets_a_clean_connection_after(
    replica_cluster: LocalCluster,
) -> None:
    pool = {"replica": {"max_size": 1, "min_size": 1}}
    with Cluster(replica_cluster.primary_dsn, replica_cluster.replica_dsns[:1], pool_kwargs=pool,
                 **FAST) as cluster:  # fmt: skip
        with cluster.read() as conn:
            conn.autocommit = False
            conn.execute("SELECT 1")  # leaves a transaction open
        with cluster.read() as conn:
            assert conn.autocommit
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_events_report_routes_and_fallbacks_and_reopen_works(
    replica_cluster: LocalCluster,
) -> None:
    lc = replica_cluster
    bus = EventBus(route_sample=1)
    seen: list[object] = []
    bus.subscribe(seen.append)
    cluster = Cluster(lc.primary_dsn, lc.replica_dsns, max_lag_bytes=0, events=bus, **FAST)
    for _ in range(2):  # open, use, close, and again
        with cluster:
            # the write's token stays in its own scope: the read must not wait for a
            # replica to be seen replaying it (it would fall back to the primary meanwhile)
            with cluster.session(inherit=False), cluster.write():
                pass
            with cluster.read(max_lag_bytes=10**12):
                pass
        routes = [e for e in seen if isinstance(e, RouteDecision)]
        assert (routes[-2].intent, routes[-2].target) == ("write", "primary")
        assert routes[-1].intent == "read" and routes[-1].target in ("replica1", "replica2")
        wait_until(
            lambda: not [t for t in threading.enumerate() if "replica-router" in t.name],
            what="monitor and pool threads to end after close()",
        )
    with Cluster(lc.primary_dsn, [], events=bus, **FAST) as primary_only, primary_only.read():
        pass
    fallback = [e for e in seen if isinstance(e, ConsistencyFallback)]
    assert fallback[-1] == ConsistencyFallback("none_healthy", "primary")


# -- lag, fallbacks ------------------------------------------------------------------------


def test_lagging_replica_is_skipped_and_readmitted_after_resume(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=0.3, read_your_writes=None,
                 **FAST) as cluster:  # fmt: skip
        paused("replica1")
        with cluster.write() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        wait_until(lambda: replica_lags(cluster, "replica1", 0.3), what="replica1 to lag")
        ports = {read_port(cluster) for _ in range(20)}
        assert ports == {lc.port("replica2")}
        lc.resume_replay("replica1")
        wait_until(
            lambda: cluster.topology.by_name["replica1"].lag_seconds == 0.0, what="re-admission"
        )
        ports = {read_port(cluster) for _ in range(20)}
        assert ports == {lc.port("replica1"), lc.port("replica2")}


def test_per_call_max_lag_overrides_the_default(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=0.2, read_your_writes=None,
                 **FAST) as cluster:  # fmt: skip
        paused("replica1")
        with cluster.write() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        wait_until(lambda: replica_lags(cluster, "replica1", 0.2), what="replica1 to lag")
        assert {read_port(cluster) for _ in range(10)} == {lc.port("replica2")}
        relaxed = {read_port(cluster, max_lag=math.inf) for _ in range(10)}
        assert relaxed == {lc.port("replica1"), lc.port("replica2")}
        # max_staleness counts the snapshot's age: a bound below it can only be the primary.
        assert read_port(cluster, max_staleness=0.0) == lc.port("primary")
        assert read_port(cluster, max_staleness=3600) == lc.port("replica2")


@pytest.mark.parametrize("fallback", ["primary", "error", "wait"])
def test_fallback_modes_when_every_replica_lags(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None], fallback: str
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=0.2, read_your_writes=None,
                 fallback=fallback, consistency_timeout=1.0, **FAST) as cluster:  # fmt: skip
        paused("replica1")
        paused("replica2")
        with cluster.write() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        wait_until(
            lambda: (
                replica_lags(cluster, "replica1", 0.2) and replica_lags(cluster, "replica2", 0.2)
            ),
            what="both replicas to lag",
        )
        if fallback == "primary":
            assert read_port(cluster) == lc.port("primary")
            assert cluster.counters().fallbacks == {"lag": 1}
        elif fallback == "error":
            with pytest.raises(ConsistencyTimeout, match="lags"):  # a NoReplicaAvailable
                read_port(cluster)
        else:
            started = time.monotonic()  # waits consistency_timeout, then the primary
            assert read_port(cluster) == lc.port("primary")
            assert time.monotonic() - started >= 1.0
            assert cluster.counters().fallbacks == {"lag": 1}
            # Waiting does help once a replica catches up within the timeout.
            timer = threading.Timer(0.2, lc.resume_replay, args=("replica2",))
            timer.start()
            try:
                with cluster.read(max_lag=0.2) as conn:
                    pass
                port = read_port(cluster, max_lag=0.5)
            finally:
                timer.join()
            assert port == lc.port("replica2")
            assert isinstance(conn, psycopg.Connection)


def test_wait_mode_fails_at_once_when_waiting_cannot_help(replica_cluster: LocalCluster) -> None:
    with Cluster(replica_cluster.primary_dsn, [], fallback="wait", consistency_timeout=5,
                 **FAST) as cluster:  # fmt: skip
        started = time.monotonic()
        with pytest.raises(NoReplicaAvailable, match="no healthy replica") as info:
            read_port(cluster)
        assert not isinstance(info.value, ConsistencyTimeout)
        assert time.monotonic() - started < 1.0
        assert isinstance(info.value, psycopg.OperationalError)


# -- configuration -------------------------------------------------------------------------


def test_from_url_discovers_roles_when_the_primary_is_not_listed_first(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    hosts = ",".join(f"127.0.0.1:{lc.port(n)}" for n in ("replica2", "primary", "replica1"))
    url = f"postgresql://postgres@{hosts}/postgres"
    with Cluster.from_url(url, **FAST) as cluster:
        by_name = {s.name: s for s in cluster.status()}
        primary_name = f"127.0.0.1:{lc.port('primary')}"
        assert by_name[primary_name].role == "primary"
        assert by_name[f"127.0.0.1:{lc.port('replica2')}"].role == "replica"
        assert cluster.node_names[0] == f"127.0.0.1:{lc.port('replica2')}"
        with cluster.write() as conn:
            assert port_of(conn) == lc.port("primary")
            conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        with cluster.session(inherit=False):  # another user: not bound by that write
            reads = {read_port(cluster) for _ in range(6)}
        assert reads == {lc.port("replica1"), lc.port("replica2")}


def test_from_env(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    env = {"DATABASE_URL": lc.primary_dsn, "DATABASE_REPLICA_URLS": ", ".join(lc.replica_dsns)}
    with Cluster.from_env(env, **FAST) as cluster:
        assert cluster.node_names == ["primary", "replica1", "replica2"]
        assert read_port(cluster) in {lc.port("replica1"), lc.port("replica2")}
    none = Cluster.from_env({"DATABASE_URL": lc.primary_dsn, "DATABASE_REPLICA_URLS": ""})
    assert none.node_names == ["primary"]
    hosts = ",".join(f"127.0.0.1:{lc.port(n)}" for n in lc.node_names)
    multi = Cluster.from_env({"DATABASE_URL": f"postgresql://postgres@{hosts}/postgres"})
    assert len(multi.node_names) == 3


def test_from_env_names_the_missing_variable() -> None:
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set"):
        Cluster.from_env({})
    with pytest.raises(ConfigurationError, match="DATABASE_REPLICA_URLS is not set"):
        Cluster.from_env({"DATABASE_URL": "postgresql://u@db/app"})


def test_bad_dsn_error_names_the_field_and_hides_the_password() -> None:
    good = "postgresql://app:s3cret-pw@db1:5432/app"
    bad = "postgresql://app:s3cret-pw@db3:notaport/app"
    with pytest.raises(ConfigurationError) as info:
        Cluster(good, [good.replace("db1", "db2"), bad])
    assert "replicas[1]" in str(info.value)
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        Cluster.from_env({"DATABASE_URL": good, "DATABASE_REPLICA_URLS": f"{good},{bad}"})
    assert "DATABASE_REPLICA_URLS[1]" in str(info.value)
    assert "s3cret-pw" not in str(info.value)
    with pytest.raises(ConfigurationError, match="primary"):
        Cluster("host=db port=99999")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fallback": "replica"}, "fallback"),
        ({"read_your_writes": "always"}, "read_your_writes"),
        ({"max_lag": -1}, "max_lag"),
        ({"max_lag_bytes": 1.5}, "max_lag_bytes"),
        ({"policy": "fastest"}, "policy"),
        ({"monitor_interval": 0}, "monitor_interval"),
        ({"failover": "auto"}, "failover"),
        ({"pool_kwargs": {"replica": {"max_sise": 3}}}, "max_sise"),
        ({"pool_kwargs": {"standby": {}}}, "standby"),
        ({"pool_kwargs": {"replica": {"timeout": 3}}}, "checkout_timeout"),
        ({"replicas": {"bad name": "postgresql://h/db"}}, "bad name"),
        ({"replicas": ["postgresql://h/db"], "primary_name": "replica1"}, "used twice"),
    ],
)
def test_bad_settings_are_rejected_naming_the_setting(kwargs: dict[str, Any], field: str) -> None:
    options: dict[str, Any] = {"primary": "postgresql://h/db", **kwargs}
    with pytest.raises(ConfigurationError, match=field):
        Cluster(**options)


def test_status_rows_are_display_safe(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    dsn = lc.primary_dsn.replace("postgres@", "postgres:hunter2@")
    with Cluster(dsn, lc.replica_dsns, **FAST) as cluster:
        with cluster.read():
            rows = {s.name: s for s in cluster.status()}
            assert sum(s.in_use for s in rows.values()) == 1
        assert rows["primary"].role == "primary" and rows["primary"].port == lc.port("primary")
        assert rows["replica1"].configured_role == "replica"
        assert rows["replica1"].lag_bytes is not None
        assert "hunter2" not in repr(cluster) + repr(cluster.status())


# -- runtime changes ---------------------------------------------------------------------


def test_add_and_remove_replicas_at_runtime(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns[:1], read_your_writes=None, **FAST) as cluster:
        assert {read_port(cluster) for _ in range(6)} == {lc.port("replica1")}
        assert cluster.add_replica(lc.dsn("replica2")) == "replica2"
        wait_until(
            lambda: lc.port("replica2") in {read_port(cluster) for _ in range(4)},
            what="reads on the added replica",
        )
        cluster.remove_replica("replica1")
        assert cluster.node_names == ["primary", "replica2"]
        assert {read_port(cluster) for _ in range(10)} == {lc.port("replica2")}
        with pytest.raises(ConfigurationError, match="is the primary"):
            cluster.remove_replica("primary")
        with pytest.raises(ConfigurationError, match="no node named"):
            cluster.remove_replica("replica1")
        with pytest.raises(ConfigurationError, match="already exists"):
            cluster.add_replica(lc.dsn("replica1"), name="replica2")
        assert cluster.add_replica(lc.dsn("replica1"), name="again") == "again"


def test_check_connections(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    dead = "postgresql://postgres@127.0.0.1:1/postgres"
    with Cluster(lc.primary_dsn, [*lc.replica_dsns, dead], **FAST) as cluster:
        assert cluster.check_connections(timeout=1.0) == {
            "primary": True,
            "replica1": True,
            "replica2": True,
            "replica3": False,
        }
        # A node that never answered does not disturb reads.
        assert {read_port(cluster) for _ in range(6)} == {lc.port("replica1"), lc.port("replica2")}


# -- failures (each test gets its own servers) -------------------------------------------------


@pytest.mark.destructive
def test_primary_down_reads_go_on_writes_fail_fast(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        with cluster.write() as conn:
            conn.execute("CREATE TABLE t (id int)")
        # The replicas must have the write before the primary dies: otherwise no
        # node but the dead primary reaches this scope's token, and refusing those
        # reads is right.
        lc.wait_replicated()
        lc.stop("primary", mode="immediate")
        failures = 0
        for _ in range(50):
            try:
                read_port(cluster)
            except psycopg.Error:
                failures += 1
        assert failures == 0
        started = time.monotonic()
        with pytest.raises(PrimaryUnavailable) as info, cluster.write() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        assert time.monotonic() - started < 2.0
        assert isinstance(info.value, psycopg.OperationalError)
        wait_until(lambda: not cluster.topology.by_name["primary"].healthy, what="detection")
        started = time.monotonic()
        with pytest.raises(PrimaryUnavailable, match="no primary"), cluster.write():
            pass
        assert time.monotonic() - started < 0.5  # known down: at once


@pytest.mark.destructive
def test_write_timeout_waits_for_the_primary_to_come_back(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, write_timeout=20, **FAST) as cluster:
        lc.stop("primary", mode="immediate")
        wait_until(lambda: not cluster.topology.by_name["primary"].healthy, what="detection")
        outcome: list[object] = []

        def writer() -> None:
            try:
                with cluster.write() as conn:
                    outcome.append(port_of(conn))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        lc.start("primary")
        thread.join(30)
        assert outcome == [lc.port("primary")]


@pytest.mark.destructive
def test_replica_killed_under_a_read_loop_costs_no_read(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        served: dict[str, int] = {}
        failures: list[BaseException] = []
        for i in range(400):
            if i == 100:
                lc.stop("replica2", mode="immediate")
            try:
                name = node_of(lc, read_port(cluster))
            except Exception as exc:
                failures.append(exc)
            else:
                served[name] = served.get(name, 0) + 1
        assert failures == []
        assert served.get("replica2", 0) <= 60  # about half of the first 100, none after
        assert served["replica1"] >= 300
        assert not cluster.topology.by_name["replica2"].healthy
        lc.start("replica2")
        wait_until(lambda: cluster.topology.by_name["replica2"].healthy, what="re-admission")
        wait_until(
            lambda: lc.port("replica2") in {read_port(cluster) for _ in range(4)},
            what="reads on the restarted replica",
        )


@pytest.mark.destructive
def test_concurrent_readers_survive_a_replica_kill(fresh_replica_cluster: LocalCluster) -> None:
    """No checkout fails. A query already running on the killed server can fail (it
    was sent; retrying it is the application's call): at most one per reader."""
    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        checkout_failures: list[BaseException] = []
        query_failures: list[BaseException] = []
        reads = [0]
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                block = cluster.read()
                try:
                    conn = block.__enter__()
                except Exception as exc:
                    checkout_failures.append(exc)
                    continue
                try:
                    conn.execute("SELECT 1").fetchone()
                    reads[0] += 1
                except psycopg.OperationalError as exc:
                    query_failures.append(exc)
                finally:
                    block.__exit__(None, None, None)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: reads[0] > 100, what="reads before the kill")
        lc.stop("replica1", mode="immediate")
        at_kill = reads[0]
        wait_until(lambda: reads[0] > at_kill + 300, what="reads after the kill")
        stop.set()
        for t in threads:
            t.join(10)
        assert checkout_failures == []
        assert len(query_failures) <= len(threads)


@pytest.mark.destructive
def test_a_node_down_at_open_does_not_block_or_break(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    lc.stop("replica2", mode="immediate")
    started = time.monotonic()
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        assert time.monotonic() - started < 5.0
        assert cluster.topology.by_name["replica2"].role is Role.UNKNOWN
        assert {read_port(cluster) for _ in range(10)} == {lc.port("replica1")}
        lc.start("replica2")
        wait_until(
            lambda: lc.port("replica2") in {read_port(cluster) for _ in range(4)},
            what="reads on the late replica",
        )
