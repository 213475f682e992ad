"""A DSN's password appears in no log record, repr, exception, status output or metric.

A scripted scenario runs on a sandbox whose ``postgres`` user has a password
(lagging replica, a stopped node, wrong and malformed DSNs, no primary, a
promotion with the old primary fenced) while every log record of every logger is
captured at DEBUG. Everything a user or an operator could see is collected, and
the password is searched for in all of it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from helpers import wait_until
from replica_router import metrics
from replica_router.cluster import Cluster
from replica_router.dashboard import status_payload
from replica_router.errors import ConfigurationError, Error, PrimaryUnavailable
from replica_router.events import Event
from replica_router.sandbox import LocalCluster

PASSWORD = "Pw-9vX2kQ7z-hunter2"  # needs no URL quoting: the raw form is what would leak
WRONG_PASSWORD = "Wr0ng-Pw-5tK8mD"


class Everything(logging.Handler):
    """Every record, formatted with its traceback, plus its raw attributes."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.texts: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.format(record))
        self.texts.append(repr(record.__dict__))


@pytest.fixture
def all_logs() -> Iterator[Everything]:
    handler = Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    ours = logging.getLogger("replica_router")
    old_ours = ours.level
    ours.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        ours.setLevel(old_ours)


def exception_text(exc: BaseException) -> str:
    """What a user could see of an exception: str, repr and the whole chained traceback."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def cli(*args: str) -> str:
    entry = "import sys; from replica_router.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", entry, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.mark.slow
@pytest.mark.destructive
def test_password_never_leaks(
    make_replica_cluster: Callable[..., LocalCluster],
    all_logs: Everything,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    lc = make_replica_cluster(replicas=2, password=PASSWORD)
    assert PASSWORD in lc.dsn("primary")  # the DSNs we hand out do carry it
    seen: list[str] = []  # everything shown to a user, besides log records
    events: list[Event] = []
    nodes = {name: lc.dsn(name) for name in lc.node_names}

    def snapshot(cluster: Cluster, registry: CollectorRegistry, *, commands: bool = False) -> None:
        seen.append(repr(cluster))
        seen.append(repr(cluster.topology))
        seen.append(repr(cluster.status()))
        seen.extend(json.dumps(row.as_dict()) for row in cluster.status())
        seen.append(repr(cluster.counters()))
        seen.append(json.dumps(status_payload(cluster)))
        seen.append(generate_latest(registry).decode())
        if commands:  # each CLI run costs a Python start-up: only at the interesting moments
            seen.append(cli("sandbox", "status", "--json", "--dir", str(lc.directory)))
            status_json = cli("status", "--json", *nodes.values())
            assert f"127.0.0.1:{lc.port('replica2')}" in status_json  # it did report the nodes
            seen.append(status_json)
            seen.append(cli("status", *nodes.values()))  # the human table too

    # -- bad configuration: malformed DSNs, in URL and key=value forms
    for bad in (
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/postgres",
        f"host=127.0.0.1 port=99999 user=postgres password={PASSWORD}",
        f"host=127.0.0.1 password='{PASSWORD}' port=5432 nonsense=1",
        f"postgresql://postgres:{PASSWORD}@h1:1,h2:2/postgres",
    ):
        with pytest.raises(ConfigurationError) as raised:
            Cluster(primary=bad, replicas=[])
        seen.append(exception_text(raised.value))
        assert "***" in str(raised.value) or "port" in str(raised.value)
    with pytest.raises(ConfigurationError) as raised:  # a typo in a replica's DSN
        Cluster(primary=lc.dsn("primary"), replicas=[f"host=127.0.0.1 password='{PASSWORD}"])
    seen.append(exception_text(raised.value))
    assert "replicas[0]" in str(raised.value)

    # -- a wrong password: authentication fails, and is reported without it
    wrong = lc.dsn("replica2").replace(PASSWORD, WRONG_PASSWORD)
    with Cluster(primary=lc.dsn("primary"), replicas=[wrong], monitor_interval=0.2) as cluster:
        wait_until(lambda: cluster.status()[1].last_error is not None, 10, "the auth failure")
        assert "password authentication failed" in str(cluster.status()[1].last_error)
        seen.append(repr(cluster.status()))
        seen.append(repr(cluster.check_connections()))

    registry = CollectorRegistry()
    with Cluster(nodes=nodes, monitor_interval=0.2, write_timeout=None) as cluster:
        metrics.register(cluster, registry)
        cluster.events.subscribe(events.append)
        with cluster.write() as conn:
            conn.execute("CREATE TABLE redaction_probe (x int)")
        with cluster.read() as conn:
            conn.execute("SELECT count(*) FROM pg_class")
        snapshot(cluster, registry)

        # a lagging replica
        lc.pause_replay("replica1")
        with cluster.write() as conn:
            conn.execute("INSERT INTO redaction_probe SELECT generate_series(1, 100)")
        wait_until(lambda: (cluster.status()[1].lag_bytes or 0) > 0, 10, "replica1's lag")
        snapshot(cluster, registry)
        lc.resume_replay("replica1")

        # a stopped node: connection refused, in status, checks and a direct checkout
        lc.stop("replica2", mode="immediate")
        wait_until(lambda: not cluster.status()[2].healthy, 10, "replica2 unhealthy")
        seen.append(repr(cluster.check_connections()))
        try:
            with psycopg.connect(lc.dsn("replica2"), connect_timeout=2):
                pass
        except psycopg.OperationalError as exc:
            seen.append(exception_text(exc))  # psycopg's own message: no password either
        else:
            pytest.fail("connected to a stopped node")
        snapshot(cluster, registry, commands=True)
        assert cluster.status()[2].last_error

        # no primary: writes fail fast with PrimaryUnavailable
        lc.stop("primary", mode="immediate")
        wait_until(lambda: not cluster.status()[0].healthy, 10, "the primary unhealthy")
        with pytest.raises(PrimaryUnavailable) as no_primary, cluster.write() as conn:
            conn.execute("INSERT INTO redaction_probe VALUES (1)")
        seen.append(exception_text(no_primary.value))
        snapshot(cluster, registry)

        # promotion, then the old primary comes back on the old timeline: fenced
        lc.start("replica2")
        lc.promote("replica1")
        wait_until(lambda: cluster.topology.primary == "replica1", 15, "the failover")
        lc.start("primary")
        wait_until(lambda: cluster.status()[0].fenced, 15, "the old primary fenced")
        try:
            with cluster.write() as conn:
                conn.execute("INSERT INTO redaction_probe VALUES (2)")
        except Error as exc:  # a write right after failover may still find no usable primary
            seen.append(exception_text(exc))
        snapshot(cluster, registry, commands=True)
        exposition = generate_latest(registry).decode()

    seen.extend(repr(event) for event in events)
    seen.append(repr(lc))
    seen.extend(caplog.text.splitlines())

    # the scenario really produced what we search through
    logged = "\n".join(all_logs.texts)
    assert len(all_logs.records) > 20
    assert any(r.levelno >= logging.WARNING for r in all_logs.records)
    assert "failover" in logged and "fenced" in logged
    assert (
        "db_failover_total 1.0" in exposition and 'db_node_fenced{node="primary"} 1.0' in exposition
    )
    assert any(type(e).__name__ == "FailoverDetected" for e in events)

    for secret in (PASSWORD, WRONG_PASSWORD):
        leaks = [text for text in [*all_logs.texts, *seen] if secret in text]
        assert not leaks, f"{len(leaks)} texts show the password, e.g.: {leaks[0][:500]}"
