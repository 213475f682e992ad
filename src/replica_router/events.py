"""Events: node state changes, failovers, fencing and sampled route decisions.

Subscribers are called synchronously on the thread that emits (the monitor
thread for node events, the caller's thread for route decisions), so they must
be quick. A subscriber that raises is logged and kept. When nobody listens,
emitting costs one attribute check: callers test ``bus.active`` first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from .topology import NodeState

__all__ = [
    "ConsistencyFallback",
    "Event",
    "EventBus",
    "FailoverDetected",
    "NodeFenced",
    "NodeStateChanged",
    "RouteDecision",
]

log = logging.getLogger("replica_router.events")


@dataclass(frozen=True, slots=True)
class NodeStateChanged:
    """A node's role, health or fencing changed (not emitted for lag-only changes)."""

    name: str
    old: NodeState | None
    new: NodeState


@dataclass(frozen=True, slots=True)
class FailoverDetected:
    """Writes moved to another node; ``promoted_by_router`` when we ran pg_promote."""

    old_primary: str | None
    new_primary: str
    timeline: int | None
    promoted_by_router: bool


@dataclass(frozen=True, slots=True)
class NodeFenced:
    """A node claims primary on an older timeline: it gets no reads and no writes."""

    name: str
    timeline: int | None
    primary_timeline: int | None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one statement or checkout went (sampled, see ``EventBus.route_sample``)."""

    intent: Literal["read", "write"]
    target: str
    reason: str


@dataclass(frozen=True, slots=True)
class ConsistencyFallback:
    """A read could not use a replica and went elsewhere (or waited, or failed)."""

    reason: Literal["lag", "token", "none_healthy"]
    target: str | None


Event: TypeAlias = (
    NodeStateChanged | FailoverDetected | NodeFenced | RouteDecision | ConsistencyFallback
)
Subscriber: TypeAlias = Callable[[Event], None]


class EventBus:
    """A tiny synchronous publish/subscribe hub.

    The subscriber tuple is copied on write (under a lock, so concurrent
    subscribes are not lost) and read without one: ``emit`` never blocks.
    """

    def __init__(self, *, route_sample: int = 100) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._changing = threading.Lock()
        self.route_sample = max(1, route_sample)  # one RouteDecision per N routes
        self.active = False

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Register ``callback``; returns a function that unsubscribes it (idempotent)."""
        with self._changing:
            self._subscribers = (*self._subscribers, callback)
            self.active = True

        def unsubscribe() -> None:
            with self._changing:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)
                self.active = bool(self._subscribers)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Call every subscriber in subscription order; one that raises is logged and kept."""
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", callback, type(event).__name__)
