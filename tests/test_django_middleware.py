"""The Django middleware through ``django.test.Client`` on real servers: the token
crosses requests in a cookie (or a header), each request is its own unit of work."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from django_support import ROUTER_SETTING, aliases_for, recording
from helpers import replay_paused, wait_until
from replica_router.sandbox import LocalCluster

REPLICAS = {"replica1", "replica2"}
COOKIE = "rr_token"


@pytest.fixture
def client(django_env: LocalCluster) -> Any:
    from django.test import Client

    return Client()


@pytest.fixture
def signed(django_env: LocalCluster) -> Iterator[None]:
    from django.test import override_settings

    with override_settings(REPLICA_ROUTER={**ROUTER_SETTING, "TOKEN": {"signed": True}}):
        yield


def _post(client: Any, title: str = "hello") -> int:
    response = client.post("/create", {"title": title})
    assert response.status_code == 200
    return int(response.json()["pk"])


def test_a_post_sets_the_cookie_and_the_next_get_reads_its_own_write(
    client: Any, django_env: LocalCluster
) -> None:
    from replica_router.integrations.django import get_cluster

    with replay_paused(django_env):
        pk = _post(client, "mine")
        assert client.cookies[COOKIE].value
        assert not client.cookies[COOKIE]["secure"]  # plain http: a Secure cookie would be lost
        with recording() as ran:
            assert client.get(f"/show/{pk}").json()["titles"] == ["mine"]
        assert aliases_for(ran, "rr_django_app_post") == {"default"}
    django_env.wait_replicated()
    cluster = get_cluster()
    wait_until(lambda: cluster.topology.by_name["replica1"].replay_lsn, what="a probe")
    with cluster.session(token=client.cookies[COOKIE].value):
        wait_until(lambda: cluster.route_read() in REPLICAS, what="a replica past the token")
    with recording() as ran:
        assert client.get(f"/show/{pk}").json()["titles"] == ["mine"]
    assert aliases_for(ran, "rr_django_app_post") <= REPLICAS


def test_a_read_only_request_sets_no_cookie_even_with_get_or_create(
    client: Any, django_env: LocalCluster
) -> None:
    """``get_or_create`` asks ``db_for_write`` and may not write: no token."""
    pk = _post(client, "exists")
    client.cookies.clear()
    response = client.get("/get-or-create", {"title": "exists"})
    assert response.json() == {"pk": pk, "created": False}
    assert COOKIE not in response.cookies
    response = client.get("/get-or-create", {"title": "made-by-a-get"})
    assert response.json()["created"] is True
    assert response.cookies[COOKIE].value  # a GET that writes hands its token on


def test_a_requests_reads_stay_on_one_replica(client: Any) -> None:
    for _ in range(3):
        aliases = client.get("/reads").json()["aliases"]
        assert len(set(aliases)) == 1 and aliases[0] in REPLICAS


def test_reads_after_a_write_in_the_same_request_see_it_with_one_position_query(
    client: Any, django_env: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replica_router.integrations import django as integration

    captures: list[str] = []
    capture = integration._capture
    monkeypatch.setattr(
        integration, "_capture", lambda alias: (captures.append(alias), capture(alias))
    )
    with replay_paused(django_env), recording() as ran:
        body = client.post("/write-then-read").json()
    assert body == {"titles": ["first", "second"], "count": 2}
    assert aliases_for(ran, "rr_django_app_post") == {"default"}
    assert captures == ["default"]  # once, when the response left
    assert client.cookies[COOKIE].value


def test_a_malformed_cookie_is_ignored_with_a_warning(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client.cookies[COOKIE] = "not-a-token"
    with caplog.at_level(logging.WARNING, logger="replica_router"):
        response = client.get("/reads")
    assert response.status_code == 200
    assert set(response.json()["aliases"]) <= REPLICAS
    assert "malformed consistency token" in caplog.text
    assert response.cookies[COOKIE]["max-age"] == 0  # cleared: no warning on every request


def test_the_header_carries_the_token_too(client: Any, django_env: LocalCluster) -> None:
    with replay_paused(django_env):
        response = client.post("/create", {"title": "by header"})
        token = response.headers["X-Replica-Router-Token"]
        pk = response.json()["pk"]
        from django.test import Client

        fresh = Client(headers={"X-Replica-Router-Token": token})  # no cookie
        with recording() as ran:
            assert fresh.get(f"/show/{pk}").json()["titles"] == ["by header"]
        assert aliases_for(ran, "rr_django_app_post") == {"default"}


def test_a_signed_cookie_round_trips_and_a_tampered_one_is_ignored(
    signed: None, client: Any, django_env: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    from django.core import signing

    from replica_router import Token

    with replay_paused(django_env):
        pk = _post(client, "signed")
        value = client.cookies[COOKIE].value
        text = signing.get_cookie_signer(salt="replica_router.token").unsign(value)
        assert Token.parse(text)
        with recording() as ran:
            assert client.get(f"/show/{pk}").json()["titles"] == ["signed"]
        assert aliases_for(ran, "rr_django_app_post") == {"default"}

        client.cookies[COOKIE] = text  # a well-formed token without its signature
        with caplog.at_level(logging.WARNING, logger="replica_router"), recording() as ran:
            response = client.get(f"/show/{pk}")
        assert response.json()["titles"] == []  # served as if it had none: the replica
        assert aliases_for(ran, "rr_django_app_post") <= REPLICAS
        assert "fails its check" in caplog.text
        assert response.cookies[COOKIE]["max-age"] == 0


def test_a_request_neither_inherits_the_threads_scope_nor_hands_its_own_back(
    client: Any, django_env: LocalCluster
) -> None:
    from replica_router import Token
    from replica_router.integrations.django import get_cluster

    cluster = get_cluster()
    far_future = Token(2**62, cluster.system_identifier)
    with cluster.session(token=far_future):  # no replica can have this
        with recording() as ran:
            client.get("/reads")
        assert aliases_for(ran, "rr_django_app_post") <= REPLICAS
        _post(client)
        assert cluster.token == far_future
    with cluster.session(inherit=False) as scope:
        _post(client)
        assert scope.token is None


def test_logging_in_then_a_get_stays_authenticated_while_replicas_lag(
    client: Any, django_env: LocalCluster
) -> None:
    from django.contrib.auth.models import User

    User.objects.filter(username="ada").delete()
    User.objects.create_user("ada", password="lovelace")
    django_env.wait_replicated()
    with replay_paused(django_env):
        response = client.post(
            "/login",
            json.dumps({"username": "ada", "password": "lovelace"}),
            content_type="application/json",
        )
        assert response.json() == {"ok": True}
        with recording() as ran:
            assert client.get("/whoami").json() == {"authenticated": True, "username": "ada"}
        assert aliases_for(ran, "django_session") == {"default"}
        stranger = type(client)()
        stranger.cookies["sessionid"] = client.cookies["sessionid"].value  # no token
        assert stranger.get("/whoami").json()["authenticated"] is False  # the replica lags
