"""Where a statement goes: a pure function of the snapshot and the request's needs.

No I/O, no locks, no clock: the same ``Topology`` and ``ReadRequirements`` give
the same answer (up to the policy's choice), so every rule is unit-tested
without a server. This runs on every read, so the common case — every replica
eligible — iterates the snapshot's precomputed replica tuple and returns a
cached decision object: nothing is built per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .policy import Policy
from .topology import NodeState, Role, Topology

__all__ = [
    "NO_REQUIREMENTS",
    "FallbackReason",
    "ReadDecision",
    "ReadRequirements",
    "route_read",
    "route_write",
]

FallbackReason = Literal["lag", "token", "none_healthy"]


@dataclass(frozen=True, slots=True)
class ReadRequirements:
    """What one read needs from a replica (the cluster fills in its defaults)."""

    max_lag_seconds: float | None = None
    max_lag_bytes: int | None = None
    min_position: int | None = None  # consistency token / monotonic floor (LSN)
    exclude: frozenset[str] = frozenset()  # nodes that just failed for this request


@dataclass(frozen=True, slots=True)
class ReadDecision:
    """The outcome of ``route_read``; the caller applies its fallback mode to it.

    ``fallback`` is None when an eligible replica serves the read, else why none
    could: ``"token"`` (a healthy replica is only behind ``min_position``),
    ``"lag"`` (a healthy replica lags too much) or ``"none_healthy"``.
    ``waitable`` says a healthy replica may qualify soon, so ``fallback="wait"``
    has something to wait for.
    """

    target: str | None
    fallback: FallbackReason | None
    waitable: bool


NO_REQUIREMENTS = ReadRequirements()  # no bounds: any healthy replica

# Outcome codes of _check: eligible, unavailable, lags too much, only behind the token.
_OK, _DOWN, _LAG, _TOKEN = 0, 1, 2, 3

# Decisions are immutable, so one object per (target, reason, waitable) is shared
# by every call; the key space is nodes x 4 x 2, small and bounded by the config.
_SERVED: dict[str, ReadDecision] = {}
_FALLBACKS: dict[tuple[str | None, FallbackReason, bool], ReadDecision] = {}


def _check(node: NodeState, req: ReadRequirements) -> int:
    if not node.healthy or node.fenced or node.diverged or node.name in req.exclude:
        return _DOWN
    max_seconds = req.max_lag_seconds
    if max_seconds is not None and (node.lag_seconds is None or node.lag_seconds > max_seconds):
        return _LAG
    max_bytes = req.max_lag_bytes
    if max_bytes is not None and (node.lag_bytes is None or node.lag_bytes > max_bytes):
        return _LAG
    floor = req.min_position
    if floor is not None and (node.replay_lsn is None or node.replay_lsn < floor):
        return _TOKEN
    return _OK


def _served(name: str) -> ReadDecision:
    decision = _SERVED.get(name)
    if decision is None:
        decision = _SERVED.setdefault(name, ReadDecision(name, None, False))
    return decision


def _fallback(target: str | None, reason: FallbackReason, waitable: bool) -> ReadDecision:
    key = (target, reason, waitable)
    decision = _FALLBACKS.get(key)
    if decision is None:
        decision = _FALLBACKS.setdefault(key, ReadDecision(target, reason, waitable))
    return decision


def route_read(
    topology: Topology,
    req: ReadRequirements,
    policy: Policy,
    in_use: Callable[[str], int],
    *,
    fallback_to_primary: bool,
) -> ReadDecision:
    """Choose a replica for a read, or say why none qualifies.

    Eligible: role replica, healthy, not fenced, not diverged (off the primary's
    timeline), not excluded, lag within both
    bounds (an unknown lag fails a set bound) and replay position at or past
    ``min_position``. With none eligible and ``fallback_to_primary``, the
    primary (healthy, not fenced, not excluded) serves it: its data is current,
    so it meets any token.
    """
    replicas = topology.replicas
    for node in replicas:
        if _check(node, req) != _OK:
            break
    else:
        if replicas:
            return _served(policy.choose(replicas, in_use).name)
        return _no_replica(topology, req, _DOWN, fallback_to_primary)

    eligible: list[NodeState] = []
    best_miss = _DOWN  # the most promising reason a healthy replica was skipped
    for node in replicas:
        outcome = _check(node, req)
        if outcome == _OK:
            eligible.append(node)
        elif outcome == _TOKEN or (outcome == _LAG and best_miss == _DOWN):
            best_miss = outcome
    if eligible:
        return _served(policy.choose(eligible, in_use).name)
    return _no_replica(topology, req, best_miss, fallback_to_primary)


def _no_replica(
    topology: Topology, req: ReadRequirements, miss: int, fallback_to_primary: bool
) -> ReadDecision:
    reason: FallbackReason = (
        "token" if miss == _TOKEN else "lag" if miss == _LAG else "none_healthy"
    )
    target = None
    if fallback_to_primary:
        primary = route_write(topology)
        if primary is not None and primary not in req.exclude:
            target = primary
    return _fallback(target, reason, miss != _DOWN)


def route_write(topology: Topology) -> str | None:
    """The node that takes writes now: the elected primary if healthy and not fenced."""
    node = topology.primary_state
    if node is None or not node.healthy or node.fenced or node.role is not Role.PRIMARY:
        return None
    return node.name
