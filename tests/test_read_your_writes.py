"""Read-your-writes, monotonic reads and tokens on real servers, made deterministic
by pausing replay (no timing luck: a paused replica *cannot* have the row)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from helpers import FAST, read_port, scratch_table, wait_until
from replica_router import Cluster, Token, TokenError
from replica_router.lsn import parse_lsn
from replica_router.sandbox import LocalCluster


def port_and_rows(conn: psycopg.Connection[Any], table: str) -> tuple[int, list[int]]:
    port = conn.execute("SELECT inet_server_port()").fetchone()
    ids = conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
    assert port is not None
    return int(port[0]), [int(r[0]) for r in ids]


@pytest.fixture
def table(replica_cluster: LocalCluster) -> Iterator[str]:
    with scratch_table(replica_cluster, "ryw", "id int PRIMARY KEY") as name:
        yield name


def insert(cluster: Cluster, table: str, row_id: int) -> None:
    with cluster.write() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (row_id,))


def test_the_token_is_at_or_past_the_commit(replica_cluster: LocalCluster, table: str) -> None:
    """A replica whose replay position reached the token has the row, every time."""
    lc = replica_cluster
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster,
        psycopg.connect(lc.dsn("replica1"), autocommit=True) as replica,
    ):
        for row_id in range(60):
            insert(cluster, table, row_id)
            token = cluster.token
            assert token is not None
            assert token.system_id == lc.system_identifier

            def replayed(target: int = token.lsn) -> bool:
                row = replica.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
                return row is not None and parse_lsn(row[0]) >= target

            wait_until(replayed, what="replay to reach the token")
            found = replica.execute(f"SELECT 1 FROM {table} WHERE id = %s", (row_id,)).fetchone()
            assert found == (1,), f"row {row_id} missing at a replay position past its token"


def test_a_failing_commit_raises_its_error_and_advances_nothing(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    name = f"{table}_deferred"
    lc.execute(
        "primary",
        f"CREATE TABLE {name} (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)",
    )
    try:
        with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster, cluster.session():
            insert(cluster, table, 1)
            before = cluster.token
            with pytest.raises(psycopg.errors.UniqueViolation), cluster.write() as conn:
                conn.execute(f"INSERT INTO {name} VALUES (1), (1)")  # checked at COMMIT
            assert cluster.token == before
            with cluster.write() as conn:  # the pooled connection is usable again
                conn.execute(f"INSERT INTO {name} VALUES (2)")
            assert cluster.token is not None and before is not None
            assert cluster.token.lsn > before.lsn
        assert lc.execute("primary", f"SELECT id FROM {name}") == [(2,)]
    finally:
        lc.execute("primary", f"DROP TABLE {name}")


def test_tokens_only_move_forward(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster, cluster.session():
        assert cluster.token is None
        seen = []
        for row_id in range(5):
            insert(cluster, table, row_id)
            token = cluster.token
            assert token is not None
            seen.append(token.lsn)
        assert seen == sorted(seen) and len(set(seen)) == 5


def test_write_then_read_sees_the_row_with_replay_paused(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        paused("replica1")
        paused("replica2")
        for row_id in range(5):
            with cluster.session():
                insert(cluster, table, row_id)
                with cluster.read() as conn:
                    port, rows = port_and_rows(conn, table)
                assert row_id in rows
                assert port == lc.port("primary")  # no replica has it
        assert cluster.counters().fallbacks["token"] == 5
        # The sessions handed their writes back to this context's scope; a unit of
        # work of its own that never wrote (another request, another job) reads a replica.
        with cluster.session(inherit=False):
            port, rows = _read_rows(cluster, table)
        assert port != lc.port("primary")
        assert rows == []


def test_a_caught_up_replica_serves_the_read_after_a_write(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        paused("replica1")
        served = set()
        for row_id in range(10):
            with cluster.session():
                insert(cluster, table, row_id)
                with cluster.read() as conn:
                    port, rows = port_and_rows(conn, table)
                assert row_id in rows
                served.add(port)
        assert lc.port("replica1") not in served
        assert lc.port("replica2") in served  # checked on demand: it had replayed the write


def test_the_token_string_carries_read_your_writes_across_threads(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        paused("replica1")
        paused("replica2")
        handed_over: list[str] = []

        def writer() -> None:
            with cluster.session(inherit=False):  # a job of its own: hands the token on
                insert(cluster, table, 42)
                handed_over.append(str(cluster.token))

        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
        results: list[tuple[int, list[int]]] = []

        def reader(text: str | None) -> None:
            if text is None:
                with cluster.read() as conn:
                    results.append(port_and_rows(conn, table))
                return
            with cluster.session(token=Token.parse(text), inherit=False), cluster.read() as conn:
                results.append(port_and_rows(conn, table))

        for text in (handed_over[0], None):
            thread = threading.Thread(target=reader, args=(text,))
            thread.start()
            thread.join()
        (with_token_port, with_token_rows), (without_port, without_rows) = results
        assert with_token_rows == [42] and with_token_port == lc.port("primary")
        assert without_rows == [] and without_port != lc.port("primary")  # the control


def test_wait_mode_waits_for_a_replica_to_reach_the_token(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, fallback="wait", consistency_timeout=0.4,
                 **FAST) as cluster:  # fmt: skip
        paused("replica1")
        paused("replica2")
        with cluster.session():
            insert(cluster, table, 1)
            started = time.monotonic()  # waits consistency_timeout, then the primary
            with cluster.read() as conn:
                assert port_and_rows(conn, table) == (lc.port("primary"), [1])
            assert time.monotonic() - started >= 0.4
            timer = threading.Timer(0.15, lc.resume_replay, args=("replica2",))
            timer.start()
            try:
                with cluster.read() as conn:
                    port, rows = port_and_rows(conn, table)
            finally:
                timer.join()
        assert rows == [1]
        assert port == lc.port("replica2")


def test_monotonic_reads_never_go_back(
    replica_cluster: LocalCluster, table: str, paused: Callable[[str], None]
) -> None:
    """One scope saw row 1 on replica2; replica1 (paused) lacks it and must not serve
    that scope again, while a plain cluster happily reads the old state there."""
    lc = replica_cluster
    options: dict[str, Any] = {"read_your_writes": None, **FAST}
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, monotonic_reads=True, **options) as mono,
        Cluster(lc.primary_dsn, lc.replica_dsns, **options) as plain,
    ):
        paused("replica1")
        insert(plain, table, 1)
        lc.wait_replicated()  # replica2 has row 1; replica1 is paused without it
        with mono.session():
            first = None
            while first != lc.port("replica2"):  # round robin reaches replica2 in <= 2 reads
                with mono.read() as conn:
                    first, rows = port_and_rows(conn, table)
            assert rows == [1]
            for _ in range(10):
                with mono.read() as conn:
                    port, rows = port_and_rows(conn, table)
                assert rows == [1]
                assert port != lc.port("replica1")
        stale = []
        for _ in range(4):
            with plain.read() as conn:
                stale.append(port_and_rows(conn, table))
        assert (lc.port("replica1"), []) in stale  # the control: going back was possible


def test_foreign_and_malformed_tokens(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        sysid = cluster.system_identifier
        assert sysid == lc.system_identifier
        foreign = Token(123, sysid + 1 if sysid < 2**64 - 1 else 1)
        with pytest.raises(TokenError, match="another cluster"), cluster.session(token=foreign):
            pass
        with (
            pytest.raises(TokenError, match="not a replica-router token"),
            cluster.session(token="1.zz.this-is-not-it"),
        ):
            pass
        with cluster.session(token=Token(5, None)) as scope:  # no cluster id: ours by default
            assert cluster.token == Token(5, sysid)
            assert scope.token == Token(5, sysid)
        with cluster.session(token=str(Token(7, sysid))):
            assert cluster.token == Token(7, sysid)


def test_nested_sessions_hand_writes_back_out(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster, cluster.session():
        with cluster.session():
            insert(cluster, table, 1)
            inner = cluster.token
        assert inner is not None
        assert cluster.token == inner


def test_window_mode_reads_the_primary_for_the_window(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes="window", window=0.5,
                 **FAST) as cluster:  # fmt: skip
        with cluster.session():
            insert(cluster, table, 1)
            assert cluster.token is None  # window mode does not capture positions
            with cluster.read() as conn:
                assert port_and_rows(conn, table)[0] == lc.port("primary")
            wait_until(lambda: read_port(cluster) != lc.port("primary"), what="the window to end")
        with cluster.session(), cluster.read() as conn:  # another scope: no write, replica
            assert port_and_rows(conn, table)[0] != lc.port("primary")


def test_window_mode_by_user_id_across_scopes(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes="window", window=30,
                 **FAST) as cluster:  # fmt: skip
        with cluster.session(user_id="alice"):
            insert(cluster, table, 1)
        ports: dict[str, int] = {}

        def request(user: str) -> None:  # a request: a unit of work of its own
            with cluster.session(user_id=user, inherit=False):
                ports[user] = read_port(cluster)

        for user in ("alice", "bob"):
            thread = threading.Thread(target=request, args=(user,))
            thread.start()
            thread.join()
        assert ports["alice"] == lc.port("primary")
        assert ports["bob"] != lc.port("primary")


def test_read_your_writes_off(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster
    with (
        Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=None, **FAST) as cluster,
        cluster.session(),
    ):
        insert(cluster, table, 1)
        assert cluster.token is None
        assert read_port(cluster) != lc.port("primary")


def _read_rows(cluster: Cluster, table: str) -> tuple[int, list[int]]:
    with cluster.read() as conn:
        return port_and_rows(conn, table)
