"""The sandbox measures roles instead of remembering them, and rejoins an old primary."""

from __future__ import annotations

import psycopg
import pytest

from helpers import wait_until
from replica_router import Cluster
from replica_router.errors import ConfigurationError, SandboxError
from replica_router.sandbox import LocalCluster

ROUTER_PROMOTES = {"failover": "promote", "monitor_interval": 0.2, "failure_threshold": 2}


def _receives_from(lc: LocalCluster, replica: str, upstream: str) -> int | None:
    """The timeline ``replica`` streams from ``upstream`` on, or None."""
    try:
        rows = lc.execute(
            replica,
            "SELECT received_tli FROM pg_stat_wal_receiver"
            " WHERE status = 'streaming' AND sender_port = %s",
            (lc.port(upstream),),
        )
    except psycopg.OperationalError:
        return None
    return int(rows[0][0]) if rows else None


@pytest.mark.destructive
@pytest.mark.slow
def test_after_the_routers_own_promotion_the_old_primary_starts_and_rejoins(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE history (v text)")
    lc.execute("primary", "INSERT INTO history VALUES ('before')")
    lc.wait_replicated()
    with Cluster(lc.primary_dsn, lc.replica_dsns, **ROUTER_PROMOTES) as cluster:
        lc.stop("primary", mode="immediate")
        new = wait_until(
            lambda: cluster.topology.primary if cluster.topology.primary != "primary" else None,
            what="the router's promotion",
        )
        other = "replica2" if new == "replica1" else "replica1"
        wait_until(lambda: _receives_from(lc, other, new) == 2, what=f"{other} re-pointed")
        # Nobody told the sandbox: it asks the servers.
        assert lc.primary_name == new
        assert lc.replica_names == [other]
        assert lc.primary_dsn == lc.dsn(new)

        lc.start("primary")  # used to raise "replica1, replica2 not streaming from primary"
        assert lc.execute("primary", "SELECT pg_is_in_recovery()") == [(False,)]
        assert lc.primary_name == new  # of two primaries, the newer timeline
        lc.execute("primary", "INSERT INTO history VALUES ('split brain')")
        lc.execute(new, "INSERT INTO history VALUES ('after')")

        lc.rejoin("primary")
        assert lc.execute("primary", "SELECT pg_is_in_recovery()") == [(True,)]
        assert _receives_from(lc, "primary", new) == 2
        assert lc.replica_names == ["primary", other]
        lc.execute(new, "INSERT INTO history VALUES ('rejoined')")
        lc.wait_replicated()
        for name in ("primary", other):  # the split-brain write was rewound away
            assert lc.execute(name, "SELECT v FROM history ORDER BY v") == [
                ("after",),
                ("before",),
                ("rejoined",),
            ]
        wait_until(
            lambda: (
                cluster.topology.by_name["primary"].healthy
                and cluster.status()[0].role == "replica"
            ),
            what="the router sees the old primary as a replica",
        )


@pytest.mark.destructive
def test_rejoin_after_a_sandbox_promotion_keeps_sync_commits_flowing(
    make_replica_cluster: object,
) -> None:
    assert callable(make_replica_cluster)
    lc: LocalCluster = make_replica_cluster(replicas=1, sync=True)
    lc.execute("primary", "CREATE TABLE t (v int)")
    lc.stop("primary", mode="immediate")
    lc.promote("replica1")  # no standby left: commits stop waiting for one
    lc.execute("replica1", "INSERT INTO t VALUES (1)")
    lc.rejoin("primary")  # the old primary was never started again: rewound from its files
    assert lc.primary_name == "replica1" and lc.replica_names == ["primary"]
    assert lc.execute("replica1", "SHOW synchronous_standby_names") == [
        ('ANY 1 ("primary", "replica1")',)
    ]
    lc.execute("replica1", "INSERT INTO t VALUES (2)")  # a sync commit: primary confirms it
    assert lc.execute("replica1", "SELECT sync_state FROM pg_stat_replication") == [("quorum",)]
    lc.wait_replicated()
    assert lc.execute("primary", "SELECT sum(v) FROM t") == [(3,)]


def test_rejoin_refuses_the_primary_and_unknown_nodes(replica_cluster: LocalCluster) -> None:
    with pytest.raises(SandboxError, match="cannot rejoin primary: it is the primary"):
        replica_cluster.rejoin("primary")
    with pytest.raises(ConfigurationError, match="unknown node 'replica9'"):
        replica_cluster.rejoin("replica9")
    assert replica_cluster.is_running("primary")
