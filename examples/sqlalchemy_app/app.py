"""Seed 004's SQLAlchemy sessions, done right: FastAPI, async SQLAlchemy, replicas.

A user posts, then reloads their page. With seed 004's ``read_session()`` the
reload goes round robin to a replica, which may not have replayed the post yet:
the post seems lost. Here the post's commit carries its WAL position back (in the
COMMIT's own round trip), the ASGI middleware hands it to the browser in a cookie,
and the reload -- on any worker process -- reads from a replica that has replayed
it, or from the primary while none has. Once a replica catches up, it serves again.

Run it (see README.md): ``python -m examples.sqlalchemy_app`` (sandbox) or
``uvicorn --factory examples.sqlalchemy_app.app:app_from_env`` (your database).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import DateTime, String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from replica_router import AsyncCluster
from replica_router.asgi import ConsistencyMiddleware
from replica_router.integrations.sqlalchemy import async_sessionmaker


class Base(DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    author: Mapped[str] = mapped_column(String(100), index=True)
    body: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PostIn(BaseModel):
    body: str = Field(min_length=1, max_length=1000)


class PostOut(BaseModel):
    id: int
    author: str
    body: str
    created_at: datetime


class Page(BaseModel):
    author: str
    posts: list[PostOut]
    served_by: str  # which node answered: only to make the routing visible in this demo


def create_app(cluster: AsyncCluster, *, secure_cookie: bool | None = None) -> FastAPI:
    """The application around an (unopened) cluster; the lifespan opens and closes it."""
    Session = async_sessionmaker(cluster, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with cluster:
            async with Session() as session:
                conn = await session.connection()  # no arguments: the primary
                await conn.run_sync(Base.metadata.create_all)
                await session.commit()
            yield

    app = FastAPI(title="replica-router SQLAlchemy example", lifespan=lifespan)

    @app.post("/users/{author}/posts", status_code=201)
    async def create_post(author: str, post: PostIn) -> PostOut:
        async with Session() as session:
            row = Post(author=author, body=post.body)
            session.add(row)
            await session.flush()  # the primary: INSERT ... RETURNING id
            await session.refresh(row)  # created_at, read in the same transaction
            await session.commit()  # the token advances; the middleware sets the cookie
        return _out(row)

    @app.get("/users/{author}/posts")
    async def list_posts(author: str) -> Page:
        async with Session() as session:
            query = select(Post).where(Post.author == author).order_by(Post.id)
            rows = (await session.scalars(query)).all()
            served_by = _served_by(cluster, session, query)
        return Page(author=author, posts=[_out(r) for r in rows], served_by=served_by)

    app.add_middleware(ConsistencyMiddleware, cluster=cluster, secure=secure_cookie)
    return app


def app_from_env() -> FastAPI:
    """``DATABASE_URL`` + ``DATABASE_REPLICA_URLS``; ``COOKIE_SECURE=1`` behind an https proxy
    (unset: the cookie is Secure when the request came over https)."""
    secure = os.environ.get("COOKIE_SECURE")
    return create_app(
        AsyncCluster.from_env(), secure_cookie=None if secure is None else secure != "0"
    )


def _out(row: Post) -> PostOut:
    return PostOut(id=row.id, author=row.author, body=row.body, created_at=row.created_at)


def _served_by(cluster: AsyncCluster, session: AsyncSession, query: object) -> str:
    """The node this session transaction read from (its bind for the query)."""
    port = session.sync_session.get_bind(clause=query).url.port  # type: ignore[arg-type]
    return next((n.name for n in cluster.status() if n.port == port), str(port))
