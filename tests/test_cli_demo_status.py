"""The ``demo`` and ``status`` commands, run as a user runs them (the console script)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replica_router.sandbox import LocalCluster

SCRIPT = str(Path(sys.executable).with_name("replica-router"))


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def url_for(lc: LocalCluster, *names: str, password: str | None = None) -> str:
    hosts = ",".join(f"127.0.0.1:{lc.port(n)}" for n in names)
    auth = "postgres" if password is None else f"postgres:{password}"
    return f"postgresql://{auth}@{hosts}/postgres"


@pytest.mark.slow
def test_demo_runs_its_script_with_no_failed_or_stale_operation() -> None:
    """Run as in CI: stdout is a pipe, not a terminal."""
    result = run("demo", "--duration", "8", timeout=150)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for step in (
        "replica1: replay paused",
        "skipped for reads",
        "replica1: caught up -> re-admitted",
        "replica2: unhealthy -> reads go to replica1",
        "replica2: healthy -> re-admitted",
    ):
        assert step in out, out
    assert "failed operations 0" in out and "stale reads 0" in out, out
    share = re.search(r"\((\d+)% served by replicas\)", out)
    assert share is not None and int(share.group(1)) >= 30, out
    summary = out[out.index("summary") :]
    counts = dict(re.findall(r"(primary|replica1|replica2)\s*│\s*([\d,]+)", summary))
    assert set(counts) == {"primary", "replica1", "replica2"}, summary
    assert int(counts["replica2"].replace(",", "")) > 0  # served reads before and after its stop


def test_demo_rejects_a_bad_duration() -> None:
    result = run("demo", "--duration", "2")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "8 to 600" in result.stderr


def test_status_json_measures_roles_whatever_the_order(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    url = url_for(lc, "replica2", "primary", "replica1", password="not-shown-anywhere")
    result = run("status", url, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows[f"127.0.0.1:{lc.port('primary')}"]["role"] == "primary"
    assert rows[f"127.0.0.1:{lc.port('replica1')}"]["role"] == "replica"
    assert all(row["healthy"] for row in rows.values())
    assert all(row["lag_bytes"] is not None for row in rows.values())
    assert "not-shown-anywhere" not in result.stdout + result.stderr


def test_status_shows_unreachable_nodes_and_fails_when_none_answers(
    replica_cluster: LocalCluster,
) -> None:
    dead = "postgresql://postgres:hunter2@127.0.0.1:1/postgres"
    mixed = run("status", replica_cluster.primary_dsn, dead, "--json")
    assert mixed.returncode == 0
    rows = {row["name"]: row for row in json.loads(mixed.stdout)}
    assert rows["127.0.0.1:1"]["healthy"] is False
    assert "refused" in rows["127.0.0.1:1"]["last_error"]
    only_dead = run("status", dead)
    assert only_dead.returncode == 1
    assert "127.0.0.1:1" in only_dead.stdout
    assert "hunter2" not in mixed.stdout + only_dead.stdout + mixed.stderr + only_dead.stderr


def test_status_table_and_bad_arguments(replica_cluster: LocalCluster) -> None:
    table = run("status", replica_cluster.primary_dsn)
    assert table.returncode == 0
    assert "primary" in table.stdout and "yes" in table.stdout
    bad = run("status", "postgresql://u:pw@h:notaport/db")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "DSN 1" in bad.stderr and "pw@" not in bad.stderr
    missing = run("status")
    assert missing.returncode == 2


def test_status_watch_refreshes_until_interrupted(replica_cluster: LocalCluster) -> None:
    proc = subprocess.Popen(
        [SCRIPT, "status", replica_cluster.primary_dsn, "--watch", "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert all(json.loads(line)[0]["role"] == "primary" for line in lines)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)
