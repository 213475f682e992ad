"""Peewee's asyncio API (``playhouse.pwasyncio``) on a primary and its replicas.

Peewee runs its sync code in a greenlet and awaits each driver call on the event
loop (its bridge). This database runs :class:`~.peewee.RoutedPostgresqlDatabase`'s
rules themselves, the same code, over an :class:`~replica_router.AsyncCluster`'s
psycopg ``AsyncConnection`` pools: only its I/O seam awaits through the bridge::

    from replica_router import AsyncCluster
    from replica_router.integrations.peewee_asyncio import AsyncRoutedPostgresqlDatabase

    cluster = await AsyncCluster(PRIMARY_DSN, [REPLICA_DSN]).open()
    db = AsyncRoutedPostgresqlDatabase(cluster)

    class User(db.Model):            # playhouse.pwasyncio's AsyncModel
        name = peewee.TextField()

    made = await User.acreate(name="Ada")      # the primary; the scope's token advances
    await User.aget_by_id(made.id)             # a replica that replayed it, else the primary
    rows = await db.list(User.select())        # a replica
    async with db.atomic(): ...                # the primary throughout, selects included
    async with db: ...                         # connection_context(): a unit of work
    await db.run(sync_function)                # any sync Peewee code, routed the same way

Each asyncio task holds its own links (a primary one, a replica one), given back
to the pools when it calls ``aclose()`` or ends. Results come back whole, as
psycopg's client-side cursors hold them: ``iterate()`` yields from that list.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import psycopg
from playhouse.pool import MaxConnectionsExceeded
from playhouse.pwasyncio import (
    AsyncDatabaseMixin,
    CursorAdapter,
    MissingGreenletBridge,
    await_,
)

from ..connection_async import run_capturing
from ..consistency import acommit_and_capture
from .peewee import CLASSIFY, RoutedPostgresqlDatabase, _ConnectionContext, _databases, _Links

if TYPE_CHECKING:
    from ..cluster_async import AsyncCluster

__all__ = ["AsyncRoutedPostgresqlDatabase"]


class _AsyncNodeLimits:
    """``max_connections`` links per node, waited for on the event loop (a thread's
    Condition would stop the loop, and with it the tasks that would give one back)."""

    def __init__(self, max_connections: int | None, timeout: float | None) -> None:
        self.max = max_connections or None
        self.timeout = None if timeout == 0 else timeout
        self.raise_at_once = timeout is None
        self._free: dict[str, asyncio.Semaphore] = {}

    async def take(self, node: str) -> None:
        if self.max is None:
            return
        free = self._free.get(node)
        if free is None:
            free = self._free[node] = asyncio.Semaphore(self.max)
        if self.raise_at_once and free.locked():
            raise MaxConnectionsExceeded(self._full(node))
        try:
            await asyncio.wait_for(free.acquire(), self.timeout)
        except TimeoutError:
            raise MaxConnectionsExceeded(self._full(node)) from None

    def give(self, node: str) -> None:
        if self.max is not None:
            self._free[node].release()

    def _full(self, node: str) -> str:
        return f"{node}: this database already holds max_connections={self.max} links"


def _whole(cursor: psycopg.AsyncCursor[Any]) -> CursorAdapter:
    """The statement's result as Peewee's bridge hands it on: rows already fetched
    (they are on the client; fetching them awaits nothing on the server)."""
    rows = await_(cursor.fetchall()) if cursor.description is not None else []
    return CursorAdapter(rows, rowcount=cursor.rowcount, description=cursor.description)


class AsyncRoutedPostgresqlDatabase(AsyncDatabaseMixin, RoutedPostgresqlDatabase):  # type: ignore[misc]
    """``playhouse.pwasyncio``'s API over an :class:`~replica_router.AsyncCluster`.

    Everything :class:`~.peewee.RoutedPostgresqlDatabase` says holds, per asyncio
    task: the same routing, tokens, topology checks and ``max_connections`` /
    ``stale_timeout`` / ``timeout`` meanings (a wait for a link awaits). Its sync
    Peewee methods run only inside the bridge (``await db.run(...)``, the ``a*``
    methods); outside it they raise pwasyncio's ``MissingGreenletBridge``.
    """

    cluster: AsyncCluster  # type: ignore[assignment]
    _resolve = staticmethod(await_)
    _run_capturing = staticmethod(run_capturing)
    _commit_and_capture = staticmethod(acommit_and_capture)
    _limits_type = _AsyncNodeLimits

    def __init__(self, cluster: AsyncCluster, **options: Any) -> None:
        """``options`` are :class:`~.peewee.RoutedPostgresqlDatabase`'s (``max_connections``,
        ``stale_timeout``, ``timeout``, ...); not pwasyncio's own: the cluster owns the pools."""
        RoutedPostgresqlDatabase.__init__(self, cluster, **options)  # type: ignore[arg-type]
        self._pool = None
        self._closing = False
        self._releasing: set[asyncio.Task[Any]] = set()
        _databases.discard(self)  # the module's check_connections() cannot await

    # -- one unit of work per task ------------------------------------------------------------

    def _new_links(self, owner: object) -> _Links:
        links = RoutedPostgresqlDatabase._new_links(self, owner)
        if isinstance(owner, asyncio.Task):
            owner.add_done_callback(functools.partial(self._task_done, links))
        return links

    def _task_done(self, links: _Links, task: asyncio.Task[Any]) -> None:
        """A task that ended holding links gives them back (an open transaction rolls
        back), in a task of its own on the loop: the release awaits."""
        if links.reader is None and links.writer is None:
            return
        release = task.get_loop().create_task(self.run(self._release_links, links))
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)

    # -- running statements (the sync rules, results fetched whole) -----------------------------

    connect = RoutedPostgresqlDatabase.connect
    close = RoutedPostgresqlDatabase.close
    is_closed = RoutedPostgresqlDatabase.is_closed
    execute_sql = RoutedPostgresqlDatabase.execute_sql

    def _run(self, sql: str, params: Any, kind: int) -> Any:
        try:
            return _whole(RoutedPostgresqlDatabase._run(self, sql, params, kind))
        except MissingGreenletBridge as exc:
            raise MissingGreenletBridge(
                f"{sql!r} was run outside Peewee's greenlet bridge: await db.run(fn), "
                "db.aexecute(query), db.list(query) or the models' a* methods"
            ) from exc

    async def aexecute_sql(self, sql: str, params: Any = None) -> Any:
        return await self.run(self._run, sql, params, CLASSIFY)

    async def aconnect(self) -> bool:
        """Open this task's connection scope (links are taken when first used)."""
        return bool(await self.run(self.connect))

    async def aclose(self) -> bool:
        """Give this task's links back to their pools."""
        return bool(await self.run(self.close))

    async def __aenter__(self) -> AsyncRoutedPostgresqlDatabase:
        """``connection_context()`` for the task: a unit of work with its own links."""
        context = _ConnectionContext(self)
        await self.run(context.__enter__)
        self._links().contexts.append(context)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.run(self._links().contexts.pop().__exit__, *exc_info)

    async def iterate(self, query: Any, buffer_size: int | None = None) -> AsyncIterator[Any]:
        """The query's rows, routed as ``list()`` routes it (fetched whole, then yielded)."""
        for row in await self.list(query):
            yield row

    async def close_pool(self) -> None:
        """Wait for the links of ended tasks to be given back, and give back this task's
        (the pools are the cluster's: ``await cluster.close()`` closes them)."""
        while self._releasing:
            await asyncio.gather(*list(self._releasing), return_exceptions=True)
        links = self._links()
        if not self.is_closed() or links.writer or links.reader:
            await self.aclose()

    # -- seed 003's management, awaited ------------------------------------------------------

    async def acheck_connections(self, timeout: float | None = None) -> dict[str, bool]:
        """``{node: healthy}``: one entry per node, the primary included."""
        return await self.cluster.check_connections(timeout)

    async def aadd_replica(self, dsn: str, name: str | None = None) -> str:
        """Add a replica at run time (reads may go to it once the monitor has probed it)."""
        return await self.cluster.add_replica(dsn, name=name)

    async def aremove_replica(self, name: str, timeout: float = 5.0) -> None:
        """Stop reading from ``name``; links held to it are swapped at their next read."""
        await self.cluster.remove_replica(name, timeout=timeout)
