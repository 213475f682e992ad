"""Balancing policies: which of several eligible replicas serves a read.

Decides which candidate serves a read, and nothing else: routing has already
filtered the candidates (healthy, within lag, past the token). Must not do I/O,
read a clock or take a lock. ``choose`` runs on every read, so each policy is a
few integer operations with no allocation. Counters are ``itertools.count``
objects: ``next()`` on them is atomic under the GIL, so concurrent callers still
spread evenly without a lock.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from .errors import ConfigurationError
from .topology import NodeState

__all__ = [
    "POLICY_NAMES",
    "LeastBusy",
    "LowestLatency",
    "Policy",
    "Random",
    "RoundRobin",
    "Weighted",
    "make_policy",
]

InUse = Callable[[str], int]


@runtime_checkable
class Policy(Protocol):
    """Picks one node among ``candidates`` (never empty, already eligible)."""

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState: ...


class RoundRobin:
    """Each candidate in turn; the default, and the tie-breaker of the others."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        return candidates[next(self._counter) % len(candidates)]

    def __repr__(self) -> str:
        return "RoundRobin()"


class Random:
    """A uniformly random candidate (``seed`` makes it reproducible in tests)."""

    __slots__ = ("_random",)

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed).random

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        return candidates[int(self._random() * len(candidates))]

    def __repr__(self) -> str:
        return "Random()"


class Weighted:
    """Random, in proportion to per-node weights (missing names weigh ``default``).

    Weights are relative (``{"r1": 3, "r2": 1}`` sends r1 three reads in four).
    A weight of 0 keeps a node out while another candidate has weight; when every
    candidate weighs 0 they share evenly rather than failing the read.
    """

    __slots__ = ("_default", "_random", "_round_robin", "weights")

    def __init__(
        self, weights: Mapping[str, float], *, default: float = 1.0, seed: int | None = None
    ) -> None:
        self.weights: Mapping[str, float] = {
            name: _check_weight(f"weights[{name!r}]", value) for name, value in weights.items()
        }
        self._default = _check_weight("default weight", default)
        self._random = random.Random(seed).random
        self._round_robin = RoundRobin()

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        weights, default = self.weights, self._default
        total = 0.0
        for node in candidates:
            total += weights.get(node.name, default)
        if total <= 0.0:
            return self._round_robin.choose(candidates, in_use)
        point = self._random() * total
        for node in candidates:
            weight = weights.get(node.name, default)
            if point < weight:
                return node
            point -= weight
        # Float rounding can leave ``point`` a hair above the last weight.
        for node in reversed(candidates):
            if weights.get(node.name, default) > 0.0:
                return node
        raise AssertionError("unreachable: total > 0 implies a positive weight")

    def __repr__(self) -> str:
        return f"Weighted({dict(self.weights)!r})"


class LeastBusy:
    """The candidate with the fewest checked-out connections (``in_use(name)``).

    Ties go round-robin, so an idle application still spreads its reads
    instead of sending every one to the first node.
    """

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        if len(candidates) == 1:
            return candidates[0]
        # One snapshot of the counts: they move under us while other threads check out.
        loads = [in_use(node.name) for node in candidates]
        best = min(loads)
        index = next(self._counter) % loads.count(best)
        for node, load in zip(candidates, loads, strict=True):
            if load == best:
                if index == 0:
                    return node
                index -= 1
        raise AssertionError("unreachable: index < number of least busy candidates")

    def __repr__(self) -> str:
        return "LeastBusy()"


class LowestLatency:
    """The candidate with the lowest smoothed probe latency (``NodeState.latency_ms``).

    Nodes within ``tolerance_ms`` + ``tolerance_ratio`` of the fastest count as
    equally fast and share round-robin: probe latencies on one network differ by
    noise, and a strict minimum would send every read to one node. A node with
    no measurement yet is slowest.
    """

    __slots__ = ("_counter", "tolerance_ms", "tolerance_ratio")

    def __init__(self, *, tolerance_ms: float = 0.5, tolerance_ratio: float = 0.25) -> None:
        if not (math.isfinite(tolerance_ms) and tolerance_ms >= 0):
            raise ConfigurationError(f"tolerance_ms must be >= 0, got {tolerance_ms!r}")
        if not (math.isfinite(tolerance_ratio) and tolerance_ratio >= 0):
            raise ConfigurationError(f"tolerance_ratio must be >= 0, got {tolerance_ratio!r}")
        self.tolerance_ms = tolerance_ms
        self.tolerance_ratio = tolerance_ratio
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[NodeState], in_use: InUse) -> NodeState:
        if len(candidates) == 1:
            return candidates[0]
        best = math.inf
        for node in candidates:
            if node.latency_ms is not None and node.latency_ms < best:
                best = node.latency_ms
        limit = best * (1.0 + self.tolerance_ratio) + self.tolerance_ms  # inf when none known
        ties = 0
        for node in candidates:
            if _latency(node) <= limit:
                ties += 1
        index = next(self._counter) % ties
        for node in candidates:
            if _latency(node) <= limit:
                if index == 0:
                    return node
                index -= 1
        raise AssertionError("unreachable: index < number of equally fast candidates")

    def __repr__(self) -> str:
        return f"LowestLatency(tolerance_ms={self.tolerance_ms}, ratio={self.tolerance_ratio})"


def _latency(node: NodeState) -> float:
    return math.inf if node.latency_ms is None else node.latency_ms


def _check_weight(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{what}: expected a number, got {type(value).__name__}")
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        raise ConfigurationError(f"{what}: must be a finite number >= 0, got {value!r}")
    return weight


_FACTORIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_busy": LeastBusy,
    "lowest_latency": LowestLatency,
}
POLICY_NAMES: tuple[str, ...] = (
    "round_robin",
    "random",
    "weighted",
    "least_busy",
    "lowest_latency",
)


def make_policy(spec: str | Policy, *, weights: Mapping[str, float] | None = None) -> Policy:
    """A policy from its name (``"round_robin"``...) or a ready ``Policy`` object.

    ``weights`` belong to ``"weighted"`` only (nodes not listed weigh 1.0);
    passing them with another policy is a mistake we report rather than ignore.
    """
    if isinstance(spec, str):
        name = spec.strip().lower().replace("-", "_")
        if name == "weighted":
            return Weighted(weights or {})
        factory = _FACTORIES.get(name)
        if factory is None:
            raise ConfigurationError(
                f"policy: unknown policy {spec!r}; valid: {', '.join(POLICY_NAMES)}"
            )
        if weights:
            raise ConfigurationError(
                f"weights: only used by policy='weighted', not policy={spec!r}"
            )
        return factory()
    if isinstance(spec, Policy):
        if weights:
            raise ConfigurationError("weights: give them to your own policy object instead")
        return spec
    raise ConfigurationError(
        f"policy: expected a name ({', '.join(POLICY_NAMES)}) or an object with "
        f"choose(candidates, in_use), got {type(spec).__name__}"
    )
