"""Seed 004's ``get_user_profile`` endpoint, done right.

The seed remembers "this user wrote recently" in a dict inside one process and
reads from the primary for 5 seconds afterwards. Its users meet two problems:
the next request often lands on *another* worker process, which never heard of
the write, and a replica more than 5 seconds behind serves the old profile anyway.

Here the write's WAL position travels with the user instead: the middleware
puts it in a cookie, and on the next request -- on any worker, any machine --
the read goes to a replica that has replayed that position, or to the primary
while none has. There is no window to tune and no shared store.

Run it (see README.md): ``python -m examples.fastapi_app`` (sandbox) or
``uvicorn --factory examples.fastapi_app.app:app_from_env`` (your database).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from replica_router import AsyncCluster
from replica_router.asgi import ConsistencyMiddleware

SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    user_id bigint PRIMARY KEY,
    name text NOT NULL,
    bio text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


class ProfileIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    bio: str = Field(default="", max_length=1000)


class Profile(ProfileIn):
    user_id: int
    updated_at: datetime
    served_by: str  # which node answered: only to make the routing visible in this demo


def create_app(cluster: AsyncCluster, *, secure_cookie: bool | None = None) -> FastAPI:
    """The application around an (unopened) cluster; the lifespan opens and closes it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with cluster:
            async with cluster.write() as conn:
                await conn.execute(SCHEMA)
            yield

    app = FastAPI(title="replica-router profile example", lifespan=lifespan)

    @app.post("/users/{user_id}/profile")
    async def update_user_profile(user_id: int, profile: ProfileIn) -> Profile:
        async with cluster.write() as conn:  # the primary; commit on exit
            cur = await conn.execute(
                """
                INSERT INTO profiles (user_id, name, bio) VALUES (%s, %s, %s)
                ON CONFLICT (user_id)
                DO UPDATE SET name = excluded.name, bio = excluded.bio, updated_at = now()
                RETURNING user_id, name, bio, updated_at
                """,
                (user_id, profile.name, profile.bio),
            )
            row = await cur.fetchone()
            served_by = _node_of(cluster, conn)
        # The commit advanced this request's token; the middleware sets the cookie.
        return _profile(row, served_by)

    @app.get("/users/{user_id}/profile")
    async def get_user_profile(user_id: int) -> Profile:
        # A replica that has replayed the user's last write (known from the
        # cookie), else the primary: never an older profile than the user saved.
        async with cluster.read() as conn:
            cur = await conn.execute(
                "SELECT user_id, name, bio, updated_at FROM profiles WHERE user_id = %s",
                (user_id,),
            )
            row = await cur.fetchone()
            served_by = _node_of(cluster, conn)
        if row is None:
            raise HTTPException(status_code=404, detail="no such profile")
        return _profile(row, served_by)

    app.add_middleware(ConsistencyMiddleware, cluster=cluster, secure=secure_cookie)
    return app


def app_from_env() -> FastAPI:
    """``DATABASE_URL`` + ``DATABASE_REPLICA_URLS``; ``COOKIE_SECURE=1`` behind an https proxy
    (unset: the cookie is Secure when the request came over https)."""
    secure = os.environ.get("COOKIE_SECURE")
    return create_app(
        AsyncCluster.from_env(), secure_cookie=None if secure is None else secure != "0"
    )


def _profile(row: Any, served_by: str) -> Profile:
    user_id, name, bio, updated_at = row
    return Profile(user_id=user_id, name=name, bio=bio, updated_at=updated_at, served_by=served_by)


def _node_of(cluster: AsyncCluster, conn: psycopg.AsyncConnection[Any]) -> str:
    address = (conn.info.host, conn.info.port)
    for node in cluster.status():
        if (node.host, node.port) == address:
            return node.name
    return f"{address[0]}:{address[1]}"
