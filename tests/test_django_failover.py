"""A stopped replica and a promotion, each on a sandbox of its own (the Django
aliases point there for the test), and Django's own connection pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_support import ALIASES, aliases_for, pointed_at, recording
from helpers import HUNG_BOUND, hung_mid_flight, wait_until
from replica_router.sandbox import LocalCluster


@pytest.fixture
def own_sandbox(
    rr_django: LocalCluster, fresh_replica_cluster: LocalCluster
) -> Iterator[LocalCluster]:
    with pointed_at(fresh_replica_cluster):
        yield fresh_replica_cluster


@pytest.mark.destructive
@pytest.mark.slow
def test_a_stopped_replica_is_skipped_and_readmitted_when_it_recovers(
    own_sandbox: LocalCluster,
) -> None:
    from replica_router.integrations.django import get_cluster
    from rr_django_app.models import Post

    lc = own_sandbox
    cluster = get_cluster()
    lc.stop("replica1", mode="immediate")
    wait_until(lambda: not cluster.topology.by_name["replica1"].healthy, what="replica1 down")
    with recording() as ran:
        for _ in range(6):
            list(Post.objects.all())
    assert aliases_for(ran, "rr_django_app_post") == {"replica2"}
    lc.start("replica1")
    wait_until(lambda: cluster.topology.by_name["replica1"].healthy, what="replica1 back")
    with recording() as ran:
        for _ in range(6):
            list(Post.objects.all())
    assert aliases_for(ran, "rr_django_app_post") == {"replica1", "replica2"}


@pytest.mark.destructive
@pytest.mark.slow
def test_after_a_promotion_writes_go_to_the_promoted_alias_and_succeed(
    own_sandbox: LocalCluster,
) -> None:
    from django.db import router

    from replica_router.integrations.django import get_cluster
    from rr_django_app.models import Post

    lc = own_sandbox
    cluster = get_cluster()
    before = Post.objects.create(title="before")
    assert router.db_for_write(Post) == "default"
    lc.stop(lc.primary_name, mode="immediate")
    lc.promote("replica1")
    wait_until(lambda: cluster.topology.primary == "replica1", what="replica1 measured primary")
    assert router.db_for_write(Post) == "replica1"
    with recording() as ran:
        after = Post.objects.create(title="after")
    assert aliases_for(ran, "INSERT INTO") == {"replica1"}
    titles = set(Post.objects.filter(pk__in=[before.pk, after.pk]).values_list("title", flat=True))
    assert titles == {"before", "after"}
    # migrate follows the measured primary too: the old one is refused.
    assert router.allow_migrate("replica1", "rr_django_app") is True
    assert router.allow_migrate("default", "rr_django_app") is False


@pytest.mark.destructive
def test_a_request_after_a_restart_writes_on_a_fresh_connection(own_sandbox: LocalCluster) -> None:
    """Design rule 9 with Django's persistent connections: the primary restarted between
    two requests, so the connection Django kept for it was ended by the server while
    idle. At the next request it is closed before any statement goes on it (one socket
    poll per open alias, as ``close_old_connections`` closes an unusable one), and the
    write connects afresh instead of failing unsent."""
    from django.db import connections
    from django.test import Client

    from replica_router.integrations.django import get_cluster
    from rr_django_app.models import Post

    lc = own_sandbox
    cluster = get_cluster()
    client = Client()  # keeps the connections between requests, as CONN_MAX_AGE does
    assert client.post("/create", {"title": "before"}).status_code == 200
    kept = connections["default"].connection
    assert kept is not None
    lc.stop(lc.primary_name, mode="fast")
    lc.start(lc.primary_name)
    wait_until(  # node names are the aliases
        lambda: (
            cluster.topology.by_name["default"].consecutive_successes > 0
            and cluster.topology.primary == "default"
        ),
        what="the monitor to see the primary back",
    )
    response = client.post("/create", {"title": "after"})
    assert response.status_code == 200
    assert connections["default"].connection is not kept
    assert Post.objects.filter(pk=response.json()["pk"]).exists()


@pytest.mark.destructive
@pytest.mark.usefixtures("own_sandbox")
def test_a_read_in_flight_on_a_hung_replica_fails_within_the_bound_then_reads_move(
    frozen: Callable[[str], None],
) -> None:
    """Design rule 10 on Django's own connections: a query sent to a replica alias
    that then hangs (SIGSTOP) fails within the bound instead of waiting until the
    node is thawed (the monitor abandons it, as the cluster's own connections); the
    following reads go to the other replica."""
    from django.db import OperationalError, connections

    from replica_router.integrations.django import get_cluster
    from rr_django_app.models import Post

    cluster = get_cluster()
    Post.objects.create(title="hung")

    def read_on_replica1(hold: Callable[[], None]) -> Any:
        conn = connections["replica1"]  # this thread's own
        try:
            conn.ensure_connection()
            hold()
            return list(Post.objects.using("replica1").values_list("title", flat=True))
        finally:
            conn.close()

    done, outcome = hung_mid_flight(read_on_replica1, lambda: frozen("replica1"), HUNG_BOUND + 1.0)
    assert done, "the query on the hung replica never returned"
    assert isinstance(outcome, OperationalError), outcome
    assert not cluster.topology.by_name["replica1"].healthy
    with recording() as ran:
        for _ in range(4):
            list(Post.objects.all())
    assert aliases_for(ran, "rr_django_app_post") == {"replica2"}


def test_djangos_connection_pool(django_env: LocalCluster) -> None:
    """``OPTIONS={"pool": True}`` (Django 5.1+, psycopg 3): the same routing."""
    import django
    from django.db import connections
    from django.test import Client

    from rr_django_app.models import Post

    if django.VERSION < (5, 1):
        pytest.fail("this Django has no connection pool; the lock pins Django 5.2+")
    connections.close_all()
    for alias in ALIASES:
        connections.settings[alias]["OPTIONS"] = {"pool": {"min_size": 0, "max_size": 4}}
    try:
        lc = django_env
        with recording() as ran:
            post = Post.objects.create(title="pooled")
            lc.wait_replicated()
            assert Client().get(f"/show/{post.pk}").json()["titles"] == ["pooled"]
        assert aliases_for(ran, "INSERT INTO") == {"default"}
        assert aliases_for(ran, "WHERE") <= {"replica1", "replica2"}  # the view's read
        assert all(connections[alias].pool is not None for alias, _ in ran)
    finally:
        for alias in ALIASES:
            connections[alias].close_pool()
            connections.settings[alias]["OPTIONS"] = {}
