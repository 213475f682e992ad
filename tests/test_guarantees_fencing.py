"""Fencing and timelines: nothing is written where it will be lost, nothing read from
a node that left the current timeline (issue 11, design rules 2, 3 and 4).

The promotions here leave the old primary running on its old timeline: the
split brain a router must fence. Each test has a sandbox of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg2
import pytest

import helpers
from helpers import FAST, port_of
from replica_router import Cluster, Error, PrimaryUnavailable
from replica_router.integrations import psycopg2 as routed
from replica_router.monitor import Timelines, on_history, parse_history
from replica_router.policy import make_policy
from replica_router.routing import ReadRequirements, route_read
from replica_router.sandbox import LocalCluster
from replica_router.topology import NodeState, Role, Topology

T = TypeVar("T")

TABLE = "guar_fence"


def wait_until(predicate: Callable[[], T], what: str) -> T:
    return helpers.wait_until(predicate, 20.0, what)


@pytest.fixture
def lc(fresh_replica_cluster: LocalCluster) -> LocalCluster:
    fresh_replica_cluster.execute("primary", f"CREATE TABLE {TABLE} (id int PRIMARY KEY)")
    fresh_replica_cluster.wait_replicated()
    return fresh_replica_cluster


@pytest.fixture
def cluster(lc: LocalCluster) -> Iterator[Cluster]:
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as c:  # type: ignore[arg-type]
        yield c
    routed.close_pools(c)


def rows_on(lc: LocalCluster, node: str, row_id: int) -> int:
    rows = lc.execute(node, f"SELECT count(*) FROM {TABLE} WHERE id = {row_id}")
    return int(rows[0][0])


def fenced_after_promotion(cluster: Cluster) -> bool:
    topology = cluster.topology
    return topology.primary == "replica1" and topology.by_name["primary"].fenced


@pytest.mark.destructive
def test_a_pinned_routed_connection_never_writes_to_a_fenced_primary(
    lc: LocalCluster, cluster: Cluster
) -> None:
    """Defect 1: the session holds an advisory lock, so it is pinned to the primary;
    once the router fenced that node, the next write gets a clear error and the
    old timeline gets nothing."""
    conn = cluster.connection()
    try:
        conn.execute("SELECT pg_advisory_lock(11)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (1)")
        lc.promote("replica1")
        wait_until(lambda: fenced_after_promotion(cluster), "the old primary to be fenced")
        with pytest.raises(Error):
            conn.execute(f"INSERT INTO {TABLE} VALUES (2)")
    finally:
        conn.close()
    assert rows_on(lc, "primary", 2) == 0, "the write committed on the dead timeline"


@pytest.mark.destructive
def test_a_pipeline_queued_on_a_primary_that_gets_fenced_commits_nothing_there(
    lc: LocalCluster, cluster: Cluster
) -> None:
    """Design rule 2 inside ``conn.pipeline()``: the block's next statement after the
    fencing fails with ``PrimaryUnavailable``, and what was queued on the old primary
    since the last sync is rolled back there (its connection is closed), not
    committed at the block's end; the connection's next write goes to the new one."""
    with cluster.connection() as conn:
        with pytest.raises(PrimaryUnavailable), conn.pipeline() as p:
            conn.execute(f"INSERT INTO {TABLE} VALUES (1)")
            assert p.node == "primary"
            lc.promote("replica1")
            wait_until(lambda: fenced_after_promotion(cluster), "the old primary to be fenced")
            conn.execute(f"INSERT INTO {TABLE} VALUES (2)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (3)")
    assert [rows_on(lc, "primary", i) for i in (1, 2, 3)] == [0, 0, 0]
    assert rows_on(lc, "replica1", 3) == 1


@pytest.mark.destructive
def test_a_pinned_psycopg2_connection_never_writes_to_a_fenced_primary(
    lc: LocalCluster, cluster: Cluster
) -> None:
    """Defect 1, psycopg2 adapter: the same pinned session, the same refusal."""
    conn = routed.connect(cluster, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_advisory_lock(11)")
        cur.execute(f"INSERT INTO {TABLE} VALUES (1)")
        lc.promote("replica1")
        wait_until(lambda: fenced_after_promotion(cluster), "the old primary to be fenced")
        with pytest.raises((Error, psycopg2.Error)):
            cur.execute(f"INSERT INTO {TABLE} VALUES (2)")
    finally:
        conn.close()
    assert rows_on(lc, "primary", 2) == 0, "the write committed on the dead timeline"


@pytest.mark.destructive
def test_a_psycopg2_connection_writes_to_the_new_primary_after_a_failover(
    lc: LocalCluster, cluster: Cluster
) -> None:
    """Design rule 2, psycopg2 adapter: the routed connection's own libpq connection
    (to the primary it was made on, its write link) never runs another statement once
    that node is fenced; the next write goes to the new primary, inside a transaction
    too (psycopg2's default mode)."""
    conn = routed.connect(cluster, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {TABLE} VALUES (1)")
        assert conn.nodes["write"] == "primary" and conn.info.port == lc.port("primary")
        lc.promote("replica1")
        wait_until(lambda: fenced_after_promotion(cluster), "the old primary to be fenced")
        cur.execute(f"INSERT INTO {TABLE} VALUES (2) RETURNING inet_server_port()")
        assert cur.fetchone() == (lc.port("replica1"),)
        conn.autocommit = False
        cur.execute(f"INSERT INTO {TABLE} VALUES (3)")
        conn.commit()
        assert conn.nodes["write"] == "replica1"
    finally:
        conn.close()
    assert [rows_on(lc, "primary", i) for i in (2, 3)] == [0, 0], "a write on the dead timeline"
    assert [rows_on(lc, "replica1", i) for i in (2, 3)] == [1, 1]


@pytest.mark.destructive
def test_a_reopened_cluster_still_fences_the_old_primary(
    lc: LocalCluster, cluster: Cluster
) -> None:
    """Defect 2: after a failover the new primary goes down; the same Cluster object
    is closed and opened again. The old primary (timeline 1) must stay fenced: it
    lost the writes made on timeline 2, and taking new ones would split the data."""
    lc.promote("replica1")
    wait_until(lambda: fenced_after_promotion(cluster), "the old primary to be fenced")
    with cluster.write() as conn:
        conn.execute(f"INSERT INTO {TABLE} VALUES (3)")
    lc.stop("replica1", mode="immediate")
    cluster.close()
    cluster.open()
    assert cluster.topology.primary != "primary"
    with pytest.raises(PrimaryUnavailable), cluster.write() as conn:
        conn.execute(f"INSERT INTO {TABLE} VALUES (4)")
    assert rows_on(lc, "primary", 4) == 0, "the fenced old primary took a write"


@pytest.mark.destructive
def test_a_replica_stranded_on_the_old_timeline_gets_no_reads(
    lc: LocalCluster, cluster: Cluster
) -> None:
    """Defect 4: replica1 is promoted from outside (an HA manager), replica2 keeps
    following the old primary, which keeps writing on timeline 1. replica2's replay
    position passes the new primary's tokens numerically, but it has none of the
    new timeline's commits: it gets no reads, and its lag is never reported as 0."""
    lc.execute("replica1", "SELECT pg_promote(wait => true)")
    wait_until(lambda: fenced_after_promotion(cluster), "the old primary to be fenced")
    with cluster.write() as conn:
        conn.execute(f"INSERT INTO {TABLE} VALUES (5)")
    token = cluster.token
    assert token is not None
    for i in range(3):  # the old timeline moves on, well past the token
        lc.execute("primary", f"INSERT INTO {TABLE} VALUES ({100 + i})")
        lc.execute("primary", "SELECT pg_switch_wal()")

    def stranded_past_the_token() -> bool:
        state = cluster.topology.by_name["replica2"]
        return state.healthy and (state.replay_lsn or 0) > token.lsn

    wait_until(stranded_past_the_token, "replica2 to replay the old timeline past the token")
    for _ in range(4):
        with cluster.read() as conn:
            row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 5").fetchone()
            assert (port_of(conn), row) == (lc.port("replica1"), (1,))
    status = {row.name: row for row in cluster.status()}["replica2"]
    assert status.lag_bytes != 0
    assert status.lag_seconds != 0


def test_psycopg2_reads_follow_a_replica_replaced_under_the_same_name(
    replica_cluster: LocalCluster,
) -> None:
    """Defect 10: ``remove_replica`` then ``add_replica`` with another server under the
    same name; the psycopg2 adapter's idle connections to the old server must go."""
    lc = replica_cluster
    nodes = {"primary": lc.primary_dsn, "replica1": lc.dsn("replica1")}
    with Cluster(nodes=nodes, max_lag=None, **FAST) as cluster:  # type: ignore[arg-type]
        try:
            before = read_port_psycopg2(cluster)
            assert before == lc.port("replica1")
            cluster.remove_replica("replica1")
            cluster.add_replica(lc.dsn("replica2"), name="replica1")
            wait_until(
                lambda: cluster.topology.by_name["replica1"].healthy,
                "the new replica1 to be probed",
            )
            assert read_port_psycopg2(cluster) == lc.port("replica2")
        finally:
            routed.close_pools(cluster)


def read_port_psycopg2(cluster: Cluster) -> int:
    conn: Any = routed.connect(cluster, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute("SELECT inet_server_port()")
        port = int(cur.fetchone()[0])
        assert conn.nodes["read"] == "replica1"
        return port
    finally:
        conn.close()


# -- the pure timeline decisions (design rules 3 and 4) --------------------------------------


ON_HISTORY = {
    "the primary's own timeline": ((2, 900, 2, {1: 500}), True),
    "an ancestor before the switch (a prefix, just behind)": ((1, 400, 2, {1: 500}), True),
    "exactly at the switch point": ((1, 500, 2, {1: 500}), True),
    "past the switch point on the old timeline": ((1, 501, 2, {1: 500}), False),
    "another timeline and no readable history": ((1, 400, 2, None), False),
    "a timeline the primary never had": ((3, 400, 2, {1: 500}), False),
    "the replica's timeline unknown": ((None, 400, 2, {1: 500}), True),
    "no primary timeline known yet": ((1, 400, None, None), True),
}


@pytest.mark.parametrize(("args", "expected"), ON_HISTORY.values(), ids=ON_HISTORY.keys())
def test_on_history(args: tuple[Any, ...], expected: bool) -> None:
    """Design rule 4: a replica serves reads only on the primary's timeline or its history."""
    assert on_history(*args) is expected


def test_parse_history_reads_postgres_history_files() -> None:
    text = "1\t0/3000060\tno recovery target specified\n\n2\t1/A0000000\tbefore 2026-01-01\n"
    assert parse_history(text) == {1: 0x3000060, 2: (1 << 32) | 0xA0000000}


def test_timelines_keep_the_newest_timeline_and_its_history() -> None:
    timelines = Timelines()
    timelines.learn(2, None)
    timelines.learn(1, {})  # an old primary seen again: no step back
    assert (timelines.newest, timelines.history) == (2, None)
    timelines.learn(2, {1: 10})  # the history became readable
    timelines.learn(3, {1: 10, 2: 20})
    assert (timelines.newest, timelines.history) == (3, {1: 10, 2: 20})


def test_a_diverged_replica_gets_no_reads() -> None:
    """The pure routing only needs the flag: a diverged replica is not eligible."""
    stranded = NodeState("replica2", Role.REPLICA, healthy=True, diverged=True, replay_lsn=10**9)
    fine = NodeState("replica3", Role.REPLICA, healthy=True, replay_lsn=5, lag_seconds=0.0)
    primary = NodeState("replica1", Role.PRIMARY, healthy=True, current_lsn=100)
    topology = Topology(nodes=(primary, stranded, fine), primary="replica1")
    req = ReadRequirements(min_position=50)
    decision = route_read(topology, req, make_policy("round_robin"), lambda _: 0,
                          fallback_to_primary=True)  # fmt: skip
    assert decision.target == "replica1"
    assert route_read(topology, ReadRequirements(), make_policy("round_robin"), lambda _: 0,
                      fallback_to_primary=True).target == "replica3"  # fmt: skip
