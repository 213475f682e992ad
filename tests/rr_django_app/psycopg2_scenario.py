"""The Django integration under Django's psycopg2 backend, run in a process of its own.

Django's postgresql backend takes psycopg 3 whenever it imports, and replica_router's
own cluster needs psycopg 3: so replica_router is imported first, then psycopg is
hidden (a meta-path blocker, its modules out of ``sys.modules``) while Django's
backend modules import, and put back before anything connects.

Usage: ``python psycopg2_scenario.py`` with ``RR_DATABASES`` (the DATABASES setting,
JSON) in the environment; prints one JSON object: what ran where.
"""

from __future__ import annotations

import importlib
import importlib.abc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

import replica_router.integrations.django  # noqa: F401  (psycopg 3, before the blocker)

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))


class _NoPsycopg3(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError(f"{name} hidden: Django must take psycopg2")
        return None


def _django_on_psycopg2() -> None:
    hidden = {n: m for n, m in sys.modules.items() if n == "psycopg" or n.startswith("psycopg.")}
    for name in hidden:
        del sys.modules[name]
    blocker = _NoPsycopg3()
    sys.meta_path.insert(0, blocker)
    try:
        importlib.import_module("django.db.backends.postgresql.base")
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)


def _replicated(databases: dict[str, dict[str, Any]]) -> None:
    """Every replica has replayed what the primary has written so far."""

    def conninfo(alias: str) -> str:
        s = databases[alias]
        return psycopg.conninfo.make_conninfo(
            host=s["HOST"],
            port=s["PORT"],
            user=s["USER"],
            password=s["PASSWORD"],
            dbname="postgres",
        )

    with psycopg.connect(conninfo("default"), autocommit=True) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
    for alias in ("replica1", "replica2"):
        with psycopg.connect(conninfo(alias), autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while not conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
            ).fetchone()[0]:  # type: ignore[index]
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{alias} did not replay to {target}")
                time.sleep(0.05)


def _set_replay(databases: dict[str, dict[str, Any]], paused: bool) -> None:
    call = "pg_wal_replay_pause" if paused else "pg_wal_replay_resume"
    for alias in ("replica1", "replica2"):
        s = databases[alias]
        info = psycopg.conninfo.make_conninfo(
            host=s["HOST"],
            port=s["PORT"],
            user=s["USER"],
            password=s["PASSWORD"],
            dbname="postgres",
        )
        with psycopg.connect(info, autocommit=True) as conn:
            conn.execute(f"SELECT {call}()")
            while (
                paused
                and conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[  # type: ignore[index]
                    0
                ]
                != "paused"
            ):
                time.sleep(0.02)


def main() -> None:
    databases = json.loads(os.environ["RR_DATABASES"])
    _django_on_psycopg2()

    import django
    from django.conf import settings

    from django_support import django_settings

    settings.configure(**django_settings(databases))
    django.setup()

    from django.core.management import call_command
    from django.db import connection, connections
    from django.test import Client

    from django_support import recording
    from replica_router.integrations.django import get_cluster
    from rr_django_app.models import Post

    out: dict[str, Any] = {"driver": connection.Database.__name__}
    call_command("migrate", run_syncdb=True, verbosity=0, database="default")
    Post.objects.create(title="seed")
    _replicated(databases)
    cluster = get_cluster()
    deadline = time.monotonic() + 30
    while cluster.route_read() not in ("replica1", "replica2"):  # the monitor saw them catch up
        if time.monotonic() > deadline:
            raise RuntimeError("no replica past the token")
        time.sleep(0.05)
    _set_replay(databases, paused=True)
    try:
        out["driver_of"] = {a: connections[a].Database.__name__ for a in databases}
        with recording() as ran:
            list(Post.objects.all())
            list(Post.objects.all())
        out["reads"] = sorted({alias for alias, sql in ran if "rr_django_app_post" in sql})

        client = Client()
        with recording() as ran:
            body = client.get("/write-then-read").json()
        out["request"] = body
        out["request_reads"] = sorted(
            {
                alias
                for alias, sql in ran
                if "rr_django_app_post" in sql and sql.startswith("SELECT")
            }
        )

        before = cluster.token
        post = Post.objects.create(title="before-update")
        after = cluster.token
        out["token_advanced"] = after is not None and (before is None or after.lsn > before.lsn)
        with recording() as ran:
            hits = list(
                Post.objects.raw(
                    "UPDATE rr_django_app_post SET title = 'updated' WHERE id = %s RETURNING id",
                    [post.pk],
                )
            )
        out["raw_update_routed_to"] = sorted({alias for alias, _ in ran})
        out["raw_update_ids"] = [p.pk for p in hits]
        out["raw_update_post_id"] = post.pk
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT title FROM rr_django_app_post WHERE id = %s", [post.pk])
            out["title_on_primary"] = cursor.fetchone()[0]
        out["on_replicas"] = {}
        for alias in ("replica1", "replica2"):
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT title FROM rr_django_app_post WHERE id = %s", [post.pk])
                row = cursor.fetchone()
                out["on_replicas"][alias] = row[0] if row else None
    finally:
        _set_replay(databases, paused=False)
        connections.close_all()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
