"""The middlewares in users' test suites and behind proxies: the cookie's Secure flag.

Starlette's TestClient and Flask's test_client talk plain http and silently drop a
``Secure`` cookie, so read-your-writes must work there with their defaults (cookie
jar on, no https). Replay is paused on every replica: only a read that carries the
write's token sees it, and a client without the cookie proves the test can fail.
"""

from __future__ import annotations

import gc
import logging
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from flask import Flask
from starlette.testclient import TestClient

from helpers import cluster_for, replay_paused, set_cookie_value
from replica_router import Cluster
from replica_router._web import Incoming, TokenMiddleware
from replica_router.asgi import ConsistencyMiddleware as AsgiMiddleware
from replica_router.sandbox import LocalCluster
from replica_router.wsgi import ConsistencyMiddleware as WsgiMiddleware

COOKIE = "rr_token"


@pytest.fixture(scope="module")
def table(replica_cluster: LocalCluster) -> str:
    name = "rr_mw_http_notes"
    replica_cluster.execute(
        "primary", f"CREATE TABLE IF NOT EXISTS {name} (id text PRIMARY KEY, body text)"
    )
    replica_cluster.wait_replicated()
    return name


@pytest.fixture
def cluster(replica_cluster: LocalCluster) -> Iterator[Cluster]:
    with cluster_for(replica_cluster) as cluster:
        yield cluster


def write(cluster: Cluster, table: str, nid: str) -> None:
    with cluster.write() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (%s, 'saved')", (nid,))


def read(cluster: Cluster, table: str, nid: str) -> str | None:
    with cluster.read() as conn:
        row = conn.execute(f"SELECT body FROM {table} WHERE id = %s", (nid,)).fetchone()
    return None if row is None else str(row[0])


def fastapi_app(cluster: Cluster, table: str, **options: Any) -> FastAPI:
    app = FastAPI()

    @app.post("/notes/{nid}")
    def create(nid: str) -> dict[str, str]:
        write(cluster, table, nid)
        return {"id": nid}

    @app.get("/notes/{nid}")
    def show(nid: str) -> dict[str, str | None]:
        return {"body": read(cluster, table, nid)}

    app.add_middleware(AsgiMiddleware, cluster=cluster, **options)
    return app


def flask_app(cluster: Cluster, table: str, **options: Any) -> Flask:
    app = Flask(__name__)

    @app.post("/notes/<nid>")
    def create(nid: str) -> dict[str, str]:
        write(cluster, table, nid)
        return {"id": nid}

    @app.get("/notes/<nid>")
    def show(nid: str) -> dict[str, str | None]:
        return {"body": read(cluster, table, nid)}

    app.wsgi_app = WsgiMiddleware(app.wsgi_app, cluster, **options)  # type: ignore[method-assign]
    return app


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """What Python would print as ``Exception ignored in: ...``."""
    seen: list[str] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda u: seen.append(f"{u.object!r}: {u.exc_value!r}")
    )
    yield seen


def test_starlette_testclient_reads_its_own_writes_over_http(
    replica_cluster: LocalCluster, cluster: Cluster, table: str
) -> None:
    nid = uuid.uuid4().hex
    with TestClient(fastapi_app(cluster, table)) as client, replay_paused(replica_cluster):
        written = client.post(f"/notes/{nid}")
        cookie = written.headers["set-cookie"]
        assert "Secure" not in cookie  # http://testserver: a Secure cookie would be dropped
        assert client.get(f"/notes/{nid}").json() == {"body": "saved"}
        client.cookies.clear()
        assert client.get(f"/notes/{nid}").json() == {"body": None}  # the replica is stale


def test_flask_test_client_reads_its_own_writes_and_closes_the_scope(
    replica_cluster: LocalCluster, cluster: Cluster, table: str, unraisable: list[str]
) -> None:
    client = flask_app(cluster, table).test_client()  # defaults: cookies on, not buffered
    nid = uuid.uuid4().hex
    with replay_paused(replica_cluster):
        written = client.post(f"/notes/{nid}")
        assert set_cookie_value(written.headers.getlist("Set-Cookie"), COOKIE) is not None
        assert client.get(f"/notes/{nid}").json == {"body": "saved"}
        client.delete_cookie(COOKIE)
        assert client.get(f"/notes/{nid}").json == {"body": None}  # the replica is stale
        del written
        gc.collect()
    assert unraisable == []


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_secure_follows_https_and_a_trusted_forwarded_proto(
    cluster: Cluster, table: str, kind: str
) -> None:
    def set_cookie(base_url: str, headers: dict[str, str] | None = None, **options: Any) -> str:
        path = f"/notes/{uuid.uuid4().hex}"
        if kind == "asgi":
            with TestClient(fastapi_app(cluster, table, **options), base_url=base_url) as client:
                return str(client.post(path, headers=headers).headers["set-cookie"])
        client = flask_app(cluster, table, **options).test_client()
        return str(client.post(base_url + path, headers=headers).headers["set-cookie"])

    https = {"X-Forwarded-Proto": "https"}
    assert "; Secure" in set_cookie("https://testserver")
    assert "; Secure" not in set_cookie("http://testserver")
    assert "; Secure" not in set_cookie("http://testserver", https)  # not trusted
    assert "; Secure" in set_cookie("http://testserver", https, trust_forwarded_proto=True)
    chain = {"X-Forwarded-Proto": "https, http"}  # our proxy (the last) got plain http
    assert "; Secure" not in set_cookie("http://testserver", chain, trust_forwarded_proto=True)
    assert "; Secure" not in set_cookie("https://testserver", secure=False)
    assert "; Secure" in set_cookie("http://testserver", secure=True)


def test_a_secure_cookie_over_http_is_warned_about_once(
    cluster: Cluster, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = fastapi_app(cluster, table, secure=True)
    with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="replica_router"):
        for _ in range(3):
            assert "; Secure" in client.post(f"/notes/{uuid.uuid4().hex}").headers["set-cookie"]
    warnings = [r.getMessage() for r in caplog.records if "plain http" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "rr_token" in warnings[0]


@pytest.mark.parametrize(
    ("scheme", "forwarded", "trust", "https"),
    [
        ("https", None, False, True),
        ("http", None, True, False),
        ("http", "https", False, False),
        ("http", "https", True, True),
        ("https", "http", True, False),
        ("http", "HTTPS ", True, True),
        ("http", "https,http", True, False),
        ("wss", None, False, True),
    ],
)
def test_is_https(scheme: str, forwarded: str | None, trust: bool, https: bool) -> None:
    middleware = TokenMiddleware(object(), cluster_stub(), trust_forwarded_proto=trust)
    assert middleware.is_https(scheme, forwarded) is https


@pytest.mark.parametrize(
    ("secure", "https", "expected"),
    [(None, True, True), (None, False, False), (True, False, True), (False, True, False)],
)
def test_cookie_is_secure(secure: bool | None, https: bool, expected: bool) -> None:
    transport = TokenMiddleware(object(), cluster_stub(), secure=secure).transport
    assert transport.cookie_is_secure(Incoming(None, https=https)) is expected


def cluster_stub() -> Cluster:
    return Cluster(primary="postgresql://u:secret@h/db", replicas=[])
