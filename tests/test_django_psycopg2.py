"""The Django integration under Django's psycopg2 backend (issue 14, point 6).

Django's backend takes psycopg 3 whenever it imports, so the scenario runs in a
process of its own where psycopg is hidden from Django's backend
(``rr_django_app/psycopg2_scenario.py``); it reports which alias served what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from django_support import database_settings
from replica_router.sandbox import LocalCluster

pytest.importorskip("django")
pytest.importorskip("psycopg2")

SCENARIO = Path(__file__).resolve().parent / "rr_django_app" / "psycopg2_scenario.py"
DB_NAME = "rr_django_pg2"
REPLICAS = {"replica1", "replica2"}


@pytest.fixture(scope="module")
def outcome(replica_cluster: LocalCluster) -> dict[str, object]:
    lc = replica_cluster
    lc.execute(lc.primary_name, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    lc.execute(lc.primary_name, f"CREATE DATABASE {DB_NAME}")
    env = dict(os.environ, RR_DATABASES=json.dumps(database_settings(lc, DB_NAME)))
    try:
        done = subprocess.run(
            [sys.executable, str(SCENARIO)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        lc.execute(lc.primary_name, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_django_runs_on_psycopg2(outcome: dict[str, object]) -> None:
    assert outcome["driver"] == "psycopg2"
    assert set(outcome["driver_of"].values()) == {"psycopg2"}  # type: ignore[attr-defined]


def test_reads_go_to_a_replica(outcome: dict[str, object]) -> None:
    assert outcome["reads"] and set(outcome["reads"]) <= REPLICAS  # type: ignore[arg-type]


def test_a_request_reads_its_own_write_from_the_primary(outcome: dict[str, object]) -> None:
    assert outcome["request"] == {"titles": ["first", "second"], "count": 2}
    assert outcome["request_reads"] == ["default"]


def test_the_token_advances_on_commit(outcome: dict[str, object]) -> None:
    assert outcome["token_advanced"] is True


def test_a_raw_update_never_runs_on_a_replica(outcome: dict[str, object]) -> None:
    assert outcome["raw_update_routed_to"] == ["default"]
    assert outcome["raw_update_ids"] == [outcome["raw_update_post_id"]]
    assert outcome["title_on_primary"] == "updated"
    # Replay is paused: the replicas have not even seen the row.
    assert outcome["on_replicas"] == {"replica1": None, "replica2": None}
