"""The Django router on real servers: where the ORM's reads and writes run.

Each test records the alias every statement ran on (``recording()``); replay is
paused wherever a stale read would show.
"""

from __future__ import annotations

import os

import pytest

from django_support import aliases_for, recording
from helpers import replay_paused, wait_until
from replica_router.sandbox import LocalCluster

REPLICAS = {"replica1", "replica2"}


@pytest.fixture
def models(django_env: LocalCluster) -> object:
    from rr_django_app import models

    return models


def test_outside_a_transaction_reads_go_to_a_replica(models) -> None:
    with recording() as ran:
        list(models.Post.objects.all())
        list(models.Post.objects.all())
    assert aliases_for(ran, "rr_django_app_post") <= REPLICAS
    assert len(ran) == 2


def test_inside_atomic_create_then_get_runs_on_default(models, django_env: LocalCluster) -> None:
    from django.db import transaction

    with replay_paused(django_env), recording() as ran, transaction.atomic():
        post = models.Post.objects.create(title="atomic")
        assert models.Post.objects.get(pk=post.pk).title == "atomic"
    assert aliases_for(ran, "rr_django_app_post") == {"default"}


def test_a_write_outside_a_request_advances_the_token_at_commit(
    models, django_env: LocalCluster
) -> None:
    from replica_router.integrations.django import get_cluster

    cluster = get_cluster()
    with replay_paused(django_env):
        post = models.Post.objects.create(title="autocommit")
        token = cluster.token
        assert token is not None
        with recording() as ran:
            assert models.Post.objects.get(pk=post.pk).title == "autocommit"
        assert aliases_for(ran, "rr_django_app_post") == {"default"}
    django_env.wait_replicated()
    wait_until(lambda: cluster.route_read() in REPLICAS, what="a replica past the token")
    with recording() as ran:
        assert models.Post.objects.get(pk=post.pk).title == "autocommit"
    assert aliases_for(ran, "rr_django_app_post") <= REPLICAS


def test_an_atomic_block_advances_the_token_once_it_commits(
    models, django_env: LocalCluster
) -> None:
    from django.db import transaction

    from replica_router.integrations.django import get_cluster

    cluster = get_cluster()
    before = cluster.token
    with replay_paused(django_env):
        with transaction.atomic():
            models.Post.objects.create(title="one")
            models.Post.objects.create(title="two")
            assert cluster.token == before  # not committed yet: no position to wait for
        after = cluster.token
        assert after is not None and (before is None or after.lsn > before.lsn)


def test_a_rolled_back_block_leaves_the_token_alone(models) -> None:
    from django.db import transaction

    from replica_router.integrations.django import get_cluster

    cluster = get_cluster()
    before = cluster.token
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        models.Post.objects.create(title="lost")
        1 / 0  # noqa: B018
    assert cluster.token == before


def test_use_primary_sends_reads_to_default(models) -> None:
    from replica_router.integrations.django import use_primary

    with recording() as ran:
        with use_primary():
            list(models.Post.objects.all())
        list(models.Post.objects.all())
    posts = [alias for alias, sql in ran if "rr_django_app_post" in sql]
    assert posts[0] == "default"
    assert posts[1] in REPLICAS


def test_get_or_create_and_select_for_update_run_on_default(models) -> None:
    from django.db import transaction

    with recording() as ran:
        post, created = models.Post.objects.get_or_create(title="goc-unique-title")
        assert created
        again, created = models.Post.objects.get_or_create(title="goc-unique-title")
        assert not created and again.pk == post.pk
        with transaction.atomic():
            locked = models.Post.objects.select_for_update().get(pk=post.pk)
            assert locked.pk == post.pk
    assert aliases_for(ran, "rr_django_app_post") == {"default"}


def test_raw_update_returning_runs_on_default(models, django_env: LocalCluster) -> None:
    post = models.Post.objects.create(title="before")
    with replay_paused(django_env), recording() as ran:
        updated = list(
            models.Post.objects.raw(
                "UPDATE rr_django_app_post SET title = 'after' WHERE id = %s RETURNING id, title",
                [post.pk],
            )
        )
        assert [(p.pk, p.title) for p in updated] == [(post.pk, "after")]
        assert aliases_for(ran, "UPDATE rr_django_app_post") == {"default"}
        # The moved write counts as a write: the next read waits for it.
        assert models.Post.objects.get(pk=post.pk).title == "after"


def test_a_cursor_write_on_a_replica_alias_runs_on_default(
    models, django_env: LocalCluster
) -> None:
    from django.db import connections

    post = models.Post.objects.create(title="cursor")
    with recording() as ran, connections["replica1"].cursor() as cursor:
        cursor.execute("UPDATE rr_django_app_post SET title = %s WHERE id = %s", ["moved", post.pk])
        assert cursor.rowcount == 1
    assert aliases_for(ran, "UPDATE rr_django_app_post") == {"default"}
    assert models.Post.objects.get(pk=post.pk).title == "moved"


def test_a_write_the_classifier_misses_is_refused_by_the_replica_then_moved(
    models, django_env: LocalCluster
) -> None:
    """The read-only refusal is the backstop: here the classifier is told the
    function only reads, and the replica's refusal still sends it to default."""
    from django.db import connections

    from replica_router.integrations.django import get_cluster

    with connections["default"].cursor() as cursor:
        cursor.execute(
            "CREATE OR REPLACE FUNCTION rr_touch(i int) RETURNS int LANGUAGE sql AS "
            "$$ UPDATE rr_django_app_post SET title = 'touched' WHERE id = i RETURNING id $$"
        )
    post = models.Post.objects.create(title="untouched")
    django_env.wait_replicated()
    classifier = get_cluster().classifier
    original = classifier.classify
    classifier.classify = lambda sql: __import__("replica_router").Intent.READ  # type: ignore[method-assign]
    try:
        with recording() as ran, connections["replica1"].cursor() as cursor:
            cursor.execute("SELECT rr_touch(%s)", [post.pk])
            assert cursor.fetchone() == (post.pk,)
    finally:
        classifier.classify = original  # type: ignore[method-assign]
    assert [alias for alias, sql in ran if "rr_touch" in sql] == ["replica1", "default"]
    assert models.Post.objects.get(pk=post.pk).title == "touched"


def test_a_write_inside_a_transaction_on_a_replica_alias_fails_clearly(models) -> None:
    from django.db import connections, transaction

    from replica_router.integrations.django import ReplicaWriteError

    with (
        pytest.raises(ReplicaWriteError, match="replica1"),
        transaction.atomic(using="replica1"),
        connections["replica1"].cursor() as cursor,
    ):
        cursor.execute("SELECT 1")
        cursor.execute("INSERT INTO rr_django_app_post (title) VALUES ('no')")
    assert not models.Post.objects.filter(title="no").exists()


def test_a_foreign_key_between_replica_and_primary_objects(
    models, django_env: LocalCluster
) -> None:
    author = models.Author.objects.create(name="Ada")
    from django.db import transaction

    from replica_router.integrations.django import get_cluster

    cluster = get_cluster()
    django_env.wait_replicated()
    wait_until(lambda: cluster.route_read() in REPLICAS, what="a replica past the token")
    from_replica = models.Author.objects.get(pk=author.pk)
    assert from_replica._state.db in REPLICAS
    post = models.Post(title="by Ada", author=from_replica)
    post.save()
    assert post._state.db == "default"
    with transaction.atomic():
        from_primary = models.Post.objects.get(pk=post.pk)
        assert from_primary._state.db == "default"
        from_primary.author = from_replica
        from_primary.save()
    assert models.Post.objects.filter(author=author).count() == 1


def test_migrate_touches_only_default(django_env: LocalCluster) -> None:
    from django.core.management import call_command
    from django.db import router

    assert router.allow_migrate("default", "rr_django_app") is True
    assert router.allow_migrate("replica1", "rr_django_app") is False
    assert router.allow_migrate("replica2", "auth") is False
    with recording() as ran:
        call_command("migrate", verbosity=0)
    assert {alias for alias, _ in ran} <= {"default"}


def test_a_lagging_replica_is_skipped_and_readmitted(
    models, django_env: LocalCluster, settings_override
) -> None:
    from replica_router.integrations.django import get_cluster

    with settings_override(OPTIONS={"max_lag": 0.3, "monitor_interval": 0.1}):
        cluster = get_cluster()
        django_env.pause_replay("replica1")
        try:
            models.Post.objects.create(title="lag")  # WAL replica1 receives but does not apply
            wait_until(
                lambda: (
                    (s := cluster.topology.by_name["replica1"]).lag_seconds is not None
                    and s.lag_seconds > 0.3
                ),
                what="replica1 lagging",
            )
            with recording() as ran:
                for _ in range(6):
                    list(models.Post.objects.all()[:1])
            assert "replica1" not in {alias for alias, _ in ran}
        finally:
            django_env.resume_replay("replica1")
        wait_until(
            lambda: "replica1" in {cluster.route_read() for _ in range(4)},
            what="replica1 readmitted",
        )


@pytest.fixture
def settings_override(django_env: LocalCluster):
    """``override_settings`` of REPLICA_ROUTER for the block (a new cluster)."""
    from contextlib import contextmanager

    from django.test import override_settings

    from django_support import ROUTER_SETTING

    @contextmanager
    def override(**changes):
        with override_settings(REPLICA_ROUTER={**ROUTER_SETTING, **changes}):
            yield

    return override


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"PRIMARY": "nope"}, r"REPLICA_ROUTER\['PRIMARY'\]: 'nope' is not in DATABASES"),
        ({"REPLICAS": "replica1"}, r"REPLICA_ROUTER\['REPLICAS'\]"),
        ({"REPLICAS": ["replica1", "gone"]}, r"REPLICA_ROUTER\['REPLICAS'\]\[1\]"),
        ({"REPLICAS": ["default"]}, r"REPLICA_ROUTER\['REPLICAS'\]\[0\]"),
        ({"OPTIONS": {"max_lagg": 1}}, r"REPLICA_ROUTER\['OPTIONS'\]\['max_lagg'\]"),
        ({"OPTIONS": {"max_lag": -1}}, r"REPLICA_ROUTER\['OPTIONS'\]: max_lag"),
        ({"OPTIONS": {"primary": "x"}}, r"REPLICA_ROUTER\['OPTIONS'\]\['primary'\]"),
        ({"TOKEN": {"samesite": "sometimes"}}, r"REPLICA_ROUTER\['TOKEN'\]: samesite"),
        ({"COOKIE": {}}, r"REPLICA_ROUTER\['COOKIE'\]: unknown key"),
    ],
)
def test_a_bad_setting_raises_improperly_configured_naming_the_key(
    django_env: LocalCluster, setting: dict[str, object], message: str
) -> None:
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from django_support import ROUTER_SETTING
    from replica_router.integrations.django import ConsistencyMiddleware, get_cluster

    with (
        override_settings(REPLICA_ROUTER={**ROUTER_SETTING, **setting}),
        pytest.raises(ImproperlyConfigured, match=message),
    ):
        get_cluster()
        ConsistencyMiddleware(lambda request: None)


def test_the_cluster_uses_the_aliases_as_node_names(django_env: LocalCluster) -> None:
    from replica_router.integrations.django import ReplicaRouter, get_cluster

    cluster = get_cluster()
    assert cluster is get_cluster()
    assert sorted(s.name for s in cluster.status()) == ["default", "replica1", "replica2"]
    assert {s.name: s.port for s in cluster.status()} == {
        "default": django_env.port(django_env.primary_name),
        **{f"replica{i + 1}": django_env.port(n) for i, n in enumerate(django_env.replica_names)},
    }
    assert ReplicaRouter().db_for_write(None) == "default"


def test_only_what_the_classifier_proves_a_read_counts_as_one() -> None:
    from psycopg import sql

    from replica_router import classify
    from replica_router.integrations.django import _writes

    assert not _writes(classify, "SELECT 1")
    assert _writes(classify, "SELECT 1 FOR UPDATE")
    assert _writes(classify, "UPDATE t SET a = 1 RETURNING id")
    assert _writes(classify, sql.SQL("SELECT 1"))  # not looked into: the primary
    assert _writes(classify, b"SELECT 1")


def test_the_monitor_connects_with_each_aliases_settings_and_libpq_options(
    django_env: LocalCluster,
) -> None:
    from django.db import connections
    from psycopg.conninfo import conninfo_to_dict

    from replica_router.integrations.django import _dsn

    options = connections.settings["replica2"]["OPTIONS"]
    connections.settings["replica2"]["OPTIONS"] = {
        "pool": True,  # Django's, not libpq's
        "isolation_level": 1,
        "application_name": "rr-django-test",
        "sslmode": "disable",
    }
    try:
        params = conninfo_to_dict(_dsn("replica2"))
    finally:
        connections.settings["replica2"]["OPTIONS"] = options
    db = connections.settings["replica2"]
    assert params == {
        "dbname": db["NAME"],
        "user": db["USER"],
        **({"password": db["PASSWORD"]} if db["PASSWORD"] else {}),
        "host": db["HOST"],
        "port": db["PORT"],
        "application_name": "rr-django-test",
        "sslmode": "disable",
    }


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_worker_opens_its_own_cluster_and_leaves_the_parents_alone(
    models, django_env: LocalCluster
) -> None:
    """gunicorn/uwsgi with a preloaded app: the parent had a cluster when it forked."""
    from replica_router.integrations.django import get_cluster

    parent = get_cluster()
    pid = os.fork()
    if pid == 0:  # the worker: a cluster of its own, that routes
        code = 1
        try:
            mine = get_cluster()
            code = 0 if mine is not parent and mine.route_read() in REPLICAS else 3
            mine.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert get_cluster() is parent
    assert parent.check_connections() == dict.fromkeys(("default", "replica1", "replica2"), True)
    assert models.Post.objects.count() >= 0  # the parent's Django connections still work


def test_a_write_under_manual_transactions_counts_once_autocommit_is_back(
    models, django_env: LocalCluster
) -> None:
    """``set_autocommit(False)`` ... ``commit()`` gives no ``on_commit`` hook: the write
    is counted when the connection is seen back in autocommit."""
    from django.db import transaction

    from replica_router.integrations.django import get_cluster

    cluster = get_cluster()
    before = cluster.token
    with replay_paused(django_env):
        transaction.set_autocommit(False)
        try:
            post = models.Post.objects.create(title="manual")
            with recording() as ran:
                assert models.Post.objects.get(pk=post.pk).title == "manual"
            transaction.commit()
        finally:
            transaction.set_autocommit(True)
        with recording() as ran2:
            assert models.Post.objects.get(pk=post.pk).title == "manual"
    assert aliases_for(ran, "rr_django_app_post") == {"default"}
    assert aliases_for(ran2, "rr_django_app_post") == {"default"}
    after = cluster.token
    assert after is not None and (before is None or after.lsn > before.lsn)


def test_a_monotonic_read_never_goes_back_once_a_replica_served_it(
    models, django_env: LocalCluster, settings_override
) -> None:
    """Defect 9 through Django: once a read saw the row on replica1, no later read of
    the scope may be served by replica2, which has not replayed it."""
    from replica_router.integrations.django import get_cluster

    options = {"max_lag": None, "monitor_interval": 0.1, "read_your_writes": None,
               "monotonic_reads": True}  # fmt: skip
    with settings_override(OPTIONS=options):
        get_cluster()
        django_env.pause_replay("replica2")
        try:
            models.Post.objects.create(title="mono")  # no token: only the floor protects
            django_env.wait_replicated()  # replica1 only: replica2 is paused
            posts = models.Post.objects.filter(title="mono")
            for _ in range(10):  # round robin: one of the first two lands on replica1
                with recording() as ran:
                    count = posts.count()
                if aliases_for(ran, "rr_django_app_post") == {"replica1"}:
                    assert count == 1
                    break
            else:
                raise AssertionError("no read landed on replica1")
            with recording() as ran:
                later = [posts.count() for _ in range(4)]
            assert later == [1, 1, 1, 1], f"a read went back in time: {ran}"
        finally:
            django_env.resume_replay("replica2")
            models.Post.objects.filter(title="mono").delete()
            django_env.wait_replicated()
