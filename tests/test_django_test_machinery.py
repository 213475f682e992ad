"""Django's own test machinery with the router, each run in a subprocess as users run
it: ``manage.py test`` (TestCase, TransactionTestCase) and pytest-django, with the
replicas as ``TEST: {"MIRROR": "default"}``.

Two shapes of replica: aliases on the primary's own server (a laptop's one
PostgreSQL) and aliases on the real streaming replicas (the test database the
runner creates on the primary replicates to them).
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

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def _env(lc: LocalCluster, *, on_replicas: bool) -> dict[str, str]:
    databases = database_settings(lc, name="rr_machinery")
    for alias in ("replica1", "replica2"):
        databases[alias]["TEST"] = {"MIRROR": "default"}
        if not on_replicas:
            databases[alias].update(HOST=databases["default"]["HOST"],
                                    PORT=databases["default"]["PORT"])  # fmt: skip
    return {
        **os.environ,
        "RR_DJANGO_DATABASES": json.dumps(databases),
        "DJANGO_SETTINGS_MODULE": "rr_django_settings",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC)]),
    }


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("on_replicas", [False, True], ids=["same-server", "streaming-replicas"])
def test_testcase_and_transactiontestcase_under_djangos_runner(
    replica_cluster: LocalCluster, on_replicas: bool
) -> None:
    result = _run(
        ["-m", "django", "test", "rr_django_app.machinery_cases", "-v", "2", "--noinput"],
        _env(replica_cluster, on_replicas=on_replicas),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Ran 5 tests" in result.stderr
    assert "\nOK\n" in result.stderr, result.stderr[-4000:]


@pytest.mark.slow
def test_the_pytest_django_recipe(replica_cluster: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this suite's settings
    result = _run(
        ["-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
         "-c", str(tmp_path / "pytest.ini"), str(TESTS / "rr_django_app" / "recipe_cases.py")],
        _env(replica_cluster, on_replicas=True),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout
