"""ASGI ConsistencyMiddleware on the sandbox: the cookie carries read-your-writes.

Two app instances, each with its own Cluster, share nothing but what the client
sends back. Both replicas have replay paused, so a read that honours the token
must go to the primary, and a read without it lands on a replica that has not
got the write (which proves each test can fail).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from helpers import cluster_for, example_module, replay_paused, set_cookie_value
from replica_router import AsyncCluster, Cluster, Token
from replica_router.asgi import ConsistencyMiddleware
from replica_router.consistency import Scope, current_scope
from replica_router.errors import ConfigurationError
from replica_router.sandbox import LocalCluster

TABLE = "rr_mw_asgi_profiles"
COOKIE = "rr_token"
HEADER = "X-Replica-Router-Token"


@pytest.fixture(scope="module")
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    replica_cluster.execute(
        "primary", f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, name text NOT NULL)"
    )
    replica_cluster.wait_replicated()
    return replica_cluster


def sync_app(cluster: Cluster, **options: Any) -> FastAPI:
    """Plain ``def`` endpoints: Starlette runs them in a threadpool (a context copy)."""
    app = FastAPI()

    @app.post("/profiles/{pid}")
    def update(pid: str, name: str) -> dict[str, str]:
        with cluster.write() as conn:
            conn.execute(
                f"INSERT INTO {TABLE} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET name = %s",
                (pid, name, name),
            )
        return {"id": pid}

    @app.get("/profiles/{pid}")
    def show(pid: str) -> dict[str, Any]:
        with cluster.read() as conn:
            row = conn.execute(
                f"SELECT (SELECT name FROM {TABLE} WHERE id = %s), inet_server_port()", (pid,)
            ).fetchone()
        assert row is not None
        return {"name": row[0], "port": row[1]}

    app.add_middleware(ConsistencyMiddleware, cluster=cluster, **options)
    return app


def async_app(cluster: AsyncCluster, **options: Any) -> FastAPI:
    """``async def`` endpoints on an AsyncCluster opened by the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with cluster:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/profiles/{pid}")
    async def update(pid: str, name: str) -> dict[str, str]:
        async with cluster.write() as conn:
            await conn.execute(
                f"INSERT INTO {TABLE} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET name = %s",
                (pid, name, name),
            )
        return {"id": pid}

    @app.get("/profiles/{pid}")
    async def show(pid: str) -> dict[str, Any]:
        async with cluster.read() as conn:
            cur = await conn.execute(
                f"SELECT (SELECT name FROM {TABLE} WHERE id = %s), inet_server_port()", (pid,)
            )
            row = await cur.fetchone()
        assert row is not None
        return {"name": row[0], "port": row[1]}

    app.add_middleware(ConsistencyMiddleware, cluster=cluster, **options)
    return app


def set_cookie_token(response: Any) -> str | None:
    return set_cookie_value(response.headers.get_list("set-cookie"), COOKIE)


@pytest.fixture
def sync_pair(lc: LocalCluster) -> Iterator[tuple[Cluster, Cluster]]:
    with cluster_for(lc) as a, cluster_for(lc) as b:
        yield a, b


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_cookie_from_app_a_makes_app_b_read_the_write(
    lc: LocalCluster, kind: str, sync_pair: tuple[Cluster, Cluster]
) -> None:
    if kind == "sync":
        app_a, app_b = sync_app(sync_pair[0]), sync_app(sync_pair[1])
    else:
        app_a = async_app(cluster_for(lc, AsyncCluster))
        app_b = async_app(cluster_for(lc, AsyncCluster))
    pid = uuid.uuid4().hex
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b, replay_paused(lc):
        written = client_a.post(f"/profiles/{pid}", params={"name": "Ada"})
        assert written.status_code == 200
        cookie = set_cookie_token(written)
        assert cookie is not None, written.headers
        token = Token.parse(cookie)
        assert token.system_id == lc.system_identifier

        with_cookie = client_b.get(f"/profiles/{pid}", headers={"Cookie": f"{COOKIE}={cookie}"})
        assert with_cookie.json() == {"name": "Ada", "port": lc.port("primary")}
        assert set_cookie_token(with_cookie) is None  # nothing written: nothing to re-set

        without = client_b.get(f"/profiles/{pid}")
        assert without.json()["name"] is None  # a paused replica: the test can fail
        assert without.json()["port"] != lc.port("primary")


def test_header_transport_without_cookies(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]
) -> None:
    app_a = sync_app(sync_pair[0], use_cookie=False)
    app_b = sync_app(sync_pair[1], use_cookie=False)
    pid = uuid.uuid4().hex
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b, replay_paused(lc):
        written = client_a.post(f"/profiles/{pid}", params={"name": "Grace"})
        assert "set-cookie" not in written.headers
        token = written.headers[HEADER]
        assert Token.parse(token).system_id == lc.system_identifier

        read = client_b.get(f"/profiles/{pid}", headers={HEADER: token})
        assert read.json() == {"name": "Grace", "port": lc.port("primary")}
        assert HEADER not in read.headers
        # A cookie is not read when cookies are off.
        stale = client_b.get(f"/profiles/{pid}", headers={"Cookie": f"{COOKIE}={token}"})
        assert stale.json()["name"] is None


def test_header_is_preferred_and_a_bad_header_falls_back_to_the_cookie(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    app_a, app_b = sync_app(sync_pair[0]), sync_app(sync_pair[1])
    pid = uuid.uuid4().hex
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b, replay_paused(lc):
        cookie = set_cookie_token(client_a.post(f"/profiles/{pid}", params={"name": "Edsger"}))
        assert cookie is not None
        old = str(Token(1, lc.system_identifier))  # every replica has replayed that far
        # The header wins over the cookie: an old header token does not cover the write.
        read = client_b.get(
            f"/profiles/{pid}", headers={HEADER: old, "Cookie": f"{COOKIE}={cookie}"}
        )
        assert read.json()["name"] is None
        with caplog.at_level(logging.WARNING, logger="replica_router"):
            read = client_b.get(
                f"/profiles/{pid}", headers={HEADER: "garbage", "Cookie": f"{COOKIE}={cookie}"}
            )
        assert read.json() == {"name": "Edsger", "port": lc.port("primary")}
        assert any(f"header {HEADER}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["malformed", "foreign"])
def test_unusable_cookie_is_logged_ignored_and_cleared(
    lc: LocalCluster,
    sync_pair: tuple[Cluster, Cluster],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    app_a, app_b = sync_app(sync_pair[0]), sync_app(sync_pair[1])
    pid = uuid.uuid4().hex
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b, replay_paused(lc):
        good = set_cookie_token(client_a.post(f"/profiles/{pid}", params={"name": "Barbara"}))
        assert good is not None
        bad = "1.x!y" if kind == "malformed" else str(Token(Token.parse(good).lsn, 12345))
        with caplog.at_level(logging.WARNING, logger="replica_router"):
            read = client_b.get(f"/profiles/{pid}", headers={"Cookie": f"{COOKIE}={bad}"})
        assert read.status_code == 200
        # Ignored, not honoured: the read went to a paused replica (a foreign
        # token's LSN means nothing here, however large it is).
        assert read.json()["name"] is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        expected = "malformed" if kind == "malformed" else "another cluster"
        assert any(expected in r.getMessage() for r in warnings), [r.getMessage() for r in warnings]
        # Expired, so that the browser stops sending it (and we stop warning).
        cleared = [h for h in read.headers.get_list("set-cookie") if h.startswith(COOKIE)]
        assert cleared == [f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"]  # over http


def test_a_write_under_an_unusable_token_still_hands_on_a_good_one(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]
) -> None:
    app_a, app_b = sync_app(sync_pair[0]), sync_app(sync_pair[1])
    pid = uuid.uuid4().hex
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b, replay_paused(lc):
        written = client_a.post(
            f"/profiles/{pid}", params={"name": "Alan"}, headers={"Cookie": f"{COOKIE}=nonsense"}
        )
        cookie = set_cookie_token(written)
        assert cookie is not None and cookie != ""
        read = client_b.get(f"/profiles/{pid}", headers={"Cookie": f"{COOKIE}={cookie}"})
        assert read.json()["name"] == "Alan"


def test_cookie_attributes(lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]) -> None:
    defaults = sync_app(sync_pair[0])
    custom = sync_app(
        sync_pair[1],
        cookie_name="consistency",
        secure=False,
        httponly=False,
        samesite="strict",
        max_age=None,
        path="/api",
    )
    with TestClient(defaults, base_url="https://testserver") as client:
        header = client.post(f"/profiles/{uuid.uuid4().hex}", params={"name": "x"}).headers[
            "set-cookie"
        ]
    value = header.split(";")[0].split("=", 1)[1]
    assert header == f"{COOKIE}={value}; Path=/; Max-Age=3600; Secure; HttpOnly; SameSite=Lax"
    with TestClient(custom) as client:
        header = client.post(f"/profiles/{uuid.uuid4().hex}", params={"name": "x"}).headers[
            "set-cookie"
        ]
    value = header.split(";")[0].split("=", 1)[1]
    assert header == f"consistency={value}; Path=/api; SameSite=Strict"
    assert Token.parse(value).system_id == lc.system_identifier


def test_token_is_captured_before_a_streamed_body(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]
) -> None:
    cluster = sync_pair[0]
    app = FastAPI()

    @app.post("/stream")
    def stream() -> StreamingResponse:
        with cluster.write() as conn:
            conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 'streamed')", (uuid.uuid4().hex,))

        def body() -> Iterator[bytes]:
            yield b"one,"
            yield b"two"

        return StreamingResponse(body())

    app.add_middleware(ConsistencyMiddleware, cluster=cluster)
    with TestClient(app) as client:
        response = client.post("/stream")
    assert response.text == "one,two"
    assert set_cookie_token(response) is not None
    assert response.headers[HEADER] == set_cookie_token(response)


def test_requests_do_not_share_a_scope(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]
) -> None:
    """A request neither inherits nor feeds a scope of the task that runs the app.

    ``httpx.ASGITransport`` runs the app in the caller's task, whose context
    already holds a scope here (as after startup code wrote something).
    """
    app = sync_app(sync_pair[0])
    pid = uuid.uuid4().hex

    async def two_requests() -> tuple[httpx.Response, Scope]:
        ambient = current_scope()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            written = await client.post(f"/profiles/{pid}", params={"name": "Ada"})
            assert set_cookie_token(written) is not None
            client.cookies.clear()
            return await client.get(f"/profiles/{pid}"), ambient  # no cookie

    with replay_paused(lc):
        later, ambient = asyncio.run(two_requests())
    assert later.json()["name"] is None
    assert set_cookie_token(later) is None
    assert HEADER not in later.headers
    assert ambient.token is None


def test_lifespan_and_websocket_pass_through(lc: LocalCluster) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/ws")
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(await ws.receive_text())
        await ws.close()

    cluster = cluster_for(lc)  # never opened: neither lifespan nor websocket touches it
    with TestClient(ConsistencyMiddleware(app, cluster)) as client:
        assert events == ["startup"]
        with client.websocket_connect("/ws", headers={"Cookie": f"{COOKIE}=garbage"}) as ws:
            ws.send_text("ping")
            assert ws.receive_text() == "ping"
    assert events == ["startup", "shutdown"]


def test_endpoint_error_still_closes_the_scope(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]
) -> None:
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.add_middleware(ConsistencyMiddleware, cluster=sync_pair[0])
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom").status_code == 500
        assert client.get("/boom").status_code == 500


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"samesite": "sometimes"}, "samesite"),
        ({"samesite": "none", "secure": False}, "secure"),
        ({"use_cookie": False, "use_header": False}, "nothing carries"),
        ({"cookie_name": "bad name"}, "cookie_name"),
        ({"header_name": "X Bad"}, "header_name"),
        ({"max_age": 0}, "max_age"),
        ({"path": "api"}, "path"),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict[str, Any], message: str) -> None:
    cluster = Cluster(primary="postgresql://u:secret@h/db", replicas=[])
    with pytest.raises(ConfigurationError, match=message):
        ConsistencyMiddleware(FastAPI(), cluster, **options)


def test_cookie_parsing_survives_other_broken_cookies(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]
) -> None:
    app_a, app_b = sync_app(sync_pair[0]), sync_app(sync_pair[1])
    pid = uuid.uuid4().hex
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b, replay_paused(lc):
        cookie = set_cookie_token(client_a.post(f"/profiles/{pid}", params={"name": "Frances"}))
        messy = f'junk; theme="dark; {COOKIE}="{cookie}"; other=1'
        read = client_b.get(f"/profiles/{pid}", headers={"Cookie": messy})
        assert read.json()["name"] == "Frances"


def test_example_app_reads_the_users_own_update(lc: LocalCluster) -> None:
    """examples/fastapi_app through TestClient: seed 004's endpoint, with the cookie."""
    example = example_module("fastapi_app")
    user = uuid.uuid4().int % 2**40
    app = example.create_app(cluster_for(lc, AsyncCluster))
    with TestClient(app, base_url="https://testserver") as client:  # Secure cookies need https
        assert client.get(f"/users/{user}/profile").status_code == 404
        assert client.post(f"/users/{user}/profile", json={"name": ""}).status_code == 422
        assert client.post(f"/users/{user}/profile", json={"name": "before"}).status_code == 200
        lc.wait_replicated()
        with replay_paused(lc):
            updated = client.post(f"/users/{user}/profile", json={"name": "after", "bio": "b"})
            assert updated.json()["served_by"] == "primary"
            assert client.cookies.get(COOKIE) == set_cookie_token(updated)
            seen = client.get(f"/users/{user}/profile").json()  # the client sends the cookie
            assert (seen["name"], seen["bio"], seen["served_by"]) == ("after", "b", "primary")
            client.cookies.clear()
            stale = client.get(f"/users/{user}/profile").json()
            assert stale["name"] == "before"  # what the seed's version can show
            assert stale["served_by"] != "primary"


def test_cookies_split_over_several_headers_are_all_read(
    lc: LocalCluster, sync_pair: tuple[Cluster, Cluster]
) -> None:
    """HTTP/2 clients may send each cookie in its own ``cookie`` header (RFC 9113 8.2.3)."""
    app_a, app_b = sync_app(sync_pair[0]), sync_app(sync_pair[1])
    pid = uuid.uuid4().hex
    with TestClient(app_a) as client_a, TestClient(app_b) as client_b, replay_paused(lc):
        cookie = set_cookie_token(client_a.post(f"/profiles/{pid}", params={"name": "Hedy"}))
        split = [("cookie", f"{COOKIE}={cookie}"), ("cookie", "theme=dark"), ("cookie", "a=b")]
        read = client_b.get(f"/profiles/{pid}", headers=split)
        assert read.json() == {"name": "Hedy", "port": lc.port("primary")}
