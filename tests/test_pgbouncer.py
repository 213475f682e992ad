"""The Cluster through a real PgBouncer per node (``LocalCluster(pgbouncer=...)``)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from helpers import replay_paused, scratch_table, wait_until
from replica_router import Cluster
from replica_router.errors import ConfigurationError, SandboxError
from replica_router.sandbox import LocalCluster, _pgbouncer


def _require_pgbouncer() -> None:
    """Without PgBouncer the tests are skipped with how to install it; not in CI."""
    try:
        _pgbouncer.find_pgbouncer()
    except SandboxError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI needs PgBouncer: {exc}")
        pytest.skip(f"{exc}")


@pytest.fixture(scope="module")
def bounced() -> Iterator[LocalCluster]:
    """A primary and two replicas, each behind its own PgBouncer in transaction mode."""
    _require_pgbouncer()
    with LocalCluster(replicas=2, pgbouncer="transaction") as lc:
        yield lc


@pytest.fixture
def make_bounced() -> Iterator[Callable[..., LocalCluster]]:
    _require_pgbouncer()
    made: list[LocalCluster] = []

    def make(**options: Any) -> LocalCluster:
        lc = LocalCluster(**options)
        made.append(lc)
        return lc.open()

    try:
        yield make
    finally:
        for lc in made:
            lc.close()


def _cluster(lc: LocalCluster, **options: Any) -> Cluster:
    options.setdefault("monitor_interval", 0.1)
    return Cluster(lc.primary_dsn, lc.replica_dsns, connect_kwargs=lc.connect_kwargs, **options)


def _server_port(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None
    return int(row[0])


def test_the_dsns_point_at_pgbouncer_in_front_of_each_server(bounced: LocalCluster) -> None:
    lc = bounced
    assert lc.pgbouncer == "transaction" and lc.pgbouncer_version
    for name in lc.node_names:
        bouncer_port = int(lc.dsn(name).rsplit(":", 1)[1].split("/")[0])
        assert bouncer_port != lc.port(name)
        assert lc.server_dsn(name).endswith(f":{lc.port(name)}/postgres")
        with psycopg.connect(lc.dsn(name), autocommit=True) as conn:
            assert _server_port(conn) == lc.port(name)  # the server behind it
        admin = lc.dsn(name).rsplit("/", 1)[0] + "/pgbouncer"
        with psycopg.connect(admin, autocommit=True, prepare_threshold=None) as console:
            databases = console.execute("SHOW DATABASES").fetchall()
            assert any(row[0] == "postgres" and row[2] == lc.port(name) for row in databases)
    assert lc.primary_dsn == lc.dsn("primary")
    assert lc.replica_dsns == [lc.dsn("replica1"), lc.dsn("replica2")]


def test_bad_pool_mode_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"pgbouncer: expected None, 'transaction'"):
        LocalCluster(pgbouncer="statement")


def test_prepared_statements_across_server_connections(bounced: LocalCluster) -> None:
    """psycopg prepares a query server-side on its 6th execution; behind PgBouncer < 1.21
    in transaction mode the next transaction may run on a server connection that never
    saw it. ``lc.connect_kwargs`` turns server-side preparing off there."""
    lc = bounced
    version = tuple(int(p) for p in lc.pgbouncer_version.split("."))
    assert lc.connect_kwargs == ({} if version >= (1, 21) else {"prepare_threshold": None})

    def run(**kwargs: Any) -> None:
        with (
            psycopg.connect(lc.primary_dsn, autocommit=True, **kwargs) as client,
            psycopg.connect(lc.primary_dsn, **kwargs) as other,
        ):
            for i in range(6):  # prepared now, on the server connection it ran on
                client.execute("SELECT %s::int", (i,))
            other.execute("SELECT 1")  # `other` holds that server connection in a transaction
            assert client.execute("SELECT %s::int", (7,)).fetchone() == (7,)
            other.rollback()

    run(**lc.connect_kwargs)
    if version < (1, 21):
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):  # the problem it avoids
            run()


def test_monitor_probes_stay_healthy_under_concurrent_load(
    bounced: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Probes repeat one query on a long-lived connection (psycopg would prepare it);
    other clients keep PgBouncer handing out different server connections."""
    lc = bounced
    caplog.set_level(logging.WARNING, logger="replica_router.monitor")
    with _cluster(lc) as cluster:
        wait_until(lambda: all(n.healthy for n in cluster.topology.nodes), what="all healthy")
        stop = threading.Event()
        errors: list[BaseException] = []

        def load() -> None:
            try:
                while not stop.is_set():
                    with cluster.read() as conn:
                        conn.execute("SELECT pg_sleep(0.005)")
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            unhealthy: list[str] = []
            start = cluster.topology.generation

            def rounds_done() -> bool:
                topology = cluster.topology
                unhealthy.extend(n.name for n in topology.nodes if not n.healthy)
                return topology.generation >= start + 30

            wait_until(rounds_done, timeout=60, what="30 monitor rounds")
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert errors == []
        assert unhealthy == []
        assert [r.getMessage() for r in caplog.records if "probe failed" in r.getMessage()] == []
        assert {row.name: row.role for row in cluster.status()} == {
            "primary": "primary",
            "replica1": "replica",
            "replica2": "replica",
        }


def test_token_capture_and_read_your_writes(bounced: LocalCluster) -> None:
    lc = bounced
    with (
        scratch_table(lc, "bounced", "id int PRIMARY KEY") as table,
        _cluster(lc, max_lag=None) as cluster,
    ):
        with replay_paused(lc):
            with cluster.write() as conn:
                conn.execute(f"INSERT INTO {table} VALUES (1)")
            token = cluster.token
            assert token is not None and token.system_id == lc.system_identifier
            position = lc.execute("primary", "SELECT pg_current_wal_lsn()::text")[0][0]
            assert token.lsn <= _lsn(position)
            with cluster.read() as conn:  # replicas cannot have it: the primary answers
                assert _server_port(conn) == lc.port("primary")
                assert conn.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]
        lc.wait_replicated()
        with cluster.read() as conn:  # replayed now: a replica, through its PgBouncer
            assert _server_port(conn) in (lc.port("replica1"), lc.port("replica2"))
            assert conn.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def test_set_is_replayed_on_the_node_a_statement_moves_to_in_session_mode(
    make_bounced: Callable[..., LocalCluster],
) -> None:
    lc = make_bounced(replicas=1, pgbouncer="session", password="s3cr'et")
    assert "s3cr" in lc.primary_dsn  # clients log in to PgBouncer, PgBouncer to the server
    with _cluster(lc) as cluster, cluster.connection() as conn:
        conn.execute("SET application_name = 'routed-app'")
        conn.execute("SET statement_timeout = '4s'")
        read = conn.execute("SELECT current_setting('application_name'), inet_server_port()")
        assert read.fetchone() == ("routed-app", lc.port("replica1"))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS scratch (v int)")  # moves to the primary
        row = conn.execute("SELECT current_setting('statement_timeout'), inet_server_port()")
        assert row.fetchone() == ("4s", lc.port("primary"))


def test_set_replay_in_transaction_mode(bounced: LocalCluster) -> None:
    """One client at a time: PgBouncer hands it the same idle server connection."""
    lc = bounced
    with _cluster(lc) as cluster, cluster.connection() as conn:
        conn.execute("SET application_name = 'routed-app'")
        row = conn.execute("SELECT current_setting('application_name'), inet_server_port()")
        name, port = row.fetchone() or (None, None)
        assert name == "routed-app" and port in (lc.port("replica1"), lc.port("replica2"))
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '3s'")  # lives in the transaction
            inside = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
            assert inside == ("3s",)


@pytest.mark.destructive
@pytest.mark.slow
def test_failover_through_pgbouncer(make_bounced: Callable[..., LocalCluster]) -> None:
    lc = make_bounced(replicas=2, pgbouncer="transaction")
    lc.execute("primary", "CREATE TABLE survived (v int)")
    with _cluster(lc, failover="promote", monitor_interval=0.2, failure_threshold=2) as cluster:
        with cluster.write() as conn:
            conn.execute("INSERT INTO survived VALUES (1)")
        lc.stop("primary", mode="immediate")  # its PgBouncer stays up, the server is gone
        new = wait_until(
            lambda: cluster.topology.primary if cluster.topology.primary != "primary" else None,
            timeout=30,
            what="the router's promotion through PgBouncer",
        )
        assert lc.primary_name == new  # the sandbox sees it too
        with cluster.write() as conn:
            conn.execute("INSERT INTO survived VALUES (2)")
            assert _server_port(conn) == lc.port(new)
        with cluster.read() as conn:
            assert conn.execute("SELECT sum(v) FROM survived").fetchone() == (3,)
