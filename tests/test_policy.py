"""Balancing policies: distributions over many picks (pure, no server)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from replica_router.errors import ConfigurationError
from replica_router.policy import (
    LeastBusy,
    LowestLatency,
    Policy,
    Random,
    RoundRobin,
    Weighted,
    make_policy,
)
from replica_router.topology import NodeState, Role


def replica(name: str, latency_ms: float | None = 1.0) -> NodeState:
    return NodeState(name=name, role=Role.REPLICA, healthy=True, latency_ms=latency_ms)


NODES = (replica("r1"), replica("r2"), replica("r3"))


def idle(name: str) -> int:
    return 0


def picks(policy: Policy, n: int, nodes: tuple[NodeState, ...] = NODES) -> Counter[str]:
    return Counter(policy.choose(nodes, idle).name for _ in range(n))


def test_round_robin_is_exactly_even() -> None:
    assert picks(RoundRobin(), 3000) == {"r1": 1000, "r2": 1000, "r3": 1000}


def test_round_robin_stays_even_across_threads() -> None:
    policy = RoundRobin()
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        local = picks(policy, 3000)
        with lock:
            seen.update(local)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"r1": 4000, "r2": 4000, "r3": 4000}


def test_round_robin_follows_a_changing_candidate_list() -> None:
    policy = RoundRobin()
    two = NODES[:2]
    assert set(picks(policy, 10, two)) == {"r1", "r2"}
    assert picks(policy, 1, NODES[2:]) == {"r3": 1}


def test_random_is_roughly_uniform() -> None:
    counts = picks(Random(seed=7), 9000)
    assert set(counts) == {"r1", "r2", "r3"}
    for n in counts.values():
        assert 2700 <= n <= 3300


def test_weighted_ratio_within_tolerance_over_10k_picks() -> None:
    counts = picks(Weighted({"r1": 3, "r2": 1, "r3": 0}, seed=1), 10_000)
    assert counts["r3"] == 0
    assert counts["r1"] / counts["r2"] == pytest.approx(3.0, rel=0.1)
    assert 7200 <= counts["r1"] <= 7800


def test_weighted_missing_names_weigh_one_and_only_candidates_count() -> None:
    policy = Weighted({"r1": 2})
    counts = picks(policy, 9000)
    assert counts["r1"] / counts["r2"] == pytest.approx(2.0, rel=0.12)
    assert counts["r2"] / counts["r3"] == pytest.approx(1.0, rel=0.12)
    # r1 filtered out by routing: the rest share by their own weights.
    assert set(picks(policy, 100, NODES[1:])) == {"r2", "r3"}


def test_weighted_all_zero_shares_evenly_instead_of_failing() -> None:
    assert picks(Weighted({"r1": 0, "r2": 0, "r3": 0}), 300) == {"r1": 100, "r2": 100, "r3": 100}


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "2", True])
def test_weighted_rejects_bad_weights(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=r"weights\['r1'\]"):
        Weighted({"r1": bad})  # type: ignore[dict-item]


def test_least_busy_picks_fewest_in_use() -> None:
    load = {"r1": 5, "r2": 1, "r3": 3}
    policy = LeastBusy()
    assert {policy.choose(NODES, load.__getitem__).name for _ in range(20)} == {"r2"}


def test_least_busy_breaks_ties_round_robin() -> None:
    load = {"r1": 2, "r2": 0, "r3": 0}
    policy = LeastBusy()
    counts = Counter(policy.choose(NODES, load.__getitem__).name for _ in range(1000))
    assert counts == {"r2": 500, "r3": 500}


def test_least_busy_reads_each_count_once_per_choice() -> None:
    calls: Counter[str] = Counter()

    def moving(name: str) -> int:  # counts change between reads, as under load
        calls[name] += 1
        return calls[name] % 3

    policy = LeastBusy()
    for _ in range(300):
        policy.choose(NODES, moving)
    assert calls == {"r1": 300, "r2": 300, "r3": 300}


def test_lowest_latency_prefers_the_fastest() -> None:
    nodes = (replica("r1", 9.0), replica("r2", 1.0), replica("r3", 30.0))
    assert picks(LowestLatency(), 50, nodes) == {"r2": 50}


def test_lowest_latency_shares_between_equally_fast_nodes() -> None:
    nodes = (replica("r1", 0.30), replica("r2", 0.34), replica("r3", 5.0))
    assert picks(LowestLatency(), 1000, nodes) == {"r1": 500, "r2": 500}


def test_lowest_latency_exact_minimum_without_tolerance() -> None:
    nodes = (replica("r1", 0.30), replica("r2", 0.34), replica("r3", 0.30))
    policy = LowestLatency(tolerance_ms=0, tolerance_ratio=0)
    assert picks(policy, 1000, nodes) == {"r1": 500, "r3": 500}


def test_lowest_latency_unmeasured_nodes_are_last_but_usable() -> None:
    nodes = (replica("r1", None), replica("r2", 2.0))
    assert picks(LowestLatency(), 10, nodes) == {"r2": 10}
    nobody = (replica("r1", None), replica("r2", None))
    assert picks(LowestLatency(), 10, nobody) == {"r1": 5, "r2": 5}


def test_single_candidate_is_always_chosen() -> None:
    for policy in (RoundRobin(), Random(), Weighted({"r1": 0}), LeastBusy(), LowestLatency()):
        assert picks(policy, 5, NODES[:1]) == {"r1": 5}


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("round_robin", RoundRobin),
        ("random", Random),
        ("weighted", Weighted),
        ("least_busy", LeastBusy),
        ("lowest_latency", LowestLatency),
        ("Least-Busy", LeastBusy),
    ],
)
def test_make_policy_by_name(spec: str, kind: type) -> None:
    assert isinstance(make_policy(spec), kind)


def test_make_policy_weighted_takes_weights() -> None:
    policy = make_policy("weighted", weights={"r1": 2.5})
    assert isinstance(policy, Weighted)
    assert policy.weights == {"r1": 2.5}


def test_make_policy_passes_objects_through() -> None:
    mine = RoundRobin()
    assert make_policy(mine) is mine


def test_make_policy_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ConfigurationError) as err:
        make_policy("fastest")
    message = str(err.value)
    assert "'fastest'" in message
    for name in ("round_robin", "random", "weighted", "least_busy", "lowest_latency"):
        assert name in message


def test_make_policy_rejects_weights_for_other_policies_and_junk() -> None:
    with pytest.raises(ConfigurationError, match="only used by policy='weighted'"):
        make_policy("round_robin", weights={"r1": 2})
    with pytest.raises(ConfigurationError, match="got int"):
        make_policy(42)  # type: ignore[arg-type]
