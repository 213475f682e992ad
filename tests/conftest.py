"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from replica_router import consistency
from replica_router.sandbox import LocalCluster

# The Django tests' fixtures (Django is configured only when one of them runs).
pytest_plugins = ["django_support"]


@pytest.fixture(autouse=True)
def _independent_consistency_scope(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test is its own unit of work, as each web request is, in a process of its own.

    Code outside every session (a thread the test starts, a fresh context) shares
    the process-wide root scope, which would otherwise keep every test's writes:
    a write in one test would make a later test's reads wait for it, and a test
    could pass or fail by order. So each test gets an empty root, and its body
    runs in a scope of its own.
    """
    monkeypatch.setattr(consistency, "_ROOT", consistency.Scope())
    with consistency.session(inherit=False):
        yield


@pytest.fixture
def paused(replica_cluster: LocalCluster) -> Iterator[Callable[[str], None]]:
    """Pause replay on replicas for one test; always resumed afterwards."""
    done: list[str] = []

    def pause(name: str) -> None:
        replica_cluster.pause_replay(name)
        done.append(name)

    yield pause
    for name in done:
        replica_cluster.resume_replay(name)
    replica_cluster.wait_replicated()


@pytest.fixture
def frozen(fresh_replica_cluster: LocalCluster) -> Iterator[Callable[[str], None]]:
    """Hang nodes of this test's own sandbox with SIGSTOP; always resumed afterwards."""
    lc = fresh_replica_cluster
    done: list[str] = []

    def freeze(name: str) -> None:
        lc.freeze(name)
        done.append(name)

    yield freeze
    for name in done:
        lc.thaw(name)
