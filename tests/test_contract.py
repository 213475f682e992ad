"""The public contract (ARCHITECTURE.md, "Contract"), used exactly as written there.

Other tests go deep on each behaviour; this one guards the names and shapes we
promised users, so a rename anywhere fails here first.
"""

from __future__ import annotations

import dataclasses

import pytest

from replica_router import AsyncCluster, Cluster, Error, Intent, Token, classify
from replica_router.sandbox import LocalCluster


def test_classify_contract() -> None:
    assert classify("SELECT * FROM t FOR UPDATE") is Intent.WRITE
    assert classify("SELECT 1") is Intent.READ


def test_node_status_fields() -> None:
    from replica_router import NodeStatus

    fields = {f.name for f in dataclasses.fields(NodeStatus)}
    assert {
        "name", "host", "port", "role", "healthy", "lag_seconds", "lag_bytes",
        "replay_lsn", "latency_ms", "last_error",
    } <= fields  # fmt: skip


def test_cluster_contract(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    cluster = Cluster(
        primary=lc.primary_dsn, replicas=lc.replica_dsns, policy="round_robin", max_lag=2.0,
        read_your_writes="lsn", fallback="primary", failover="follow", monitor_interval=0.5,
    )  # fmt: skip
    with cluster:
        with cluster.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS contract_t (id int)")
            conn.execute("INSERT INTO contract_t VALUES (1)")
        token = cluster.token
        assert isinstance(token, Token)
        with cluster.session(token=Token.parse(str(token))), cluster.read() as conn:
            assert conn.execute("SELECT count(*) FROM contract_t").fetchone()[0] >= 1
        with cluster.connection() as conn:
            port = conn.execute("SELECT inet_server_port()").fetchone()[0]
            assert port in {lc.port(n) for n in lc.replica_names} | {lc.port("primary")}
            conn.execute("INSERT INTO contract_t VALUES (2)")
        names = {row.name for row in cluster.status()}
        assert names == {"primary", "replica1", "replica2"}
        assert cluster.check_connections() == dict.fromkeys(names, True)
        cluster.remove_replica("replica2")
        assert {row.name for row in cluster.status()} == {"primary", "replica1"}
        cluster.add_replica(lc.dsn("replica2"), name="replica2")
        assert {row.name for row in cluster.status()} == names


def test_from_url_discovers_roles(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    hosts = ",".join(f"127.0.0.1:{lc.port(n)}" for n in ("replica1", "primary", "replica2"))
    with Cluster.from_url(f"postgresql://postgres@{hosts}/postgres") as cluster:
        roles = {row.port: row.role for row in cluster.status()}
    assert roles[lc.port("primary")] == "primary"
    assert roles[lc.port("replica1")] == roles[lc.port("replica2")] == "replica"


async def _async_contract(lc: LocalCluster) -> int:
    async with AsyncCluster(primary=lc.primary_dsn, replicas=lc.replica_dsns) as cluster:
        async with cluster.write() as conn:
            await conn.execute("SELECT 1")
        async with cluster.read() as conn:
            cur = await conn.execute("SELECT inet_server_port()")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])


def test_async_cluster_contract(replica_cluster: LocalCluster) -> None:
    import asyncio

    port = asyncio.run(_async_contract(replica_cluster))
    assert port in {replica_cluster.port(n) for n in replica_cluster.replica_names}


def test_errors_are_rooted() -> None:
    from replica_router import ConfigurationError, PrimaryUnavailable, TokenError

    assert issubclass(ConfigurationError, Error) and issubclass(TokenError, Error)
    import psycopg

    assert issubclass(PrimaryUnavailable, psycopg.OperationalError)
    with pytest.raises(TokenError):
        Token.parse("garbage")
