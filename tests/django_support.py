"""Django set-up the Django integration tests share: settings for a sandbox, the
test database, and a recorder of where each statement ran.

Django's settings are configured once per process (``settings.configure``), the
first time a Django test runs, with aliases ``default`` / ``replica1`` /
``replica2`` on the sandbox's nodes and a database of their own (``rr_django``),
dropped at the end. Destructive tests point the same aliases at their own
sandbox for a while (:func:`pointed_at`). Nothing is configured when no Django
test is selected, so the rest of the suite runs without Django loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from replica_router.sandbox import LocalCluster

DB_NAME = "rr_django"
ALIASES = ("default", "replica1", "replica2")
MIDDLEWARE = [
    "replica_router.integrations.django.ConsistencyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROUTER_SETTING = {
    "PRIMARY": "default",
    "REPLICAS": ["replica1", "replica2"],
    # No lag bound: a paused replica stays eligible, so only the token keeps a read off it.
    "OPTIONS": {"max_lag": None, "monitor_interval": 0.1},
}


def database_settings(lc: LocalCluster, name: str = DB_NAME) -> dict[str, dict[str, Any]]:
    """DATABASES for a sandbox: the primary as ``default``, its replicas after it."""
    nodes = [lc.primary_name, *lc.replica_names]
    databases = {}
    for alias, node in zip(ALIASES, nodes, strict=True):
        params = conninfo_to_dict(lc.dsn(node))
        databases[alias] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": params.get("user", "postgres"),
            "PASSWORD": params.get("password", ""),
            "HOST": params["host"],
            "PORT": str(params["port"]),
        }
    return databases


def django_settings(databases: dict[str, Any]) -> dict[str, Any]:
    """The test project's settings for ``databases`` (the shared sandbox's, or a
    scenario process's own)."""
    return {
        "DEBUG": False,
        "SECRET_KEY": "replica-router-tests",
        "ALLOWED_HOSTS": ["*"],
        "USE_TZ": True,
        "DEFAULT_AUTO_FIELD": "django.db.models.AutoField",
        "INSTALLED_APPS": [
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            "rr_django_app",
        ],
        "ROOT_URLCONF": "rr_django_app.urls",
        "MIDDLEWARE": MIDDLEWARE,
        "DATABASES": databases,
        "DATABASE_ROUTERS": ["replica_router.integrations.django.ReplicaRouter"],
        "REPLICA_ROUTER": ROUTER_SETTING,
        "PASSWORD_HASHERS": ["django.contrib.auth.hashers.MD5PasswordHasher"],
    }


def configure(lc: LocalCluster) -> None:
    """Configure Django for the shared sandbox (once per process)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(**django_settings(database_settings(lc)))
    django.setup()


def create_database(lc: LocalCluster) -> None:
    """The test database on the sandbox's primary, migrated, and replicated."""
    from django.core.management import call_command

    lc.execute(lc.primary_name, f"DROP DATABASE IF EXISTS {DB_NAME}")
    lc.execute(lc.primary_name, f"CREATE DATABASE {DB_NAME}")
    call_command("migrate", run_syncdb=True, verbosity=0, database="default")
    lc.wait_replicated()


def drop_database(lc: LocalCluster) -> None:
    from django.db import connections

    from replica_router.integrations import django as integration

    connections.close_all()
    integration._close()
    lc.execute(lc.primary_name, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


@contextmanager
def pointed_at(lc: LocalCluster) -> Iterator[None]:
    """The aliases on another sandbox for the block (its own test database)."""
    from django.db import connections

    from replica_router.integrations import django as integration

    saved = {alias: dict(connections.settings[alias]) for alias in ALIASES}
    connections.close_all()
    integration._close()
    for alias, values in database_settings(lc).items():
        connections.settings[alias].update(values)
    try:
        create_database(lc)
        yield
    finally:
        connections.close_all()
        integration._close()
        for alias in ALIASES:
            connections.settings[alias].update(saved[alias])


@contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """``(alias, sql)`` of every statement that runs on this thread's connections."""
    from django.db import connections

    ran: list[tuple[str, str]] = []

    def recorder(alias: str) -> Callable[..., Any]:
        def record(execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any) -> Any:
            ran.append((alias, sql))
            return execute(sql, params, many, ctx)

        return record

    with ExitStack() as stack:
        for alias in ALIASES:
            stack.enter_context(connections[alias].execute_wrapper(recorder(alias)))
        yield ran


def aliases_for(ran: list[tuple[str, str]], fragment: str) -> set[str]:
    """The aliases on which a statement containing ``fragment`` ran."""
    return {alias for alias, sql in ran if fragment in sql}


@pytest.fixture(scope="session")
def rr_django(replica_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """Django configured on the shared sandbox, with its test database."""
    configure(replica_cluster)
    create_database(replica_cluster)
    try:
        yield replica_cluster
    finally:
        drop_database(replica_cluster)


@pytest.fixture
def django_env(rr_django: LocalCluster) -> Iterator[LocalCluster]:
    """Per test: Django's connections and the integration's cluster are closed
    afterwards (a test's state does not reach the next, and no monitor of ours is
    left connected to the shared sandbox for the other tests to count)."""
    from django.db import connections

    from replica_router.integrations import django as integration

    yield rr_django
    connections.close_all()
    integration._close()
