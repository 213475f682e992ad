"""The routed connection: a psycopg-like connection that sends each statement where it may run.

``AsyncRoutedConnection`` (asyncio, from ``AsyncCluster.connection()``) is written in
``connection_async.py``; ``RoutedConnection`` (threads, from ``Cluster.connection()``)
in ``connection.py`` is generated from it by ``tools/async_to_sync.py``. Edit the
async source and regenerate; CI fails when the twin is out of date.

This is the I/O shell: the rules are :mod:`replica_router.session`'s (where a
statement goes, pinning, settings replay, whether a held link may still be used,
when a commit advances the token) and :mod:`replica_router.routing`'s (which
node serves a read); it runs the statements, BEGIN/COMMIT and the settings
replay those rules ask for, and nothing else. The rules, with their reasons,
are in ``docs/routing-rules.md``; in short:

* **autocommit** (the default here): each statement is classified (the
  cluster's :class:`~replica_router.classify.Classifier`, cached by text) and
  routed on its own. A read goes to the node the cluster's routing picks (lag
  bounds, the scope's token, the policy); anything else to the primary, after
  which the scope's token advances past the write.
* **a transaction** (``transaction()``, a ``BEGIN`` statement, or any statement
  with ``autocommit=False``) is pinned to one node for its whole life: the
  primary, or a replica when declared read-only (``read_only = True``,
  ``BEGIN READ ONLY``, or ``SET TRANSACTION READ ONLY`` as the first statement
  with ``autocommit=False``). It is never split.
* **session state**: plain ``SET``/``RESET`` are recorded and replayed on every
  node connection the session uses; ``set_config(..., false)`` and session
  ``SET`` inside a transaction are read back from ``pg_settings`` and replayed
  the same way. Temp tables, ``LISTEN``, session advisory locks, ``PREPARE``,
  cursors ``WITH HOLD``, ``DISCARD`` and ``LOAD`` pin the session to the
  primary from then on (their state cannot be copied to another node).

Node connections are leased from the cluster's pools when first needed and
kept until ``close()``: one for reads (a replica, re-checked against the
cluster's routing whenever the topology snapshot or the scope's consistency
mark changes) and one on the primary. Keeping them is what makes a routed
statement cost what a plain one does (``benchmarks/routed_connection.py``);
``least_busy`` sees them as in use, which they are. On return, a connection
that carried session state is cleaned with ``DISCARD ALL``.

A routed connection is for one thread or task at a time, like a psycopg
cursor: share the cluster, not the connection.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Iterable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, cast

import psycopg
from psycopg._preparing import Prepare
from psycopg._queries import PostgresQuery
from psycopg.abc import Params, Query
from psycopg.adapt import Transformer
from psycopg.errors import ReadOnlySqlTransaction
from psycopg.pq import TransactionStatus
from psycopg.rows import RowFactory, tuple_row

from ._connection_base import (
    PIPELINE_SYNC_NO_WAIT,
    CursorBase,
    Many,
    PsycopgSession,
    exchange_gen,
    lsn_of,
    query_text,
    queue_sync,
    savepoint_sql,
    swallows,
)
from .classify import Intent, Statement
from .consistency import (
    NODE_POSITION_SQL,
    POSITION_SQL,
    WROTE_COMMIT_POSITION_SQL,
    WROTE_SQL,
    current_scope,
)
from .errors import PrimaryUnavailable
from .lsn import parse_lsn
from .session import (
    BEGINS,
    PINNING_EFFECTS,
    ROUTE_BEGIN_READ,
    ROUTE_BEGIN_WRITE,
    ROUTE_SETTING,
    SESSION_SETTINGS_SQL,
    Link,
    pipelines_position,
    refuse_on_replica,
    refused_read,
    route,
    uses_copy,
    writes_data,
)
from .sources import (
    aset_autocommit_owing,
    check_queued_reset,
    queue_owed_reset,
    server_hung_up,
)

if TYPE_CHECKING:
    from psycopg import IsolationLevel, Notify

    from ._cluster_base import Lease
    from .classify import Classifier
    from .monitor import Monitor

__all__ = [
    "PIPELINE_SYNC_NO_WAIT",  # whether run_capturing() can be used with this psycopg
    "AsyncRoutedConnection",
    "AsyncRoutedCursor",
    "AsyncRoutedPipeline",
    "AsyncRoutedTransaction",
    "run_capturing",
]

log = logging.getLogger("replica_router.connection")


async def run_capturing(
    cursor: psycopg.AsyncCursor[Any],
    query: Any,
    params: Any,
    prepare: bool | None = None,
    *,
    wrote: bool,
) -> tuple[bool, int | None]:
    """Run one autocommit statement on ``cursor`` (an idle autocommit connection to the
    primary) and read the WAL position after its commit, in one round trip: libpq's
    pipeline mode sends the statement, a Sync (which ends its implicit transaction:
    the commit), the position query and a second Sync, and waits once. Read inside the
    statement's own transaction, the position would be before its commit record; read
    after the Sync it is at or past it. Unless ``wrote`` (the classifier called it a
    write), the server is asked too whether the statement's transaction was assigned a
    transaction id, inside that transaction, before the Sync. Returns (wrote,
    position); raises the statement's error (the position query after the Sync runs
    anyway). Results go to ``cursor`` as its ``execute()`` would hand them. Only
    where :data:`PIPELINE_SYNC_NO_WAIT` and ``pipelines_position(st)``
    hold; the framework integrations use it too. A reset the pooled connection owes
    goes first, in the same round trip."""
    conn = cursor.connection
    statement = _prepare_cursor(cursor, query, params, prepare)
    prepared = conn._prepared
    # The position query is prepared at once (it runs after every such write; parsing
    # and planning it each time was half its cost), unless preparing is off
    # (prepare_threshold=None: PgBouncer in transaction mode).
    at_prep, at_name = prepared.get(_POSITION_PGQ, True)
    async with conn.lock:
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        try:
            owed = queue_owed_reset(conn)
            key = _send_statement(cursor, statement)
            if not wrote:
                pgconn.send_query_params(_WROTE_QUERY, None)
            pgconn.pipeline_sync()  # ends the statement's implicit transaction: commits
            if at_prep is _NO:
                pgconn.send_query_params(_POSITION_PGQ.query, None)
            else:
                if at_prep is _SHOULD:
                    pgconn.send_prepare(at_name, _POSITION_PGQ.query)
                pgconn.send_query_prepared(at_name, None)
            at_key = prepared.maybe_add_to_cache(_POSITION_PGQ, at_prep, at_name)
            pgconn.pipeline_sync()
            expected = (statement.prep is _SHOULD) + (at_prep is _SHOULD) + (4 if wrote else 5)
            groups = await conn.wait(exchange_gen(pgconn, expected + owed))
        finally:
            _leave_pipeline(pgconn)
        check_queued_reset(conn, groups, owed)
        if at_key is not None:
            prepared.validate(at_key, at_prep, at_name, groups[-2])
        await _hand_over(cursor, query, statement, key, groups)
    if not wrote:
        wrote = _first_value(groups[1]) == b"t"
    position = _first_lsn(groups[-2])
    if position is None:  # the position query failed (its prepared statement gone?)
        asked = conn.cursor(row_factory=tuple_row)
        await asked.execute(POSITION_SQL, prepare=False)  # still after the commit
        position = lsn_of(asked)
    return wrote, position


async def run_beginning(
    cursor: psycopg.AsyncCursor[Any], query: Any, params: Any, prepare: bool | None = None
) -> None:
    """Run a checked-out connection's first statement with what must go before it, in
    one round trip (libpq's pipeline mode): the reset the pooled connection owes (and a
    Sync, so that the statement's transaction cannot undo it), then, unless in
    autocommit, the ``BEGIN`` psycopg would send (its isolation level, read only,
    deferrable), the statement and a Sync, which leaves that transaction open. psycopg
    waits for its BEGIN on its own. The connection must be idle and not in a
    pipeline; results and errors as ``execute()``'s."""
    conn = cursor.connection
    statement = _prepare_cursor(cursor, query, params, prepare)
    async with conn.lock:
        pgconn = conn.pgconn
        begin = not conn._autocommit
        pgconn.enter_pipeline_mode()
        try:
            owed = queue_owed_reset(conn)
            if begin:
                pgconn.send_query_params(conn._get_tx_start_command(), None)
            key = _send_statement(cursor, statement)
            pgconn.pipeline_sync()
            expected = owed + begin + (statement.prep is _SHOULD) + 2
            groups = await conn.wait(exchange_gen(pgconn, expected))
        finally:
            _leave_pipeline(pgconn)
        check_queued_reset(conn, groups, owed)
        if begin:
            (began,) = groups.pop(0)
            if began.status == _FATAL_ERROR:
                raise psycopg.errors.error_from_result(began, encoding=pgconn._encoding)
        await _hand_over(cursor, query, statement, key, groups)


class _Statement(NamedTuple):
    """A statement converted for sending, and what psycopg's cache says of it."""

    pgq: PostgresQuery
    prep: Prepare
    name: bytes


def _prepare_cursor(
    cursor: psycopg.AsyncCursor[Any] | psycopg.Cursor[Any], query: Any, params: Any,
    prepare: bool | None,
) -> _Statement:  # fmt: skip
    """What psycopg's ``execute()`` does before sending (its cursor's own steps), so
    that the results can be handed to the cursor as ``execute()`` would hand them."""
    if cursor.closed:
        raise psycopg.InterfaceError("the cursor is closed")
    cursor._reset()
    if cursor._last_query is not query:
        cursor._last_query = None
        cursor._tx = Transformer(cursor)
    pgq = cursor._convert_query(query, params)
    prep, name = cursor.connection._prepared.get(pgq, prepare)  # psycopg's own cache
    return _Statement(pgq, prep, name)


def _send_statement(
    cursor: psycopg.AsyncCursor[Any] | psycopg.Cursor[Any], statement: _Statement
) -> Any:
    """Send the statement in pipeline mode, prepared as psycopg's cache says (written
    on libpq: psycopg's Pipeline costs client time of its own, a poll and a send per
    queued command and its result queue, about a round trip's); the cache's key."""
    pgq, prep, name = statement
    pgconn = cursor.connection.pgconn
    if prep is _NO:
        pgconn.send_query_params(
            pgq.query, pgq.params, param_formats=pgq.formats,
            param_types=pgq.types, result_format=cursor.format,
        )  # fmt: skip
    else:
        if prep is _SHOULD:
            pgconn.send_prepare(name, pgq.query, param_types=pgq.types)
        pgconn.send_query_prepared(
            name, pgq.params, param_formats=pgq.formats, result_format=cursor.format
        )
    return cursor.connection._prepared.maybe_add_to_cache(pgq, prep, name)


def _leave_pipeline(pgconn: Any) -> None:
    try:
        pgconn.exit_pipeline_mode()
    except psycopg.OperationalError:
        pgconn.finish()  # interrupted with results pending: unusable
        raise


async def _hand_over(
    cursor: psycopg.AsyncCursor[Any], query: Any, statement: _Statement, key: Any,
    groups: list[Any],
) -> None:  # fmt: skip
    """The statement's results (``groups[0]``, after its prepare's) to the cursor, as
    ``execute()`` hands them: its error raised, psycopg's cache kept current."""
    conn = cursor.connection
    prepared = conn._prepared
    pgq, prep, name = statement
    if prep is _SHOULD:
        (made,) = groups.pop(0)
        if made.status == _FATAL_ERROR:
            raise psycopg.errors.error_from_result(made, encoding=conn.pgconn._encoding)
    results = groups[0]
    if key is not None:
        prepared.validate(key, prep, name, results)
    cursor._query = pgq
    cursor._last_query = query
    cursor._check_results(results)  # the statement's error, raised as psycopg does
    cursor._set_results(results)
    if prepared._to_flush:  # e.g. DEALLOCATE a statement out of the cache
        await conn.wait(prepared.maintain_gen(conn))


class AsyncBeginningCursor(psycopg.AsyncCursor[Any]):
    """The cursor class of a checked-out pooled connection: a statement that starts a
    transaction, or the first one after the connection was handed back (which owes its
    reset), goes with what must precede it in one round trip (:func:`run_beginning`);
    anything else as psycopg runs it. In autocommit, once nothing is owed, the
    connection's later cursors are psycopg's own again."""

    __slots__ = ()

    async def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None,
        binary: bool | None = None,
    ) -> AsyncBeginningCursor:  # fmt: skip
        conn = self._conn
        if (
            binary is None
            and (not conn._autocommit or getattr(conn, "owed_since", None) is not None)
            and conn._pipeline is None
            and conn.pgconn.transaction_status == _IDLE
            and PIPELINE_SYNC_NO_WAIT
        ):
            await run_beginning(self, query, params, prepare)
        else:
            await super().execute(query, params, prepare=prepare, binary=binary)
        if conn._autocommit and conn.cursor_factory is AsyncBeginningCursor:
            conn.cursor_factory = psycopg.AsyncCursor  # nothing left to carry
        return self


def _first_value(results: list[Any]) -> bytes | None:
    result = results[0] if results else None
    if result is None or result.status != _TUPLES_OK or not result.ntuples:
        return None
    value: bytes | None = result.get_value(0, 0)
    return value


def _first_lsn(results: list[Any]) -> int | None:
    value = _first_value(results)
    return None if value is None else parse_lsn(value.decode())


_WROTE_QUERY: Final = WROTE_SQL.encode()


def _converted(query: str) -> PostgresQuery:
    """``query`` (no parameters) as psycopg's prepared-statement cache keys it."""
    pgq = PostgresQuery(Transformer())
    pgq.convert(query, None)
    return pgq


_POSITION_PGQ: Final = _converted(POSITION_SQL)
_TUPLES_OK: Final = psycopg.pq.ExecStatus.TUPLES_OK
_FATAL_ERROR: Final = psycopg.pq.ExecStatus.FATAL_ERROR
_NO: Final = Prepare.NO
_SHOULD: Final = Prepare.SHOULD
_IDLE: Final = TransactionStatus.IDLE
_PIPELINE_OFF: Final = psycopg.pq.PipelineStatus.OFF
_INTRANS: Final = TransactionStatus.INTRANS
_READ: Final = Intent.READ


class _Cluster(Protocol):
    """What a routed connection asks of its cluster (``AsyncCluster`` is one)."""

    classifier: Classifier
    _monitor: Monitor | None

    @property
    def monitor(self) -> Monitor | None: ...
    @property
    def system_identifier(self) -> int | None: ...
    def _require_monitor(self) -> Monitor: ...
    def _count_route(self, intent: Any, node: str, reason: str = "") -> None: ...

    _monotonic: bool

    def _note_write(self, position: int | str | None) -> None: ...
    def _raise_floor(self, position: int | None) -> None: ...
    async def _acquire_read(self) -> Lease[psycopg.AsyncConnection[Any]]: ...
    async def _release_read(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None: ...
    async def _acquire_write(self) -> Lease[psycopg.AsyncConnection[Any]]: ...
    async def _checkin(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None: ...
    async def _capture_commit(self, conn: psycopg.AsyncConnection[Any]) -> int | None: ...
    async def _position_elsewhere(self, node: str, error: BaseException | None) -> int | None: ...
    async def learn_functions(self, *, refused_on: str | None = None) -> None: ...


class AsyncRoutedConnection(PsycopgSession):
    """A psycopg-like connection whose statements are routed (see the module doc).

    Made by ``cluster.connection()``; use it in an ``async with`` block: on exit an
    open transaction is committed (rolled back on error) and the node
    connections go back to the cluster's pools.
    """

    _cluster: _Cluster

    def __init__(
        self,
        cluster: _Cluster,
        *,
        autocommit: bool = True,
        read_only: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> None:
        super().__init__(
            cluster, autocommit=autocommit, read_only=read_only, row_factory=row_factory
        )

    async def set_autocommit(self, value: bool) -> None:
        """psycopg's ``set_autocommit()`` (the ``autocommit`` attribute, as a call)."""
        self.autocommit = value

    async def set_read_only(self, value: bool | None) -> None:
        self.read_only = value

    async def set_isolation_level(self, value: IsolationLevel | None) -> None:
        self.isolation_level = value

    async def set_deferrable(self, value: bool | None) -> None:
        self.deferrable = value

    def cursor(
        self,
        name: str = "",
        *,
        binary: bool = False,
        row_factory: RowFactory[Any] | None = None,
    ) -> AsyncRoutedCursor:
        """A cursor whose statements are routed like the connection's."""
        self._check_open()
        if name:
            raise psycopg.NotSupportedError(
                "server-side (named) cursors are not routed: use cluster.read() or "
                "cluster.write() for a connection to one node"
            )
        return AsyncRoutedCursor(self, row_factory or self.row_factory, binary)

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> AsyncRoutedCursor:
        """Run one statement where it may run; returns a cursor to fetch from."""
        cursor = AsyncRoutedCursor(self, self.row_factory, binary)
        link = self._reader
        if (
            link is not None
            and not self._attention
            and self._tx is None
            and self._autocommit
            and not self._pinned
            and link.gen == self._settings_gen
            and type(query) is str
        ):
            # The hot path, inlined: an autocommit read on the held read node while the
            # topology snapshot and the scope's mark are the ones it was validated for.
            st = self._analyze(query)
            cluster = self._cluster
            monitor = cluster._monitor
            if (
                st.intent is _READ
                and not st.session
                and monitor is not None
                and monitor.topology is self._read_topology
                and current_scope().mark(cluster.system_identifier) is self._read_mark
            ):
                node_cursor = cursor._cur = link.conn.cursor(row_factory=self.row_factory,
                                                             binary=binary)  # fmt: skip
                if self._adapters is not None:
                    self._adapted(node_cursor)
                try:
                    await node_cursor.execute(query, params, prepare=prepare)
                except psycopg.OperationalError:
                    if not link.conn.broken:
                        raise
                    await self._lost(link)
                    await self._execute(cursor, query, params, prepare)  # routed afresh, once
                    return cursor
                except ReadOnlySqlTransaction:
                    await self._cluster.learn_functions(refused_on=link.node)
                    await self._route(cursor, refused_read(st), query, params, prepare)
                    return cursor
                self._last = link
                if link.fresh:
                    link.fresh = False  # the lease was counted when it was routed
                else:
                    cluster._count_route("read", link.node)
                if cluster._monotonic:
                    await self._note_read(link)
                return cursor
        await self._execute(cursor, query, params, prepare)
        return cursor

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncRoutedTransaction:
        """A transaction block pinned to one node; nested blocks are savepoints."""
        self._check_open()
        return AsyncRoutedTransaction(self, savepoint_name, force_rollback)

    async def commit(self) -> None:
        """Commit the open transaction (capturing its position when it wrote)."""
        self._before_commit()
        await self._sync_pipeline()
        await self._finish(commit=True)

    async def rollback(self) -> None:
        self._before_rollback()
        await self._sync_pipeline()
        await self._finish(commit=False)

    async def close(self) -> None:
        """Roll back an open transaction and give the node connections back."""
        pipeline = self._pipeline
        if pipeline is not None and not self._closed:
            self._pipeline = None
            try:
                await pipeline._sync_point()
            except psycopg.Error as exc:
                log.warning("closing: the pipeline's results were lost: %s", exc)
        for link in self._closing_links():
            await self._release(link)

    def pipeline(self) -> AsyncRoutedPipeline:
        """psycopg's ``conn.pipeline()``, routed: statements are queued without waiting
        for their results, on one node at a time (see :class:`AsyncRoutedPipeline`)."""
        self._check_open()
        if self._pipeline is None:
            return AsyncRoutedPipeline(self)
        return cast(AsyncRoutedPipeline, self._pipeline)  # nested: the same block

    async def _sync_pipeline(self) -> None:
        """A transaction boundary inside a pipeline block: its queued statements first."""
        if self._pipeline is not None:
            await self._pipeline._sync_point()

    def notifies(
        self, *, timeout: float | None = None, stop_after: int | None = None
    ) -> AsyncIterator[Notify]:
        """Notifications received by the session (after ``LISTEN``, which pins it)."""
        self._check_open()
        if not self._pinned or self._writer is None:
            raise psycopg.ProgrammingError("no LISTEN on this connection yet: nothing to wait for")
        return self._writer.conn.notifies(timeout=timeout, stop_after=stop_after)  # type: ignore[no-any-return]

    async def __aenter__(self) -> AsyncRoutedConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed:
            return
        try:
            if exc_type is None and self._failed is None:
                await self.commit()
            elif self._tx is not None:
                try:
                    await self._finish(commit=False)
                except Exception as error:
                    log.warning("rollback on exit failed: %s", error)
        finally:
            await self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"{self!r} was not closed: its node connections never went back to the "
                "pools (close it, or use it as a context manager)",
                ResourceWarning,
                stacklevel=2,
            )

    async def _execute(
        self,
        rc: AsyncRoutedCursor,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        st = await self._statement(query)
        pipeline = self._pipeline
        if pipeline is not None:
            if pipelines_position(st):
                await pipeline._execute(rc, st, query, params, how)
                return
            await pipeline._sync_point()  # it runs on its own, as outside the block
        if uses_copy(st):
            raise psycopg.ProgrammingError(
                f"{st.reason} cannot be used with execute(); use cursor.copy() instead"
            )
        if self._tx is not None:
            await self._in_transaction(rc, st, query, params, how)
        elif self._autocommit_read(st):
            link = await self._read_link()  # the hot path: an autocommit read
            try:
                await self._run(rc, link, query, params, how)
            except psycopg.OperationalError:
                if not link.conn.broken:
                    raise
                await self._lost(link)  # a read changed nothing: run it once more elsewhere
                link = await self._read_link()
                await self._run(rc, link, query, params, how)
            except ReadOnlySqlTransaction:
                await self._cluster.learn_functions(refused_on=link.node)
                await self._route(rc, refused_read(st), query, params, how)
                return
            self._count(link, st)
            if self._cluster._monotonic:
                await self._note_read(link)
        else:
            await self._route(rc, st, query, params, how)

    async def _statement(self, query: Any) -> Statement:
        """The classifier's verdict on the next statement, after what is due first."""
        if self._attention:
            self._check_open()
            self._attention = self._pipeline is not None  # its statements take _execute
            await self._cluster.learn_functions()  # once per cluster; then an attribute check
        st: Statement = self._analyze(query if type(query) is str else query_text(query))
        return st

    @contextlib.asynccontextmanager
    async def _copy(
        self, rc: AsyncRoutedCursor, statement: Query, params: Params | None
    ) -> AsyncIterator[psycopg.AsyncCopy]:
        """``cursor.copy()``: ``COPY ... TO STDOUT`` of a read runs on the read node,
        ``COPY ... FROM STDIN`` on the primary; in autocommit the token follows the
        primary once the COPY has ended (it commits then), in a transaction at COMMIT."""
        st = await self._statement(statement)
        await self._sync_pipeline()  # COPY has no pipeline mode: it runs on its own
        autocommit_write = False
        if self._tx is not None:
            link = self._tx
            self._note_statement(link, st)
        elif self._autocommit_read(st):
            link = await self._read_link()
        elif self._autocommit:
            link = await self._write_link()
            autocommit_write = True
        else:  # the COPY opens the transaction, as any statement does
            link = await self._open_transaction()
            self._note_statement(link, st)
        if link.gen != self._settings_gen:
            await self._sync_settings(link)
        cursor = rc._attach(link.conn)
        try:
            async with cursor.copy(statement, params) as copy:
                yield copy
        except psycopg.Error:
            if link.conn.broken:
                await self._lost(link)
            elif autocommit_write:
                await self._after_failure(link, st, in_transaction=False, many=False)
            raise
        self._count(link, st)
        if autocommit_write and writes_data(st):
            await self._after_write(link)
        elif link.role == "read" and self._cluster._monotonic:
            await self._note_read(link)

    async def _route(
        self,
        rc: AsyncRoutedCursor,
        st: Statement,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        where = route(st, autocommit=self._autocommit, read_only=self._read_only,
                      pinned=self._pinned, serializable=self._serializable)  # fmt: skip
        if where in (ROUTE_BEGIN_READ, ROUTE_BEGIN_WRITE):
            if where == ROUTE_BEGIN_READ:
                refuse_on_replica(st, psycopg)
            link = await (self._read_link() if where == ROUTE_BEGIN_READ else self._write_link())
            if link.gen != self._settings_gen:
                await self._sync_settings(link)  # before BEGIN: a rollback must not undo it
            if st.transaction not in BEGINS:
                await self._checked(link, link.conn.execute, self._begin)
            self._begin_transaction_on(link)
            await self._in_transaction(rc, st, query, params, how)
            return
        if where == ROUTE_SETTING:
            for attempt in (1, 2):
                link = await (
                    self._read_link() if self._setting_on_reader() else self._write_link()
                )
                try:
                    await self._checked(link, self._run, rc, link, query, params, how)
                    break
                except psycopg.Error:
                    if attempt == 2 or not link.conn.broken:
                        raise  # a SET changes nothing else: safe to send again elsewhere
            if self._record_setting(link, query, params):
                await self._capture_settings(link)
            return
        if st.session & PINNING_EFFECTS and not self._pinned:
            await self._pin()
        link = await self._write_link()
        if st.session:
            link.dirty = True  # it may leave state behind: cleaned before it goes back
        captured: tuple[bool, int | None] | None = None
        try:
            if (
                PIPELINE_SYNC_NO_WAIT
                and not isinstance(how, Many)
                and pipelines_position(st)
                and self._position_wanted()
            ):
                captured = await self._checked(
                    link, partial(self._run_capturing, wrote=writes_data(st)),
                    rc, link, query, params, how,
                )  # fmt: skip
            else:
                await self._checked(link, self._run, rc, link, query, params, how)
        except psycopg.Error:
            await self._after_failure(link, st, in_transaction=False, many=isinstance(how, Many))
            raise
        self._count(link, st)
        if captured is not None:  # the position came back with the statement
            wrote, position = captured
            if wrote:
                self._written_at(position)
            return
        committed, settings = self._after_autocommit(
            link, st, link.conn.pgconn.transaction_status, rc.statusmessage
        )
        if committed:
            await self._after_write(link)
        if settings:
            await self._capture_settings(link)

    async def _in_transaction(
        self,
        rc: AsyncRoutedCursor,
        st: Statement,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        link = cast(Link, self._tx)
        self._note_statement(link, st)
        if self._pinned and self._reader is not None and self._reader is not link:
            await self._release(self._reader)
        try:
            await self._checked(link, self._run, rc, link, query, params, how)
        except psycopg.Error:
            if link.role == "write":
                await self._after_failure(link, st, in_transaction=True,
                                          many=isinstance(how, Many))  # fmt: skip
            if self._tx is link and link.conn.pgconn.transaction_status == _IDLE:
                await self._end_transaction(link)  # e.g. "INSERT ...; COMMIT; SELECT 1/0"
            raise
        self._count(link, st)
        settle, note_read, ended = self._after_in_transaction(
            link, st, link.conn.pgconn.transaction_status, rc.statusmessage
        )
        if settle:
            await self._settle(link)
        if note_read:
            await self._note_read(link)  # what the transaction read so far
        if ended:  # COMMIT, ROLLBACK, PREPARE TRANSACTION
            await self._end_transaction(link)

    async def _run(
        self,
        rc: AsyncRoutedCursor,
        link: Link,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        if link.gen != self._settings_gen:
            await self._sync_settings(link)
        cursor = rc._cur
        if cursor is None or cursor.connection is not link.conn:
            cursor = rc._attach(link.conn)
        if isinstance(how, Many):
            await cursor.executemany(query, params, returning=how.returning)
        else:
            await cursor.execute(query, params, prepare=how)

    async def _run_capturing(
        self,
        rc: AsyncRoutedCursor,
        link: Link,
        query: Any,
        params: Any,
        prepare: bool | None,
        *,
        wrote: bool,
    ) -> tuple[bool, int | None]:
        """Run one autocommit statement on the primary and read the position after its
        commit, in one round trip: libpq's pipeline mode sends the statement, a Sync
        (which ends its implicit transaction: the commit), the position query and a
        second Sync, and waits once. Read inside the statement's own transaction, the
        position would be before its commit record; read after the Sync it is at or
        past it. Unless the classifier called it a write (``wrote``), the server is
        asked too whether the statement's transaction was assigned a transaction id,
        inside that transaction, before the Sync. Returns (wrote, position); raises the
        statement's error (the position query after the Sync runs anyway)."""
        if link.gen != self._settings_gen:
            await self._sync_settings(link)
        conn = link.conn
        cursor = rc._cur
        if cursor is None or cursor.connection is not conn:
            cursor = rc._attach(conn)
        return await run_capturing(cursor, query, params, prepare, wrote=wrote)

    async def _checked(self, link: Link, call: Any, *args: Any) -> Any:
        """``call(*args)``; if ``link``'s connection broke doing it, forget the link."""
        try:
            return await call(*args)
        except psycopg.Error:
            if link.conn.broken:
                await self._lost(link)
            raise

    async def _read_link(self) -> Link:
        """The node for reads: the one held while routing still allows it, else a new lease."""
        topology, mark = self._read_key()
        link = self._reader
        if link is not None:
            if self._keeps_reader(link, topology, mark):
                return link
            await self._release(link)
        return self._hold(await self._cluster._acquire_read(), "read", topology, mark)

    async def _write_link(self) -> Link:
        """The primary (the pinned session's node, whatever the topology says since).

        A held link the server ended while it sat idle (a restart, a terminated
        backend: its socket is readable) is replaced before a write is sent on it, so
        the write goes on a fresh connection instead of failing unsent (design rule 9);
        a pinned session fails then, its state gone with that backend."""
        link = self._writer
        topology = self._cluster._require_monitor().topology
        if link is not None:
            if server_hung_up(link.conn):
                await link.conn.close()
                await self._lost(link)
                self._check_open()
            elif self._keeps_writer(link, topology):
                return link
            else:
                await self._release(link)
        lease = await self._cluster._acquire_write()
        try:
            # Statements commit one by one; BEGIN opens. (No I/O: a reset the connection
            # owes stays owed, for its first statement to carry.)
            await aset_autocommit_owing(lease.conn, True)
        except BaseException:
            await self._cluster._checkin(lease)
            raise
        return self._hold(lease, "write", topology)

    async def _pin(self) -> None:
        self._pinned = True
        reader = self._reader
        if reader is not None and reader is not self._tx:
            await self._release(reader)

    async def _release(self, link: Link) -> None:
        """Give ``link`` back to its pool, clean: no transaction, no session state."""
        self._forget(link)
        conn = link.conn
        try:
            if not conn.closed and not conn.broken:
                if conn.pgconn.transaction_status != _IDLE:
                    await conn.rollback()
                if link.dirty:
                    await conn.execute("DISCARD ALL")
                if link.role == "write":
                    await aset_autocommit_owing(conn, False)  # idle: no I/O
        except psycopg.Error as exc:
            log.warning("closing a connection to %s that could not be cleaned: %s", link.node, exc)
            await conn.close()
        finally:
            if link.role == "read":
                await self._cluster._release_read(link.lease)
            else:
                await self._cluster._checkin(link.lease)

    async def _lost(self, link: Link) -> None:
        self._note_lost(link)
        await self._cluster._checkin(link.lease)  # the pool discards a broken connection

    async def _open_transaction(self) -> Link:
        """BEGIN on the node the connection's declarations call for (``transaction()``)."""
        on_replica = self._transactions_on_replica()
        link = await (self._read_link() if on_replica else self._write_link())
        if link.gen != self._settings_gen:
            await self._sync_settings(link)
        await self._checked(link, link.conn.execute, self._begin)
        self._begin_transaction_on(link)
        return link

    async def _finish(self, *, commit: bool) -> None:
        link = self._tx
        if link is None:
            return
        conn = link.conn
        try:
            if commit and self._tx_wrote:
                await self._checked(link, self._cluster._capture_commit, conn)
            elif commit and link.role == "write" and conn.pgconn.transaction_status == _INTRANS:
                await self._checked(link, self._commit_if_wrote, link)
            elif commit:
                await self._checked(link, conn.commit)
            else:
                await self._checked(link, conn.rollback)
            if self._commit_owed and self._tx is link:
                await self._settle(link)
        finally:
            if self._tx is link:
                await self._end_transaction(link)

    async def _end_transaction(self, link: Link) -> None:
        self._tx = None
        self._tx_wrote = False
        if self._tx_settings:
            self._tx_settings = False
            if not self._pinned and not link.conn.broken:
                await self._capture_settings(link)

    async def _commit_if_wrote(self, link: Link) -> None:
        """COMMIT a primary transaction in which the classifier saw no write, asking the
        server whether it wrote (it was assigned a transaction id): one round trip, and
        the token advances only when it did (a view or function that writes)."""
        wanted = self._position_wanted()
        conn = link.conn
        if wanted is None:
            await conn.commit()
            return
        cursor = conn.cursor(row_factory=tuple_row)
        await cursor.execute(WROTE_COMMIT_POSITION_SQL)
        wrote = await cursor.fetchone() == (True,)
        position = lsn_of(cursor) if cursor.nextset() and cursor.nextset() else None
        if wrote:
            self._cluster._note_write(position if wanted else None)

    async def _after_failure(
        self, link: Link, st: Statement, *, in_transaction: bool, many: bool
    ) -> None:
        """A statement failed on the primary link: it may have committed before it failed
        (``INSERT ...; COMMIT; SELECT 1/0``, ``executemany`` in autocommit). The token
        follows the primary then; the statement's own error is the one raised."""
        conn = link.conn
        if conn.broken:
            return  # lost: the outcome is unknown, and no position can be asked
        if self._after_failure_on(link, st, conn.pgconn.transaction_status,
                                  in_transaction=in_transaction, many=many):  # fmt: skip
            with contextlib.suppress(psycopg.Error):
                await self._settle(link)

    async def _settle(self, link: Link) -> None:
        """A commit happened on ``link`` that the token does not cover yet: cover it."""
        self._commit_owed = False
        await self._after_write(link)

    async def _after_write(self, link: Link) -> None:
        """A write committed on ``link`` (the primary): advance the scope past it."""
        ask = self._position_after_write()
        if ask is not None:
            self._written_at(await self._position_on(link, POSITION_SQL) if ask else None)

    async def _note_read(self, link: Link) -> None:
        """Monotonic reads: the floor rises when a read is served, not when the link
        goes back, to where ``link``'s node stands now (replayed on a replica, inserted
        on the primary): at or past what the read saw. One query more per read."""
        self._cluster._raise_floor(await self._position_on(link, NODE_POSITION_SQL))

    async def _position_on(self, link: Link, sql: str) -> int | None:
        """The WAL position ``sql`` reads on ``link``."""
        cursor = link.conn.cursor(row_factory=tuple_row)
        await self._checked(link, cursor.execute, sql)
        return lsn_of(cursor)

    async def _capture_settings(self, link: Link) -> None:
        cursor = link.conn.cursor(row_factory=tuple_row)
        await self._checked(link, cursor.execute, SESSION_SETTINGS_SQL)
        self._replace_settings(link, await cursor.fetchall())

    async def _sync_settings(self, link: Link) -> None:
        reset, statements = self._replay_plan(link)
        conn = link.conn
        if reset:
            await self._checked(link, conn.execute, "RESET ALL")
        for query, params in statements:
            await self._checked(link, conn.execute, query, params)
        self._replayed(link)


class AsyncRoutedTransaction:
    """``with conn.transaction():`` — psycopg's ``Transaction`` semantics on a routed connection.

    The outermost block opens a transaction on one node (BEGIN) and commits it
    on exit (capturing its position when it wrote) or rolls it back on an
    exception; nested blocks are savepoints. ``raise psycopg.Rollback`` (or
    ``Rollback(tx)``) leaves the block, or the block ``tx``, rolled back,
    without an error.
    """

    __slots__ = ("_conn", "_force_rollback", "_outer", "_savepoint", "savepoint_name")

    def __init__(
        self, conn: AsyncRoutedConnection, savepoint_name: str | None, force_rollback: bool
    ) -> None:
        self._conn = conn
        self.savepoint_name = savepoint_name
        self._force_rollback = force_rollback
        self._outer = False
        self._savepoint: str | None = None

    @property
    def connection(self) -> AsyncRoutedConnection:
        return self._conn

    async def __aenter__(self) -> AsyncRoutedTransaction:
        conn = self._conn
        conn._check_open()
        await conn._sync_pipeline()
        if conn._tx is None:
            self._outer = True
            link = await conn._open_transaction()
            self._savepoint = self.savepoint_name
        else:
            link = conn._tx
            self._savepoint = self.savepoint_name or f"_rr_{conn._blocks + 1}"
        if self._savepoint is not None:
            savepoint = savepoint_sql("SAVEPOINT", self._savepoint)
            await conn._checked(link, link.conn.execute, savepoint)
        conn._blocks += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        conn = self._conn
        conn._blocks -= 1
        swallow = swallows(exc, self)
        queued: psycopg.Error | None = None  # a statement the block queued in a pipeline failed
        try:
            await conn._sync_pipeline()
        except psycopg.Error as error:
            if exc_type is not None:
                log.warning("error ignored ending %r after %r: %s", self, exc, error)
            else:
                queued = error
        link = conn._tx
        if link is None:  # lost, or ended by a COMMIT/ROLLBACK statement in the block
            if self._outer:
                conn._tx_lost = None
            if queued is not None:
                raise queued
            return swallow
        failed = exc_type is not None or self._force_rollback or queued is not None
        try:
            if self._outer:
                await conn._finish(commit=not failed)
            elif self._savepoint is not None:
                if failed:
                    undo = savepoint_sql("ROLLBACK TO SAVEPOINT", self._savepoint)
                    await conn._checked(link, link.conn.execute, undo)
                release = savepoint_sql("RELEASE SAVEPOINT", self._savepoint)
                await conn._checked(link, link.conn.execute, release)
        except Exception as error:
            if exc_type is None and queued is None:
                raise
            log.warning("error ignored ending %r after %r: %s", self, exc or queued, error)
        if queued is not None:
            raise queued
        return swallow

    def __repr__(self) -> str:
        return f"<AsyncRoutedTransaction {'outer' if self._outer else self._savepoint}>"


class AsyncRoutedPipeline:
    """``async with conn.pipeline() as p:`` — psycopg's pipeline mode, routed.

    Statements are queued on a node connection in psycopg's pipeline mode (sent
    without waiting; results arrive when fetched, at ``sync()`` or at the end of the
    block; an error aborts what follows it up to the next sync point), and routed
    as outside the block, but **on one node at a time**, in order:

    * in a transaction (open before, or opened by the block's first statement with
      ``autocommit=False``): its node, as every statement of it;
    * in autocommit: reads on the read node until the block's first statement that
      is not a plain read; that one and **every later statement of the block** on
      the primary, which has the block's writes (so a read queued after a write
      sees it). Moving from the read node to the primary is a sync point: what was
      queued there is waited for first, and its error, if any, is raised before the
      write is sent (it is never sent then). When the block (or its primary part)
      ends, the position after its last Sync comes back in the same round trip and
      the scope's token advances to it.

    Statements that cannot be queued (transaction control, session state, several
    statements in one string, ``COPY``, ``CALL``/``DO``), ``commit()``,
    ``rollback()``, ``transaction()`` and ``cursor.copy()`` are sync points: what
    was queued is waited for, then they run as outside the block. A primary that
    stops taking writes during the block (fenced, failed over) fails the next
    statement with ``PrimaryUnavailable`` and its connection is closed, so what
    was queued there since the last sync never commits.
    """

    __slots__ = ("_block", "_conn", "_link", "_node_pipeline", "_primary_part", "level")

    def __init__(self, conn: AsyncRoutedConnection) -> None:
        self._conn = conn
        self._link: Link | None = None  # the node the block is queued on now
        self._block: Any = None  # that node connection's pipeline() context manager
        self._node_pipeline: psycopg.AsyncPipeline | None = None
        self._primary_part = False  # autocommit statements queued on the primary
        self.level = 0

    @property
    def connection(self) -> AsyncRoutedConnection:
        return self._conn

    @property
    def node(self) -> str | None:
        """The node the block's statements are queued on now (None: none yet)."""
        return None if self._link is None else self._link.node

    async def sync(self) -> None:
        """psycopg's ``Pipeline.sync()``: send what is queued and wait for its results
        (an autocommit part commits here); raises the first error among them."""
        link, pipeline = self._link, self._node_pipeline
        if link is not None and pipeline is not None:
            await self._conn._checked(link, pipeline.sync)

    async def __aenter__(self) -> AsyncRoutedPipeline:
        conn = self._conn
        conn._check_open()
        if self.level:
            await self.sync()  # nested, as psycopg: what the outer block queued first
        else:
            conn._pipeline = self
            conn._attention = True  # the inlined read path does not know the block
        self.level += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.level -= 1
        if self.level:
            if exc is None:
                await self.sync()
            return
        conn = self._conn
        if conn._pipeline is self:
            conn._pipeline = None
        try:
            await self._sync_point(exc)
        except psycopg.Error as error:
            if exc is None:
                raise
            log.warning("error ignored ending %r after %r: %s", self, exc, error)

    async def _execute(
        self,
        rc: AsyncRoutedCursor,
        st: Statement,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        """Queue one statement on the node it goes to (one that ``pipelines_position``)."""
        conn = self._conn
        link = await self._link_for(st)
        if conn._tx is link:
            conn._note_statement(link, st)
        cursor = rc._attach(link.conn)
        try:
            if isinstance(how, Many):
                await cursor.executemany(query, params, returning=how.returning)
            else:
                await cursor.execute(query, params, prepare=how)
        except psycopg.Error:
            if link.conn.broken:
                await self._end_block()
                await conn._lost(link)
            raise
        conn._count(link, st)

    async def _link_for(self, st: Statement) -> Link:
        conn = self._conn
        link = self._link
        if link is not None:
            if conn._tx is link:
                return link
            if conn._tx is None and conn._autocommit and link.role == "write":
                await self._check_primary(link)
                return link  # after the block's first write, everything on the primary
            if conn._tx is None and conn._autocommit and conn._autocommit_read(st):
                return link
            await self._sync_point()
        if conn._tx is not None:
            link = conn._tx
        elif not conn._autocommit:
            link = await conn._open_transaction()  # BEGIN, then the block's statements
        elif conn._autocommit_read(st):
            link = await conn._read_link()
        else:
            link = await conn._write_link()
            self._primary_part = True
        if link.gen != conn._settings_gen:
            await conn._sync_settings(link)
        block = link.conn.pipeline()
        self._node_pipeline = await block.__aenter__()
        self._block, self._link = block, link
        return link

    async def _check_primary(self, link: Link) -> None:
        """Fencing at every use: a primary that stopped taking writes gets nothing more,
        and what was queued on it since the last sync must not commit."""
        conn = self._conn
        try:
            if conn._keeps_writer(link, conn._cluster._require_monitor().topology):
                return
        except Exception:
            await self._close_node(link)
            raise
        await self._close_node(link)
        raise PrimaryUnavailable(
            f"{link.node} stopped taking writes during the pipeline (fenced, failed over "
            "or removed): its connection was closed, so what was queued on it since the "
            "last sync was not committed"
        )

    async def _close_node(self, link: Link) -> None:
        await link.conn.close()  # first: the server rolls the queued statements back
        await self._end_block()
        self._conn._forget(link)
        await self._conn._cluster._checkin(link.lease)  # the pool replaces it

    async def _end_block(self) -> None:
        """Leave a node pipeline whose connection is closed or broken. Explicitly: a
        dropped psycopg ``pipeline()`` block is finalized by the garbage collector,
        which syncs it (committing what was queued) if the connection still works."""
        block = self._block
        self._drop()
        if block is not None:
            with contextlib.suppress(psycopg.Error):
                await block.__aexit__(None, None, None)

    def _drop(self) -> None:
        """Forget the node pipeline (the caller holds its block: see ``_end_block``)."""
        self._link = self._block = self._node_pipeline = None
        self._primary_part = False

    async def _sync_point(self, exc: BaseException | None = None) -> None:
        """Leave the node the block is queued on: wait for its results (an autocommit
        part commits), note the write or the read, and raise the first error."""
        link, block, pipeline = self._link, self._block, self._node_pipeline
        if link is None or block is None or pipeline is None:
            return
        primary_part = self._primary_part
        self._drop()
        conn = self._conn
        cluster = conn._cluster
        wanted = conn._position_wanted() if primary_part else None
        measure = primary_part and (wanted or cluster._monotonic)
        position: psycopg.AsyncCursor[Any] | None = None
        error: psycopg.Error | None = None
        try:
            if measure and PIPELINE_SYNC_NO_WAIT:
                queue_sync(pipeline)  # the queued statements commit at this Sync
                position = link.conn.cursor(row_factory=tuple_row)
                await position.execute(POSITION_SQL)  # answered after it, in the same trip
            await block.__aexit__(None if exc is None else type(exc), exc, None)
        except psycopg.Error as failed:
            error = failed
        if link.conn.broken:
            await conn._lost(link)
            if error is not None:
                raise error
            return
        stray = link.conn.pgconn.pipeline_status != _PIPELINE_OFF
        if stray:
            # psycopg stopped reading at the error and left the rest of the block's
            # results on the connection, still in pipeline mode: the next statement
            # there would read them as its own. Closed; the position, if one is owed,
            # comes from another connection to the node.
            await link.conn.close()
            conn._forget(link)
            await cluster._checkin(link.lease)
        if primary_part and (wanted is not None or cluster._monotonic):
            # The position after the last Sync covers whatever the part committed (an
            # error rolls back only its own implicit transaction).
            at = None
            if stray:
                at = await cluster._position_elsewhere(link.node, error)
            elif position is not None:
                with contextlib.suppress(psycopg.Error):
                    at = lsn_of(position)
            if at is None and measure and not stray:
                with contextlib.suppress(psycopg.Error):
                    cursor = link.conn.cursor(row_factory=tuple_row)
                    await cursor.execute(POSITION_SQL)
                    at = lsn_of(cursor)
            if wanted is not None:
                cluster._note_write(at if wanted else None)
            if cluster._monotonic:
                cluster._raise_floor(at)
        elif link.role == "read" and cluster._monotonic and error is None and not stray:
            await conn._note_read(link)
        if error is not None:
            raise error

    def __repr__(self) -> str:
        where = f" on {self._link.node}" if self._link is not None else ""
        return f"<AsyncRoutedPipeline level {self.level}{where}>"


class AsyncRoutedCursor(CursorBase[AsyncRoutedConnection, psycopg.AsyncCursor[Any]]):
    """A cursor of a routed connection: each ``execute`` is routed on its own.

    Results come from the node the statement ran on and stay readable after
    the next statement went elsewhere (psycopg's results are client-side).
    """

    __slots__ = ()

    def _attach(self, conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncCursor[Any]:
        # The previous node cursor holds only a client-side result: dropping it frees it.
        cursor = conn.cursor(row_factory=self._row_factory, binary=self._binary)
        self._cur = cursor = self._conn._adapted(cursor)
        return cursor

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> AsyncRoutedCursor:
        self._check_open()
        if binary is not None and binary != self._binary:
            self._binary = binary
            self._cur = None
        await self._conn._execute(self, query, params, prepare)
        return self

    async def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        self._check_open()
        await self._conn._execute(self, query, params_seq, Many(returning))

    def copy(
        self, statement: Query, params: Params | None = None
    ) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncCopy]:
        """psycopg's ``cursor.copy()``, routed like the statement (see ``_copy``)."""
        self._check_open()
        return self._conn._copy(self, statement, params)

    async def fetchone(self) -> Any:
        cursor = self._cur
        if cursor is None or self._closed:
            cursor = self._result()  # raises
        return await cursor.fetchone()

    async def fetchmany(self, size: int = 0) -> list[Any]:
        return await self._result().fetchmany(size or self.arraysize)

    async def fetchall(self) -> list[Any]:
        cursor = self._cur
        if cursor is None or self._closed:
            cursor = self._result()  # raises
        return await cursor.fetchall()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._result().__aiter__()

    async def scroll(self, value: int, mode: str = "relative") -> None:
        await self._result().scroll(value, mode)

    async def close(self) -> None:
        self._closed = True
        if self._cur is not None:
            await self._cur.close()

    async def __aenter__(self) -> AsyncRoutedCursor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
