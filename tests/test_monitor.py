"""The node monitor: election (pure) and probes against real PostgreSQL servers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from helpers import wait_until
from replica_router.dsn import parse_dsn
from replica_router.errors import ConfigurationError
from replica_router.events import Event, EventBus, FailoverDetected, NodeFenced, NodeStateChanged
from replica_router.monitor import APPLICATION_NAME, Monitor, elect_primary
from replica_router.policy import RoundRobin
from replica_router.routing import NO_REQUIREMENTS, ReadRequirements, route_read, route_write
from replica_router.sandbox import LocalCluster
from replica_router.topology import NodeSpec, NodeState, Role, Topology

# -- elect_primary (pure) -------------------------------------------------------


def claim(name: str, timeline: int, lsn: int = 100, **kw: object) -> NodeState:
    state = NodeState(
        name=name,
        role=Role.PRIMARY,
        healthy=True,
        timeline=timeline,
        current_lsn=lsn,
        system_identifier=42,
    )
    return replace(state, **kw)  # type: ignore[arg-type]


def standby(name: str, **kw: object) -> NodeState:
    state = NodeState(name=name, role=Role.REPLICA, healthy=True, timeline=1, system_identifier=42)
    return replace(state, **kw)  # type: ignore[arg-type]


def test_elect_the_only_primary() -> None:
    assert elect_primary([claim("a", 1), standby("b")]) == ("a", frozenset())


def test_elect_nobody_when_no_healthy_node_claims_primary() -> None:
    assert elect_primary([claim("a", 1, healthy=False), standby("b")]) == (None, frozenset())
    assert elect_primary([]) == (None, frozenset())


def test_two_primaries_higher_timeline_wins_other_fenced() -> None:
    states = [claim("old", 1, lsn=900), claim("new", 2, lsn=500), standby("c")]
    assert elect_primary(states, previous="old") == ("new", frozenset({"old"}))


def test_same_timeline_tie_keeps_the_previous_primary() -> None:
    states = [claim("a", 2, lsn=100), claim("b", 2, lsn=900)]
    assert elect_primary(states, previous="a") == ("a", frozenset({"b"}))
    # No previous among them: the furthest WAL position, then the first name.
    assert elect_primary(states, previous=None) == ("b", frozenset({"a"}))
    even = [claim("b", 2), claim("a", 2)]
    assert elect_primary(even) == ("a", frozenset({"b"}))


def test_old_timeline_primary_alone_is_fenced_not_elected() -> None:
    # The new primary (timeline 2) is down; the old one came back on timeline 1.
    states = [claim("old", 1), claim("new", 2, healthy=False), standby("c")]
    assert elect_primary(states, newest_timeline=2) == (None, frozenset({"old"}))
    assert elect_primary(states, newest_timeline=1) == ("old", frozenset())


def test_node_of_another_cluster_is_fenced() -> None:
    states = [claim("a", 1), standby("b"), standby("stranger", system_identifier=7)]
    assert elect_primary(states) == ("a", frozenset({"stranger"}))


def test_unhealthy_claimant_is_neither_elected_nor_fenced() -> None:
    states = [claim("a", 2), claim("b", 1, healthy=False)]
    assert elect_primary(states) == ("a", frozenset())


# -- construction -----------------------------------------------------------------


def spec(name: str, dsn: str, role: Role = Role.UNKNOWN) -> NodeSpec:
    return NodeSpec(name=name, dsn=dsn, info=parse_dsn(dsn, field=name), role=role)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("interval", 0),
        ("interval", -1.0),
        ("interval", float("nan")),
        ("failure_threshold", 0),
        ("failure_threshold", 1.5),
        ("connect_timeout", 0),
        ("probe_timeout", True),
    ],
)
def test_bad_settings_are_rejected(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=option.replace("interval", "monitor_interval")):
        Monitor([], events=EventBus(), **{option: value})  # type: ignore[arg-type]


def test_duplicate_names_are_rejected() -> None:
    node = spec("a", "host=127.0.0.1 port=1")
    with pytest.raises(ConfigurationError, match="'a' is already monitored"):
        Monitor([node, node], events=EventBus())


def test_nothing_starts_in_the_constructor() -> None:
    before = {t.name for t in threading.enumerate()}
    monitor = Monitor([spec("a", "host=127.0.0.1 port=1")], events=EventBus(), name="rr-test-idle")
    assert not monitor.running
    assert {t.name for t in threading.enumerate()} == before
    assert monitor.topology.generation == 0
    assert monitor.topology.by_name["a"].role is Role.UNKNOWN
    monitor.stop()  # stopping a monitor that never started is fine


# -- against real servers -----------------------------------------------------------


class Recorder:
    """Collects events from a bus (subscribers run on the monitor's thread)."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: type) -> list[Event]:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]


MonitorFactory = Callable[..., Monitor]


@pytest.fixture
def make_monitor() -> Iterator[MonitorFactory]:
    made: list[Monitor] = []

    def make(
        lc: LocalCluster, *, extra: list[NodeSpec] | None = None, **options: object
    ) -> Monitor:
        specs = [
            spec(n, lc.dsn(n), Role.PRIMARY if n == lc.primary_name else Role.REPLICA)
            for n in lc.node_names
        ]
        options.setdefault("events", EventBus())
        monitor = Monitor([*specs, *(extra or [])], **options)  # type: ignore[arg-type]
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.stop()


def wait_for(monitor: Monitor, predicate: Callable[[Topology], bool], timeout: float) -> Topology:
    topology = monitor.wait_for(predicate, timeout)
    if topology is None:
        pytest.fail(f"condition not met within {timeout} s; last topology: {monitor.topology}")
    return topology


def monitor_connections(lc: LocalCluster, node: str) -> int:
    rows = lc.execute(
        node,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
        (APPLICATION_NAME,),
    )
    return int(rows[0][0])


def read_targets(topology: Topology, req: ReadRequirements, picks: int) -> set[str | None]:
    policy = RoundRobin()
    return {
        route_read(topology, req, policy, lambda _: 0, fallback_to_primary=True).target
        for _ in range(picks)
    }


def write_something(lc: LocalCluster) -> None:
    lc.execute(
        lc.primary_name,
        "CREATE TABLE IF NOT EXISTS monitor_probe_test (id serial, at timestamptz default now())",
    )
    lc.execute(lc.primary_name, "INSERT INTO monitor_probe_test DEFAULT VALUES")


def test_probe_reports_roles_positions_timeline_and_identity(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = replica_cluster
    write_something(lc)
    lc.wait_replicated()
    monitor = make_monitor(lc)
    monitor.start()
    topology = monitor.topology
    assert topology.generation >= 1
    assert topology.primary == "primary"
    primary = topology.by_name["primary"]
    assert primary.role is Role.PRIMARY and primary.healthy and not primary.fenced
    assert primary.current_lsn is not None and primary.current_lsn > 0
    assert primary.replay_lsn == primary.current_lsn
    assert [n.name for n in topology.replicas] == ["replica1", "replica2"]
    for node in topology.replicas:
        assert node.healthy and not node.fenced and not node.replay_paused
        assert node.receive_lsn is not None and node.replay_lsn is not None
        assert node.replay_lsn <= primary.current_lsn
    for node in topology.nodes:
        assert node.timeline == 1
        assert node.system_identifier == lc.system_identifier
        assert node.latency_ms is not None and 0 < node.latency_ms < 1000
        assert node.last_error is None
    # The probe's connection says who it is, and it is one connection per node
    # (polled: connections of monitors from earlier tests may take a moment to end).
    wait_until(lambda: monitor_connections(lc, "primary") == 1, 5.0)


def test_positions_track_the_primary(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = replica_cluster
    monitor = make_monitor(lc, interval=0.2)
    monitor.start()
    write_something(lc)
    target = int(
        lc.execute("primary", "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")[0][0]
    )
    topology = wait_for(
        monitor,
        lambda t: all((n.replay_lsn or 0) >= target and n.lag_bytes == 0 for n in t.replicas),
        5.0,
    )
    assert (topology.by_name["primary"].current_lsn or 0) >= target


@pytest.mark.slow
def test_idle_caught_up_replica_reports_zero_lag(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = replica_cluster
    write_something(lc)
    lc.wait_replicated()
    monitor = make_monitor(lc, interval=0.2)
    monitor.start()
    naive = (
        "SELECT EXTRACT(EPOCH FROM (now() - pg_last_xact_replay_timestamp()))::float8"  # seed 004
    )
    deadline = time.monotonic() + 10
    while float(lc.execute("replica1", naive)[0][0]) < 2.5:  # idle long enough to show it
        assert time.monotonic() < deadline, "the naive lag did not grow on an idle replica"
        time.sleep(0.1)
    generation = monitor.topology.generation
    topology = wait_for(monitor, lambda t: t.generation > generation, 2.0)
    for node in topology.replicas:
        assert node.lag_seconds == 0.0, node
        assert node.lag_bytes == 0, node
    assert float(lc.execute("replica1", naive)[0][0]) >= 2.5  # ... where seed 004 says otherwise


@pytest.mark.slow
def test_paused_replay_grows_lag_and_resume_brings_it_back(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = replica_cluster
    monitor = make_monitor(lc, interval=0.2)
    recorder = Recorder(monitor.events)
    monitor.start()
    lc.pause_replay("replica1")
    try:
        write_something(lc)
        first = wait_for(
            monitor,
            lambda t: (
                (t.by_name["replica1"].lag_bytes or 0) > 0
                and (t.by_name["replica1"].lag_seconds or 0) > 0
            ),
            5.0,
        ).by_name["replica1"]
        assert first.replay_paused
        write_something(lc)
        later = wait_for(
            monitor,
            lambda t: (
                (t.by_name["replica1"].lag_seconds or 0) > (first.lag_seconds or 0) + 0.5
                and (t.by_name["replica1"].lag_bytes or 0) > (first.lag_bytes or 0)
            ),
            5.0,
        )
        # The other replica is unaffected, and routing with a bound skips the paused one.
        assert later.by_name["replica2"].lag_seconds == 0.0
        bounded = replace(NO_REQUIREMENTS, max_lag_seconds=0.4)
        targets = read_targets(later, bounded, 4)
        assert targets == {"replica2"}
    finally:
        lc.resume_replay("replica1")
    back = wait_for(
        monitor,
        lambda t: t.by_name["replica1"].lag_seconds == 0.0 and t.by_name["replica1"].lag_bytes == 0,
        5.0,
    )
    assert not back.by_name["replica1"].replay_paused
    # Lag came and went, but role, health and fencing never changed: one event only
    # (the first probe: unknown -> replica).
    changes = [e for e in recorder.of(NodeStateChanged) if isinstance(e, NodeStateChanged)]
    assert [e.name for e in changes].count("replica1") == 1


@pytest.mark.slow
def test_apply_delay_shows_as_lag_until_applied(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = replica_cluster
    monitor = make_monitor(lc, interval=0.2)
    monitor.start()
    lc.set_apply_delay("replica2", 1.5)
    try:
        write_something(lc)
        wait_for(monitor, lambda t: (t.by_name["replica2"].lag_seconds or 0) >= 0.8, 5.0)
        wait_for(monitor, lambda t: t.by_name["replica2"].lag_seconds == 0.0, 5.0)
    finally:
        lc.set_apply_delay("replica2", 0)


def test_mark_suspect_unhealthy_at_threshold_then_probe_readmits(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = replica_cluster
    monitor = make_monitor(lc, interval=5.0)  # only the suspicion can trigger the next probe
    recorder = Recorder(monitor.events)
    monitor.start()
    monitor.mark_suspect("replica2", "connection refused (password=hunter2)")
    assert monitor.topology.by_name["replica2"].healthy  # one failure < threshold 2
    monitor.mark_suspect("replica2", "connection refused")
    wait_for(monitor, lambda t: t.by_name["replica2"].consecutive_successes == 1, 3.0)
    health = [
        e.new.healthy
        for e in recorder.of(NodeStateChanged)
        if isinstance(e, NodeStateChanged) and e.name == "replica2"
    ]
    assert health[-2:] == [False, True]
    assert all("hunter2" not in repr(e) for e in recorder.events)


def test_probe_soon_probes_at_once_and_counts_nothing_against_the_node(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    """A routed connection's held link ended (a restart, a terminated backend): the node
    is probed now, not at the next interval, and stays healthy if it answers."""
    monitor = make_monitor(replica_cluster, interval=5.0)  # only the request can probe now
    monitor.start()
    wait_for(monitor, lambda t: t.by_name["replica1"].consecutive_successes == 1, 3.0)
    monitor.probe_soon("replica1")
    state = wait_for(monitor, lambda t: t.by_name["replica1"].consecutive_successes == 2, 3.0)
    assert state.by_name["replica1"].healthy
    assert state.by_name["replica1"].consecutive_failures == 0
    monitor.probe_soon("nonexistent")  # a node removed meanwhile: nothing to do


def test_wait_for_returns_none_on_timeout_and_refresh_works_without_start(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    monitor = make_monitor(replica_cluster)
    assert monitor.wait_for(lambda t: t.primary is not None, 0.2) is None
    topology = monitor.refresh()
    assert topology.primary == "primary" and topology.generation == 1
    assert not monitor.running
    assert monitor.wait_for(lambda t: t.primary is not None, 0.2) is topology


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a hung node."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, name="silent-server", daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.mark.slow
def test_a_hung_node_does_not_delay_the_others(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory, silent_server: int
) -> None:
    hung = spec("hung", f"host=127.0.0.1 port={silent_server} user=x password=s3cret dbname=x")
    monitor = make_monitor(replica_cluster, extra=[hung], interval=0.2, failure_threshold=2)
    monitor.start()  # waits for the hung connect once (connect timeout), then goes on
    start = monitor.topology
    topology = wait_for(monitor, lambda t: t.generation >= start.generation + 5, 2.0)
    # While "hung" cannot even connect, every other node was probed in each round.
    for name in ("primary", "replica1", "replica2"):
        assert (topology.by_name[name].consecutive_successes or 0) >= 5
    hung_state = wait_for(monitor, lambda t: t.by_name["hung"].last_error is not None, 5.0)
    node = hung_state.by_name["hung"]
    assert not node.healthy
    assert "s3cret" not in (node.last_error or "")


def test_passwords_never_reach_state_or_logs(
    make_monitor: MonitorFactory, replica_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="replica_router")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    bad = spec("bad", f"postgresql://user:pa55word@127.0.0.1:{free}/db")
    monitor = Monitor([bad], events=EventBus(), failure_threshold=1)
    try:
        topology = monitor.refresh()
    finally:
        monitor.stop()
    state = topology.by_name["bad"]
    assert not state.healthy and state.last_error
    assert "pa55word" not in repr(topology)
    assert "pa55word" not in caplog.text
    assert "bad" in caplog.text  # the failure was logged, by node name


# -- destructive: a sandbox of their own --------------------------------------------


@pytest.mark.slow
@pytest.mark.destructive
def test_stopped_node_unhealthy_backoff_and_back(
    fresh_replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = fresh_replica_cluster
    monitor = make_monitor(lc, interval=0.2, failure_threshold=2)
    recorder = Recorder(monitor.events)
    monitor.start()
    lc.stop("replica2", mode="immediate")
    down = wait_for(monitor, lambda t: not t.by_name["replica2"].healthy, 3.0)
    assert down.by_name["replica2"].consecutive_failures >= 2
    assert down.by_name["replica2"].last_error
    assert read_targets(down, NO_REQUIREMENTS, 4) == {"replica1"}

    # Backoff: over ~3 s (15 rounds) the dead node is retried only a few times.
    before = monitor.probe_stats()["replica2"].connect_attempts
    generation = monitor.topology.generation
    wait_for(monitor, lambda t: t.generation >= generation + 15, 6.0)
    retries = monitor.probe_stats()["replica2"].connect_attempts - before
    assert 1 <= retries <= 5, retries

    lc.start("replica2")
    back = wait_for(monitor, lambda t: t.by_name["replica2"].healthy, 8.0)
    assert back.by_name["replica2"].consecutive_failures == 0
    changes = [
        e.new.healthy
        for e in recorder.of(NodeStateChanged)
        if isinstance(e, NodeStateChanged) and e.name == "replica2"
    ]
    assert changes[-2:] == [False, True]


@pytest.mark.slow
@pytest.mark.destructive
def test_primary_down_writes_have_nowhere_reads_go_on(
    fresh_replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    lc = fresh_replica_cluster
    monitor = make_monitor(lc, interval=0.2)
    monitor.start()
    lc.stop("primary", mode="immediate")
    topology = wait_for(monitor, lambda t: t.primary is None, 3.0)
    assert route_write(topology) is None
    bounded = replace(NO_REQUIREMENTS, max_lag_seconds=1.0)
    targets = read_targets(topology, bounded, 4)
    assert targets == {"replica1", "replica2"}
    # ... and stay routable: without a primary, replicas are measured against each other.
    later = wait_for(monitor, lambda t: t.generation >= topology.generation + 10, 4.0)
    for node in later.replicas:
        assert node.healthy and node.lag_seconds == 0.0


@pytest.mark.slow
@pytest.mark.destructive
def test_external_promotion_followed_and_old_primary_fenced(
    fresh_replica_cluster: LocalCluster,
    make_monitor: MonitorFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc = fresh_replica_cluster
    interval = 0.5
    monitor = make_monitor(lc, interval=interval)
    recorder = Recorder(monitor.events)
    monitor.start()
    assert monitor.topology.primary == "primary"

    lc.promote("replica1")  # the old primary keeps running on timeline 1
    promoted = time.monotonic()
    topology = wait_for(monitor, lambda t: t.primary == "replica1", 3 * interval)
    assert time.monotonic() - promoted <= 2 * interval + 0.3
    assert topology.by_name["replica1"].timeline == 2  # the new timeline, at once
    assert topology.by_name["primary"].fenced
    assert route_write(topology) == "replica1"
    failovers = recorder.of(FailoverDetected)
    assert len(failovers) == 1
    assert failovers[0] == FailoverDetected("primary", "replica1", 2, False)
    assert monitor.failovers == 1
    fenced = recorder.of(NodeFenced)
    assert fenced == [NodeFenced("primary", 1, 2)]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("primary fenced" in m and "timeline 1" in m for m in errors), errors
    reads = read_targets(topology, NO_REQUIREMENTS, 6)
    assert "primary" not in reads

    # The old primary restarts: it is a primary on timeline 1 again, and stays fenced.
    lc.stop("primary", mode="immediate")
    wait_for(monitor, lambda t: not t.by_name["primary"].healthy, 5.0)
    lc.start("primary")
    assert lc.execute("primary", "SELECT pg_is_in_recovery()") == [(False,)]
    back = wait_for(monitor, lambda t: t.by_name["primary"].healthy, 8.0)
    assert back.by_name["primary"].fenced and back.primary == "replica1"
    assert monitor.fenced_events == 2

    # Even with the new primary down, the old one never gets writes again.
    lc.stop("replica1", mode="immediate")
    orphaned = wait_for(monitor, lambda t: not t.by_name["replica1"].healthy, 5.0)
    assert orphaned.primary is None
    assert orphaned.by_name["primary"].fenced
    assert route_write(orphaned) is None
    assert (monitor.last_primary, monitor.newest_timeline) == ("replica1", 2)

    # A promotion the router made itself (as failover="promote" does) is reported so.
    monitor.note_promoted("replica2")
    lc.promote("replica2")
    third = wait_for(monitor, lambda t: t.primary == "replica2", 3 * interval)
    assert third.by_name["replica2"].timeline == 3
    assert recorder.of(FailoverDetected)[-1] == FailoverDetected("replica1", "replica2", 3, True)
    assert monitor.failovers == 2


def monitor_threads(name: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(name)]


def test_stop_ends_every_thread_it_started(
    replica_cluster: LocalCluster, make_monitor: MonitorFactory
) -> None:
    monitor = make_monitor(replica_cluster, name="rr-test-stop")
    monitor.start()
    assert set(monitor_threads("rr-test-stop")) == {
        "rr-test-stop",
        "rr-test-stop:primary",
        "rr-test-stop:replica1",
        "rr-test-stop:replica2",
    }
    monitor.stop(timeout=5)
    assert not monitor.running
    wait_until(lambda: not monitor_threads("rr-test-stop"), 5.0)  # workers end when told
    wait_until(lambda: monitor_connections(replica_cluster, "primary") == 0, 5.0)


def test_a_failing_round_is_logged_and_the_loop_goes_on(
    replica_cluster: LocalCluster,
    make_monitor: MonitorFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = make_monitor(replica_cluster, interval=0.1)
    monitor.start()
    real_round = monitor._round
    calls = []

    def broken_once(*, everyone: bool) -> Topology:  # a bug in one round, injected
        calls.append(everyone)
        if len(calls) == 1:
            raise RuntimeError("injected bug")
        return real_round(everyone=everyone)

    monitor._round = broken_once  # type: ignore[method-assign]
    generation = monitor.topology.generation
    wait_for(monitor, lambda t: t.generation >= generation + 3, 3.0)
    assert monitor.running
    assert "probe round failed" in caplog.text and "injected bug" in caplog.text
