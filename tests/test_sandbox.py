"""LocalCluster against real PostgreSQL servers."""

from __future__ import annotations

import pytest

from replica_router.sandbox import LocalCluster


def test_write_on_primary_reaches_every_replica(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    lc.execute(lc.primary_name, "CREATE TABLE IF NOT EXISTS sandbox_visible (v text)")
    lc.execute(lc.primary_name, "INSERT INTO sandbox_visible VALUES ('hello')")
    lc.wait_replicated()
    for name in lc.replica_names:
        assert ("hello",) in lc.execute(name, "SELECT v FROM sandbox_visible")
        assert lc.execute(name, "SELECT pg_is_in_recovery()") == [(True,)]
    assert lc.execute(lc.primary_name, "SELECT pg_is_in_recovery()") == [(False,)]


@pytest.mark.destructive
def test_promote_repoints_the_other_replica(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    lc.stop("primary", mode="immediate")
    lc.promote("replica1")
    assert lc.primary_name == "replica1"
    lc.execute("replica1", "CREATE TABLE after_failover (v int)")
    lc.execute("replica1", "INSERT INTO after_failover VALUES (42)")
    lc.wait_replicated()
    assert lc.execute("replica2", "SELECT v FROM after_failover") == [(42,)]
