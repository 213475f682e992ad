"""Failover: the pure promotion decisions, then promote/follow/fence on real servers."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import psycopg
import pytest
from prometheus_client import CollectorRegistry

import helpers
from replica_router import AsyncCluster, Cluster, ConfigurationError, PrimaryUnavailable, metrics
from replica_router.cli import main as cli_main
from replica_router.events import Event, FailoverDetected, NodeFenced
from replica_router.failover import (
    Probe,
    choose_candidate,
    parse_address,
    primary_lost,
    settled,
)
from replica_router.sandbox import LocalCluster
from replica_router.topology import NodeState, Role, Topology

T = TypeVar("T")

# -- primary_lost (pure) ------------------------------------------------------------


def node(name: str, role: Role, **kw: Any) -> NodeState:
    base = NodeState(name=name, role=role, healthy=True, timeline=1, system_identifier=7)
    return replace(base, **kw)


def down(name: str = "primary", failures: int = 3) -> NodeState:
    return node(name, Role.PRIMARY, healthy=False, consecutive_failures=failures)


def topo(*nodes: NodeState, primary: str | None = None) -> Topology:
    return Topology(nodes=nodes, primary=primary)


REPLICAS = (node("replica1", Role.REPLICA), node("replica2", Role.REPLICA))


def test_primary_lost_after_threshold_failures_with_a_healthy_replica() -> None:
    assert primary_lost(topo(down(), *REPLICAS), "primary", 3)


@pytest.mark.parametrize(
    ("topology", "last_primary", "why"),
    [
        (topo(node("primary", Role.PRIMARY), *REPLICAS, primary="primary"), "primary", "alive"),
        (topo(down(failures=2), *REPLICAS), "primary", "below the threshold"),
        (topo(down(), *REPLICAS), None, "no primary ever seen (starting during an outage)"),
        (
            topo(down(), node("replica1", Role.PRIMARY, timeline=2), REPLICAS[1]),
            "primary",
            "someone else promoted replica1 (not elected yet)",
        ),
        (
            topo(down(), *(replace(r, healthy=False) for r in REPLICAS)),
            "primary",
            "no healthy replica to promote",
        ),
    ],
)
def test_primary_not_lost(topology: Topology, last_primary: str | None, why: str) -> None:
    assert not primary_lost(topology, last_primary, 3), why


def test_a_fenced_zombie_does_not_stop_a_promotion() -> None:
    zombie = node("old", Role.PRIMARY, fenced=True)
    assert primary_lost(topo(zombie, down("replica1"), REPLICAS[1]), "replica1", 3)


# -- settled / choose_candidate (pure) -------------------------------------------------


def replica(name: str, replay: int, receive: int | None = None, **kw: Any) -> Probe:
    return Probe(
        name,
        reachable=True,
        in_recovery=True,
        replay_lsn=replay,
        receive_lsn=replay if receive is None else receive,
        **kw,
    )


def test_settled_waits_only_for_replicas_still_replaying_what_they_received() -> None:
    assert settled([replica("a", 100), replica("b", 90)])
    assert not settled([replica("a", 100), replica("b", 90, receive=100)])
    assert settled([replica("a", 100), replica("b", 90, receive=100, replay_paused=True)])
    assert settled([Probe("dead", reachable=False), Probe("p", reachable=True, timeline=1)])


def test_the_highest_replay_lsn_is_promoted_not_the_first_listed() -> None:
    decision = choose_candidate(
        [replica("replica1", 100), replica("replica2", 300), replica("replica3", 200)],
        newest_timeline=1,
    )
    assert decision.promote == "replica2"
    assert "0/12C" in decision.reason  # 300, as PostgreSQL spells it


def test_ties_go_to_the_received_lsn_then_the_name() -> None:
    tied = [replica("b", 100, receive=150), replica("a", 100, receive=120), replica("c", 100)]
    assert choose_candidate(tied, newest_timeline=1).promote == "b"
    same = [replica("c", 100), replica("a", 100), replica("b", 100)]
    assert choose_candidate(same, newest_timeline=1).promote == "a"
    assert choose_candidate(reversed(same), newest_timeline=1).promote == "a"


def test_nothing_is_promoted_while_a_node_reports_primary_on_the_newest_timeline() -> None:
    back = Probe("primary", reachable=True, in_recovery=False, timeline=1)
    decision = choose_candidate([back, replica("replica1", 500)], newest_timeline=1)
    assert decision.promote is None
    assert "primary reports itself primary (timeline 1)" in decision.reason
    promoted = Probe("replica2", reachable=True, in_recovery=False, timeline=3)
    assert choose_candidate([promoted, replica("replica1", 9)], newest_timeline=2).promote is None
    unknown = Probe("x", reachable=True, in_recovery=False, timeline=5)
    assert choose_candidate([unknown, replica("replica1", 9)], newest_timeline=None).promote is None


def test_a_primary_on_an_older_timeline_is_a_zombie_and_does_not_block() -> None:
    zombie = Probe("primary", reachable=True, in_recovery=False, timeline=1)
    decision = choose_candidate([zombie, replica("replica2", 70)], newest_timeline=2)
    assert decision.promote == "replica2"


def test_unreachable_nodes_are_skipped_and_no_replica_means_no_promotion() -> None:
    dead = Probe("replica1", reachable=False, error="refused")
    assert choose_candidate([dead, replica("replica2", 1)], newest_timeline=1).promote == (
        "replica2"
    )
    decision = choose_candidate([dead, Probe("primary", reachable=False)], newest_timeline=1)
    assert decision == replace(decision, promote=None)
    assert "no reachable replica" in decision.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [("db1:5432", ("db1", 5432)), ("[::1]:6432", ("::1", 6432)), (" 10.0.0.5:1 ", ("10.0.0.5", 1))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, field="f") == expected


@pytest.mark.parametrize("text", ["db1", "db1:", ":5432", "db1:0", "db1:70000", "db1:x", 5432])
def test_parse_address_rejects_garbage_naming_the_field(text: object) -> None:
    with pytest.raises(ConfigurationError, match=r"replication_addresses\['a'\]"):
        parse_address(text, field="replication_addresses['a']")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failover": "auto"}, "failover: expected 'follow' or 'promote'"),
        ({"failover": "promote", "replication_addresses": {"replica1": "x"}}, "replica1"),
        ({"failover": "promote", "replication_addresses": {"nope": "h:1"}}, "no node named"),
    ],
)
def test_bad_failover_settings_are_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Cluster("host=127.0.0.1 port=1", ["host=127.0.0.1 port=2"], **kwargs)


# -- on real servers (each test gets its own sandbox) -------------------------------------

PROMOTE = {
    "failover": "promote",
    "monitor_interval": 0.5,
    "failure_threshold": 3,
    "write_timeout": 15.0,
}


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, what: str = "") -> T:
    """:func:`helpers.wait_until` with more time by default: a failover takes probe rounds."""
    return helpers.wait_until(predicate, timeout, what)


@dataclass
class Traffic:
    """A writer (sequential ids, one INSERT per transaction) and a reader, through
    the router, remembering acknowledged ids (when, and which node said OK) and
    every read failure."""

    cluster: Cluster
    lc: LocalCluster
    acked: list[tuple[int, float, str]] = field(default_factory=list)
    write_errors: list[BaseException] = field(default_factory=list)
    read_errors: list[BaseException] = field(default_factory=list)
    reads: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Traffic:
        for target in (self._write, self._read):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _write(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                with self.cluster.write() as conn:
                    sql = "INSERT INTO t (id) VALUES (%s) RETURNING inet_server_port()"
                    node = self._node(conn.execute(sql, (i,)).fetchone())
            except psycopg.Error as exc:
                self.write_errors.append(exc)
                time.sleep(0.01)  # retry pace: the next attempt waits for a primary anyway
            else:
                self.acked.append((i, time.monotonic(), node))

    def _read(self) -> None:
        # Through RoutedConnections (one per read, so the policy spreads them), which
        # run a read whose node died under it once more elsewhere: with cluster.read()
        # a query in flight when its server is killed fails (it was sent; the router
        # cannot know what the user's block had done). The reader is another user: a
        # unit of work of its own, not bound by the writer's token (outside every
        # session the two threads would share the process's root scope, and a read
        # after a write not yet replayed has no node while the primary is down).
        with self.cluster.session(inherit=False):
            while not self.stop.is_set():
                try:
                    with self.cluster.connection() as conn:
                        row = conn.execute("SELECT inet_server_port()").fetchone()
                        node = self._node(row)
                except psycopg.Error as exc:
                    self.read_errors.append(exc)
                else:
                    self.reads[node] = self.reads.get(node, 0) + 1
                time.sleep(0.002)

    def _node(self, row: tuple[Any, ...] | None) -> str:
        assert row is not None
        return next(n for n in self.lc.node_names if self.lc.port(n) == row[0])

    def ids(self, after: float = 0.0, *, on: str | None = None) -> list[int]:
        """Acknowledged ids after ``after`` (by ``on`` only, when given)."""
        return [i for i, at, node in list(self.acked) if at > after and on in (None, node)]

    def moved_on(self, after: float, old: str = "primary") -> bool:
        """Some write after ``after`` was acknowledged by another node than ``old``
        (one in flight at a kill may still have been acknowledged by it)."""
        return any(at > after and node != old for _, at, node in list(self.acked))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


class Recorder:
    def __init__(self, cluster: Cluster) -> None:
        self.events: list[Event] = []
        cluster.events.subscribe(self.events.append)

    def wait_for(self, kind: type[T]) -> list[T]:
        """The events of ``kind`` once there is one (subscribers are called just
        after the snapshot is published, so a test that saw the snapshot may be early)."""
        return wait_until(
            lambda: [e for e in list(self.events) if isinstance(e, kind)], what=kind.__name__
        )


def make_table(lc: LocalCluster) -> None:
    lc.execute(lc.primary_name, "CREATE TABLE t (id int PRIMARY KEY)")
    lc.wait_replicated()


def rows_on(lc: LocalCluster, name: str, ids: list[int]) -> int:
    return int(lc.execute(name, "SELECT count(*) FROM t WHERE id = ANY(%s)", (ids,))[0][0])


@pytest.mark.destructive
@pytest.mark.slow
def test_promote_mode_primary_killed_under_writes_then_the_old_primary_is_fenced(
    fresh_replica_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    lc = fresh_replica_cluster
    make_table(lc)
    caplog.set_level(logging.WARNING, logger="replica_router")
    with Cluster(lc.primary_dsn, lc.replica_dsns, **PROMOTE) as cluster:
        recorder = Recorder(cluster)
        registry = CollectorRegistry()
        metrics.register(cluster, registry)
        traffic = Traffic(cluster, lc).start()
        try:
            wait_until(lambda: len(traffic.acked) >= 30, what="writes before the kill")
            assert registry.get_sample_value("db_failover_total") == 0
            killed = time.monotonic()
            lc.stop("primary", mode="immediate")
            wait_until(lambda: traffic.moved_on(killed), what="a write after the kill")
            new = cluster.topology.primary
            assert new in ("replica1", "replica2")
            other = "replica2" if new == "replica1" else "replica1"
            assert cluster.topology.by_name[new].timeline == 2
            failovers = recorder.wait_for(FailoverDetected)
            assert failovers == [FailoverDetected("primary", new, 2, True)]
            assert cluster.counters().failovers == 1
            assert registry.get_sample_value("db_failover_total") == 1
            promoting = [
                r
                for r in caplog.records
                if r.name == "replica_router.failover" and "promoting" in r.getMessage()
            ]
            assert len(promoting) == 1 and promoting[0].levelno == logging.WARNING
            assert "highest replay LSN" in promoting[0].getMessage()
            # The other replica was re-pointed: it streams from the new primary.
            wait_until(
                lambda: lc.execute(new, "SELECT count(*) FROM pg_stat_replication")[0][0] == 1,
                what=f"{other} streaming from {new}",
            )

            # The old primary restarts: a primary on timeline 1 again, and fenced.
            lc.promote(new)  # tell the sandbox (it adopts the router's promotion)
            lc.start("primary")
            restarted = time.monotonic()
            assert lc.execute("primary", "SELECT pg_is_in_recovery()") == [(False,)]
            wait_until(lambda: cluster.topology.by_name["primary"].healthy, what="old primary up")
            status = {row.name: row for row in cluster.status()}
            assert status["primary"].fenced and status["primary"].timeline == 1
            assert status[new].role == "primary" and status[new].timeline == 2
            assert cluster.counters().fenced_events == 1
            assert registry.get_sample_value("db_fenced_total") == 1
            assert recorder.wait_for(NodeFenced) == [NodeFenced("primary", 1, 2)]
            reads_before = traffic.reads.get("primary", 0)
            count = len(traffic.acked)
            wait_until(lambda: len(traffic.acked) >= count + 50, what="writes after restart")
        finally:
            traffic.finish()
        assert traffic.read_errors == []  # reads never failed, outage included
        assert traffic.reads.get("primary", 0) == reads_before
        after = traffic.ids(after=restarted)
        assert rows_on(lc, "primary", after) == 0
        assert rows_on(lc, new, after) == len(after)
        assert cluster.counters().failovers == 1
    # Counters stay monotonic across close() and a new open(), as Prometheus needs.
    assert cluster.counters().failovers == 1 and cluster.counters().fenced_events == 1
    with cluster:
        assert cluster.counters().failovers == 1
        assert registry.get_sample_value("db_failover_total") == 1


@pytest.mark.destructive
@pytest.mark.slow
def test_the_most_caught_up_replica_is_promoted_and_the_other_follows_it(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    make_table(lc)
    lc.pause_replay("replica1")  # replica1 falls behind; seed 004's pop(0) would pick it
    with Cluster(lc.primary_dsn, lc.replica_dsns, **PROMOTE) as cluster:
        with cluster.write() as conn:
            conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
        lc.wait_replicated()  # replica2 has the rows; paused replica1 is skipped
        lc.stop("primary", mode="immediate")
        topology = wait_until(
            lambda: cluster.topology.primary not in (None, "primary") and cluster.topology,
            what="a new primary",
        )
        assert topology.primary == "replica2"
        assert rows_on(lc, "replica2", list(range(1, 101))) == 100
        lc.resume_replay("replica1")
        with cluster.write() as conn:
            conn.execute("INSERT INTO t VALUES (1000)")
        # replica1 was re-pointed while paused; resumed, it replays timeline 2.
        wait_until(lambda: rows_on(lc, "replica1", [1000]) == 1, what="replica1 following")
        state = wait_until(
            lambda: (s := cluster.topology.by_name["replica1"]).healthy and s.lag_bytes == 0 and s,
            what="replica1 caught up in the monitor",
        )
        assert state.role is Role.REPLICA and not state.fenced
        assert rows_on(lc, "replica1", list(range(1, 101))) == 100


@pytest.mark.destructive
@pytest.mark.slow
def test_sync_replication_loses_no_acknowledged_write_across_a_router_failover(
    make_replica_cluster: Callable[..., LocalCluster],
) -> None:
    lc = make_replica_cluster(replicas=2, sync=True)
    make_table(lc)
    with Cluster(lc.primary_dsn, lc.replica_dsns, **PROMOTE) as cluster:
        traffic = Traffic(cluster, lc).start()
        try:
            wait_until(lambda: len(traffic.acked) >= 200, what="writes before the kill")
            killed = time.monotonic()
            lc.stop("primary", mode="immediate")
            wait_until(lambda: traffic.moved_on(killed), what="writes after the kill")
            count = len(traffic.acked)
            wait_until(lambda: len(traffic.acked) >= count + 50, what="more writes")
        finally:
            traffic.finish()
        new = cluster.topology.primary
        assert new in ("replica1", "replica2")
        acked = traffic.ids()
        assert rows_on(lc, new, acked) == len(acked)  # every acknowledged commit survived
        assert cluster.counters().failovers == 1
        assert traffic.read_errors == []


@pytest.mark.destructive
@pytest.mark.slow
def test_follow_mode_external_promotion_followed_then_old_primary_fenced(
    fresh_replica_cluster: LocalCluster,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lc = fresh_replica_cluster
    make_table(lc)
    caplog.set_level(logging.WARNING, logger="replica_router")
    settings = {"monitor_interval": 0.5, "write_timeout": 15.0}  # failover="follow" by default
    with Cluster(lc.primary_dsn, lc.replica_dsns, **settings) as cluster:
        recorder = Recorder(cluster)
        traffic = Traffic(cluster, lc).start()
        try:
            wait_until(lambda: len(traffic.acked) >= 30, what="writes before the kill")
            lc.stop("primary", mode="immediate")
            wait_until(lambda: not cluster.topology.by_name["primary"].healthy, what="down")
            outage = len(traffic.read_errors), len(traffic.acked)
            # No promotion by the router in follow mode, however long the outage.
            assert cluster.monitor.wait_for(lambda t: t.primary is not None, 2.0) is None  # type: ignore[union-attr]
            assert len(traffic.acked) == outage[1]
            lc.promote("replica1")
            promoted = time.monotonic()
            wait_until(lambda: traffic.moved_on(promoted), 10, what="a write after promotion")
            assert cluster.topology.primary == "replica1"
            assert recorder.wait_for(FailoverDetected) == [
                FailoverDetected("primary", "replica1", 2, False)
            ]
            lc.start("primary")  # a primary on timeline 1 again
            restarted = time.monotonic()
            wait_until(lambda: cluster.topology.by_name["primary"].fenced, what="fenced")
            status = {row.name: row for row in cluster.status()}
            assert status["primary"].fenced and status["primary"].timeline == 1
            assert status["primary"].healthy and status["primary"].role == "primary"
            assert status["replica1"].role == "primary" and status["replica1"].timeline == 2
            assert recorder.wait_for(NodeFenced) == [NodeFenced("primary", 1, 2)]
            assert any(
                r.levelno == logging.ERROR and r.getMessage().startswith("primary fenced")
                for r in caplog.records
            )
            reads_before = traffic.reads.get("primary", 0)
            count = len(traffic.acked)
            wait_until(lambda: len(traffic.acked) >= count + 50, what="writes after restart")
        finally:
            traffic.finish()
        assert traffic.read_errors == []
        assert traffic.reads.get("primary", 0) == reads_before  # no reads on it either
        # The CLI, which knows nothing of the past, sees the same from the timelines.
        dsns = [lc.dsn(n) for n in lc.node_names]
        assert cli_main(["status", "--json", *dsns]) == 0
        shown = {row["port"]: row for row in json.loads(capsys.readouterr().out)}
        assert shown[lc.port("primary")]["fenced"] is True
        assert shown[lc.port("primary")]["timeline"] == 1
        assert shown[lc.port("replica1")]["timeline"] == 2
        assert shown[lc.port("replica2")]["timeline"] == 2
        assert cli_main(["status", *dsns]) == 0
        table = capsys.readouterr().out
        assert "fenced" in table and "TL" in table
        after = traffic.ids(after=restarted)
        assert rows_on(lc, "primary", after) == 0
        assert rows_on(lc, "replica1", after) == len(after)
        assert cluster.counters().fenced_events == 1
        assert cluster.counters().failovers == 1


@pytest.mark.destructive
def test_writes_fail_fast_without_write_timeout_while_no_primary(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, monitor_interval=0.2) as cluster:
        lc.stop("primary", mode="immediate")
        wait_until(lambda: cluster.topology.primary is None, what="detection")
        started = time.monotonic()
        with pytest.raises(PrimaryUnavailable), cluster.write():
            pass
        assert time.monotonic() - started < 0.5
        with cluster.read() as conn:  # reads go on from the replicas
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


@pytest.mark.destructive
@pytest.mark.slow
def test_a_replica_killed_and_restarted_is_readmitted_and_nothing_is_promoted(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    make_table(lc)
    with Cluster(lc.primary_dsn, lc.replica_dsns, **PROMOTE) as cluster:
        traffic = Traffic(cluster, lc).start()
        try:
            wait_until(lambda: traffic.reads.get("replica2", 0) >= 20, what="reads on replica2")
            lc.stop("replica2", mode="immediate")
            wait_until(lambda: not cluster.topology.by_name["replica2"].healthy, what="down")
            during = dict(traffic.reads)
            wait_until(
                lambda: traffic.reads.get("replica1", 0) >= during.get("replica1", 0) + 50,
                what="reads on replica1 alone",
            )
            assert traffic.reads.get("replica2", 0) == during.get("replica2", 0)
            lc.start("replica2")
            wait_until(lambda: cluster.topology.by_name["replica2"].healthy, what="re-admitted")
            back = traffic.reads.get("replica2", 0)
            wait_until(lambda: traffic.reads.get("replica2", 0) >= back + 20, what="reads again")
        finally:
            traffic.finish()
        assert traffic.read_errors == []
        assert traffic.write_errors == []
        assert cluster.topology.primary == "primary"
        assert cluster.counters().failovers == 0


@pytest.mark.destructive
@pytest.mark.slow
def test_a_primary_restart_shorter_than_the_threshold_is_not_a_failover(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    make_table(lc)
    settings = {**PROMOTE, "failure_threshold": 12}  # 5.5 s of failures before promoting
    with Cluster(lc.primary_dsn, lc.replica_dsns, **settings) as cluster:
        traffic = Traffic(cluster, lc).start()
        try:
            wait_until(lambda: len(traffic.acked) >= 30, what="writes before the restart")
            lc.stop("primary", mode="immediate")
            lc.start("primary")
            restarted = time.monotonic()
            wait_until(lambda: traffic.ids(after=restarted), what="writes on the same primary")
        finally:
            traffic.finish()
        assert cluster.topology.primary == "primary"
        assert cluster.counters().failovers == 0
        for name in ("replica1", "replica2"):
            assert lc.execute(name, "SELECT pg_is_in_recovery()") == [(True,)]


@pytest.mark.destructive
@pytest.mark.slow
def test_a_replica_down_during_the_failover_is_repointed_when_it_comes_back(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    make_table(lc)
    with Cluster(lc.primary_dsn, lc.replica_dsns, **PROMOTE) as cluster:
        lc.stop("replica2")
        with cluster.write() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        # Replication is asynchronous: a row replica1 never received is lost with the
        # primary, and replica2 could never show it.
        lc.wait_replicated()
        lc.stop("primary", mode="immediate")
        wait_until(lambda: cluster.topology.primary == "replica1", what="replica1 promoted")
        lc.start("replica2")  # still configured to follow the dead primary
        wait_until(
            lambda: lc.execute("replica1", "SELECT count(*) FROM pg_stat_replication")[0][0] == 1,
            what="replica2 streaming from replica1",
        )
        with cluster.write() as conn:
            conn.execute("INSERT INTO t VALUES (2)")
        wait_until(lambda: rows_on(lc, "replica2", [1, 2]) == 2, what="replica2 following")


@pytest.mark.destructive
@pytest.mark.slow
def test_async_cluster_promotes_too(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    make_table(lc)

    async def scenario() -> tuple[str | None, int]:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, **PROMOTE) as cluster:
            lc.stop("primary", mode="immediate")
            async with cluster.write() as conn:  # waits (write_timeout) for the promotion
                cur = await conn.execute("INSERT INTO t VALUES (1) RETURNING inet_server_port()")
                row = await cur.fetchone()
            assert row is not None
            return cluster.topology.primary, int(row[0])

    primary, port = asyncio.run(scenario())
    assert primary in ("replica1", "replica2")
    assert port == lc.port(primary)
