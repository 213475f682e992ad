"""Routing decisions: eligibility, fallback reasons, writes (pure, no server)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from replica_router.policy import RoundRobin
from replica_router.routing import (
    NO_REQUIREMENTS,
    ReadDecision,
    ReadRequirements,
    route_read,
    route_write,
)
from replica_router.topology import NodeState, Role, Topology

PRIMARY = NodeState(
    name="primary", role=Role.PRIMARY, healthy=True, current_lsn=5000, replay_lsn=5000
)


def replica(name: str, **kw: object) -> NodeState:
    base = NodeState(
        name=name,
        role=Role.REPLICA,
        healthy=True,
        replay_lsn=5000,
        receive_lsn=5000,
        lag_bytes=0,
        lag_seconds=0.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def topo(*replicas: NodeState, primary: NodeState | None = PRIMARY) -> Topology:
    nodes = (primary, *replicas) if primary is not None else replicas
    return Topology(nodes=nodes, primary=primary.name if primary else None, generation=1)


def idle(name: str) -> int:
    return 0


SHARED_POLICY = RoundRobin()


def read(
    t: Topology, req: ReadRequirements = NO_REQUIREMENTS, *, fallback: bool = True
) -> ReadDecision:
    return route_read(t, req, SHARED_POLICY, idle, fallback_to_primary=fallback)


def test_reads_spread_over_every_eligible_replica() -> None:
    t = topo(replica("r1"), replica("r2"), replica("r3"))
    policy = RoundRobin()
    counts = Counter(
        route_read(t, NO_REQUIREMENTS, policy, idle, fallback_to_primary=True).target
        for _ in range(300)
    )
    assert counts == {"r1": 100, "r2": 100, "r3": 100}


def test_served_decision_has_no_fallback() -> None:
    assert read(topo(replica("r1"))) == ReadDecision("r1", None, False)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"healthy": False}, "unhealthy"),
        ({"fenced": True}, "fenced"),
        ({"role": Role.UNKNOWN}, "not probed yet"),
        ({"role": Role.PRIMARY}, "claims primary"),
    ],
)
def test_unavailable_replicas_are_skipped(bad: dict[str, object], why: str) -> None:
    t = topo(replica("r1", **bad), replica("r2"))
    assert {read(t).target for _ in range(10)} == {"r2"}, why


def test_excluded_replica_is_skipped() -> None:
    t = topo(replica("r1"), replica("r2"))
    req = ReadRequirements(exclude=frozenset({"r1"}))
    assert {read(t, req).target for _ in range(10)} == {"r2"}


def test_lag_seconds_bound() -> None:
    t = topo(replica("r1", lag_seconds=3.0), replica("r2", lag_seconds=1.0))
    assert {read(t, ReadRequirements(max_lag_seconds=2.0)).target for _ in range(10)} == {"r2"}
    assert {read(t, ReadRequirements(max_lag_seconds=5.0)).target for _ in range(10)} == {
        "r1",
        "r2",
    }
    # The bound is inclusive: exactly at it still qualifies.
    assert (
        read(topo(replica("r1", lag_seconds=2.0)), ReadRequirements(max_lag_seconds=2.0)).target
        == "r1"
    )


def test_lag_bytes_bound() -> None:
    t = topo(replica("r1", lag_bytes=10_000), replica("r2", lag_bytes=10))
    assert {read(t, ReadRequirements(max_lag_bytes=100)).target for _ in range(10)} == {"r2"}


def test_unknown_lag_fails_a_set_bound_only() -> None:
    t = topo(replica("r1", lag_seconds=None, lag_bytes=None))
    assert read(t).target == "r1"
    assert read(t, ReadRequirements(max_lag_seconds=10.0)) == ReadDecision("primary", "lag", True)
    assert read(t, ReadRequirements(max_lag_bytes=10**9)) == ReadDecision("primary", "lag", True)


def test_min_position() -> None:
    t = topo(replica("r1", replay_lsn=4000), replica("r2", replay_lsn=5000))
    assert {read(t, ReadRequirements(min_position=4500)).target for _ in range(10)} == {"r2"}
    assert {read(t, ReadRequirements(min_position=4000)).target for _ in range(10)} == {"r1", "r2"}


def test_fallback_reason_token_when_only_behind_the_token() -> None:
    t = topo(replica("r1", replay_lsn=4000), replica("r2", healthy=False))
    assert read(t, ReadRequirements(min_position=4500)) == ReadDecision("primary", "token", True)


def test_fallback_reason_token_wins_over_lag() -> None:
    t = topo(replica("r1", replay_lsn=4000), replica("r2", lag_seconds=9.0))
    req = ReadRequirements(max_lag_seconds=2.0, min_position=4500)
    assert read(t, req) == ReadDecision("primary", "token", True)


def test_lagging_and_behind_the_token_is_lag() -> None:
    t = topo(replica("r1", replay_lsn=4000, lag_seconds=9.0))
    req = ReadRequirements(max_lag_seconds=2.0, min_position=4500)
    assert read(t, req) == ReadDecision("primary", "lag", True)


def test_fallback_reason_none_healthy() -> None:
    t = topo(replica("r1", healthy=False), replica("r2", fenced=True))
    assert read(t) == ReadDecision("primary", "none_healthy", False)
    assert read(topo()) == ReadDecision("primary", "none_healthy", False)


def test_excluded_replicas_count_as_unavailable() -> None:
    t = topo(replica("r1"))
    assert read(t, ReadRequirements(exclude=frozenset({"r1"}))) == ReadDecision(
        "primary", "none_healthy", False
    )


def test_no_fallback_to_primary_gives_no_target_but_the_reason() -> None:
    t = topo(replica("r1", lag_seconds=9.0))
    req = ReadRequirements(max_lag_seconds=2.0)
    assert read(t, req, fallback=False) == ReadDecision(None, "lag", True)


def test_primary_down_reads_go_on_from_replicas() -> None:
    down = replace(PRIMARY, healthy=False)
    t = Topology(nodes=(down, replica("r1"), replica("r2")), primary=None)
    assert {read(t).target for _ in range(10)} == {"r1", "r2"}
    # ...and when no replica qualifies either, there is no target.
    lagging = Topology(nodes=(down, replica("r1", lag_seconds=9.0)), primary=None)
    assert read(lagging, ReadRequirements(max_lag_seconds=1.0)) == ReadDecision(None, "lag", True)


def test_fenced_or_excluded_primary_is_never_a_read_fallback() -> None:
    fenced = topo(replica("r1", healthy=False), primary=replace(PRIMARY, fenced=True))
    assert read(fenced) == ReadDecision(None, "none_healthy", False)
    t = topo(replica("r1", healthy=False))
    req = ReadRequirements(exclude=frozenset({"primary"}))
    assert read(t, req) == ReadDecision(None, "none_healthy", False)


def test_decisions_are_shared_objects() -> None:
    t = topo(replica("r1"))
    assert read(t) is read(t)


def test_route_write_goes_to_the_healthy_primary() -> None:
    assert route_write(topo(replica("r1"))) == "primary"


@pytest.mark.parametrize(
    "primary",
    [
        None,
        replace(PRIMARY, healthy=False),
        replace(PRIMARY, fenced=True),
        replace(PRIMARY, role=Role.REPLICA),
    ],
)
def test_route_write_without_a_usable_primary(primary: NodeState | None) -> None:
    nodes = (replica("r1"),) if primary is None else (primary, replica("r1"))
    t = Topology(nodes=nodes, primary=None if primary is None else primary.name)
    assert route_write(t) is None


def test_topology_replicas_are_precomputed() -> None:
    t = topo(replica("r1"), replica("r2"))
    assert t.replicas is t.replicas
    assert [n.name for n in t.replicas] == ["r1", "r2"]
