"""Events: the bus itself (fast), and the events a real cluster emits, in order."""

from __future__ import annotations

import logging
import threading

import pytest

from replica_router.events import (
    ConsistencyFallback,
    Event,
    EventBus,
    FailoverDetected,
    NodeStateChanged,
    RouteDecision,
)
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
