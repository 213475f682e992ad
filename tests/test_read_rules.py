"""A read's plan and its steps (``ReadRules``, ``ReadAttempt``): pure, no server.

The sync and asyncio clusters and ``route_read()`` all walk these steps; what is
tested here holds for every one of them.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from replica_router import ConfigurationError, ConsistencyTimeout, NoReplicaAvailable
from replica_router.consistency import Mark
from replica_router.policy import RoundRobin
from replica_router.routing import (
    CATCH_UP,
    FAIL,
    USE,
    WAIT,
    ReadAttempt,
    ReadRules,
    new_primary_after,
)
from replica_router.topology import NodeState, Role, Topology

PRIMARY = NodeState(name="primary", role=Role.PRIMARY, healthy=True, current_lsn=9000)


def replica(name: str, replay: int = 5000, **kw: object) -> NodeState:
    node = NodeState(
        name=name,
        role=Role.REPLICA,
        healthy=True,
        replay_lsn=replay,
        receive_lsn=replay,
        lag_bytes=0,
        lag_seconds=0.0,
    )
    return replace(node, **kw)  # type: ignore[arg-type]


def topo(*nodes: NodeState, primary: str | None = "primary", generation: int = 1) -> Topology:
    return Topology(nodes=(PRIMARY, *nodes), primary=primary, generation=generation)


def rules(**kw: object) -> ReadRules:
    settings: dict[str, object] = {
        "max_lag": 2.0,
        "max_lag_bytes": None,
        "read_your_writes": "lsn",
        "window": 5.0,
        "monotonic": False,
        "fallback": "primary",
        "consistency_timeout": 1.0,
    }
    settings.update(kw)
    return ReadRules(RoundRobin(), lambda name: 0, **settings)  # type: ignore[arg-type]


# -- the plan -----------------------------------------------------------------------


def test_plan_without_a_mark_is_the_shared_default() -> None:
    r = rules()
    assert r.plan(None, 0.0) is r.plan(None, 1.0)  # nothing built per read
    assert r.plan(None, 0.0).req.max_lag_seconds == 2.0
    assert r.plan(None, 0.0).req.min_position is None


def test_the_token_and_the_monotonic_floor_set_the_position_a_read_must_see() -> None:
    assert rules().plan(Mark(position=700, floor=900), 0.0).req.min_position == 700
    monotonic = rules(monotonic=True)
    assert monotonic.plan(Mark(position=700, floor=900), 0.0).req.min_position == 900
    assert monotonic.plan(Mark(floor=900), 0.0).req.min_position == 900
    assert rules(read_your_writes=None).plan(Mark(position=700), 0.0).req.min_position is None


def test_window_mode_reads_the_primary_only_within_the_window() -> None:
    r = rules(read_your_writes="window", window=5.0)
    assert r.plan(Mark(last_write_at=10.0), 14.9).force_primary
    assert not r.plan(Mark(last_write_at=10.0), 15.0).force_primary
    assert r.plan(Mark(position=700, last_write_at=10.0), 11.0).req.min_position is None


def test_overrides_replace_the_bounds_and_staleness_counts_the_snapshot_age() -> None:
    r = rules(max_lag=2.0, max_lag_bytes=100)
    plan = r.plan(None, 0.0, max_lag=30.0)
    assert (plan.req.max_lag_seconds, plan.req.max_lag_bytes) == (30.0, 100)
    plan = r.plan(None, 0.0, max_staleness=1.5, snapshot_age=0.5)
    assert plan.req.max_lag_seconds == pytest.approx(1.0)
    with pytest.raises(ConfigurationError, match="max_lag"):
        r.plan(None, 0.0, max_lag=-1)
    with pytest.raises(ConfigurationError, match="max_lag_bytes"):
        r.plan(None, 0.0, max_lag_bytes=-1)


# -- the steps ----------------------------------------------------------------------


def test_an_eligible_replica_is_used_at_once() -> None:
    attempt = ReadAttempt(rules(), rules().plan(None, 0.0))
    step = attempt.step(topo(replica("r1")), 0.0)
    assert (step.action, step.node, step.reason) == (USE, "r1", None)


def test_a_failed_checkout_is_retried_on_the_next_node_then_the_primary() -> None:
    r = rules()
    attempt = ReadAttempt(r, r.plan(None, 0.0))
    t = topo(replica("r1"), replica("r2"))
    first = attempt.step(t, 0.0).node
    assert first in ("r1", "r2")
    attempt.failed(first, f"{first}: refused")
    second = attempt.step(t, 0.0).node
    assert second in ("r1", "r2") and second != first
    attempt.failed(second, f"{second}: refused")
    step = attempt.step(t, 0.0)
    assert (step.action, step.node, step.reason) == (USE, "primary", "none_healthy")
    attempt.failed("primary", "primary: refused")
    step = attempt.step(t, 0.0)
    assert step.action == FAIL
    assert isinstance(step.error, NoReplicaAvailable)
    assert "r1: refused" in str(step.error) and "primary: refused" in str(step.error)


def test_behind_the_token_the_furthest_replica_is_asked_first() -> None:
    r = rules()
    attempt = ReadAttempt(r, r.plan(Mark(position=6000), 0.0))
    t = topo(replica("r1", replay=5000), replica("r2", replay=5900))
    step = attempt.step(t, 0.0)
    assert (step.action, step.node, step.reason) == (CATCH_UP, "r2", "token")
    # It had not caught up either: the primary serves (fallback="primary").
    step = attempt.step(t, 0.0)
    assert (step.action, step.node, step.reason) == (USE, "primary", "token")


def test_route_read_never_asks_a_node_it_cannot_check_out() -> None:
    r = rules()
    attempt = ReadAttempt(r, r.plan(Mark(position=6000), 0.0), catch_up=False)
    step = attempt.step(topo(replica("r1", replay=5000)), 0.0)
    assert (step.action, step.node) == (USE, "primary")


def test_fallback_wait_waits_in_slices_then_reads_the_primary() -> None:
    r = rules(fallback="wait", consistency_timeout=1.0)
    attempt = ReadAttempt(r, r.plan(Mark(position=6000), 0.0), catch_up=False)
    behind = topo(replica("r1", replay=5000))
    step = attempt.step(behind, 10.0)
    assert step.action == WAIT and 0 < step.timeout <= 0.05
    assert not step.ready(behind)
    assert step.ready(topo(replica("r1", replay=6000)))
    assert attempt.step(behind, 10.9).action == WAIT
    step = attempt.step(behind, 11.0)  # waited in vain: the primary has every commit
    assert (step.action, step.node, step.reason) == (USE, "primary", "token")
    attempt.failed("primary", "primary: down")
    step = attempt.step(behind, 11.0)
    assert step.action == FAIL and isinstance(step.error, ConsistencyTimeout)
    # A replica that caught up meanwhile is used.
    attempt = ReadAttempt(r, r.plan(Mark(position=6000), 0.0), catch_up=False)
    assert attempt.step(topo(replica("r1", replay=6000)), 0.0).node == "r1"


def test_after_a_wait_the_catch_up_check_is_tried_again() -> None:
    r = rules(fallback="wait")
    attempt = ReadAttempt(r, r.plan(Mark(position=6000), 0.0))
    behind = topo(replica("r1", replay=5000))
    assert attempt.step(behind, 0.0).action == CATCH_UP
    assert attempt.step(behind, 0.0).action == WAIT
    assert attempt.step(behind, 0.01).action == CATCH_UP


def test_fallback_error_fails_without_the_primary() -> None:
    r = rules(fallback="error")
    attempt = ReadAttempt(r, r.plan(None, 0.0))
    step = attempt.step(topo(replica("r1", lag_seconds=9.0)), 0.0)
    assert step.action == FAIL and step.reason == "lag"
    assert isinstance(step.error, ConsistencyTimeout)  # what both docs' handlers catch
    assert "fallback='error'" in str(step.error)
    step = ReadAttempt(r, r.plan(None, 0.0)).step(topo(replica("r1", healthy=False)), 0.0)
    assert step.action == FAIL and step.reason == "none_healthy"
    assert type(step.error) is NoReplicaAvailable


def test_window_mode_reads_the_primary_unless_it_is_excluded() -> None:
    r = rules(read_your_writes="window")
    attempt = ReadAttempt(r, r.plan(Mark(last_write_at=0.0), 1.0))
    t = topo(replica("r1"))
    assert attempt.step(t, 1.0).node == "primary"
    attempt.failed("primary", "primary: down")
    assert attempt.step(t, 1.0).node == "r1"


def test_decide_keeps_a_preferred_node_while_it_is_eligible() -> None:
    r = rules()
    t = topo(replica("r1"), replica("r2"), replica("r3"))
    plan = r.plan(None, 0.0)
    assert {r.decide(t, plan, prefer="r2").target for _ in range(6)} == {"r2"}
    lagging = topo(replica("r1"), replica("r2", lag_seconds=9.0))
    assert r.decide(lagging, plan, prefer="r2").target == "r1"


def test_new_primary_after_needs_a_newer_snapshot_with_a_usable_primary() -> None:
    ready = new_primary_after(3)
    assert not ready(topo(generation=3))
    assert not ready(topo(generation=4, primary=None))
    assert ready(topo(generation=4))
