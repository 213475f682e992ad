"""WSGI ConsistencyMiddleware on the sandbox, through Flask and a bare WSGI app.

As for ASGI: two app instances with their own Cluster share nothing but what the
client sends back; both replicas have replay paused, so only a read that honours
the token sees the write, and a read without it proves the test can fail.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from flask import Flask, request
from werkzeug.test import Client, TestResponse

from helpers import cluster_for, replay_paused, set_cookie_value
from replica_router import Cluster, Token
from replica_router.consistency import Scope, current_scope, peek_scope
from replica_router.errors import ConfigurationError
from replica_router.sandbox import LocalCluster
from replica_router.wsgi import ConsistencyMiddleware

TABLE = "rr_mw_wsgi_profiles"
COOKIE = "rr_token"
HEADER = "X-Replica-Router-Token"


@pytest.fixture(scope="module")
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    replica_cluster.execute(
        "primary", f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, name text NOT NULL)"
    )
    replica_cluster.wait_replicated()
    return replica_cluster


@pytest.fixture
def pair(lc: LocalCluster) -> Iterator[tuple[Cluster, Cluster]]:
    with cluster_for(lc) as a, cluster_for(lc) as b:
        yield a, b


def flask_app(cluster: Cluster, **options: Any) -> Client:
    app = Flask(__name__)

    @app.post("/profiles/<pid>")
    def update(pid: str) -> dict[str, str]:
        name = request.args["name"]
        with cluster.write() as conn:
            conn.execute(
                f"INSERT INTO {TABLE} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET name = %s",
                (pid, name, name),
            )
        return {"id": pid}

    @app.get("/profiles/<pid>")
    def show(pid: str) -> dict[str, Any]:
        return read_profile(cluster, pid)

    app.wsgi_app = ConsistencyMiddleware(app.wsgi_app, cluster, **options)  # type: ignore[method-assign]
    return client(app)


def client(app: Any) -> Client:
    """A test client that closes each response (as servers must) and keeps no cookies."""

    class ClosingClient(Client):
        def open(self, *args: Any, **kwargs: Any) -> TestResponse:
            kwargs["buffered"] = True
            return super().open(*args, **kwargs)

    return ClosingClient(app, use_cookies=False)


def read_profile(cluster: Cluster, pid: str) -> dict[str, Any]:
    with cluster.read() as conn:
        row = conn.execute(
            f"SELECT (SELECT name FROM {TABLE} WHERE id = %s), inet_server_port()", (pid,)
        ).fetchone()
    assert row is not None
    return {"name": row[0], "port": row[1]}


def set_cookie_token(response: TestResponse) -> str | None:
    return set_cookie_value(response.headers.getlist("Set-Cookie"), COOKIE)


def test_cookie_from_app_a_makes_app_b_read_the_write(
    lc: LocalCluster, pair: tuple[Cluster, Cluster]
) -> None:
    client_a, client_b = flask_app(pair[0]), flask_app(pair[1])
    pid = uuid.uuid4().hex
    with replay_paused(lc):
        written = client_a.post(f"/profiles/{pid}?name=Ada")
        assert written.status_code == 200
        cookie = set_cookie_token(written)
        assert cookie is not None
        assert Token.parse(cookie).system_id == lc.system_identifier

        with_cookie = client_b.get(f"/profiles/{pid}", headers={"Cookie": f"{COOKIE}={cookie}"})
        assert with_cookie.json == {"name": "Ada", "port": lc.port("primary")}
        assert set_cookie_token(with_cookie) is None

        without = client_b.get(f"/profiles/{pid}")
        assert without.json is not None
        assert without.json["name"] is None  # a paused replica: the test can fail
        assert without.json["port"] != lc.port("primary")


def test_requests_on_one_thread_do_not_share_a_scope(
    lc: LocalCluster, pair: tuple[Cluster, Cluster]
) -> None:
    """A sync worker serves every request on one thread: nothing may carry over.

    The thread's context already holds a scope (as it does once startup code
    on that thread wrote something); requests must neither inherit nor feed it.
    """
    client = flask_app(pair[0])
    pid = uuid.uuid4().hex

    def serve_two_requests() -> tuple[TestResponse, Scope]:
        ambient = current_scope()
        assert set_cookie_token(client.post(f"/profiles/{pid}?name=Ada")) is not None
        return client.get(f"/profiles/{pid}"), ambient  # same thread, no cookie

    with replay_paused(lc):
        after, ambient = contextvars.copy_context().run(serve_two_requests)
    assert after.json is not None
    assert after.json["name"] is None
    assert set_cookie_token(after) is None
    assert HEADER not in after.headers
    assert ambient.token is None  # the request's write did not leak into the thread


def test_header_transport(lc: LocalCluster, pair: tuple[Cluster, Cluster]) -> None:
    client_a = flask_app(pair[0], use_cookie=False)
    client_b = flask_app(pair[1], use_cookie=False)
    pid = uuid.uuid4().hex
    with replay_paused(lc):
        written = client_a.post(f"/profiles/{pid}?name=Grace")
        assert "Set-Cookie" not in written.headers
        token = written.headers[HEADER]
        read = client_b.get(f"/profiles/{pid}", headers={HEADER: token})
        assert read.json == {"name": "Grace", "port": lc.port("primary")}
        ignored = client_b.get(f"/profiles/{pid}", headers={"Cookie": f"{COOKIE}={token}"})
        assert ignored.json is not None
        assert ignored.json["name"] is None


@pytest.mark.parametrize("kind", ["malformed", "foreign"])
def test_unusable_token_is_logged_and_ignored(
    lc: LocalCluster,
    pair: tuple[Cluster, Cluster],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    client_a, client_b = flask_app(pair[0]), flask_app(pair[1])
    pid = uuid.uuid4().hex
    with replay_paused(lc):
        good = set_cookie_token(client_a.post(f"/profiles/{pid}?name=Barbara"))
        assert good is not None
        bad = "%%%" if kind == "malformed" else str(Token(Token.parse(good).lsn, 12345))
        with caplog.at_level(logging.WARNING, logger="replica_router"):
            read = client_b.get(f"/profiles/{pid}", headers={"Cookie": f"{COOKIE}={bad}"})
        assert read.status_code == 200
        assert read.json is not None
        assert read.json["name"] is None  # ignored, not honoured
        expected = "malformed" if kind == "malformed" else "another cluster"
        assert any(
            expected in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
        )


def bare_app(cluster: Cluster, pid: str, writes: bool) -> ConsistencyMiddleware:
    """A WSGI app whose body reads lazily, while the server iterates it."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if writes:
            with cluster.write() as conn:
                conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 'lazy')", (pid,))
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            yield b"name="
            yield str(read_profile(cluster, pid)["name"]).encode()

        return body()

    return ConsistencyMiddleware(app, cluster)


def test_a_lazily_iterated_body_reads_within_the_request_scope(
    lc: LocalCluster, pair: tuple[Cluster, Cluster]
) -> None:
    pid = uuid.uuid4().hex
    with replay_paused(lc):
        written = client(bare_app(pair[0], pid, writes=True)).get("/")
        assert written.text == "name=lazy"  # the write's own token covers the lazy read
        cookie = set_cookie_token(written)
        assert cookie is not None
        reader = bare_app(pair[1], pid, writes=False)
        assert client(reader).get("/", headers={"Cookie": f"{COOKIE}={cookie}"}).text == (
            "name=lazy"
        )
        assert client(reader).get("/").text == "name=None"


def test_an_app_error_closes_the_scope_and_propagates(pair: tuple[Cluster, Cluster]) -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("boom")

    ambient = peek_scope()
    with pytest.raises(RuntimeError, match="boom"):
        client(ConsistencyMiddleware(broken, pair[0])).get("/")
    assert peek_scope() is ambient


def test_body_close_is_forwarded(pair: tuple[Cluster, Cluster]) -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"ok"

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    assert client(ConsistencyMiddleware(app, pair[0])).get("/").text == "ok"
    assert closed == [True]


def test_cookie_attributes(lc: LocalCluster, pair: tuple[Cluster, Cluster]) -> None:
    client = flask_app(pair[0], secure=False, samesite=None, max_age=60)
    header = client.post(f"/profiles/{uuid.uuid4().hex}?name=x").headers["Set-Cookie"]
    value = header.split(";")[0].split("=", 1)[1]
    assert header == f"{COOKIE}={value}; Path=/; Max-Age=60; HttpOnly"


def test_bad_options_are_refused(pair: tuple[Cluster, Cluster]) -> None:
    with pytest.raises(ConfigurationError, match="samesite"):
        ConsistencyMiddleware(Flask(__name__).wsgi_app, pair[0], samesite="always")
