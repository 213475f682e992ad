"""Events: the bus itself (fast), and the events a real cluster emits, in order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from replica_router.cluster import Cluster
from replica_router.events import (
    ConsistencyFallback,
    Event,
    EventBus,
    FailoverDetected,
    NodeFenced,
    NodeStateChanged,
    RouteDecision,
)
from replica_router.sandbox import LocalCluster
from replica_router.topology import NodeState, Role

# -- the bus ---------------------------------------------------------------------------------


def test_active_only_while_someone_listens() -> None:
    bus = EventBus()
    assert bus.active is False
    first = bus.subscribe(lambda event: None)
    second = bus.subscribe(lambda event: None)
    assert bus.active is True
    first()
    assert bus.active is True
    second()
    assert bus.active is False
    second()  # unsubscribing twice is harmless
    assert bus.active is False


def test_subscribers_see_events_in_emit_order_and_subscription_order() -> None:
    bus = EventBus()
    seen: list[tuple[str, Event]] = []
    bus.subscribe(lambda event: seen.append(("a", event)))
    bus.subscribe(lambda event: seen.append(("b", event)))
    one = RouteDecision(intent="read", target="replica1", reason="policy")
    two = ConsistencyFallback(reason="lag", target="primary")
    bus.emit(one)
    bus.emit(two)
    assert seen == [("a", one), ("b", one), ("a", two), ("b", two)]


def test_unsubscribed_callback_is_not_called() -> None:
    bus = EventBus()
    seen: list[Event] = []
    unsubscribe = bus.subscribe(seen.append)
    unsubscribe()
    bus.emit(RouteDecision(intent="write", target="primary", reason="write"))
    assert seen == []


def test_a_failing_subscriber_is_logged_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    event = FailoverDetected("primary", "replica1", 2, promoted_by_router=False)
    with caplog.at_level(logging.ERROR, logger="replica_router.events"):
        bus.emit(event)
        bus.emit(event)
    assert seen == [event, event]  # the others still got both
    failures = [r for r in caplog.records if "FailoverDetected" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None


def test_concurrent_subscribes_are_not_lost() -> None:
    bus = EventBus()
    calls: list[int] = []
    lock = threading.Lock()

    def subscribe_many(offset: int) -> None:
        for i in range(200):

            def callback(event: Event, n: int = offset + i) -> None:
                with lock:
                    calls.append(n)

            bus.subscribe(callback)

    threads = [threading.Thread(target=subscribe_many, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bus.emit(RouteDecision(intent="read", target="replica1", reason="policy"))
    assert len(calls) == 800 and len(set(calls)) == 800


def test_route_sample_is_at_least_one() -> None:
    assert EventBus(route_sample=0).route_sample == 1
    assert EventBus(route_sample=10).route_sample == 10


def test_node_state_changed_carries_both_states() -> None:
    old = NodeState(name="replica1", role=Role.REPLICA, healthy=True)
    new = NodeState(name="replica1", role=Role.REPLICA, healthy=False, last_error="refused")
    event = NodeStateChanged("replica1", old, new)
    assert (event.old.healthy, event.new.healthy) == (True, False)  # type: ignore[union-attr]


# -- a real cluster ---------------------------------------------------------------------------


class Recorder:
    """Collects events from the monitor thread; waits for one matching a predicate."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float, what: str) -> int:
        """Index of the first matching event (from the start); fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i, event in enumerate(self.events):
                    if predicate(event):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {what} within {timeout} s; events: {self.events}")
                self._changed.wait(left)


def changed(name: str, **fields: object) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        return (
            isinstance(event, NodeStateChanged)
            and event.name == name
            and all(getattr(event.new, k) == v for k, v in fields.items())
        )

    return match


@pytest.mark.slow
@pytest.mark.destructive
def test_events_fire_in_order_on_a_scripted_scenario(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    nodes = {name: lc.dsn(name) for name in lc.node_names}
    bus = EventBus(route_sample=1)
    with Cluster(nodes=nodes, monitor_interval=0.2, events=bus) as cluster:
        recorder = Recorder()
        unsubscribe = bus.subscribe(recorder)

        # routes are sampled (1 in 1 here)
        with cluster.read() as conn:
            conn.execute("SELECT 1")
        # lag alone is not a state change; a read no replica can serve is a fallback
        lc.pause_replay("replica1")
        lc.pause_replay("replica2")
        lc.execute("primary", "CREATE TABLE events_probe AS SELECT generate_series(1, 1000) x")
        lagging = cluster.monitor.wait_for(  # type: ignore[union-attr]
            lambda t: all((t.by_name[r].lag_bytes or 0) > 0 for r in ("replica1", "replica2")),
            timeout=10,
        )
        assert lagging is not None, "the replicas' lag did not show within 10 s"
        with cluster.read(max_lag_bytes=0) as conn:
            conn.execute("SELECT 1")
        lc.resume_replay("replica1")
        lc.resume_replay("replica2")
        assert not [e for e in recorder.events if isinstance(e, NodeStateChanged)]
        routes = [(e.intent, e.target) for e in recorder.events if isinstance(e, RouteDecision)]
        assert routes[0] in {("read", "replica1"), ("read", "replica2")}
        assert routes[1:] == [("read", "primary")]
        assert ConsistencyFallback("lag", "primary") in recorder.events

        lc.stop("replica2", mode="immediate")
        down = recorder.wait_for(changed("replica2", healthy=False), 10, "replica2 down")
        lc.start("replica2")
        up = recorder.wait_for(changed("replica2", healthy=True), 15, "replica2 up")

        lc.promote("replica1")  # the old primary keeps running: it must be fenced
        failover = recorder.wait_for(
            lambda e: isinstance(e, FailoverDetected), 15, "the failover event"
        )
        promoted = recorder.wait_for(changed("replica1", role=Role.PRIMARY), 1, "replica1 primary")
        fenced = recorder.wait_for(
            lambda e: isinstance(e, NodeFenced) and e.name == "primary", 10, "primary fenced"
        )
        assert down < up < promoted < failover
        assert up < fenced
        event = recorder.events[failover]
        assert isinstance(event, FailoverDetected)
        assert (event.old_primary, event.new_primary) == ("primary", "replica1")
        assert event.timeline == 2 and event.promoted_by_router is False

        unsubscribe()
        count = len(recorder.events)
        with cluster.read() as conn:
            conn.execute("SELECT 1")
        assert len(recorder.events) == count  # nobody listening: nothing emitted
        assert bus.active is False
