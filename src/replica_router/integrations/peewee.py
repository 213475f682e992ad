"""Peewee on a primary and its replicas: one ``Database`` that routes each query.

Seed 003's readers want ``User.select()`` on a replica and ``User.create()`` on
the primary without binding models to other databases per query (``Model.bind``
races under gevent: coleifer/peewee#2345)::

    from replica_router import Cluster
    from replica_router.integrations.peewee import RoutedPostgresqlDatabase, use_primary

    cluster = Cluster(primary=PRIMARY_DSN, replicas=[REPLICA_DSN, ...]).open()
    db = RoutedPostgresqlDatabase(cluster)

    class User(peewee.Model):
        name = peewee.TextField()
        class Meta:
            database = db

    User.select()                  # a replica (lag bounds, the scope's token)
    User.create(name="Ada")        # the primary; the scope's token advances
    with db.atomic(): ...          # the primary throughout, selects included
    with db.use_primary(): ...     # reads on the primary too

The rules (``docs/peewee.md`` has the reasons):

* ``execute(query)`` routes by the query's type: a ``Select`` goes to the node
  ``cluster.route_read()`` names, unless this scope is in a transaction, holds
  an uncommitted transaction it began itself, is pinned by session state, or is
  inside ``use_primary()``; ``for_update()`` and everything else goes to the
  primary. ``execute_sql()``, ``raw()`` and selects with CTEs are routed by the
  cluster's SQL classifier. Read links are read-only sessions: what a replica
  refuses as a write runs on the primary instead.
* A commit on the primary advances the scope's token in the COMMIT's own round
  trip; an autocommit statement on the primary reads the WAL position right
  after it, on the same connection.
* Connection state lives in a ``ContextVar`` owned by the thread, greenlet or
  asyncio task that made it, so none of them ever sees another's links.
  ``connect()`` opens the scope, ``close()`` and ``connection_context()`` give
  both links (primary and replica) back to the cluster's pools. Links are taken
  when first needed.
* Before each statement the held primary link is checked against the current
  topology: a link to a node that is no longer the primary never runs another
  statement (outside a transaction it is replaced, inside one the transaction
  fails). A read whose connection turns out dead runs again on a fresh one.
"""

# The I/O seam (RoutedPostgresqlDatabase._resolve) also carries calls that return None.
# mypy: disable-error-code="func-returns-value"

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import peewee
import psycopg
from playhouse.pool import MaxConnectionsExceeded
from psycopg.errors import ReadOnlySqlTransaction, SerializationFailure
from psycopg.pq import TransactionStatus

from ..classify import Intent
from ..connection import PIPELINE_SYNC_NO_WAIT, run_capturing
from ..consistency import NODE_POSITION_SQL, POSITION_SQL, commit_and_capture, unit_of_work
from ..errors import NodeUnavailable, NoReplicaAvailable, PrimaryUnavailable
from ..lsn import parse_lsn
from ..routing import route_write
from ..session import PINNING_EFFECTS, pipelines_position
from ..sources import server_hung_up
from ..topology import Role

if TYPE_CHECKING:
    from ..cluster import Cluster, Lease
    from ..consistency import Scope, Token
    from ..topology import NodeStatus, Topology

__all__ = ["RoutedPostgresqlDatabase", "check_connections", "use_primary"]

T = TypeVar("T")

try:  # greenlets (gevent, eventlet) are units of their own; in a loop, the task is
    from greenlet import getcurrent as _current_flow  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - greenlet is not installed
    _current_flow = threading.get_ident

_IDLE: Final = TransactionStatus.IDLE
_READ: Final = Intent.READ
_READ_ATTEMPTS: Final = 4  # a read whose connection died runs again, on another node at last
_STALE_TRIES: Final = 5  # checkouts skipped because the connection was older than stale_timeout
_AGE_SQL: Final = (
    "SELECT EXTRACT(EPOCH FROM pg_catalog.clock_timestamp() - backend_start)::float8"
    " FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()"
)
_ROUTER_ERRORS: Final = (NodeUnavailable, NoReplicaAvailable, PrimaryUnavailable)
_EVERY_DATABASE: Final = object()
# use_primary() blocks open in this context: databases, or _EVERY_DATABASE.
_PRIMARY_ONLY: contextvars.ContextVar[tuple[object, ...]] = contextvars.ContextVar(
    "replica_router_peewee_primary", default=()
)
# Peewee's exception translation (driver errors -> peewee.IntegrityError, ...); not in its stubs.
_translated: Final[Any] = vars(peewee)["__exception_wrapper__"]
_databases: weakref.WeakSet[RoutedPostgresqlDatabase] = weakref.WeakSet()


def _owner() -> object:
    """The unit of work running now: the asyncio task, else the greenlet or thread."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        task = asyncio.current_task(loop)
        if task is not None:
            return task
    return _current_flow()


# How a statement is routed (see query_route); the classifier decides for CLASSIFY.
CLASSIFY: Final = 0  # raw SQL, a select with CTEs (which may modify data), a bare node
READ: Final = 1  # a select: the read link unless the scope must stay on the primary
WRITE: Final = 2  # everything else: the primary


def query_route(query: Any) -> int:
    """A query object's route by its type (pure; no I/O)."""
    if isinstance(query, peewee.SelectBase):
        if getattr(query, "_for_update", None) is not None:
            return WRITE
        return CLASSIFY if getattr(query, "_cte_list", None) else READ
    if isinstance(query, peewee.RawQuery) or not isinstance(query, peewee.Query):
        return CLASSIFY
    return WRITE


@contextlib.contextmanager
def use_primary() -> Iterator[None]:
    """Every statement of every routed database in the block runs on the primary."""
    token = _PRIMARY_ONLY.set((*_PRIMARY_ONLY.get(), _EVERY_DATABASE))
    try:
        yield
    finally:
        _PRIMARY_ONLY.reset(token)


def check_connections(
    database: RoutedPostgresqlDatabase | Cluster | None = None,
) -> dict[str, bool]:
    """Seed 003's ``check_connections()``: ``{node: healthy}``, one entry per node
    (of this routed database's cluster, or of the cluster given).

    Without an argument, for every routed database of this process whose cluster
    is open (their nodes merged; usually there is one cluster).
    """
    if database is not None:
        return database.check_connections()
    result: dict[str, bool] = {}
    seen: set[int] = set()
    for db in list(_databases):
        if id(db.cluster) not in seen and db.cluster.monitor is not None:
            seen.add(id(db.cluster))
            result.update(db.check_connections())
    return result


class _Links:
    """One unit of work's state: Peewee's connection state plus two node links."""

    __slots__ = (
        "closed",
        "commit_callbacks",
        "contexts",
        "ctx",
        "dirty",
        "owner",
        "pinned",
        "reader",
        "release",
        "transactions",
        "writer",
    )

    def __init__(self, owner: object, release: Callable[[Lease[Any], bool], None]) -> None:
        self.owner = owner
        self.release = release
        self.reader: Lease[psycopg.Connection[Any]] | None = None
        self.writer: Lease[psycopg.Connection[Any]] | None = None
        self.dirty = False  # the primary link carries session state: DISCARD ALL on return
        self.pinned = False  # session state lives on the primary: everything goes there
        self.contexts: list[Any] = []  # `async with db:` blocks open (the asyncio twin)
        self.reset()

    def reset(self) -> None:
        self.closed = True
        self.ctx: list[Any] = []
        self.transactions: list[Any] = []
        self.commit_callbacks: list[Any] = []

    @property
    def conn(self) -> psycopg.Connection[Any] | None:
        return None if self.writer is None else self.writer.conn

    def set_connection(self, conn: Any) -> None:
        raise peewee.InterfaceError("a routed database takes its connections from the cluster")

    def in_transaction(self) -> bool:
        """Peewee's transaction stack, or one the server says is open on the primary."""
        if self.transactions or self.pinned:
            return True
        writer = self.writer
        return writer is not None and writer.conn.pgconn.transaction_status != _IDLE

    def __del__(self) -> None:
        # The unit of work ended without close(): its links still go back to the pools,
        # closed if they were left in a transaction or carry session state.
        for lease in (self.reader, self.writer):
            if lease is not None:
                with contextlib.suppress(Exception):
                    busy = lease.conn.pgconn.transaction_status != _IDLE
                    self.release(lease, busy or (lease is self.writer and self.dirty))


class _ScopedState:
    """Peewee's ``_state`` API over the current unit's :class:`_Links` (contextvars)."""

    __slots__ = ("_links",)

    def __init__(self, links: Callable[[], _Links]) -> None:
        self._links = links

    @property
    def closed(self) -> bool:
        return self._links().closed

    @property
    def conn(self) -> psycopg.Connection[Any] | None:
        return self._links().conn

    @property
    def ctx(self) -> list[Any]:
        return self._links().ctx

    @property
    def transactions(self) -> list[Any]:
        return self._links().transactions

    @property
    def commit_callbacks(self) -> list[Any]:
        return self._links().commit_callbacks

    def reset(self) -> None:
        self._links().reset()

    def set_connection(self, conn: Any) -> None:
        self._links().set_connection(conn)


class _NodeLimits:
    """``max_connections`` links per node for one database, waiting up to ``timeout``
    (playhouse.pool's meanings: None raises at once, 0 waits for ever)."""

    def __init__(self, max_connections: int | None, timeout: float | None) -> None:
        self.max = max_connections or None
        self.timeout = float("inf") if timeout == 0 else timeout
        self._cond = threading.Condition()
        self._held: dict[str, int] = {}

    def take(self, node: str) -> None:
        if self.max is None:
            return
        with self._cond:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while self._held.get(node, 0) >= self.max:
                remaining = 0.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise MaxConnectionsExceeded(
                        f"{node}: this database already holds max_connections={self.max} links"
                    )
                self._cond.wait(min(remaining, 1.0))
            self._held[node] = self._held.get(node, 0) + 1

    def give(self, node: str) -> None:
        if self.max is None:
            return
        with self._cond:
            self._held[node] = self._held.get(node, 1) - 1
            self._cond.notify()


def still_primary(topology: Topology, node: str) -> bool:
    """May a transaction open on ``node`` go on? Yes while it is the elected primary and
    not fenced, even if a probe just failed (then its own server answers); no once it
    was demoted, fenced, replaced or removed: a commit there would be lost."""
    if route_write(topology) == node:
        return True
    state = topology.by_name.get(node)
    return (
        topology.primary == node
        and state is not None
        and state.role is Role.PRIMARY
        and not state.fenced
    )


@contextlib.contextmanager
def _peewee_errors() -> Iterator[None]:
    """Driver errors as Peewee's, and the router's own as ``peewee.OperationalError``."""
    try:
        with _translated:
            yield
    except _ROUTER_ERRORS as exc:  # existing `except peewee.OperationalError` handlers
        raise peewee.OperationalError(exc, *exc.args) from exc


def _as_is(done: T) -> T:
    """A sync call's result: already there (the sync side of the I/O seam)."""
    return done


def _lsn(row: tuple[Any, ...] | None) -> int | None:
    return None if row is None or row[0] is None else parse_lsn(str(row[0]))


class _ConnectionContext(peewee.ConnectionContext):
    """``connection_context()`` inside a consistency unit of work."""

    __slots__ = ("_unit",)

    def __enter__(self) -> None:
        self._unit = unit_of_work()
        self._unit.__enter__()
        try:
            super().__enter__()
        except BaseException as exc:
            self._unit.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._unit.__exit__(*exc_info)


class RoutedPostgresqlDatabase(peewee.PostgresqlDatabase):
    """A Peewee database over a :class:`~replica_router.Cluster` (see the module doc).

    ``max_connections`` (default 20), ``stale_timeout`` and ``timeout`` mean what
    they mean in ``playhouse.pool``: at most that many links to one node held at
    once by this database (waiting up to ``timeout`` for one: None raises
    ``MaxConnectionsExceeded`` at once, 0 waits for ever), and connections older
    than ``stale_timeout`` seconds are closed instead of reused. The connections
    themselves come from the cluster's pools (psycopg 3).
    """

    # Peewee's own internals (not in its type stubs).
    _adapter: Any
    _isolation_level: Any
    _log_query: Callable[[str, Any], None]
    _notify_hooks: Callable[[str, Any, float, Exception | None], None]

    # The I/O seam. Every driver and cluster call below goes through ``_resolve``:
    # here the result itself; the asyncio twin (``peewee_asyncio``) runs these same
    # rules over psycopg's AsyncConnection from Peewee's greenlet bridge, and its
    # ``_resolve`` awaits what those calls return.
    _resolve = staticmethod(_as_is)
    _run_capturing: Callable[..., Any] = staticmethod(run_capturing)
    _commit_and_capture: Callable[[Any], Any] = staticmethod(commit_and_capture)
    _limits_type: type[Any] = _NodeLimits  # playhouse.pool's limits: threads wait on a Condition

    def __init__(
        self,
        cluster: Cluster,
        *,
        max_connections: int | None = 20,
        stale_timeout: float | None = None,
        timeout: float | None = None,
        isolation_level: Any = None,
        autoconnect: bool = True,
        field_types: Mapping[str, str] | None = None,
        operations: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self._limits = self._limits_type(max_connections, timeout)
        self._stale_timeout = stale_timeout
        self._born: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        self._links_var: contextvars.ContextVar[_Links] = contextvars.ContextVar(
            f"replica_router_peewee_{id(self):x}"
        )
        self._release_lease = self._give_back  # bound once: every _Links keeps it
        super().__init__(
            "replica-router",
            autoconnect=autoconnect,
            field_types=field_types,
            operations=operations,
            isolation_level=isolation_level,
            prefer_psycopg3=True,  # the cluster's connections are psycopg 3, whatever is installed
        )
        self._state = _ScopedState(self._links)
        _databases.add(self)

    # -- the unit of work's state ---------------------------------------------------------

    def _links(self) -> _Links:
        links = self._links_var.get(None)
        owner = _owner()
        if links is None or links.owner is not owner:
            # A new unit of work, or a context copied from another one (a task
            # created by a task, asyncio.to_thread): never share its links.
            links = self._new_links(owner)
            self._links_var.set(links)
        return links

    def _new_links(self, owner: object) -> _Links:
        return _Links(owner, self._release_lease)

    # -- Peewee's connection management -------------------------------------------------

    def connect(self, reuse_if_open: bool = False) -> bool:
        """Open this unit of work's connection scope; links are taken when first used."""
        if self.deferred:
            raise peewee.InterfaceError(
                "Error, database must be initialized before opening a connection."
            )
        links = self._links()
        if not links.closed:
            if reuse_if_open:
                return False
            raise peewee.OperationalError("Connection already opened.")
        if self.cluster.monitor is None:
            raise peewee.InterfaceError(
                "the cluster is not open: call cluster.open() (or use it in a with block) first"
            )
        links.reset()
        links.closed = False
        return True

    def connection_context(self) -> _ConnectionContext:
        """Peewee's ``connection_context()``, also a unit of work of its own outside every
        session (``consistency.unit_of_work``): a thread's block reads its own writes
        and is not steered by other threads' (their positions reach the root scope when
        their blocks end)."""
        return _ConnectionContext(self)

    def close(self) -> bool:
        """Give both links back to their pools; True if the scope was open."""
        links = self._links()
        if links.transactions:
            raise peewee.OperationalError("Attempting to close database while transaction is open.")
        was_open = not links.closed
        try:
            self._release_links(links)
        finally:
            links.reset()
        return was_open

    def dispose(self) -> None:
        """Forget this unit's links without touching them (after ``os.fork()``)."""
        links = self._links()
        links.reader = links.writer = None
        links.pinned = links.dirty = False
        links.reset()

    def is_closed(self) -> bool:
        return self._links().closed

    def is_connection_usable(self) -> bool:
        links = self._links()
        if links.closed:
            return False
        writer = links.writer
        return writer is None or bool(self._adapter.is_connection_usable(writer.conn))

    def connection(self) -> psycopg.Connection[Any]:
        """The primary link's psycopg connection (raw use may write)."""
        with _peewee_errors():
            return self._writer(self._open_links()).conn

    def cursor(self, named_cursor: Any = None) -> psycopg.Cursor[Any]:
        """A cursor on the primary link: SQL run on it directly is not routed."""
        return self.connection().cursor()

    def in_transaction(self) -> bool:
        return bool(self._links().transactions)

    def _open_links(self) -> _Links:
        links = self._links()
        if links.closed:
            if not self.autoconnect:
                raise peewee.InterfaceError("Error, database connection not opened.")
            self.connect()
        return links

    # -- running statements ---------------------------------------------------------------

    def execute(self, query: Any, **context_options: Any) -> Any:
        """Run a query object where its type says it may run (see the module doc)."""
        ctx: Any = self.get_sql_context(**context_options)
        sql, params = ctx.sql(query).query()
        return self._run(sql, params, query_route(query))

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        """Run SQL text where the cluster's classifier says it may run."""
        return self._run(sql, params, CLASSIFY)

    def _run(self, sql: str, params: Any, kind: int) -> Any:
        self._log_query(sql, params)
        start = time.perf_counter() if self.query_hooks else None
        try:
            try:
                with _translated:
                    cursor = self._route(sql, params, kind)
            except _ROUTER_ERRORS as exc:  # existing `except peewee.OperationalError` handlers
                raise peewee.OperationalError(exc, *exc.args) from exc
        except Exception as exc:
            if start is not None:
                self._notify_hooks(sql, params, start, exc)
            raise
        if start is not None:
            self._notify_hooks(sql, params, start, None)
        return cursor

    def _route(self, sql: str, params: Any, kind: int) -> psycopg.Cursor[Any]:
        links = self._open_links()
        session = False
        one_trip = kind == WRITE  # Peewee's own INSERT/UPDATE/DELETE: one plain statement
        if kind == CLASSIFY:
            st = self.cluster.classifier.analyze(sql)
            one_trip = pipelines_position(st)
            kind = READ if st.intent is _READ and not st.session else WRITE
            if st.session:
                session = True
                links.dirty = True
                if st.session & PINNING_EFFECTS or "set" in st.session:
                    links.pinned = True  # the state lives on the primary's backend only
        if kind == READ and not links.in_transaction():
            primary_only = _PRIMARY_ONLY.get()
            if not primary_only or (
                _EVERY_DATABASE not in primary_only and self not in primary_only
            ):
                return self._read(links, sql, params)
            return self._read(links, sql, params, on_primary=True)
        return self._write(links, sql, params, session, one_trip=one_trip)

    def _read(
        self, links: _Links, sql: str, params: Any, on_primary: bool = False
    ) -> psycopg.Cursor[Any]:
        """On the routed node's read link; a dead connection or a recovery conflict runs
        it again (a read changed nothing), what the node refuses as a write on the
        primary's write link."""
        cluster = self.cluster
        exclude: tuple[str, ...] = ()
        failed: set[str] = set()
        for _attempt in range(_READ_ATTEMPTS):
            held = links.reader
            if on_primary:
                node = route_write(cluster.topology) or self._resolve(cluster.route_write())
            else:
                node = self._resolve(cluster.route_read(
                    prefer=None if held is None else held.node, exclude=exclude))  # fmt: skip
            if held is not None and held.node != node:
                links.reader = None
                self._give_back(held)
                held = None
            if held is None:
                try:
                    held = links.reader = self._take(node, "read")
                except NodeUnavailable:
                    exclude = (*exclude, node)  # down, or its pool exhausted: another node
                    continue
            cursor = held.conn.cursor()
            try:
                self._resolve(cursor.execute(sql, params))
            except ReadOnlySqlTransaction:
                return self._write(links, sql, params)  # the server says it writes
            except SerializationFailure:
                if cluster.topology.primary == node:
                    raise
                exclude = (*exclude, node)  # a replica's conflict with recovery
                continue
            except psycopg.OperationalError:
                if not held.conn.broken:
                    raise
                links.reader = None
                self._give_back(held)  # the pool discards the broken connection
                if node in failed:
                    self._suspect(node, "a fresh connection failed too")
                    exclude = (*exclude, node)
                failed.add(node)
                continue
            if cluster.monotonic_reads:  # monotonic reads: later reads never go back before it
                self._note_read(held.conn)
            return cursor
        raise NoReplicaAvailable(
            f"the read failed on every node tried ({', '.join(sorted(failed | set(exclude)))})"
        )

    def _write(
        self,
        links: _Links,
        sql: str,
        params: Any,
        session: bool = False,
        *,
        one_trip: bool = False,
    ) -> psycopg.Cursor[Any]:
        """On the primary link; an autocommit statement's WAL position is read right
        after it committed, on the same connection (not a pooled one of its own): in
        the statement's own round trip where it may be pipelined (``one_trip``: one
        statement, no transaction control, no session state, no COPY), else after it."""
        lease = self._writer(links)
        conn = lease.conn
        cursor = conn.cursor()
        wanted = self.cluster.read_your_writes == "lsn"  # else no position is used
        try:
            if (
                one_trip
                and wanted
                and not session
                and PIPELINE_SYNC_NO_WAIT
                and conn.pgconn.transaction_status == _IDLE
            ):
                _, position = self._resolve(self._run_capturing(cursor, sql, params, wrote=True))
                self.cluster.record_write(position)  # at or past the statement's commit
                return cursor
            self._resolve(cursor.execute(sql, params))
            if session or conn.pgconn.transaction_status != _IDLE:
                return cursor  # in a transaction: its COMMIT captures the position
            position = self._position(conn, POSITION_SQL) if wanted else None
        except psycopg.Error:
            if conn.broken:
                links.writer = None
                self._give_back(lease)
            raise
        self.cluster.record_write(position)  # it committed: the token advances past it
        return cursor

    def _position(self, conn: psycopg.Connection[Any], sql: str) -> int | None:
        """The WAL position ``sql`` reads on ``conn``."""
        return _lsn(self._resolve(self._resolve(conn.execute(sql)).fetchone()))

    def _note_read(self, conn: psycopg.Connection[Any]) -> None:
        """The position the node that served a read stands at, for monotonic reads (as
        the psycopg2 adapter does); a failure to measure it leaves the floor as it was."""
        try:
            position = self._position(conn, NODE_POSITION_SQL)
        except psycopg.Error:
            return
        self.cluster.record_read(position)

    # -- the primary link ---------------------------------------------------------------------

    def _writer(self, links: _Links) -> Lease[psycopg.Connection[Any]]:
        """The primary link, checked against the topology at every use."""
        cluster = self.cluster
        lease = links.writer
        if lease is not None:
            busy = links.in_transaction()
            if busy:
                if still_primary(cluster.topology, lease.node):
                    return lease
            elif route_write(cluster.topology) == lease.node and not server_hung_up(lease.conn):
                return lease
            links.writer = None
            self._give_back(lease, broken=True)
            if busy:
                links.pinned = links.dirty = False  # that backend's state is gone with it
                raise peewee.OperationalError(
                    f"{lease.node} is no longer the primary (fenced, demoted or removed): "
                    "the transaction on it was rolled back and must be run again"
                )
        node = self._resolve(cluster.route_write())
        lease = self._take(node, "write")
        try:
            self._resolve(lease.conn.set_autocommit(True))  # Peewee's mode: transactions say BEGIN
        except BaseException:
            self._give_back(lease)
            raise
        links.writer = lease
        return lease

    def begin(self, isolation_level: Any = None) -> None:
        """BEGIN on the primary link (every statement until COMMIT goes there)."""
        links = self._open_links()
        if isolation_level is None:
            isolation_level = self._isolation_level
        stmt = "BEGIN"
        if isolation_level:
            level = self._adapter.isolation_level_str(isolation_level)
            stmt = f"BEGIN TRANSACTION ISOLATION LEVEL {level}"
        with _peewee_errors():
            self._resolve(self._writer(links).conn.execute(stmt))

    def commit(self) -> None:
        """COMMIT on the primary, capturing its WAL position in the same round trip."""
        links = self._links()
        if links.closed:
            raise peewee.InterfaceError("Cannot commit, database connection not open.")
        lease = links.writer
        if lease is None or lease.conn.pgconn.transaction_status == _IDLE:
            return
        if not still_primary(self.cluster.topology, lease.node):
            links.writer = None
            self._give_back(lease, broken=True)  # rolled back: a fenced node must not commit
            raise peewee.OperationalError(
                f"{lease.node} is no longer the primary (fenced, demoted or removed): "
                "the transaction was rolled back, not committed"
            )
        with _peewee_errors():
            try:
                position = self._resolve(self._commit_and_capture(lease.conn))
            except psycopg.Error:
                if lease.conn.broken:
                    links.writer = None
                    self._give_back(lease)
                raise
        if position is not None:
            self.cluster.record_write(position)

    def rollback(self) -> None:
        links = self._links()
        if links.closed:
            raise peewee.InterfaceError("Cannot rollback, database connection not open.")
        lease = links.writer
        if lease is None:
            return
        with _peewee_errors():
            try:
                self._resolve(lease.conn.rollback())
            except psycopg.Error:
                if lease.conn.broken:
                    links.writer = None
                    self._give_back(lease)
                raise

    # -- leases -----------------------------------------------------------------------------

    def _take(self, node: str, purpose: Any) -> Lease[psycopg.Connection[Any]]:
        """A checked connection to ``node`` from the cluster's pool, within the limits."""
        resolve = self._resolve
        resolve(self._limits.take(node))
        try:
            lease = resolve(self.cluster.checkout(node, purpose))
            for _ in range(_STALE_TRIES):
                if not self._is_stale(lease.conn):
                    break
                resolve(lease.conn.close())  # the pool replaces a closed connection
                resolve(self.cluster.checkin(lease))
                lease = resolve(self.cluster.checkout(node, purpose))
        except BaseException:
            self._limits.give(node)
            raise
        if self.server_version is None:
            self.server_version = lease.conn.info.server_version
        return lease

    def _is_stale(self, conn: psycopg.Connection[Any]) -> bool:
        timeout = self._stale_timeout
        if timeout is None:
            return False
        born = self._born.get(conn)
        if born is None:  # the server knows when this backend started
            row = self._resolve(self._resolve(conn.execute(_AGE_SQL)).fetchone())
            if not conn.autocommit:
                self._resolve(conn.rollback())  # a write connection: leave no transaction open
            born = time.monotonic() - (float(row[0]) if row and row[0] is not None else 0.0)
            self._born[conn] = born
        return time.monotonic() - born > timeout

    def _give_back(self, lease: Lease[Any], broken: bool = False, dirty: bool = False) -> None:
        """Return a link clean: no transaction, no session state, the pool's mode.

        ``broken``: close it instead (a node that is no longer the primary, whose
        open transaction must not commit; a link whose unit of work vanished).
        """
        conn = lease.conn
        resolve = self._resolve
        try:
            if broken:
                resolve(conn.close())
            elif not conn.closed and not conn.broken:
                if conn.pgconn.transaction_status != _IDLE:
                    resolve(conn.rollback())
                if dirty:
                    resolve(conn.execute("DISCARD ALL"))
                if lease.purpose == "write":
                    resolve(conn.set_autocommit(False))
                if self._is_stale(conn):
                    resolve(conn.close())
        except psycopg.Error:
            resolve(conn.close())
        finally:
            try:
                resolve(self.cluster.checkin(lease))
            finally:
                self._limits.give(lease.node)

    def _release_links(self, links: _Links) -> None:
        reader, writer = links.reader, links.writer
        links.reader = None
        try:
            if reader is not None:
                self._give_back(reader)
        finally:
            links.writer = None
            if writer is not None:
                self._give_back(writer, dirty=links.dirty)
            links.pinned = links.dirty = False

    def _suspect(self, node: str, why: str) -> None:
        monitor = self.cluster.monitor
        if monitor is not None:
            monitor.mark_suspect(node, why)

    # -- routing scopes and seed 003's management -------------------------------------------

    @contextlib.contextmanager
    def use_primary(self) -> Iterator[None]:
        """Every statement of this database in the block runs on the primary."""
        token = _PRIMARY_ONLY.set((*_PRIMARY_ONLY.get(), self))
        try:
            yield
        finally:
            _PRIMARY_ONLY.reset(token)

    def session(
        self, token: Token | str | None = None, *, user_id: str | None = None, inherit: bool = True
    ) -> contextlib.AbstractContextManager[Scope]:
        """The cluster's consistency scope (``cluster.session``): a request, a job."""
        return self.cluster.session(token, user_id=user_id, inherit=inherit)

    @property
    def token(self) -> Token | None:
        """The current scope's token (hand it to the user's next request)."""
        return self.cluster.token

    def check_connections(self, timeout: float | None = None) -> dict[str, bool]:
        """``{node: healthy}``: one entry per node, the primary included."""
        return self._resolve(self.cluster.check_connections(timeout))

    def add_replica(self, dsn: str, name: str | None = None) -> str:
        """Add a replica at run time (reads may go to it once the monitor has probed it)."""
        return self._resolve(self.cluster.add_replica(dsn, name=name))

    def remove_replica(self, name: str, timeout: float = 5.0) -> None:
        """Stop reading from ``name``; links held to it are swapped at their next read."""
        self._resolve(self.cluster.remove_replica(name, timeout=timeout))

    def status(self) -> list[NodeStatus]:
        """The cluster's status table: role, health, lag and traffic per node."""
        return self.cluster.status()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.cluster!r}>"
