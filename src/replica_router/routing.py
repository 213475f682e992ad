"""Where a read or a write goes: pure functions of the snapshot and the read's needs.

Decides: which node serves a read (lag bounds, the scope's token and monotonic
floor, fencing, the policy's pick) or takes a write; what one read needs, from
the cluster's settings and the scope's mark (:meth:`ReadRules.plan`); and what
a read does when no replica qualifies or a checkout fails — try the most
caught-up replica, wait, fall back to the primary, retry elsewhere, or fail
(:class:`ReadAttempt`). Every cluster shell (sync, asyncio, ``route_read()`` for
integrations) follows these steps; none restates them.

Must not: do I/O, take a lock or read a clock (callers pass ``now``). The same
``Topology`` and requirements give the same answer (up to the policy's choice),
so every rule is unit-tested without a server. This runs on every read, so the
common case — every replica eligible — iterates the snapshot's precomputed
replica tuple and returns a cached decision object: nothing is built per call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .errors import ConfigurationError, ConsistencyTimeout, NoReplicaAvailable
from .policy import InUse, Policy
from .topology import NodeState, Role, Topology

__all__ = [
    "NO_REQUIREMENTS",
    "FallbackReason",
    "ReadAttempt",
    "ReadDecision",
    "ReadPlan",
    "ReadRequirements",
    "ReadRules",
    "ReadStep",
    "check_seconds",
    "new_primary_after",
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


def new_primary_after(generation: int) -> Callable[[Topology], bool]:
    """A predicate for ``monitor.wait_for``: a newer snapshot with a usable primary."""

    def ready(topology: Topology) -> bool:
        return topology.generation > generation and route_write(topology) is not None

    return ready


# -- what one read needs, and its way to a node -----------------------------------------

Fallback = Literal["primary", "wait", "error"]
ReadYourWrites = Literal["lsn", "window"] | None
# A scope's mark on one cluster: (token position, monotonic floor, monotonic time of
# the last write); ``consistency.Mark`` is one.
MarkFields = tuple[int | None, int | None, float | None]
WAIT_SLICE = 0.05  # fallback="wait": look at the replicas again this often


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What one read needs, decided once per read from the settings and the scope."""

    req: ReadRequirements
    force_primary: bool = False  # window mode right after a write: the primary serves


class _First:
    """A side-effect-free policy for predicates: is *any* candidate eligible?"""

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        return candidates[0]


class _MostCaughtUp:
    """The replica most likely to have reached a token: the furthest replayed (ties in
    turn, so reads right after writes still spread)."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        best = max(-1 if n.replay_lsn is None else n.replay_lsn for n in candidates)
        ties = [n for n in candidates if (-1 if n.replay_lsn is None else n.replay_lsn) == best]
        return ties[next(self._turn) % len(ties)]


class _Prefer:
    """The cluster's policy, except that ``node`` is kept while it is a candidate."""

    __slots__ = ("_node", "_policy")

    def __init__(self, node: str, policy: Policy) -> None:
        self._node = node
        self._policy = policy

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        for candidate in candidates:
            if candidate.name == self._node:
                return candidate
        return self._policy.choose(candidates, in_use)


_FIRST = _First()
_MOST_CAUGHT_UP = _MostCaughtUp()
_FAILURE_REASONS = {
    "lag": "every healthy replica lags more than allowed",
    "token": "no replica has replayed this scope's last write yet",
    "none_healthy": "no healthy replica",
}


def check_seconds(field: str, value: object) -> float:
    """``value`` as seconds, or a :class:`ConfigurationError` naming ``field``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < 0
    ):
        raise ConfigurationError(f"{field}: expected a number of seconds >= 0, got {value!r}")
    return float(value)


class ReadRules:
    """A cluster's read settings and policy: the rules every read follows.

    Built once by the cluster from validated settings; ``plan`` and ``decide`` are
    the per-read decisions, :class:`ReadAttempt` the steps around them.
    """

    __slots__ = (
        "_plain",
        "consistency_timeout",
        "fallback",
        "in_use",
        "max_lag",
        "max_lag_bytes",
        "monotonic",
        "policy",
        "read_your_writes",
        "window",
    )

    def __init__(
        self,
        policy: Policy,
        in_use: InUse,
        *,
        max_lag: float | None,
        max_lag_bytes: int | None,
        read_your_writes: ReadYourWrites,
        window: float,
        monotonic: bool,
        fallback: Fallback,
        consistency_timeout: float,
    ) -> None:
        self.policy = policy
        self.in_use = in_use
        self.max_lag = max_lag
        self.max_lag_bytes = max_lag_bytes
        self.read_your_writes = read_your_writes
        self.window = window
        self.monotonic = monotonic
        self.fallback = fallback
        self.consistency_timeout = consistency_timeout
        self._plain = ReadPlan(ReadRequirements(max_lag, max_lag_bytes))

    @property
    def tracks_scope(self) -> bool:
        """Whether reads depend on the scope at all (else its mark need not be read)."""
        return self.read_your_writes is not None or self.monotonic

    def plan(
        self,
        mark: MarkFields | None,
        now: float,
        *,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
        snapshot_age: float = 0.0,
    ) -> ReadPlan:
        """What a read needs: the bounds (the cluster's, or this read's overrides), the
        position it must see (token, and floor with monotonic reads), or the primary
        (window mode within ``window`` seconds of a write). ``snapshot_age`` is how old
        the topology is: ``max_staleness`` counts it."""
        min_position: int | None = None
        force_primary = False
        if mark is not None:
            position, floor, last_write_at = mark
            ryw = self.read_your_writes
            if ryw == "lsn":
                min_position = position
            elif ryw == "window" and last_write_at is not None:
                force_primary = now - last_write_at < self.window
            if self.monotonic and floor is not None:
                min_position = floor if min_position is None else max(min_position, floor)
        if max_lag is None and max_lag_bytes is None and max_staleness is None:
            if min_position is None:
                return ReadPlan(self._plain.req, True) if force_primary else self._plain
            req = ReadRequirements(self.max_lag, self.max_lag_bytes, min_position)
            return ReadPlan(req, force_primary)
        lag = self.max_lag if max_lag is None else check_seconds("max_lag", max_lag)
        if max_lag_bytes is not None and (isinstance(max_lag_bytes, bool) or max_lag_bytes < 0):
            raise ConfigurationError(f"max_lag_bytes: expected bytes >= 0, got {max_lag_bytes!r}")
        lag_bytes = self.max_lag_bytes if max_lag_bytes is None else max_lag_bytes
        if max_staleness is not None:
            # The snapshot is already this old: the replica may have fallen behind
            # since, by at most that much.
            bound = check_seconds("max_staleness", max_staleness) - snapshot_age
            lag = bound if lag is None else min(lag, bound)
        return ReadPlan(ReadRequirements(lag, lag_bytes, min_position), force_primary)

    def decide(
        self,
        topology: Topology,
        plan: ReadPlan,
        exclude: frozenset[str] = frozenset(),
        prefer: str | None = None,
    ) -> ReadDecision:
        """The node for the read now, or why none (``prefer`` is kept while eligible:
        a held connection's node)."""
        req = plan.req
        if exclude:
            req = ReadRequirements(
                req.max_lag_seconds, req.max_lag_bytes, req.min_position, exclude
            )
        if plan.force_primary:
            primary = route_write(topology)
            if primary is not None and primary not in exclude:
                return _fallback(primary, "token", False)
        policy = self.policy if prefer is None else _Prefer(prefer, self.policy)
        return route_read(
            topology, req, policy, self.in_use, fallback_to_primary=self.fallback == "primary"
        )

    def ready(self, plan: ReadPlan, exclude: frozenset[str]) -> Callable[[Topology], bool]:
        """A predicate for ``monitor.wait_for``: some replica now qualifies."""
        req = ReadRequirements(
            plan.req.max_lag_seconds, plan.req.max_lag_bytes, plan.req.min_position, exclude
        )
        in_use = self.in_use

        def ready(topology: Topology) -> bool:
            decision = route_read(topology, req, _FIRST, in_use, fallback_to_primary=False)
            return decision.fallback is None

        return ready

    def catch_up_candidate(
        self, topology: Topology, plan: ReadPlan, exclude: frozenset[str]
    ) -> str | None:
        """The replica within lag bounds that is furthest along (to ask it directly
        whether it has reached the token the snapshot says it has not)."""
        req = ReadRequirements(plan.req.max_lag_seconds, plan.req.max_lag_bytes, None, exclude)
        return route_read(
            topology, req, _MOST_CAUGHT_UP, self.in_use, fallback_to_primary=False
        ).target

    def failure(
        self, reason: FallbackReason | None, failures: Sequence[str], *, timed_out: bool
    ) -> NoReplicaAvailable:
        """The error a read raises when no node can serve it."""
        why_none = _FAILURE_REASONS[reason or "none_healthy"]
        tail = f"; failed: {'; '.join(failures)}" if failures else ""
        if timed_out:
            return ConsistencyTimeout(
                f"no replica could serve the read within {self.consistency_timeout:g} s "
                f"(consistency_timeout) and the primary is unavailable: {why_none}{tail}"
            )
        if self.fallback == "error" and reason in ("token", "lag"):
            return ConsistencyTimeout(
                f"no replica can serve the read: {why_none} and fallback='error'{tail}"
            )
        if self.fallback == "primary":
            why = "and the primary is unavailable"
        elif self.fallback == "error":
            why = "and fallback='error'"
        else:
            why = "and waiting cannot help (fallback='wait')"
        return NoReplicaAvailable(f"no node can serve the read: {why_none} {why}{tail}")


USE: Final = "use"
CATCH_UP: Final = "catch_up"
WAIT: Final = "wait"
FAIL: Final = "fail"


def _never(topology: Topology) -> bool:
    return False


StepAction = Literal["use", "catch_up", "wait", "fail"]


@dataclass(frozen=True, slots=True)
class ReadStep:
    """What the caller does next for a read (see :class:`ReadAttempt`)."""

    action: StepAction
    node: str | None = None  # use / catch_up: the node
    reason: FallbackReason | None = None  # why not a replica within bounds (None: one is)
    timeout: float = 0.0  # wait: at most this long
    ready: Callable[[Topology], bool] = _never  # wait: for a snapshot where this holds
    error: NoReplicaAvailable | None = None  # fail: raise this


_NOBODY: frozenset[str] = frozenset()
_USE_STEPS: dict[tuple[str, FallbackReason | None], ReadStep] = {}


def _use(node: str, reason: FallbackReason | None) -> ReadStep:
    """The shared step for ``node`` (steps are immutable; the read path builds none)."""
    step = _USE_STEPS.get((node, reason))
    if step is None:
        step = _USE_STEPS.setdefault((node, reason), ReadStep(USE, node, reason))
    return step


class ReadAttempt:
    """One read's way to a node, as steps its caller carries out (sans I/O).

    ``step(topology, now)`` says what to do: ``use`` a node (check a connection
    out, or name it), ``catch_up`` (ask the furthest replica whether it has
    replayed the token yet; if not, step again), ``wait``
    for a better snapshot (``fallback="wait"``), or ``fail`` with an error. A
    node that failed (its checkout or its catch-up check) is reported with
    ``failed()`` and left out of the next steps: that is how a failed checkout is
    retried, on the next-best node, until none is left.
    """

    __slots__ = (
        "_catch_up",
        "_catch_ups",
        "_plan",
        "_prefer",
        "_rules",
        "_wait_until",
        "exclude",
        "failures",
    )

    def __init__(
        self, rules: ReadRules, plan: ReadPlan, *, catch_up: bool = True, prefer: str | None = None
    ) -> None:
        self._rules = rules
        self._plan = plan
        self._prefer = prefer  # kept while it qualifies (the node a unit of work read from)
        self._catch_ups = catch_up  # the caller can ask a node (it checks connections out)
        self._catch_up = catch_up
        self._wait_until: float | None = None
        self.exclude: frozenset[str] = _NOBODY
        self.failures: tuple[str, ...] = ()

    @property
    def plan(self) -> ReadPlan:
        return self._plan

    def step(self, topology: Topology, now: float) -> ReadStep:
        rules, plan = self._rules, self._plan
        decision = rules.decide(topology, plan, self.exclude, self._prefer)
        reason = decision.fallback
        if reason is not None and not plan.force_primary:
            if reason == "token" and self._catch_up:
                self._catch_up = False
                candidate = rules.catch_up_candidate(topology, plan, self.exclude)
                if candidate is not None:
                    return ReadStep(CATCH_UP, candidate, reason)
            if rules.fallback == "wait" and decision.waitable:
                if self._wait_until is None:
                    self._wait_until = now + rules.consistency_timeout
                if now < self._wait_until:
                    self._catch_up = self._catch_ups
                    ready = rules.ready(plan, self.exclude)
                    timeout = min(self._wait_until - now, WAIT_SLICE)
                    return ReadStep(WAIT, None, reason, timeout, ready)
                # Waited in vain: the primary, which has every commit, serves the read.
                primary = route_write(topology)
                if primary is None or primary in self.exclude:
                    return ReadStep(FAIL, reason=reason, error=self._failure(reason, True))
                return _use(primary, reason)
        if decision.target is None:
            return ReadStep(FAIL, reason=reason, error=self._failure(reason, False))
        return _use(decision.target, reason)

    def failed(self, node: str, message: str) -> None:
        """``node`` could not serve this read: the next steps leave it out."""
        self.exclude = self.exclude | {node}
        self.failures = (*self.failures, message)
        self._catch_up = self._catch_ups

    def _failure(self, reason: FallbackReason | None, timed_out: bool) -> NoReplicaAvailable:
        return self._rules.failure(reason, self.failures, timed_out=timed_out)
