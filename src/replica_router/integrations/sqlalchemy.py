"""SQLAlchemy 2.x sessions that read from replicas and write to the primary, sync and asyncio.

::

    from replica_router.integrations.sqlalchemy import sessionmaker, use_primary

    Session = sessionmaker(cluster, expire_on_commit=False)   # sqlalchemy.orm.sessionmaker
    with Session() as session:
        session.scalars(select(User)).all()       # a replica (lag bounds, the scope's token)
        session.add(User(name="Ada"))
        session.commit()                          # the primary; the scope's token advances
        session.get(User, 1)                      # sees that write

Routing is per session *transaction*, never per statement (SQLAlchemy's docs warn
that per-statement routing "leads to uncoordinated transaction behavior"): the
first read picks one node with ``cluster.route_read()``, and every later read of
the transaction uses it. A flush (autoflush included), an INSERT/UPDATE/DELETE,
``with_for_update()``, a statement the classifier calls a write (``nextval``, a DML
CTE, a volatile function) or ``Session.connection()`` without arguments take the
primary, and from then on the whole transaction runs there: it must see its own
uncommitted rows. The COMMIT on the primary carries the WAL position back in its
own round trip and advances the consistency scope, so the reload that
``expire_on_commit`` triggers reads a node that has the commit.

Connections: the cluster's pools are the only pools. Each node has an Engine per
purpose (``"read"``: autocommit, read-only; ``"write"``: the primary's
transactions), with the psycopg dialect and a SQLAlchemy pool that keeps no
connections of its own but borrows them from the cluster (``cluster.checkout()``).
A write engine runs a statement only while its node is the primary *now*.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psycopg
from sqlalchemy import event, util
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg, PGDialectAsync_psycopg
from sqlalchemy.engine import URL, Connection, Engine, create_engine
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm import sessionmaker as _sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, Pool
from sqlalchemy.sql import visitors
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement, TextClause
from sqlalchemy.sql.functions import FunctionElement

from ..classify import Classifier, Intent
from ..cluster import AsyncCluster, Cluster, Lease
from ..consistency import NODE_POSITION_SQL, acommit_and_capture, commit_and_capture
from ..errors import ConfigurationError, PrimaryUnavailable
from ..routing import route_write
from ..sources import Purpose

if TYPE_CHECKING:
    from ..topology import Topology

__all__ = [
    "RoutingSession",
    "async_sessionmaker",
    "cluster_from_engines",
    "engines",
    "pool_settings",
    "sessionmaker",
    "use_primary",
]

F = TypeVar("F", bound=Callable[..., Any])
AnyCluster = Cluster | AsyncCluster

USE_PRIMARY = "use_primary"  # execution option: this statement's reads go to the primary
_DIALECT = "replica_router"  # postgresql+replica_router: psycopg, with COMMIT capture
_INTENTS = 2048  # statement shapes whose intent is remembered

_use_primary: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "replica_router.sqlalchemy.use_primary", default=False
)
# The cluster connection a pool is about to wrap in a new SQLAlchemy record.
_handoff: contextvars.ContextVar[Lease[Any] | None] = contextvars.ContextVar(
    "replica_router.sqlalchemy.handoff", default=None
)


class use_primary:
    """Every read in the block (or decorated function) runs on the primary.

    ``with use_primary():``, ``async with use_primary():``, ``@use_primary()`` on a
    function or a coroutine function. It lives in a ``contextvars`` variable, so
    it follows the code that entered it (threads and asyncio tasks each see
    their own) and nests. For one statement, use the execution option instead:
    ``select(User).execution_options(use_primary=True)``.
    """

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: list[contextvars.Token[bool]] = []

    def __enter__(self) -> None:
        self._tokens.append(_use_primary.set(True))

    def __exit__(self, *exc_info: object) -> None:
        _use_primary.reset(self._tokens.pop())

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                token = _use_primary.set(True)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    _use_primary.reset(token)

            return cast(F, run_async)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            token = _use_primary.set(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _use_primary.reset(token)

        return cast(F, run)


# -- what a statement needs (pure, remembered per statement shape) ---------------------


class _Intents:
    """Whether a SQLAlchemy statement may run on a replica, by its cache key.

    Walking a statement costs more than a database round trip, so the verdict
    is remembered per statement *shape* (SQLAlchemy's cache key, which leaves
    out parameter values): the walk happens once per shape.
    """

    def __init__(self, classifier: Classifier, dialect: PGDialect_psycopg) -> None:
        self._classifier = classifier
        self._dialect = dialect
        self._known: dict[Any, Intent] = {}
        self._texts: dict[str, Intent] = {}

    def of(self, clause: ClauseElement | None) -> Intent:
        if clause is None or clause.is_dml:
            return Intent.WRITE
        if isinstance(clause, TextClause):
            return self._text(clause)
        key = clause._generate_cache_key()
        if key is None:  # a statement SQLAlchemy cannot cache: decide each time
            return self._walk(clause)
        intent = self._known.get(key.key)
        if intent is None:
            intent = self._walk(clause)
            if len(self._known) >= _INTENTS:
                self._known.clear()
            self._known[key.key] = intent
        return intent

    def _text(self, clause: TextClause) -> Intent:
        intent = self._texts.get(clause.text)
        if intent is None:
            intent = self._classifier.classify(self._sql(clause))
            if len(self._texts) >= _INTENTS:
                self._texts.clear()
            self._texts[clause.text] = intent
        return intent

    def _walk(self, clause: ClauseElement) -> Intent:
        if not getattr(clause, "is_select", False):
            return Intent.WRITE  # DDL and anything else that is not a query
        for element in visitors.iterate(clause):
            if getattr(element, "_for_update_arg", None) is not None or getattr(
                element, "is_dml", False
            ):
                return Intent.WRITE
            if isinstance(element, (FunctionElement, TextClause)):
                sql = "SELECT " + self._sql(element)
                if self._classifier.classify(sql) is Intent.WRITE:
                    return Intent.WRITE
        return Intent.READ

    def _sql(self, element: ClauseElement) -> str:
        return str(element.compile(dialect=self._dialect))


# -- connections: SQLAlchemy pools that borrow from the cluster's ------------------------


class _NodeLink:
    """One node and purpose of a cluster, as a SQLAlchemy engine sees it.

    It lends the cluster's pooled connections (``checkout``/``checkin``) and
    refuses a statement on a write connection unless its node is the primary
    in the cluster's topology *now* (``guard``): a node fenced or demoted since
    the connection was checked out never runs another statement.
    """

    def __init__(self, cluster: AnyCluster, node: str, purpose: Purpose) -> None:
        self.cluster = cluster
        self.node = node
        self.purpose = purpose
        self.leases: dict[int, Lease[Any]] = {}  # id(driver connection) -> its lease
        self._checked: Topology | None = None  # the last snapshot that passed the guard

    def lend(self, lease: Lease[Any]) -> Any:
        self.leases[id(lease.conn)] = lease
        return lease.conn

    def take_back(self, conn: Any) -> Lease[Any] | None:
        return self.leases.pop(id(conn), None)

    def guard(self, conn: Any | None) -> None:
        """Raise unless this node takes writes now; ``conn`` (driver level) is closed then."""
        if self.purpose == "read":
            return
        topology = self.cluster.topology
        if topology is self._checked:
            return
        if route_write(topology) == self.node:
            self._checked = topology
            return
        if conn is not None:
            conn.close()  # psycopg then reports it closed: SQLAlchemy invalidates it
        raise PrimaryUnavailable(
            f"{self.node} is no longer the primary: its write connection runs nothing more "
            "(the transaction is lost; retry it)"
        )


def _driver_of(context: Any) -> Any | None:
    """The driver connection an execution context runs on."""
    return None if context is None else context.root_connection.connection.driver_connection


def _link_of(dialect: Any) -> _NodeLink | None:
    link: _NodeLink | None = dialect.__dict__.get("replica_router_link")
    return link


class _CaptureMixin:
    """The psycopg dialect, plus: a write connection's COMMIT reports its WAL position.

    ``do_commit`` sends ``COMMIT; SELECT pg_current_wal_insert_lsn()`` in one
    round trip on the same connection (``consistency.commit_and_capture``) and
    hands the position to ``cluster.record_write``; every statement first passes
    the node guard. Inside SQLAlchemy's ``do_*`` methods, errors are wrapped and
    disconnects handled as for any DBAPI call.
    """

    def do_commit(self, dbapi_connection: Any) -> None:
        link = _link_of(self)
        if link is None or link.purpose == "read":
            super().do_commit(dbapi_connection)  # type: ignore[misc]
            return
        conn = dbapi_connection.driver_connection
        link.guard(conn)
        link.cluster.record_write(self._commit(conn))

    def _commit(self, conn: Any) -> int | None:
        return commit_and_capture(conn)

    def _node_position(self, conn: Any) -> Any:
        return conn.execute(NODE_POSITION_SQL).fetchone()

    def _served(self, link: _NodeLink | None, context: Any) -> None:
        """Monotonic reads: a read link's statement ran; no later read of the scope may
        go back before where its node stands now (measured after the read, as the
        routed connections do; one tiny query, only with ``monotonic_reads``). A failed
        measurement leaves the floor as it was."""
        if link is None or link.purpose != "read" or not link.cluster.monotonic_reads:
            return
        conn = _driver_of(context)
        if conn is None:
            return
        try:
            row = self._node_position(conn)
        except psycopg.Error:
            return
        link.cluster.record_read(row[0] if row else None)

    def do_execute(self, cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        link = _link_of(self)
        if link is not None:
            link.guard(_driver_of(context))
        super().do_execute(cursor, statement, parameters, context)  # type: ignore[misc]
        self._served(link, context)

    def do_execute_no_params(self, cursor: Any, statement: Any, context: Any = None) -> None:
        link = _link_of(self)
        if link is not None:
            link.guard(_driver_of(context))
        super().do_execute_no_params(cursor, statement, context)  # type: ignore[misc]
        self._served(link, context)

    def do_executemany(
        self, cursor: Any, statement: Any, parameters: Any, context: Any = None
    ) -> None:
        link = _link_of(self)
        if link is not None:
            link.guard(_driver_of(context))
        super().do_executemany(cursor, statement, parameters, context)  # type: ignore[misc]
        self._served(link, context)


class RoutedPGDialect(_CaptureMixin, PGDialect_psycopg):
    """``postgresql+replica_router://``: psycopg 3 with COMMIT capture (see module doc)."""

    supports_statement_cache = True

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> type[RoutedPGDialectAsync]:
        return RoutedPGDialectAsync


class RoutedPGDialectAsync(_CaptureMixin, PGDialectAsync_psycopg):
    """The asyncio twin of :class:`RoutedPGDialect`."""

    supports_statement_cache = True

    def _commit(self, conn: Any) -> int | None:
        return util.await_only(acommit_and_capture(conn))

    def _node_position(self, conn: Any) -> Any:
        return util.await_only(_anode_position(conn))


async def _anode_position(conn: psycopg.AsyncConnection[Any]) -> Any:
    cursor = await conn.execute(NODE_POSITION_SQL)
    return await cursor.fetchone()


registry.register(f"postgresql.{_DIALECT}", __name__, "RoutedPGDialect")


class _LeasePool(Pool):
    """A SQLAlchemy pool that owns no connections: it borrows them from the cluster.

    Checkout is ``cluster.checkout(node, purpose)`` (which checks the connection,
    as ``pool_pre_ping`` would, and counts it); return is ``cluster.checkin``.
    SQLAlchemy keeps one record per server connection, so its per-connection
    set-up (the dialect's connect hooks) runs once per connection, not per checkout.
    """

    def __init__(
        self, creator: Any, replica_router_link: _NodeLink | None = None, **kw: Any
    ) -> None:
        if replica_router_link is None:
            raise ConfigurationError("a replica-router pool needs its node link")
        kw.pop("pre_ping", None)  # the cluster checks every connection it lends
        super().__init__(creator, **kw)
        self._link = replica_router_link
        self._records: dict[int, ConnectionPoolEntry] = {}

    def _lease(self) -> Lease[Any]:
        link = self._link
        return cast(Cluster, link.cluster).checkout(link.node, link.purpose)

    def _give_back(self, lease: Lease[Any]) -> None:
        cast(Cluster, self._link.cluster).checkin(lease)

    def _do_get(self) -> ConnectionPoolEntry:
        lease = self._lease()
        conn = lease.conn
        try:
            self._link.guard(conn)
        except BaseException:
            self._give_back(lease)
            raise
        record = self._records.get(id(conn))
        if record is not None and record.driver_connection is conn:
            self._link.lend(lease)
            return record
        token = _handoff.set(lease)
        try:
            record = self._create_connection()  # the creator lends ``lease``
        except BaseException:
            if self._link.take_back(conn) is not None or not conn.closed:
                self._give_back(lease)
            raise
        finally:
            _handoff.reset(token)
        self._records = {k: r for k, r in self._records.items() if _open(r)}
        self._records[id(conn)] = record
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        conn = record.driver_connection
        if conn is None:
            return  # invalidated: its lease went back when it was closed
        self._records[id(conn)] = record
        lease = self._link.take_back(conn)
        if lease is not None:
            self._give_back(lease)

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        """SQLAlchemy discards a connection: close it, so the cluster's pool replaces it."""
        conn = self._dialect.get_driver_connection(connection)
        super()._close_connection(connection, terminate=terminate)
        lease = self._link.take_back(conn)
        if lease is not None:
            self._give_back(lease)

    def recreate(self) -> _LeasePool:
        return type(self)(
            self._creator,
            replica_router_link=self._link,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            dialect=self._dialect,
            _dispatch=self.dispatch,
        )

    def dispose(self) -> None:
        self._records = {}

    def status(self) -> str:
        return f"lends {self._link.node}/{self._link.purpose} connections of {self._link.cluster!r}"


def _open(record: ConnectionPoolEntry) -> bool:
    conn = record.driver_connection
    return conn is not None and not conn.closed


class _AsyncLeasePool(_LeasePool):
    """:class:`_LeasePool` for ``AsyncCluster`` (inside SQLAlchemy's greenlet)."""

    def _lease(self) -> Lease[Any]:
        link = self._link
        return cast(
            "Lease[Any]",
            util.await_only(cast(AsyncCluster, link.cluster).checkout(link.node, link.purpose)),
        )

    def _give_back(self, lease: Lease[Any]) -> None:
        util.await_only(cast(AsyncCluster, self._link.cluster).checkin(lease))


# -- the engines of one cluster -----------------------------------------------------------


class _Router:
    """A cluster's engines (one per node and purpose) and its routing calls.

    Engines are made on first use and disposed when their node leaves the
    topology, gets fenced, or (write engines) stops being the primary.
    """

    def __init__(self, cluster: AnyCluster) -> None:
        self.cluster = cluster
        self.is_async = isinstance(cluster, AsyncCluster)
        self._engines: dict[tuple[str, Purpose], Engine] = {}
        self._lock = threading.Lock()
        self._generation = -1
        self.intents = _Intents(cluster.classifier, RoutedPGDialect())  # type: ignore[no-untyped-call]

    def route_read(self) -> str:
        if self.is_async:
            return util.await_only(cast(AsyncCluster, self.cluster).route_read())
        return cast(Cluster, self.cluster).route_read()

    def route_write(self) -> str:
        if self.is_async:
            return util.await_only(cast(AsyncCluster, self.cluster).route_write())
        return cast(Cluster, self.cluster).route_write()

    def primary_for_reads(self) -> str:
        """The primary, for reads: falls back to no waiting if there is none."""
        primary = route_write(self.cluster.topology)
        return primary if primary is not None else self.route_write()

    def engine(self, node: str, purpose: Purpose) -> Engine:
        topology = self.cluster.topology
        if topology.generation != self._generation:
            self._prune(topology)
        engine = self._engines.get((node, purpose))
        if engine is None:
            with self._lock:
                engine = self._engines.get((node, purpose))
                if engine is None:
                    engine = self._make(node, purpose)
                    self._engines = {**self._engines, (node, purpose): engine}
        return engine

    def _make(self, node: str, purpose: Purpose) -> Engine:
        row = next((r for r in self.cluster.status() if r.name == node), None)
        if row is None:
            raise ConfigurationError(f"no node named {node!r} in {self.cluster!r}")
        link = _NodeLink(self.cluster, node, purpose)
        url = URL.create(f"postgresql+{_DIALECT}", host=row.host, port=row.port)
        name = f"replica_router.{node}.{purpose}"
        if self.is_async:

            async def connect_async() -> Any:
                return link.lend(_handoff.get() or await self._acheckout(link))

            async_engine = sa_asyncio.create_async_engine(
                url,
                poolclass=_AsyncLeasePool,
                async_creator=connect_async,
                replica_router_link=link,
                logging_name=name,
            )
            engine = async_engine.sync_engine
        else:

            def connect() -> Any:
                lease = _handoff.get() or cast(Cluster, self.cluster).checkout(node, purpose)
                return link.lend(lease)

            engine = create_engine(
                url,
                poolclass=_LeasePool,
                creator=connect,
                replica_router_link=link,
                logging_name=name,
            )
        engine.dialect.__dict__["replica_router_link"] = link
        if purpose == "read":
            # Read connections are autocommit, where DECLARE CURSOR is refused: results
            # asked for with stream_results / yield_per are buffered instead.
            engine.dialect.supports_server_side_cursors = False
        return engine

    async def _acheckout(self, link: _NodeLink) -> Lease[Any]:
        return await cast(AsyncCluster, self.cluster).checkout(link.node, link.purpose)

    def _prune(self, topology: Topology) -> None:
        with self._lock:
            self._generation = topology.generation
            primary = route_write(topology)
            keep: dict[tuple[str, Purpose], Engine] = {}
            gone: list[Engine] = []
            for key, engine in self._engines.items():
                node, purpose = key
                state = topology.by_name.get(node)
                demoted = purpose == "write" and primary is not None and node != primary
                if state is None or state.fenced or demoted:
                    gone.append(engine)
                else:
                    keep[key] = engine
            self._engines = keep
        for engine in gone:
            engine.dispose(close=False)

    def engines(self) -> Mapping[tuple[str, Purpose], Engine]:
        """The engines made so far, by ``(node, purpose)``."""
        return dict(self._engines)


_routers: weakref.WeakKeyDictionary[AnyCluster, _Router] = weakref.WeakKeyDictionary()
_routers_lock = threading.Lock()


def _router_for(cluster: AnyCluster) -> _Router:
    router = _routers.get(cluster)
    if router is None:
        with _routers_lock:
            router = _routers.get(cluster)
            if router is None:
                router = _routers[cluster] = _Router(cluster)
    return router


def engines(cluster: AnyCluster) -> Mapping[tuple[str, Purpose], Engine]:
    """The engines made so far for ``cluster``, by ``(node, purpose)`` (a snapshot).

    For observability and tests: sessions pick engines themselves. (For the
    primary in tools such as Alembic, use ``session.connection()``.)
    """
    return _router_for(cluster).engines()


# -- the session ---------------------------------------------------------------------------


class RoutingSession(Session):
    """A :class:`sqlalchemy.orm.Session` that routes each transaction (see module doc).

    ``RoutingSession(cluster=cluster, **session_kwargs)``; ``cluster`` may be an
    ``AsyncCluster`` when this is an ``AsyncSession``'s ``sync_session_class``.
    A session given ``bind=`` or ``binds=`` (a test fixture's connection, say)
    uses those: an explicit bind wins.
    """

    def __init__(self, *args: Any, cluster: AnyCluster | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        explicit = bool(args) or kwargs.get("bind") is not None or bool(kwargs.get("binds"))
        if cluster is None and not explicit:
            raise ConfigurationError(
                "RoutingSession needs cluster= (or use replica_router's sessionmaker(cluster))"
            )
        self.cluster = cluster
        self._router = None if cluster is None else _router_for(cluster)
        self._explicit = explicit
        # The engines of this transaction (kept, not looked up again: a transaction
        # must never get a second connection to its node from a newer engine).
        self._reader: Engine | None = None  # the node it reads from
        self._writer: Engine | None = None  # set once it writes: everything runs there

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: ClauseElement | None = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        router = self._router
        if bind is not None or router is None or self._explicit or self.bind is not None:
            return super().get_bind(mapper, clause=clause, bind=bind, **kw)
        if self._writer is not None:
            return self._writer
        if self._flushing or router.intents.of(clause) is Intent.WRITE:
            self._writer = router.engine(router.route_write(), "write")
            return self._writer
        if _use_primary.get() or kw.get(USE_PRIMARY) or _asks_for_primary(clause):
            return router.engine(router.primary_for_reads(), "read")
        if self._reader is None:
            self._reader = router.engine(router.route_read(), "read")
        return self._reader

    def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        _pass_use_primary(kw)
        return super().execute(statement, params, **kw)

    def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        _pass_use_primary(kw)
        return super().scalars(statement, params, **kw)

    def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        _pass_use_primary(kw)
        return super().scalar(statement, params, **kw)


def _asks_for_primary(clause: ClauseElement | None) -> bool:
    """``select(...).execution_options(use_primary=True)``."""
    return isinstance(clause, Executable) and bool(clause.get_execution_options().get(USE_PRIMARY))


def _pass_use_primary(kw: dict[str, Any]) -> None:
    """``execute(..., execution_options={"use_primary": True})``: tell ``get_bind``."""
    options = kw.get("execution_options")
    if options and options.get(USE_PRIMARY):
        kw["bind_arguments"] = {**(kw.get("bind_arguments") or {}), USE_PRIMARY: True}


@event.listens_for(RoutingSession, "after_transaction_end")
def _transaction_ended(session: Session, transaction: SessionTransaction) -> None:
    """A new session transaction routes afresh."""
    if transaction.parent is None and isinstance(session, RoutingSession):
        session._reader = session._writer = None


def sessionmaker(cluster: Cluster, **kwargs: Any) -> _sessionmaker[RoutingSession]:
    """SQLAlchemy's ``sessionmaker`` of :class:`RoutingSession` on ``cluster``.

    Every keyword of ``sqlalchemy.orm.sessionmaker`` applies (``class_`` must be a
    RoutingSession subclass).
    """
    class_ = kwargs.pop("class_", RoutingSession)
    _check_class(class_)
    return _sessionmaker(class_=class_, cluster=cluster, **kwargs)


def async_sessionmaker(
    cluster: AsyncCluster, **kwargs: Any
) -> sa_asyncio.async_sessionmaker[sa_asyncio.AsyncSession]:
    """SQLAlchemy's ``async_sessionmaker`` of ``AsyncSession`` routed on ``cluster``.

    ``AsyncSession.get_bind`` is not an override point: the routing lives in the
    ``sync_session_class`` (:class:`RoutingSession`), as SQLAlchemy documents.
    """
    sync_class = kwargs.pop("sync_session_class", RoutingSession)
    _check_class(sync_class)
    return sa_asyncio.async_sessionmaker(sync_session_class=sync_class, cluster=cluster, **kwargs)


def _check_class(cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, RoutingSession)):
        raise ConfigurationError(f"expected a RoutingSession subclass, got {cls!r}")


# -- seed 004's engines -------------------------------------------------------------------


def pool_settings(
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_recycle: float = -1,
    pool_pre_ping: bool = False,
) -> dict[str, Any]:
    """``create_engine``'s pool arguments as the cluster's pool settings for one role.

    ``Cluster(pool_kwargs={"primary": pool_settings(pool_size=30, max_overflow=20,
    pool_recycle=1800, pool_pre_ping=True), "replica": pool_settings(...)})``: the
    pool keeps ``pool_size`` connections and opens up to ``max_overflow`` more
    under load (psycopg_pool's ``min_size`` / ``max_size``), replaces a connection
    older than ``pool_recycle`` seconds (``max_lifetime``; -1 keeps the cluster's
    default) and checks each connection it hands out with ``pool_pre_ping``
    (without it, no check).
    """
    if pool_size < 1 or max_overflow < 0:
        raise ConfigurationError(
            f"pool_settings: pool_size must be >= 1 and max_overflow >= 0, "
            f"got {pool_size} and {max_overflow}"
        )
    settings: dict[str, Any] = {"min_size": pool_size, "max_size": pool_size + max_overflow}
    if pool_recycle > 0:
        settings["max_lifetime"] = float(pool_recycle)
    if not pool_pre_ping:
        settings["check"] = None  # with it, the cluster's own check of each checkout
    return settings


def _settings_of(engine: Engine) -> dict[str, Any]:
    pool = engine.pool
    size = getattr(pool, "size", None)
    return pool_settings(
        pool_size=size() if callable(size) and size() > 0 else 5,
        max_overflow=max(0, getattr(pool, "_max_overflow", 10)),
        pool_recycle=getattr(pool, "_recycle", -1),
        pool_pre_ping=bool(getattr(pool, "_pre_ping", False)),
    )


def _dsn_of(engine: Engine) -> str:
    if engine.dialect.name != "postgresql":
        raise ConfigurationError(f"{engine!r}: expected a PostgreSQL engine")
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def cluster_from_engines(
    primary: Engine | sa_asyncio.AsyncEngine,
    replicas: list[Engine] | list[sa_asyncio.AsyncEngine],
    **cluster_kwargs: Any,
) -> Any:
    """A ``Cluster`` (``AsyncCluster`` for async engines) of the nodes seed 004's
    engines point at, with their pool settings per role.

    The engines' own pools are disposed: from here on the cluster's pools are
    the only ones, and :func:`sessionmaker` builds the per-node engines on them.
    ``cluster_kwargs`` go to the cluster (``max_lag=2.0``, ``policy=...``).
    """
    engines = [e.sync_engine if isinstance(e, sa_asyncio.AsyncEngine) else e
               for e in (primary, *replicas)]  # fmt: skip
    roles = {"primary": _settings_of(engines[0])}
    if replicas:
        roles["replica"] = _settings_of(engines[1])
    cluster_kwargs.setdefault("pool_kwargs", roles)
    cls = AsyncCluster if isinstance(primary, sa_asyncio.AsyncEngine) else Cluster
    cluster = cls(_dsn_of(engines[0]), [_dsn_of(e) for e in engines[1:]], **cluster_kwargs)
    for engine in engines:
        engine.dispose()
    return cluster
