"""examples/sqlalchemy_app through TestClient: a user posts, reloads, sees the post."""

from __future__ import annotations

import uuid

from starlette.testclient import TestClient

from helpers import FAST, example_module, replay_paused, set_cookie_value, wait_until
from replica_router import AsyncCluster
from replica_router.sandbox import LocalCluster

COOKIE = "rr_token"


def test_a_post_is_on_the_authors_next_page_load(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    example = example_module("sqlalchemy_app")
    author = f"ada-{uuid.uuid4().hex[:8]}"
    cluster = AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST)
    page = f"/users/{author}/posts"
    with TestClient(example.create_app(cluster), base_url="https://testserver") as client:
        assert client.post(page, json={"body": ""}).status_code == 422
        lc.wait_replicated()  # the schema, on every replica
        with replay_paused(lc):
            posted = client.post(page, json={"body": "hello"})
            assert posted.status_code == 201
            assert set_cookie_value(posted.headers.get_list("set-cookie"), COOKIE)
            reload = client.get(page).json()  # with the cookie: the primary has it
            assert [p["body"] for p in reload["posts"]] == ["hello"]
            assert reload["served_by"] == "primary"
            cookie = client.cookies.get(COOKIE)
            client.cookies.clear()
            stranger = client.get(page).json()  # no token: a (paused) replica
            assert stranger["posts"] == [] and stranger["served_by"] != "primary"
        client.cookies.set(COOKIE, cookie or "", domain="testserver")

        def from_a_replica() -> dict[str, object] | None:
            seen = client.get(page).json()
            return seen if seen["served_by"] != "primary" else None

        caught_up = wait_until(from_a_replica, what="a replica that has replayed the post")
        assert [p["body"] for p in caught_up["posts"]] == ["hello"]  # type: ignore[union-attr]
