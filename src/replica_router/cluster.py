# Generated from replica_router/cluster_async.py by tools/async_to_sync.py; do not edit.
# Edit the async source and run: python tools/async_to_sync.py
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
import threading  # noqa: F401, RUF100
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
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
from .cluster_async import AsyncCluster as AsyncCluster  # noqa: PLC0414
from .connection import BeginningCursor, RoutedConnection
from .consistency import commit_and_capture
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
    ConnectionSource,
    PoolTimeout,
    Purpose,
    SourceFactory,
    pool_sources,
)
from .topology import NodeSpec

if TYPE_CHECKING:
    from psycopg.rows import RowFactory

__all__ = ["Cluster", "Counters", "Lease", "NodeUnavailableError", "node_status"]

log = logging.getLogger("replica_router.cluster")


class Cluster(ClusterBase):
    """A primary and its replicas, for asyncio (see the module docstring and README).

    ``with cluster.read() as conn`` gives an autocommit, read-only psycopg
    connection on a replica that satisfies the read (or the primary, per
    ``fallback``); ``with cluster.write() as conn`` a connection on the
    primary inside a transaction, committed on exit (rolled back on error).
    ``session()``, ``token``, ``status()`` and ``counters()`` do no I/O and are
    plain methods. The monitor is a background thread either way (probes are
    tiny and must not depend on the event loop being responsive).
    """

    _sources: dict[tuple[str, Purpose], ConnectionSource]
    _factory: SourceFactory
    _lock_type = threading.Lock

    def open(self, wait: bool = False, timeout: float = 30.0) -> Cluster:
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
        with self._config_lock:
            if self._monitor is not None:
                return self
            factory = cast("SourceFactory | None", self._source_factory)
            self._factory = factory or pool_sources(
                self._pool_kwargs, self._connect_kwargs, connect_timeout=self._connect_timeout
            )
            self._sources = {}
            monitor = self._monitor_for(self._specs)
            monitor.start()
            self._monitor = monitor
            try:
                if wait:
                    remaining = deadline - time.monotonic()
                    ready = monitor.wait_for(_has_primary, remaining)
                    if ready is None:
                        raise self._not_ready(monitor.topology, timeout)
                for spec in self._specs:
                    self._open_source(spec, "read")
                primary = route_write(monitor.topology)
                if primary is not None:
                    self._open_source(self._spec(primary), "write")
            except BaseException:
                self._shutdown(5.0)
                raise
            _fork.opened(self)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the monitor and close every pool (connections in use close on return)."""
        with self._config_lock:
            self._shutdown(timeout)

    def _shutdown(self, timeout: float) -> None:
        _fork.closed(self)
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop(timeout)
            self._retire(monitor)
        sources, self._sources = getattr(self, "_sources", {}), {}
        for source in sources.values():
            try:
                source.close(timeout)
            except Exception:
                log.exception("closing %r failed", source)

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's pools and monitor (see ``_fork``)."""
        self._forget_after_fork()
        self.open()

    def __enter__(self) -> Cluster:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the user surface --------------------------------------------------------------

    def read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection for reads on a node that satisfies them (see the class).

        ``max_lag`` / ``max_lag_bytes`` override the cluster's bounds for this
        read (``math.inf`` lifts one); ``max_staleness`` bounds how old the data
        may be, counting the age of the monitor's snapshot too.

        A failure while *getting* the connection is retried on another node.
        A failure of your own query inside the block is not: something was
        sent, and only you know whether running it again is safe.
        """
        return _Block(self, False, max_lag, max_lag_bytes, max_staleness)

    def write(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A primary connection in a transaction: commit on exit, rollback on error.

        Raises :class:`PrimaryUnavailable` when no primary is usable (after
        waiting up to ``write_timeout`` for one, if set).
        """
        return _Block(self, True)

    def add_replica(self, dsn: str, name: str | None = None) -> str:
        """Add a replica at runtime (probed from the next round on); returns its name."""
        with self._config_lock:
            spec = self._new_replica_spec(dsn, name)
            self._specs = (*self._specs, spec)
            monitor = self._monitor
            if monitor is not None:
                self._open_source(spec, "read")
                monitor.add_node(spec)
        return spec.name

    def remove_replica(self, name: str, timeout: float = 5.0) -> None:
        """Stop routing to ``name`` and close its pools (not the primary)."""
        with self._config_lock:
            self._spec_to_remove(name)
            self._specs = tuple(s for s in self._specs if s.name != name)
            monitor = self._monitor
            if monitor is not None:
                monitor.remove_node(name)
            sources = getattr(self, "_sources", {})
            gone = [sources[k] for k in ((name, "read"), (name, "write")) if k in sources]
            self._sources = {k: v for k, v in sources.items() if k[0] != name}
        for source in gone:
            source.close(timeout)

    def connection(
        self,
        *,
        autocommit: bool = True,
        read_only: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> RoutedConnection:
        """An :class:`~replica_router.connection.RoutedConnection`: one
        psycopg-like connection that sends each statement where it may run.

        Autocommit by default, so statements are routed one by one; use
        ``conn.transaction()`` for a transaction (pinned to the primary, or a
        replica with ``read_only=True``). Node connections are taken from the
        pools when first needed: nothing happens before the first statement.
        """
        self._require_monitor()
        return RoutedConnection(
            self, autocommit=autocommit, read_only=read_only, row_factory=row_factory
        )

    def check_connections(self, timeout: float | None = None) -> dict[str, bool]:
        """``{name: True}`` for each node a checked connection could be had from now."""
        self._require_monitor()
        wait = self._connect_timeout if timeout is None else timeout
        result = {}
        for spec in self._specs:
            try:
                lease = self._checkout(spec.name, "read", timeout=wait, give_up_when_down=False)
            except NodeUnavailableError:
                result[spec.name] = False
            else:
                self._checkin(lease)
                result[spec.name] = True
        return result

    # -- the public routing seam (integrations with their own connections) -------------

    def route_read(
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
                waited = monitor.wait_for(step.ready, step.timeout)
                topology = waited or monitor.topology
                continue
            if step.node is None:
                raise self._read_error(step)
            self._count_route("read", step.node, step.reason or "replica")
            if step.reason is not None:
                self._count_fallback(step.reason, step.node)
            return step.node

    def route_write(self) -> str:
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

                monitor.wait_for(new_primary_after(topology.generation), remaining)

    def checkout(
        self, node: str, purpose: Purpose = "read", *, timeout: float | None = None
    ) -> Lease[psycopg.Connection[Any]]:
        """A checked connection to the named node from its pool for ``purpose``.

        For integrations that hold a node's connection across statements
        (``route_read()`` names the node): ``"read"`` connections are autocommit
        and read-only, ``"write"`` ones transactional. Give it back with
        :meth:`checkin`. Raises :class:`NodeUnavailable` when none can be had.
        """
        try:
            return self._checkout(node, purpose, timeout=timeout)
        except NodeUnavailableError as exc:
            raise NodeUnavailable(node, exc.message) from None

    def checkin(self, lease: Lease[psycopg.Connection[Any]]) -> None:
        """Give back a connection from :meth:`checkout` to its pool."""
        self._checkin(lease)

    # -- seams (see the module docstring) -------------------------------------------------

    def _open_source(self, spec: NodeSpec, purpose: Purpose) -> ConnectionSource:
        source = self._factory(spec, purpose, self._role_of(spec))
        source.open()
        self._sources = {**self._sources, (spec.name, purpose): source}
        return source

    def _source(self, node: str, purpose: Purpose) -> ConnectionSource:
        source = self._sources.get((node, purpose))
        if source is None:  # a write pool for a promoted replica, made on first use
            with self._config_lock:
                if self._monitor is None:
                    raise Error("Cluster is closed")
                source = self._sources.get((node, purpose))
                if source is None:
                    source = self._open_source(self._spec(node), purpose)
        return source

    def _checkout(
        self,
        node: str,
        purpose: Purpose,
        *,
        timeout: float | None = None,
        give_up_when_down: bool = True,
        routes: dict[str, int] | None = None,
    ) -> Lease[psycopg.Connection[Any]]:
        source = self._sources.get((node, purpose)) or self._source(node, purpose)
        budget = self._checkout_timeout if timeout is None else timeout
        started = since = time.monotonic()
        wait, dead = budget, 0
        while True:
            try:
                conn = source.getconn(min(CHECKOUT_SLICE, wait))
            except PoolTimeout:
                conn = self._wait_for_connection(source, node, purpose, wait, give_up_when_down)
            except psycopg.Error as exc:  # e.g. the pool was closed by remove_replica
                raise self._unavailable(node, exc) from None
            self._track(node, conn)  # from here on a hung node's monitor can free it
            try:
                source.check(conn)
            except Exception as exc:
                self._untrack(node, conn)
                # before the pool closes it; one we abandoned says the node is hung
                lost = died_while_pooled(conn, since) and conn not in self._abandoned
                with contextlib.suppress(Exception):
                    source.putconn(conn)  # a broken one is replaced by the pool
                if lost and dead < DEAD_POOLED_RETRIES:
                    dead += 1  # design rule 9: lost while idle, try the next one
                    # What the pool began connecting until now may have been hit by the
                    # same event: only connections begun later count as fresh.
                    since = time.monotonic()
                    wait = max(CHECKOUT_SLICE, budget - (since - started))
                    continue
                message = f"connection check failed: {self._scrub(node, str(exc).strip())}"
                raise NodeUnavailableError(node, message, broken=True) from None
            if conn.cursor_factory is psycopg.Cursor:  # not one the user configured
                # The first statement carries what must go before it (the reset the
                # connection owes, a BEGIN) in its own round trip.
                conn.cursor_factory = BeginningCursor
            self._count_out(node, routes)
            return Lease(conn, node, purpose, source)

    def _wait_for_connection(
        self,
        source: ConnectionSource,
        node: str,
        purpose: Purpose,
        wait: float,
        give_up_when_down: bool,
    ) -> psycopg.Connection[Any]:
        """The pool had nothing idle: wait in slices, giving up early if the node goes down."""
        deadline = time.monotonic() + wait - CHECKOUT_SLICE
        while True:
            timeout = self._checkout_slice(node, purpose, wait, deadline, give_up_when_down)
            try:
                return source.getconn(timeout)
            except PoolTimeout:
                continue
            except psycopg.Error as exc:
                raise self._unavailable(node, exc) from None

    def _checkin(self, lease: Lease[psycopg.Connection[Any]]) -> None:
        self._untrack(lease.node, lease.conn)
        if lease.conn.cursor_factory is BeginningCursor:  # as _checkout found it
            lease.conn.cursor_factory = psycopg.Cursor
        try:
            lease.source.putconn(lease.conn)
        finally:
            self._count_in(lease.node)

    def _acquire_read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> Lease[psycopg.Connection[Any]]:
        monitor = self._monitor or self._require_monitor()
        topology = monitor.topology
        plan = self._plan_read(topology, max_lag, max_lag_bytes, max_staleness)
        target = self._replica_at_once(topology, plan)
        if target is not None:  # the common case: one decision, the steps for the rest
            try:
                lease = self._checkout(target, "read", routes=self._reads)
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
                    lease = self._checkout(node, "read", routes=self._reads)
                    self._served(node, step.reason)
                    return lease
                if step.action == CATCH_UP and node is not None:
                    caught_up = self._caught_up(node, attempt)
                    if caught_up is not None:
                        return caught_up
                    continue
            except NodeUnavailableError as exc:
                topology = self._node_failed(attempt, exc)
                continue
            if step.action == WAIT:
                waited = monitor.wait_for(step.ready, step.timeout)
                topology = waited or monitor.topology
                continue
            raise self._read_error(step)

    def _caught_up(self, node: str, attempt: ReadAttempt) -> Lease[psycopg.Connection[Any]] | None:
        """The snapshot says every replica is behind the token; ask the furthest one now."""
        lease = self._checkout(node, "read")
        try:
            cursor = lease.conn.execute(REPLAY_SQL)
            row = cursor.fetchone()
        except psycopg.Error as exc:
            broken = lease.conn.broken
            self._checkin(lease)
            raise self._unavailable(node, exc, broken) from None
        position = position_of(row[0] if row else None)
        wanted = attempt.plan.req.min_position
        if position is None or wanted is None or position < wanted:
            self._checkin(lease)
            return None
        lease.position = position
        self._count_route("read", node, "caught_up")
        return lease

    def _release_read(self, lease: Lease[psycopg.Connection[Any]]) -> None:
        conn = lease.conn
        try:
            if not conn.autocommit or conn.pgconn.transaction_status != TransactionStatus.IDLE:
                # Put back what the block changed: no open transaction, autocommit on.
                with contextlib.suppress(psycopg.Error):
                    if conn.pgconn.transaction_status in (
                        TransactionStatus.INTRANS,
                        TransactionStatus.INERROR,
                    ):
                        conn.rollback()
                    if not conn.autocommit:
                        conn.set_autocommit(True)
            if self._monotonic:
                self._raise_floor(self._read_position(lease))
        finally:
            self._checkin(lease)

    def _read_position(self, lease: Lease[psycopg.Connection[Any]]) -> int | None:
        """Where the data just read stands: measured now (an upper bound of what the
        reads saw), else the best we knew before."""
        with contextlib.suppress(psycopg.Error):
            if lease.conn.pgconn.transaction_status == TransactionStatus.IDLE:
                cursor = lease.conn.execute(consistency.NODE_POSITION_SQL)
                row = cursor.fetchone()
                position = position_of(row[0] if row else None)
                if position is not None:
                    return position
        return self._known_position(lease)

    def _acquire_write(self) -> Lease[psycopg.Connection[Any]]:
        monitor = self._require_monitor()
        deadline = time.monotonic() + (self._write_timeout or 0.0)
        error: NodeUnavailableError | None = None
        while True:
            topology = monitor.topology
            target = route_write(topology)
            if target is not None:
                try:
                    lease = self._checkout(target, "write", routes=self._writes)
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

                monitor.wait_for(new_primary_after(topology.generation), remaining)

    def _release_write(
        self, lease: Lease[psycopg.Connection[Any]], error: BaseException | None
    ) -> None:
        conn = lease.conn
        try:
            status = conn.pgconn.transaction_status
            if error is None and status == TransactionStatus.INTRANS:
                self._capture_commit(conn)  # the usual path: one round trip
                return
            if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
            # The block may have committed on its own before it ended or raised
            # (conn.commit(), conn.transaction(), autocommit statements): only the
            # server knows, and its current position covers whatever it did.
            try:
                position = self._position_now(conn)
            except psycopg.Error:
                # The connection broke after the block's own statements: any position
                # read on the node from now on covers a commit they made.
                position = self._position_elsewhere(lease.node, error)
            self._note_write(position)
        finally:
            self._checkin(lease)

    @staticmethod
    def _position_now(conn: psycopg.Connection[Any]) -> int | None:
        """The node's WAL position, asked in autocommit (switching is client-side
        only), so that no transaction is left open on a connection going back."""
        conn.set_autocommit(True)
        try:
            cursor = conn.execute(consistency.POSITION_SQL)
            row = cursor.fetchone()
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.set_autocommit(False)
        return position_of(row[0] if row else None)

    def _position_elsewhere(self, node: str, error: BaseException | None) -> int | None:
        """:meth:`_position_now` on another connection to ``node``. When none answers and
        the block ended without an error, it may have committed where no token can
        follow it: the caller gets an error instead of a silent stale read."""
        try:
            lease = self._checkout(node, "write")
            try:
                return self._position_now(lease.conn)
            finally:
                self._checkin(lease)
        except (NodeUnavailableError, psycopg.Error) as exc:
            if error is not None:
                return None  # the block's own error goes on
            cause = exc.message if isinstance(exc, NodeUnavailableError) else str(exc).strip()
            raise PrimaryUnavailable(
                f"{node}: the write block's connection broke after its statements and no"
                f" other connection answered, so whether and where it committed is unknown"
                f" ({self._scrub(node, cause)})"
            ) from None

    def _capture_commit(self, conn: psycopg.Connection[Any]) -> int | None:
        """COMMIT ``conn`` (on the primary) and advance the current scope past it."""
        if self._ryw != "lsn":
            conn.commit()
            self._note_write(None)
            return None
        position = commit_and_capture(conn)
        if position is not None:
            self._note_write(position)
        return position

    def learn_functions(self, *, refused_on: str | None = None) -> None:
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
            lease = self._checkout(primary, "read", timeout=self._connect_timeout)
        except NodeUnavailableError:
            return
        try:
            self.classifier.learn_functions(lease.conn)
            self._functions_learned = True
        except psycopg.Error as exc:
            log.warning("could not learn function volatility from %s: %s", primary,
                        self._scrub(primary, str(exc)))  # fmt: skip
        finally:
            self._checkin(lease)


class _Block:
    """``with cluster.read()`` / ``write()``: a class, not a generator, to keep the read
    path lean; a write block commits (capturing the position) or rolls back on exit."""

    __slots__ = ("_args", "_cluster", "_lease", "_write")

    def __init__(
        self,
        cluster: Cluster,
        write: bool,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> None:
        self._cluster = cluster
        self._write = write
        self._args = (max_lag, max_lag_bytes, max_staleness)
        self._lease: Lease[psycopg.Connection[Any]] | None = None

    def __enter__(self) -> psycopg.Connection[Any]:
        cluster = self._cluster
        acquired = cluster._acquire_write() if self._write else cluster._acquire_read(*self._args)
        self._lease = lease = acquired
        return lease.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        if self._write:
            self._cluster._release_write(lease, exc)
        else:
            self._cluster._release_read(lease)
