"""Pure routing decision cost with 3 replicas (target: median <= 2 us).

Each row times one call of ``route_read`` / ``route_write`` with
``perf_counter_ns`` around batches of calls (the clock itself costs ~50 ns, so
single-call timings would mostly measure it), and reports the per-call median
and p99 over the batches. The baseline row is seed 004's hand-rolled
``LagAwareRouter.get_engine`` (a list comprehension plus an index), measured
in the same run.

    .venv/bin/python benchmarks/routing.py [--batches 2000] [--batch 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from replica_router.policy import Policy, make_policy
from replica_router.routing import ReadRequirements, route_read, route_write
from replica_router.topology import NodeState, Role, Topology


def build_topology() -> Topology:
    primary = NodeState(
        name="primary", role=Role.PRIMARY, healthy=True, current_lsn=10**9, latency_ms=0.3
    )
    replicas = tuple(
        NodeState(
            name=f"replica{i}",
            role=Role.REPLICA,
            healthy=True,
            replay_lsn=10**9 - i,
            receive_lsn=10**9,
            lag_bytes=i,
            lag_seconds=0.0,
            latency_ms=0.3 + i / 100,
        )
        for i in range(1, 4)
    )
    return Topology(nodes=(primary, *replicas), primary="primary", generation=1)


@dataclass
class _SeedReplica:  # seed 004's ReplicaHealth
    engine: object
    name: str
    lag_seconds: float = 0.0
    healthy: bool = True


class _SeedLagAwareRouter:  # seed 004's LagAwareRouter.get_engine, verbatim logic
    def __init__(self, replicas: list[_SeedReplica]) -> None:
        self.replicas = replicas
        self._index = 0

    def get_engine(self) -> object:
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            return None
        replica = healthy[self._index % len(healthy)]
        self._index += 1
        return replica.engine


def measure(call: Callable[[], object], batches: int, batch: int) -> tuple[float, float]:
    """Per-call (median, p99) in microseconds over ``batches`` batches."""
    for _ in range(batch * 10):  # warm up caches and the decision memo
        call()
    per_call: list[float] = []
    rng = range(batch)
    clock = time.perf_counter_ns
    for _ in range(batches):
        start = clock()
        for _ in rng:
            call()
        per_call.append((clock() - start) / batch / 1000)
    per_call.sort()
    return statistics.median(per_call), per_call[int(len(per_call) * 0.99) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()

    topology = build_topology()
    in_use = {n.name: 0 for n in topology.nodes}.__getitem__
    bounded = ReadRequirements(max_lag_seconds=2.0, max_lag_bytes=10**6)
    token = ReadRequirements(max_lag_seconds=2.0, min_position=10**9 - 1)  # excludes 2 of 3

    rows: list[tuple[str, Callable[[], object]]] = []
    seed = _SeedLagAwareRouter([_SeedReplica(object(), f"replica{i}") for i in range(1, 4)])
    rows.append(("baseline: seed 004 LagAwareRouter", seed.get_engine))
    for name in ("round_robin", "random", "weighted", "least_busy", "lowest_latency"):
        policy = make_policy(name, weights={"replica1": 2} if name == "weighted" else None)

        def call(policy: Policy = policy) -> object:
            return route_read(topology, bounded, policy, in_use, fallback_to_primary=True)

        rows.append((f"route_read {name}", call))
    rr = make_policy("round_robin")
    rows.append(
        (
            "route_read round_robin, token (1 of 3)",
            lambda: route_read(topology, token, rr, in_use, fallback_to_primary=True),
        )
    )
    rows.append(("route_write", lambda: route_write(topology)))

    print(f"3 replicas; {args.batches} batches x {args.batch} calls; microseconds per call")
    print(f"{'decision':<42} {'median us':>10} {'p99 us':>10}")
    print("-" * 64)
    worst = 0.0
    for label, fn in rows:
        median, p99 = measure(fn, args.batches, args.batch)
        if label.startswith("route_"):
            worst = max(worst, median)
        print(f"{label:<42} {median:>10.3f} {p99:>10.3f}")
    print("-" * 64)
    verdict = "OK" if worst <= 2.0 else "OVER TARGET"
    print(f"slowest routing median {worst:.3f} us (target <= 2 us): {verdict}")
    return 0 if worst <= 2.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
