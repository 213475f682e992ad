"""Async views and the async ORM (``acreate``, ``aget``) through ``AsyncClient``."""

from __future__ import annotations

import asyncio
from typing import Any

from helpers import replay_paused, run
from replica_router.sandbox import LocalCluster

REPLICAS = {"replica1", "replica2"}
COOKIE = "rr_token"


def test_fifty_concurrent_async_requests_read_their_own_writes_without_leaks(
    django_env: LocalCluster,
) -> None:
    from django.test import AsyncClient

    from replica_router import Token
    from replica_router.integrations.django import get_cluster

    cluster = get_cluster()

    async def write(i: int) -> tuple[int, Any]:
        response = await AsyncClient().get("/async", {"title": f"t{i}"})
        return i, response

    async def look() -> Any:
        return (await AsyncClient().get("/awhere")).json()["alias"]

    async def main() -> tuple[list[tuple[int, Any]], list[Any]]:
        writes = asyncio.gather(*(write(i) for i in range(50)))
        looks = asyncio.gather(*(look() for _ in range(20)))
        return await writes, await looks

    with replay_paused(django_env):  # aget finds the row only if it reads on the primary
        written, looked = run(main())
    tokens = []
    for i, response in written:
        assert response.status_code == 200, response.content
        assert response.json()["title"] == f"t{i}"
        tokens.append(Token.parse(response.cookies[COOKIE].value))
    assert len(tokens) == 50  # every request that wrote hands its token on
    assert set(looked) <= REPLICAS  # the writers' tokens did not reach these requests
    assert cluster.token is None  # nor the test's own context


def test_an_async_view_reads_from_a_replica_without_a_token(django_env: LocalCluster) -> None:
    from django.test import AsyncClient

    async def main() -> Any:
        return (await AsyncClient().get("/awhere")).json()

    assert run(main())["alias"] in REPLICAS
