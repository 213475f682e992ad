"""The cluster shell: the object an application holds, and the I/O it carries out.

``AsyncCluster`` (asyncio) is written in ``cluster_async.py``; ``Cluster`` (threads)
in ``cluster.py`` is generated from it by ``tools/async_to_sync.py``. Edit the
async source and regenerate; CI fails when the twin is out of date.

A cluster owns a :class:`~replica_router.monitor.Monitor` (which measures every
node's role and lag and publishes immutable ``Topology`` snapshots) and one
connection source per node and purpose (``psycopg_pool`` pools by default, see
:mod:`replica_router.sources`). ``read()`` follows the read's steps from
:class:`~replica_router.routing.ReadAttempt` (lag bounds, the scope's token, the
monotonic floor, fallbacks, waiting, retrying another node) and checks a
connection out of the chosen node's read pool; ``write()`` checks one out of the
current primary's write pool and commits on exit, capturing the commit's WAL
position into the current consistency scope.

Decides nothing itself: where a read goes is :mod:`routing`'s, what a commit does
to the scope is :class:`~replica_router._cluster_base.ClusterBase`'s. This module
only carries out the I/O those decisions ask for (checkouts, the catch-up query,
waiting on the monitor, COMMIT).

Nothing starts in the constructor: ``open()`` (or ``with``) starts the monitor
(its first probe round finishes before ``open()`` returns, so the first read is
routed on measurements, not guesses) and opens the pools without waiting on
them, so a node that is down at start costs nothing but its probe.

Seams for the routed connections (stable within the package):
``_acquire_read()`` / ``_release_read(lease)``, ``_acquire_write()`` /
``_release_write(lease, error)``, ``_checkout(node, purpose)`` / ``_checkin(lease)``
(raises ``NodeUnavailableError``) and ``_capture_commit(conn)``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import psycopg
from psycopg.pq import TransactionStatus

from . import _fork, consistency
from ._cluster_base import (
    CHECKOUT_SLICE,
    DEAD_POOLED_RETRIES,
    REPLAY_SQL,
    ClusterBase,
    Counters,
    Lease,
    NodeUnavailableError,
    _has_primary,
    died_while_pooled,
    node_status,
    position_of,
)
from .connection_async import AsyncBeginningCursor, AsyncRoutedConnection
from .consistency import acommit_and_capture
from .errors import Error, NodeUnavailable, PrimaryUnavailable
from .routing import (
    CATCH_UP,
    USE,
    WAIT,
    ReadAttempt,
    check_seconds,
    new_primary_after,
    route_write,
)
from .sources import (
    AsyncConnectionSource,
    AsyncSourceFactory,
    PoolTimeout,
    Purpose,
    async_pool_sources,
)
from .topology import NodeSpec

if True:  # ASYNC
    import asyncio
else:
    import threading  # noqa: F401, RUF100

if TYPE_CHECKING:
    from psycopg.rows import RowFactory

__all__ = ["AsyncCluster", "Counters", "Lease", "NodeUnavailableError", "node_status"]

log = logging.getLogger("replica_router.cluster")


class AsyncCluster(ClusterBase):
    """A primary and its replicas, for asyncio (see the module docstring and README).

    ``async with cluster.read() as conn`` gives an autocommit, read-only psycopg
    connection on a replica that satisfies the read (or the primary, per
    ``fallback``); ``async with cluster.write() as conn`` a connection on the
    primary inside a transaction, committed on exit (rolled back on error).
    ``session()``, ``token``, ``status()`` and ``counters()`` do no I/O and are
    plain methods. The monitor is a background thread either way (probes are
    tiny and must not depend on the event loop being responsive).
    """

    _sources: dict[tuple[str, Purpose], AsyncConnectionSource]
    _factory: AsyncSourceFactory
    _lock_type = asyncio.Lock

    async def open(self, wait: bool = False, timeout: float = 30.0) -> AsyncCluster:
        """Start the monitor (first probe round included) and the pools; idempotent.

        ``wait=True`` (psycopg_pool's convention) returns only once the cluster is
        ready, which is when a primary is measured (it answered the probe and reports
        itself primary, unfenced): waiting for any node would call a cluster that cannot
        write ready, waiting for every node would let one dead replica block the start.
        If none is within ``timeout`` seconds, ``open()`` closes what it started and
        raises ``PrimaryUnavailable`` naming each node's last error, redacted. Without
        ``wait``, it starts even when nodes are down.
        """
        deadline = time.monotonic() + check_seconds("timeout", timeout)
        async with self._config_lock:
            if self._monitor is not None:
                return self
            factory = cast("AsyncSourceFactory | None", self._source_factory)
            self._factory = factory or async_pool_sources(
                self._pool_kwargs, self._connect_kwargs, connect_timeout=self._connect_timeout
            )
            self._sources = {}
            monitor = self._monitor_for(self._specs)
            await asyncio.to_thread(monitor.start)
            self._monitor = monitor
            try:
                if wait:
                    remaining = deadline - time.monotonic()
                    ready = await asyncio.to_thread(monitor.wait_for, _has_primary, remaining)
                    if ready is None:
                        raise self._not_ready(monitor.topology, timeout)
                for spec in self._specs:
                    await self._open_source(spec, "read")
                primary = route_write(monitor.topology)
                if primary is not None:
                    await self._open_source(self._spec(primary), "write")
            except BaseException:
                await self._shutdown(5.0)
                raise
            _fork.opened(self)
        return self

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the monitor and close every pool (connections in use close on return)."""
        async with self._config_lock:
            await self._shutdown(timeout)

    async def _shutdown(self, timeout: float) -> None:
        _fork.closed(self)
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            await asyncio.to_thread(monitor.stop, timeout)
            self._retire(monitor)
        sources, self._sources = getattr(self, "_sources", {}), {}
        for source in sources.values():
            try:
                await source.close(timeout)
            except Exception:
                log.exception("closing %r failed", source)

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's pools and monitor (see ``_fork``)."""
        self._forget_after_fork()
        if True:  # ASYNC
            pass  # opening needs the child's event loop: left to the caller
        else:
            self.open()

    async def __aenter__(self) -> AsyncCluster:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the user surface --------------------------------------------------------------

    def read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A connection for reads on a node that satisfies them (see the class).

        ``max_lag`` / ``max_lag_bytes`` override the cluster's bounds for this
        read (``math.inf`` lifts one); ``max_staleness`` bounds how old the data
        may be, counting the age of the monitor's snapshot too.

        A failure while *getting* the connection is retried on another node.
        A failure of your own query inside the block is not: something was
        sent, and only you know whether running it again is safe.
        """
        return _AsyncBlock(self, False, max_lag, max_lag_bytes, max_staleness)

    def write(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A primary connection in a transaction: commit on exit, rollback on error.

        Raises :class:`PrimaryUnavailable` when no primary is usable (after
        waiting up to ``write_timeout`` for one, if set).
        """
        return _AsyncBlock(self, True)

    async def add_replica(self, dsn: str, name: str | None = None) -> str:
        """Add a replica at runtime (probed from the next round on); returns its name."""
        async with self._config_lock:
            spec = self._new_replica_spec(dsn, name)
            self._specs = (*self._specs, spec)
            monitor = self._monitor
            if monitor is not None:
                await self._open_source(spec, "read")
                monitor.add_node(spec)
        return spec.name

    async def remove_replica(self, name: str, timeout: float = 5.0) -> None:
        """Stop routing to ``name`` and close its pools (not the primary)."""
        async with self._config_lock:
            self._spec_to_remove(name)
            self._specs = tuple(s for s in self._specs if s.name != name)
            monitor = self._monitor
            if monitor is not None:
                await asyncio.to_thread(monitor.remove_node, name)
            sources = getattr(self, "_sources", {})
            gone = [sources[k] for k in ((name, "read"), (name, "write")) if k in sources]
            self._sources = {k: v for k, v in sources.items() if k[0] != name}
        for source in gone:
            await source.close(timeout)

    def connection(
        self,
        *,
        autocommit: bool = True,
        read_only: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> AsyncRoutedConnection:
        """An :class:`~replica_router.connection_async.AsyncRoutedConnection`: one
        psycopg-like connection that sends each statement where it may run.

        Autocommit by default, so statements are routed one by one; use
        ``conn.transaction()`` for a transaction (pinned to the primary, or a
        replica with ``read_only=True``). Node connections are taken from the
        pools when first needed: nothing happens before the first statement.
        """
        self._require_monitor()
        return AsyncRoutedConnection(
            self, autocommit=autocommit, read_only=read_only, row_factory=row_factory
        )

    async def check_connections(self, timeout: float | None = None) -> dict[str, bool]:
        """``{name: True}`` for each node a checked connection could be had from now."""
        self._require_monitor()
        wait = self._connect_timeout if timeout is None else timeout
        result = {}
        for spec in self._specs:
            try:
                lease = await self._checkout(
                    spec.name, "read", timeout=wait, give_up_when_down=False
                )
            except NodeUnavailableError:
                result[spec.name] = False
            else:
                await self._checkin(lease)
                result[spec.name] = True
        return result

    # -- the public routing seam (integrations with their own connections) -------------

    async def route_read(
        self,
        max_lag: float | None = None,
        prefer: str | None = None,
        *,
        exclude: Iterable[str] = (),
    ) -> str:
        """The node name a read in the current scope should use now.

        For integrations that hold their own connections (SQLAlchemy, Django,
        Peewee, yours): every rule of ``read()`` applies (lag bounds, this
        scope's token and monotonic floor, ``fallback``), counted as routed.
        The name may be the primary's. ``prefer`` keeps a node (the one this
        unit of work read from before) while it still qualifies, so its reads
        do not go back in time by hopping to a replica that is further behind
        (and a held connection is not swapped per read); ``exclude`` skips
        nodes that just failed you (the next best is named, as ``read()``
        retries another node). Raises ``NoReplicaAvailable`` (or
        ``ConsistencyTimeout``) like ``read()``.
        """
        monitor = self._monitor or self._require_monitor()
        topology = monitor.topology
        plan = self._plan_read(topology, max_lag)
        if exclude == ():  # the common case takes one decision, as read()'s does
            target = self._replica_at_once(topology, plan, prefer)
            if target is not None:
                self._count_route("read", target, "replica")
                return target
        attempt = ReadAttempt(self._rules, plan, catch_up=False, prefer=prefer)
        attempt.exclude = frozenset(exclude)
        while True:
            step = attempt.step(topology, time.monotonic())
            if step.action == WAIT:
                waited = await asyncio.to_thread(monitor.wait_for, step.ready, step.timeout)
                topology = waited or monitor.topology
                continue
            if step.node is None:
                raise self._read_error(step)
            self._count_route("read", step.node, step.reason or "replica")
            if step.reason is not None:
                self._count_fallback(step.reason, step.node)
            return step.node

    async def route_write(self) -> str:
        """The node that takes writes now, for integrations with their own connections.

        Waits up to ``write_timeout`` for a primary (as ``write()`` does), counted as
        routed; raises :class:`PrimaryUnavailable` when there is none.
        """
        monitor = self._require_monitor()
        deadline = time.monotonic() + (self._write_timeout or 0.0)
        while True:
            topology = monitor.topology
            target = route_write(topology)
            if target is not None:
                self._count_route("write", target)
                return target
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_primary(monitor.topology, None)
            await asyncio.to_thread(
                monitor.wait_for, new_primary_after(topology.generation), remaining
            )

    async def checkout(
        self, node: str, purpose: Purpose = "read", *, timeout: float | None = None
    ) -> Lease[psycopg.AsyncConnection[Any]]:
        """A checked connection to the named node from its pool for ``purpose``.

        For integrations that hold a node's connection across statements
        (``route_read()`` names the node): ``"read"`` connections are autocommit
        and read-only, ``"write"`` ones transactional. Give it back with
        :meth:`checkin`. Raises :class:`NodeUnavailable` when none can be had.
        """
        try:
            return await self._checkout(node, purpose, timeout=timeout)
        except NodeUnavailableError as exc:
            raise NodeUnavailable(node, exc.message) from None

    async def checkin(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None:
        """Give back a connection from :meth:`checkout` to its pool."""
        await self._checkin(lease)

    # -- seams (see the module docstring) -------------------------------------------------

    async def _open_source(self, spec: NodeSpec, purpose: Purpose) -> AsyncConnectionSource:
        source = self._factory(spec, purpose, self._role_of(spec))
        await source.open()
        self._sources = {**self._sources, (spec.name, purpose): source}
        return source

    async def _source(self, node: str, purpose: Purpose) -> AsyncConnectionSource:
        source = self._sources.get((node, purpose))
        if source is None:  # a write pool for a promoted replica, made on first use
            async with self._config_lock:
                if self._monitor is None:
                    raise Error("AsyncCluster is closed")
                source = self._sources.get((node, purpose))
                if source is None:
                    source = await self._open_source(self._spec(node), purpose)
        return source

    async def _checkout(
        self,
        node: str,
        purpose: Purpose,
        *,
        timeout: float | None = None,
        give_up_when_down: bool = True,
        routes: dict[str, int] | None = None,
    ) -> Lease[psycopg.AsyncConnection[Any]]:
        source = self._sources.get((node, purpose)) or await self._source(node, purpose)
        budget = self._checkout_timeout if timeout is None else timeout
        started = since = time.monotonic()
        wait, dead = budget, 0
        while True:
            try:
                conn = await source.getconn(min(CHECKOUT_SLICE, wait))
            except PoolTimeout:
                conn = await self._wait_for_connection(
                    source, node, purpose, wait, give_up_when_down
                )
            except psycopg.Error as exc:  # e.g. the pool was closed by remove_replica
                raise self._unavailable(node, exc) from None
            self._track(node, conn)  # from here on a hung node's monitor can free it
            try:
                await source.check(conn)
            except Exception as exc:
                self._untrack(node, conn)
                # before the pool closes it; one we abandoned says the node is hung
                lost = died_while_pooled(conn, since) and conn not in self._abandoned
                with contextlib.suppress(Exception):
                    await source.putconn(conn)  # a broken one is replaced by the pool
                if lost and dead < DEAD_POOLED_RETRIES:
                    dead += 1  # design rule 9: lost while idle, try the next one
                    # What the pool began connecting until now may have been hit by the
                    # same event: only connections begun later count as fresh.
                    since = time.monotonic()
                    wait = max(CHECKOUT_SLICE, budget - (since - started))
                    continue
                message = f"connection check failed: {self._scrub(node, str(exc).strip())}"
                raise NodeUnavailableError(node, message, broken=True) from None
            if conn.cursor_factory is psycopg.AsyncCursor:  # not one the user configured
                # The first statement carries what must go before it (the reset the
                # connection owes, a BEGIN) in its own round trip.
                conn.cursor_factory = AsyncBeginningCursor
            self._count_out(node, routes)
            return Lease(conn, node, purpose, source)

    async def _wait_for_connection(
        self,
        source: AsyncConnectionSource,
        node: str,
        purpose: Purpose,
        wait: float,
        give_up_when_down: bool,
    ) -> psycopg.AsyncConnection[Any]:
        """The pool had nothing idle: wait in slices, giving up early if the node goes down."""
        deadline = time.monotonic() + wait - CHECKOUT_SLICE
        while True:
            timeout = self._checkout_slice(node, purpose, wait, deadline, give_up_when_down)
            try:
                return await source.getconn(timeout)
            except PoolTimeout:
                continue
            except psycopg.Error as exc:
                raise self._unavailable(node, exc) from None

    async def _checkin(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None:
        self._untrack(lease.node, lease.conn)
        if lease.conn.cursor_factory is AsyncBeginningCursor:  # as _checkout found it
            lease.conn.cursor_factory = psycopg.AsyncCursor
        try:
            await lease.source.putconn(lease.conn)
        finally:
            self._count_in(lease.node)

    async def _acquire_read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> Lease[psycopg.AsyncConnection[Any]]:
        monitor = self._monitor or self._require_monitor()
        topology = monitor.topology
        plan = self._plan_read(topology, max_lag, max_lag_bytes, max_staleness)
        target = self._replica_at_once(topology, plan)
        if target is not None:  # the common case: one decision, the steps for the rest
            try:
                lease = await self._checkout(target, "read", routes=self._reads)
            except NodeUnavailableError as exc:
                attempt = ReadAttempt(self._rules, plan)
                topology = self._node_failed(attempt, exc)
            else:
                self._served(target, None)
                return lease
        else:
            attempt = ReadAttempt(self._rules, plan)
        while True:
            step = attempt.step(topology, time.monotonic())
            node = step.node
            try:
                if step.action == USE and node is not None:
                    lease = await self._checkout(node, "read", routes=self._reads)
                    self._served(node, step.reason)
                    return lease
                if step.action == CATCH_UP and node is not None:
                    caught_up = await self._caught_up(node, attempt)
                    if caught_up is not None:
                        return caught_up
                    continue
            except NodeUnavailableError as exc:
                topology = self._node_failed(attempt, exc)
                continue
            if step.action == WAIT:
                waited = await asyncio.to_thread(monitor.wait_for, step.ready, step.timeout)
                topology = waited or monitor.topology
                continue
            raise self._read_error(step)

    async def _caught_up(
        self, node: str, attempt: ReadAttempt
    ) -> Lease[psycopg.AsyncConnection[Any]] | None:
        """The snapshot says every replica is behind the token; ask the furthest one now."""
        lease = await self._checkout(node, "read")
        try:
            cursor = await lease.conn.execute(REPLAY_SQL)
            row = await cursor.fetchone()
        except psycopg.Error as exc:
            broken = lease.conn.broken
            await self._checkin(lease)
            raise self._unavailable(node, exc, broken) from None
        position = position_of(row[0] if row else None)
        wanted = attempt.plan.req.min_position
        if position is None or wanted is None or position < wanted:
            await self._checkin(lease)
            return None
        lease.position = position
        self._count_route("read", node, "caught_up")
        return lease

    async def _release_read(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None:
        conn = lease.conn
        try:
            if not conn.autocommit or conn.pgconn.transaction_status != TransactionStatus.IDLE:
                # Put back what the block changed: no open transaction, autocommit on.
                with contextlib.suppress(psycopg.Error):
                    if conn.pgconn.transaction_status in (
                        TransactionStatus.INTRANS,
                        TransactionStatus.INERROR,
                    ):
                        await conn.rollback()
                    if not conn.autocommit:
                        await conn.set_autocommit(True)
            if self._monotonic:
                self._raise_floor(await self._read_position(lease))
        finally:
            await self._checkin(lease)

    async def _read_position(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> int | None:
        """Where the data just read stands: measured now (an upper bound of what the
        reads saw), else the best we knew before."""
        with contextlib.suppress(psycopg.Error):
            if lease.conn.pgconn.transaction_status == TransactionStatus.IDLE:
                cursor = await lease.conn.execute(consistency.NODE_POSITION_SQL)
                row = await cursor.fetchone()
                position = position_of(row[0] if row else None)
                if position is not None:
                    return position
        return self._known_position(lease)

    async def _acquire_write(self) -> Lease[psycopg.AsyncConnection[Any]]:
        monitor = self._require_monitor()
        deadline = time.monotonic() + (self._write_timeout or 0.0)
        error: NodeUnavailableError | None = None
        while True:
            topology = monitor.topology
            target = route_write(topology)
            if target is not None:
                try:
                    lease = await self._checkout(target, "write", routes=self._writes)
                except NodeUnavailableError as exc:
                    error = exc
                    if exc.broken:
                        monitor.mark_suspect(target, exc.message)
                else:
                    if self.events.active:
                        self._route_event("write", target, "primary")
                    return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_primary(monitor.topology, error) from error
            await asyncio.to_thread(
                monitor.wait_for, new_primary_after(topology.generation), remaining
            )

    async def _release_write(
        self, lease: Lease[psycopg.AsyncConnection[Any]], error: BaseException | None
    ) -> None:
        conn = lease.conn
        try:
            status = conn.pgconn.transaction_status
            if error is None and status == TransactionStatus.INTRANS:
                await self._capture_commit(conn)  # the usual path: one round trip
                return
            if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                with contextlib.suppress(psycopg.Error):
                    await conn.rollback()
            # The block may have committed on its own before it ended or raised
            # (conn.commit(), conn.transaction(), autocommit statements): only the
            # server knows, and its current position covers whatever it did.
            try:
                position = await self._position_now(conn)
            except psycopg.Error:
                # The connection broke after the block's own statements: any position
                # read on the node from now on covers a commit they made.
                position = await self._position_elsewhere(lease.node, error)
            self._note_write(position)
        finally:
            await self._checkin(lease)

    @staticmethod
    async def _position_now(conn: psycopg.AsyncConnection[Any]) -> int | None:
        """The node's WAL position, asked in autocommit (switching is client-side
        only), so that no transaction is left open on a connection going back."""
        await conn.set_autocommit(True)
        try:
            cursor = await conn.execute(consistency.POSITION_SQL)
            row = await cursor.fetchone()
        finally:
            with contextlib.suppress(psycopg.Error):
                await conn.set_autocommit(False)
        return position_of(row[0] if row else None)

    async def _position_elsewhere(self, node: str, error: BaseException | None) -> int | None:
        """:meth:`_position_now` on another connection to ``node``. When none answers and
        the block ended without an error, it may have committed where no token can
        follow it: the caller gets an error instead of a silent stale read."""
        try:
            lease = await self._checkout(node, "write")
            try:
                return await self._position_now(lease.conn)
            finally:
                await self._checkin(lease)
        except (NodeUnavailableError, psycopg.Error) as exc:
            if error is not None:
                return None  # the block's own error goes on
            cause = exc.message if isinstance(exc, NodeUnavailableError) else str(exc).strip()
            raise PrimaryUnavailable(
                f"{node}: the write block's connection broke after its statements and no"
                f" other connection answered, so whether and where it committed is unknown"
                f" ({self._scrub(node, cause)})"
            ) from None

    async def _capture_commit(self, conn: psycopg.AsyncConnection[Any]) -> int | None:
        """COMMIT ``conn`` (on the primary) and advance the current scope past it."""
        if self._ryw != "lsn":
            await conn.commit()
            self._note_write(None)
            return None
        position = await acommit_and_capture(conn)
        if position is not None:
            self._note_write(position)
        return position

    async def learn_functions(self, *, refused_on: str | None = None) -> None:
        """Teach ``classifier`` the volatility of the database's own functions.

        From the primary, once per open (the first routed statement does it; an
        integration that classifies statements itself calls it too). ``refused_on``
        names a node that refused a statement classified as a read: what was learned
        may be stale, so it is learned again. A primary that cannot be asked now is
        asked by the next call.
        """
        if refused_on is not None:
            log.warning("%s refused a statement classified as a read; running it on the "
                        "primary and re-learning function volatility", refused_on)  # fmt: skip
            self._functions_learned = False
        if self._functions_learned:
            return
        primary = route_write(self.topology)
        if primary is None:
            return
        try:
            lease = await self._checkout(primary, "read", timeout=self._connect_timeout)
        except NodeUnavailableError:
            return
        try:
            await self.classifier.alearn_functions(lease.conn)
            self._functions_learned = True
        except psycopg.Error as exc:
            log.warning("could not learn function volatility from %s: %s", primary,
                        self._scrub(primary, str(exc)))  # fmt: skip
        finally:
            await self._checkin(lease)


class _AsyncBlock:
    """``with cluster.read()`` / ``write()``: a class, not a generator, to keep the read
    path lean; a write block commits (capturing the position) or rolls back on exit."""

    __slots__ = ("_args", "_cluster", "_lease", "_write")

    def __init__(
        self,
        cluster: AsyncCluster,
        write: bool,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> None:
        self._cluster = cluster
        self._write = write
        self._args = (max_lag, max_lag_bytes, max_staleness)
        self._lease: Lease[psycopg.AsyncConnection[Any]] | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        cluster = self._cluster
        acquired = cluster._acquire_write() if self._write else cluster._acquire_read(*self._args)
        self._lease = lease = await acquired
        return lease.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        if self._write:
            await self._cluster._release_write(lease, exc)
        else:
            await self._cluster._release_read(lease)
