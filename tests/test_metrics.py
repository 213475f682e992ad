"""Prometheus metrics: names, labels and values; serving; the monitoring examples.

The exposition is checked on hand-made status rows (fast, no server) and on a
real sandbox after a scripted scenario (pause replay, stop a node, fail over).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_until
from replica_router import metrics
from replica_router.cluster import Cluster
from replica_router.sandbox import LocalCluster
from replica_router.topology import NodeStatus

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "monitoring"
SEED_METRICS = {"db_replication_lag_seconds", "db_read_route_total", "db_failover_total"}


@dataclass(frozen=True)
class FakeCounters:
    reads: Mapping[str, int] = field(default_factory=dict)
    writes: Mapping[str, int] = field(default_factory=dict)
    failovers: int = 0
    fenced_events: int = 0
    fallbacks: Mapping[str, int] = field(default_factory=dict)


@dataclass
class FakeCluster:
    """Status rows and counters as a Cluster reports them; mutable between scrapes."""

    nodes: list[NodeStatus]
    counts: FakeCounters = field(default_factory=FakeCounters)

    def status(self) -> list[NodeStatus]:
        return list(self.nodes)

    def counters(self) -> FakeCounters:
        return self.counts


def node(name: str, role: str, **kw: Any) -> NodeStatus:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 5432,
        "healthy": True,
        "lag_seconds": None,
        "lag_bytes": None,
        "replay_lsn": None,
        "latency_ms": 1.0,
        "last_error": None,
        "timeline": 1,
    }
    values.update(kw)
    return NodeStatus(name=name, role=role, **values)


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition text, keyed by (name, labels)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry).get((name, frozenset(labels.items())))


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    replica = node("r", "replica", lag_seconds=0.0, lag_bytes=0)
    metrics.register(FakeCluster([node("p", "primary"), replica]), registry)
    return {name for name, _ in samples(registry)}


# -- the collector on hand-made rows -------------------------------------------------------


def test_exposition_names_labels_and_values() -> None:
    cluster = FakeCluster(
        [
            node("primary", "primary", latency_ms=2.0, timeline=3),
            node("replica1", "replica", lag_seconds=1.5, lag_bytes=4096),
            node("replica2", "replica", healthy=False, last_error="connection refused"),
            node("old", "primary", fenced=True, timeline=2),
        ],
        FakeCounters(
            reads={"replica1": 7, "primary": 2},
            writes={"primary": 5},
            failovers=1,
            fenced_events=1,
            fallbacks={"lag": 2},
        ),
    )
    registry = CollectorRegistry()
    metrics.register(cluster, registry)
    got = samples(registry)

    assert {name for name, _ in got} >= SEED_METRICS
    assert value(registry, "db_replication_lag_seconds", replica="replica1") == 1.5
    assert value(registry, "db_replication_lag_bytes", replica="replica1") == 4096
    # unknown lag is left out rather than reported as 0 (0 would read "caught up")
    assert value(registry, "db_replication_lag_seconds", replica="replica2") is None
    assert value(registry, "db_replication_lag_seconds", replica="primary") is None
    assert value(registry, "db_node_healthy", node="replica2") == 0
    assert value(registry, "db_node_healthy", node="replica1") == 1
    assert value(registry, "db_node_role", node="primary", role="primary") == 1
    assert value(registry, "db_node_role", node="primary", role="replica") == 0
    assert value(registry, "db_node_role", node="replica1", role="replica") == 1
    assert value(registry, "db_node_fenced", node="old") == 1
    assert value(registry, "db_node_fenced", node="primary") == 0
    assert value(registry, "db_node_timeline", node="primary") == 3
    assert value(registry, "db_node_probe_latency_seconds", node="primary") == 0.002
    assert value(registry, "db_replicas_healthy") == 1  # replica2 is down
    assert value(registry, "db_read_route_total", target="replica1") == 7
    assert value(registry, "db_read_route_total", target="primary") == 2
    assert value(registry, "db_read_route_total", target="replica2") == 0  # series from the start
    assert value(registry, "db_write_route_total", target="primary") == 5
    assert value(registry, "db_failover_total") == 1
    assert value(registry, "db_fenced_total") == 1
    assert value(registry, "db_consistency_fallback_total", reason="lag") == 2
    assert value(registry, "db_consistency_fallback_total", reason="token") == 0
    assert value(registry, "db_consistency_fallback_total", reason="none_healthy") == 0


def test_values_are_read_at_scrape_time() -> None:
    cluster = FakeCluster([node("replica1", "replica", lag_seconds=0.0, lag_bytes=0)])
    registry = CollectorRegistry()
    metrics.register(cluster, registry)
    assert value(registry, "db_replication_lag_seconds", replica="replica1") == 0
    cluster.nodes = [node("replica1", "replica", lag_seconds=9.0, lag_bytes=10)]
    cluster.counts = FakeCounters(reads={"replica1": 3}, failovers=2)
    assert value(registry, "db_replication_lag_seconds", replica="replica1") == 9
    assert value(registry, "db_read_route_total", target="replica1") == 3
    assert value(registry, "db_failover_total") == 2


def test_one_cluster_per_registry_and_unregister() -> None:
    registry = CollectorRegistry()
    cluster = FakeCluster([node("primary", "primary")])
    collector = metrics.register(cluster, registry)
    with pytest.raises(ValueError, match="Duplicated"):
        metrics.register(cluster, registry)
    metrics.unregister(collector, registry)
    assert generate_latest(registry) == b""
    metrics.register(cluster, registry)  # free again
    assert value(registry, "db_node_healthy", node="primary") == 1


def test_default_registry_is_prometheus_clients_global_one() -> None:
    from prometheus_client import REGISTRY

    collector = metrics.register(FakeCluster([node("only-here", "primary")]))
    try:
        assert 'db_node_healthy{node="only-here"} 1.0' in generate_latest(REGISTRY).decode()
    finally:
        metrics.unregister(collector)
    assert "only-here" not in generate_latest(REGISTRY).decode()


def test_serve_binds_loopback_and_stops() -> None:
    cluster = FakeCluster([node("replica1", "replica", lag_seconds=0.25)])
    with metrics.serve(cluster, port=0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
        assert 'db_replication_lag_seconds{replica="replica1"} 0.25' in body
        url = server.url
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_mount_into_an_asgi_app() -> None:
    import asyncio

    import httpx
    from fastapi import FastAPI
    from prometheus_client import make_asgi_app

    registry = CollectorRegistry()
    metrics.register(FakeCluster([node("primary", "primary")], FakeCounters(failovers=4)), registry)
    app = FastAPI()
    app.mount("/metrics", make_asgi_app(registry=registry))

    async def scrape() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get("/metrics/")

    response = asyncio.run(scrape())
    assert response.status_code == 200
    assert "db_failover_total 4.0" in response.text


def test_clear_error_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails like a missing one
    with pytest.raises(ImportError, match=r"pip install 'replica-router\[prometheus\]'"):
        metrics.register(FakeCluster([]))


# -- examples/monitoring ------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_METRIC_NAME = re.compile(r"\bdb_[a-z_]+")


def load_rules() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load((EXAMPLES / "alerts.yml").read_text())
    assert set(document) == {"groups"}
    rules: dict[str, dict[str, Any]] = {}
    for group in document["groups"]:
        assert isinstance(group["name"], str) and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] not in rules, f"duplicate alert {rule['alert']}"
            assert isinstance(rule["expr"], str)
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            rules[rule["alert"]] = rule
    return rules


def test_alert_rules_cover_the_three_seed_alerts() -> None:
    rules = load_rules()
    assert set(rules) == {"ReplicaLagHigh", "AllReplicasUnhealthy", "DatabaseFailover"}
    lag = rules["ReplicaLagHigh"]["expr"]
    assert "db_replication_lag_seconds" in lag and re.search(r">\s*5\b", lag)
    assert "by (replica)" in lag  # one alert per replica, whatever the number of app processes
    assert "db_replicas_healthy" in rules["AllReplicasUnhealthy"]["expr"]
    assert re.search(r"==\s*0\b", rules["AllReplicasUnhealthy"]["expr"])
    assert "increase(db_failover_total[" in rules["DatabaseFailover"]["expr"]
    assert "for" not in rules["DatabaseFailover"]  # a failover alerts at once


def test_alert_rules_and_their_unit_tests_use_only_exported_metrics() -> None:
    exported = exported_names()
    rules = load_rules()
    used = {m for rule in rules.values() for m in _METRIC_NAME.findall(rule["expr"])}
    described = {
        m for rule in rules.values() for m in _METRIC_NAME.findall(str(rule["annotations"]))
    }
    assert used and used <= exported, used - exported
    assert described <= exported, described - exported

    tests = yaml.safe_load((EXAMPLES / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    assert tested == set(rules)
    series = {
        _METRIC_NAME.match(s["series"]).group(0)  # type: ignore[union-attr]
        for t in tests["tests"]
        for s in t["input_series"]
    }
    assert series <= exported, series - exported


def test_grafana_dashboard_panels_query_our_metrics() -> None:
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exported = exported_names()
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    queries: dict[str, list[str]] = {}
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["datasource"]["uid"] == "${datasource}"
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            names = set(_METRIC_NAME.findall(expr))
            assert names and names <= exported, (panel["title"], names - exported)
        queries[panel["title"]] = exprs
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"

    def panel_with(metric: str, by: str) -> dict[str, Any]:
        found = [
            p
            for p in panels
            if any(metric in t["expr"] and f"by ({by})" in t["expr"] for t in p["targets"])
        ]
        assert found, f"no panel shows {metric} by {by}"
        return found[0]

    lag = panel_with("db_replication_lag_seconds", "replica")
    assert lag["type"] == "timeseries" and lag["fieldConfig"]["defaults"]["unit"] == "s"
    assert lag["targets"][0]["legendFormat"] == "{{replica}}"
    split = panel_with("rate(db_read_route_total", "target")
    assert split["type"] == "timeseries"
    health = panel_with("db_node_healthy", "node")
    assert health["type"] in {"state-timeline", "status-history", "stat", "timeseries"}


# -- a real cluster -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.destructive
def test_metrics_follow_a_scripted_scenario(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    registry = CollectorRegistry()
    nodes = {name: lc.dsn(name) for name in lc.node_names}
    with Cluster(nodes=nodes, monitor_interval=0.2) as cluster:
        collector = metrics.register(cluster, registry)

        def metric(name: str, **labels: str) -> float | None:
            return value(registry, name, **labels)

        # all up, caught up
        lc.wait_replicated()
        for name in lc.node_names:
            assert metric("db_node_healthy", node=name) == 1
        assert metric("db_node_role", node="primary", role="primary") == 1
        assert metric("db_node_role", node="replica1", role="replica") == 1
        assert metric("db_replicas_healthy") == 2
        wait_until(
            lambda: metric("db_replication_lag_bytes", replica="replica1") == 0, 10, "no lag"
        )
        assert metric("db_replication_lag_seconds", replica="replica1") == 0
        assert metric("db_failover_total") == 0

        # routes are counted per target
        for _ in range(4):
            with cluster.read() as conn:
                conn.execute("SELECT 1")
        with cluster.write() as conn:
            conn.execute("CREATE TABLE metrics_probe (x int)")
        assert metric("db_read_route_total", target="replica1") == 2
        assert metric("db_read_route_total", target="replica2") == 2
        assert metric("db_read_route_total", target="primary") == 0
        assert metric("db_write_route_total", target="primary") == 1

        # replay paused on replica1: its lag shows in bytes and seconds
        lc.pause_replay("replica1")
        with cluster.write() as conn:
            conn.execute("INSERT INTO metrics_probe SELECT generate_series(1, 1000)")
        wait_until(
            lambda: (
                (metric("db_replication_lag_bytes", replica="replica1") or 0) > 0
                and (metric("db_replication_lag_seconds", replica="replica1") or 0) > 0
            ),
            10,
            "replica1's lag gauges to rise",
        )
        assert metric("db_node_healthy", node="replica1") == 1  # lagging is not unhealthy

        # replica2 stopped: unhealthy; a read that no replica can serve is a "lag" fallback
        lc.stop("replica2", mode="immediate")
        wait_until(
            lambda: metric("db_node_healthy", node="replica2") == 0, 10, "replica2 unhealthy"
        )
        assert metric("db_replicas_healthy") == 1
        with cluster.read(max_lag_bytes=0) as conn:
            conn.execute("SELECT 1")
        assert metric("db_consistency_fallback_total", reason="lag") == 1
        assert metric("db_read_route_total", target="primary") == 1

        lc.resume_replay("replica1")
        lc.start("replica2")
        wait_until(lambda: metric("db_replicas_healthy") == 2, 15, "both replicas healthy again")

        # promotion with the old primary still running: failover, and the old one fenced
        lc.promote("replica1")
        wait_until(lambda: metric("db_failover_total") == 1, 15, "the failover to be counted")
        assert metric("db_node_role", node="replica1", role="primary") == 1
        wait_until(
            lambda: metric("db_node_fenced", node="primary") == 1, 10, "the old primary fenced"
        )
        assert metric("db_fenced_total") == 1
        assert metric("db_node_timeline", node="replica1") == 2

        text = generate_latest(registry).decode()
        assert "postgresql://" not in text and "127.0.0.1" not in text  # names, never DSNs
        metrics.unregister(collector, registry)
