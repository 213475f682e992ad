"""The public routing seam, ``route_read`` and ``record_write``, on real servers:
what SQLAlchemy, Django, Peewee and users' own integrations build on."""

from __future__ import annotations

import psycopg
import pytest

from helpers import FAST, cluster_for, replay_paused, run, scratch_table
from replica_router import AsyncCluster, Cluster, Error, NodeUnavailable
from replica_router.consistency import commit_and_capture
from replica_router.lsn import format_lsn
from replica_router.sandbox import LocalCluster


def test_route_read_names_a_replica_without_a_token(replica_cluster: LocalCluster) -> None:
    with Cluster(replica_cluster.primary_dsn, replica_cluster.replica_dsns, **FAST) as cluster:
        assert cluster.route_read() in replica_cluster.replica_names


def test_record_write_sends_the_scopes_reads_to_a_node_that_has_it(
    replica_cluster: LocalCluster,
) -> None:
    """A commit made on the user's own connection, recorded by position, is honoured
    by the next route: the paused replicas cannot have it, so the primary serves."""
    lc = replica_cluster
    with scratch_table(lc, "seam", "id int") as table, cluster_for(lc) as cluster:
        assert cluster.route_read() in lc.replica_names
        with replay_paused(lc), psycopg.connect(lc.primary_dsn) as own:
            own.execute(f"INSERT INTO {table} VALUES (1)")
            position = commit_and_capture(own)
            assert position is not None
            cluster.record_write(format_lsn(position))  # the string form is accepted too
            assert cluster.token is not None and cluster.token.lsn == position
            assert cluster.route_read() == "primary"
            with cluster.session(inherit=False):
                assert cluster.route_read() in lc.replica_names  # another unit of work


def test_route_read_honours_a_tighter_max_lag(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
        assert cluster.route_read(max_lag=30.0) in lc.replica_names
        record_unknown = cluster.token
        cluster.record_write(None)  # position unknown: LSN mode keeps the token it had
        assert cluster.token == record_unknown


def test_checkout_hands_out_a_named_nodes_pooled_connection(
    replica_cluster: LocalCluster,
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        node = cluster.route_read()
        lease = cluster.checkout(node)
        try:
            assert lease.node == node
            row = lease.conn.execute("SELECT inet_server_port()").fetchone()
            assert row == (lc.port(node),)
            assert cluster.in_use(node) == 1
        finally:
            cluster.checkin(lease)
        assert cluster.in_use(node) == 0
        write = cluster.checkout("primary", "write")
        try:
            assert not write.conn.autocommit
        finally:
            cluster.checkin(write)


def test_checkout_of_an_unknown_node_is_a_clear_error(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster, pytest.raises(Error):
        cluster.checkout("nosuch")


def test_route_read_keeps_the_preferred_node_while_it_qualifies(
    replica_cluster: LocalCluster,
) -> None:
    """``prefer=`` keeps a unit of work on the replica it read from (round robin
    would alternate), and gives it up when that replica no longer qualifies."""
    lc = replica_cluster
    first, second = lc.replica_names
    with cluster_for(lc) as cluster:
        assert len({cluster.route_read() for _ in range(4)}) == 2  # round robin alternates
        assert {cluster.route_read(prefer=second) for _ in range(4)} == {second}
        with scratch_table(lc, "prefer", "id int") as table, replay_paused(lc):
            with cluster.write() as conn:
                conn.execute(f"INSERT INTO {table} VALUES (1)")
            assert cluster.route_read(prefer=first) == "primary"  # neither has the write


def test_route_write_names_the_primary(replica_cluster: LocalCluster) -> None:
    with Cluster(replica_cluster.primary_dsn, replica_cluster.replica_dsns, **FAST) as cluster:
        assert cluster.route_write() == "primary"


def test_async_route_read_and_write_follow_the_token(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster

    async def main() -> None:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
            assert await cluster.route_read() in lc.replica_names
            assert await cluster.route_write() == "primary"
            with replay_paused(lc):
                async with cluster.write() as conn:
                    await conn.execute("SELECT pg_catalog.txid_current()")
                assert await cluster.route_read() == "primary"
                cluster.record_write(None)  # the shared, pure half of the seam
                assert cluster.token is not None

    run(main())


def test_route_read_skips_excluded_nodes(replica_cluster: LocalCluster) -> None:
    """``exclude=`` is for a retry after a node failed this unit of work."""
    lc = replica_cluster
    first, second = lc.replica_names
    with cluster_for(lc) as cluster:
        assert {cluster.route_read(exclude=[second]) for _ in range(6)} == {first}
        assert cluster.route_read(exclude=lc.replica_names) == "primary"  # the fallback
        assert cluster.route_read(prefer="primary") in lc.replica_names  # not a candidate


def test_conninfo_and_note_in_use_serve_an_integrations_own_connections(
    replica_cluster: LocalCluster,
) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:
        own = psycopg.connect(cluster.conninfo("primary", "read"), autocommit=True)
        with own, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            own.execute("CREATE TABLE rr_never (id int)")
        with psycopg.connect(cluster.conninfo("primary", "write"), autocommit=True) as own:
            assert own.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
        cluster.note_in_use("replica1", +1)
        assert cluster.in_use("replica1") == 1
        assert {s.name: s.in_use for s in cluster.status()}["replica1"] == 1
        cluster.note_in_use("replica1", -1)
        assert cluster.in_use("replica1") == 0
        with pytest.raises(NodeUnavailable):
            cluster.conninfo("nosuch")


def test_record_read_raises_the_monotonic_floor(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with cluster_for(lc) as plain, plain.session():
        plain.record_read(10**12)
        assert not plain.monotonic_reads
        assert plain.route_read() in lc.replica_names  # no floor without monotonic reads
    with (
        Cluster(
            lc.primary_dsn, lc.replica_dsns, max_lag=None, monotonic_reads=True, **FAST
        ) as cluster,
        cluster.session(),
    ):
        assert cluster.monotonic_reads
        cluster.record_read("FF/0")  # far ahead of every replica
        assert cluster.route_read() == "primary"
