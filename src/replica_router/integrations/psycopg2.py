"""psycopg2 connections that send each statement where it may run.

For code written against psycopg2 (seed 001's readers expect one connection that
sends SELECTs to a replica and writes to the primary by itself)::

    import psycopg2
    from replica_router import Cluster
    from replica_router.integrations import psycopg2 as routed

    cluster = Cluster(primary=PRIMARY_DSN, replicas=[REPLICA_DSN, ...]).open()
    conn = routed.connect(cluster, autocommit=True)
    # or: psycopg2.connect(connection_factory=routed.connection_factory(cluster))
    cur = conn.cursor()
    cur.execute("SELECT * FROM users")          # a replica
    cur.execute("INSERT INTO users ...")        # the primary
    conn.commit()                               # (nothing to commit in autocommit)

The connection **is** a ``psycopg2.extensions.connection`` and its cursors are
``psycopg2.extensions.cursor`` objects, so code that checks for them, and psycopg2's own
helpers (``psycopg2.extras.execute_values``, ``register_uuid(conn)`` and the other
``register_*``, ``psycopg2.sql``, ``DictCursor`` & co.), work unchanged. Its own
libpq connection goes to the primary (to a read node while there is none): it
answers ``encoding``, ``server_version``, ``dsn`` (psycopg2 hides the password),
``info`` and ``get_parameter_status()``, renders ``mogrify()``, and serves as the
write link while that node is the primary. Each statement runs on the node
connection the rules pick; its results are read from there, with the typecasters
registered on the routed connection and on the cursor applied.

The rules are the :class:`~replica_router.connection.RoutedConnection`'s
(``docs/routing-rules.md``), with psycopg2's defaults:

* psycopg2 is **not** autocommit by default: the first statement opens a
  transaction, and a transaction is never split across nodes, so it runs on the
  primary — even when it starts with a SELECT, since it may write later. Declare
  read-only work (``conn.set_session(readonly=True)`` or ``connect(cluster,
  readonly=True)``) to run it on a replica; set ``conn.autocommit = True`` (or
  ``set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT)``) to route statement by
  statement.
* ``with conn:`` is a transaction (psycopg2 >= 2.9 semantics, also in
  autocommit): committed on exit, rolled back on an exception; it does not
  close the connection.
* Writes advance the cluster's consistency token like every other path, COPY ...
  FROM STDIN (``copy_from``, ``copy_expert``) and ``execute_values`` included;
  ``COPY ... TO STDOUT`` of a read (``copy_to``, ``copy_expert``) goes where reads go;
  ``callproc`` where its ``SELECT * FROM proc(...)`` goes.
* Named cursors are ``DECLARE``/``FETCH``/``MOVE``/``CLOSE`` through the same rules:
  in a transaction (the primary, or a replica in a read-only one), or
  ``withhold=True`` in autocommit, which pins the session to the primary.
* Not routed (``NotSupportedError``): two-phase commit, large objects, ``reset()``,
  asynchronous connections, ``set_client_encoding()`` to another encoding.

The routing, lag, consistency and failover decisions are the cluster's; only the
connections differ. Idle node connections are kept per cluster (a few per node,
checked before reuse); :func:`close_pools` closes them after ``cluster.close()``.
A node connection in use is one the cluster abandons if its node hangs
(``cluster.using``), so a statement in flight there fails, or a read moves on.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from ..classify import Intent
from ..cluster import Lease
from ..consistency import NODE_POSITION_SQL, POSITION_SQL, WROTE_SQL
from ..dsn import password_of, scrub
from ..errors import Error, NodeUnavailable
from ..lsn import parse_lsn
from ..session import (
    BEGINS,
    PINNING_EFFECTS,
    ROUTE_BEGIN_READ,
    ROUTE_BEGIN_WRITE,
    ROUTE_SETTING,
    SESSION_SETTINGS_SQL,
    Link,
    RoutedSession,
    refuse_on_replica,
    refused_read,
    route,
)
from ..sources import Purpose, socket_hung_up

if TYPE_CHECKING:
    from ..classify import Statement
    from ..cluster import Cluster

__all__ = ["RoutedConnection", "RoutedCursor", "close_pools", "connect", "connection_factory"]

_IDLE: Final = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_MAX_IDLE: Final = 8  # idle connections kept per node and purpose
_COMMIT_AND_POSITION: Final = "COMMIT; " + POSITION_SQL
# psycopg2's isolation level constants -> the SQL words (psycopg's numbering differs).
_LEVELS: Final = {
    psycopg2.extensions.ISOLATION_LEVEL_READ_UNCOMMITTED: "READ UNCOMMITTED",
    psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED: "READ COMMITTED",
    psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ: "REPEATABLE READ",
    psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE: "SERIALIZABLE",
}


def connect(
    cluster: Cluster,
    *,
    autocommit: bool = False,
    readonly: bool | None = None,
    cursor_factory: Any = None,
) -> RoutedConnection:
    """A routed psycopg2 connection through ``cluster`` (which must be open).

    ``autocommit=False`` is psycopg2's default (transactions, on the primary
    unless ``readonly``); ``autocommit=True`` routes statement by statement.
    ``cursor_factory`` (e.g. ``psycopg2.extras.RealDictCursor``) is used for
    every cursor, as with ``psycopg2.connect(cursor_factory=...)``.
    """
    return RoutedConnection(
        "", cluster=cluster, autocommit=autocommit, readonly=readonly,
        cursor_factory=cursor_factory,
    )  # fmt: skip


def connection_factory(
    cluster: Cluster, *, autocommit: bool = False, readonly: bool | None = None
) -> Callable[..., RoutedConnection]:
    """What ``psycopg2.connect(connection_factory=...)`` takes to make routed connections.

    ``psycopg2.connect(connection_factory=connection_factory(cluster))``, also
    through code that passes its keyword arguments on to ``psycopg2.connect``
    (Peewee's ``PostgresqlDatabase(..., connection_factory=...)``,
    ``psycopg2.pool``). The connection string ``psycopg2.connect`` builds is not
    used: the cluster's nodes are where statements go.
    """
    return functools.partial(
        RoutedConnection, cluster=cluster, autocommit=autocommit, readonly=readonly
    )


def close_pools(cluster: Cluster) -> None:
    """Close the idle psycopg2 connections kept for ``cluster`` (after ``cluster.close()``)."""
    with _registry_lock:
        pools = _registry.pop(cluster, None)
    if pools is not None:
        pools.close()


class _NodeConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A node connection that remembers the connection string it was made with."""

    conninfo: str


class _Held:
    """A node connection this module holds: counted in use, and one the cluster
    abandons if its node stops answering (``cluster.using``, design rule 10)."""

    __slots__ = ("_cluster", "_node", "_using")

    def __init__(self, cluster: Cluster, node: str, conn: Any) -> None:
        self._cluster = cluster
        self._node = node
        self._using = cluster.using(node, conn)
        self._using.__enter__()
        cluster.note_in_use(node, +1)

    def end(self) -> None:
        self._using.__exit__(None, None, None)
        self._cluster.note_in_use(self._node, -1)


class _Lease(Lease[Any]):
    """A node connection out of this module's idle lists or the routed connection's own."""

    __slots__ = ("held",)

    def __init__(self, conn: Any, node: str, purpose: Purpose, source: Any, held: _Held) -> None:
        super().__init__(conn, node, purpose, source)
        self.held = held


class _NodePools:
    """Idle psycopg2 connections per node, purpose and connection string; no threads.

    Keyed by the connection string too, so a node removed and added again under the
    same name (another server) never gets the old server's idle connections.
    An idle connection is checked with ``SELECT 1`` before it is handed out
    again (a routed connection keeps its node connections for its whole life,
    so this is once per routed connection and node, not per statement). From
    that check on, the cluster knows it is in use (``cluster.using``): the
    monitor abandons it if its node stops answering.
    """

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, str], list[_NodeConnection]] = {}

    def lease(self, node: str, purpose: Purpose) -> Lease[Any]:
        """A checked connection to ``node``; raises psycopg2.OperationalError if none."""
        try:  # like the cluster's read pools: for "read", a write fails on every node
            dsn = self._cluster.conninfo(node, purpose)
        except NodeUnavailable as exc:
            raise psycopg2.OperationalError(str(exc)) from None
        stale: list[_NodeConnection] = []
        with self._lock:
            idle = self._idle.get((node, purpose, dsn))
            conn = idle.pop() if idle else None
            if idle is None:  # first lease since the node changed: drop the old server's
                for key in [k for k in self._idle if k[:2] == (node, purpose)]:
                    stale += self._idle.pop(key)
        for old in stale:
            old.close()
        held = None
        if conn is not None:
            held = _Held(self._cluster, node, conn)  # a check on a hung node is abandoned
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except psycopg2.Error:
                held.end()
                conn.close()
                conn = held = None
        if conn is None or held is None:
            conn = self._connect(node, dsn)
            held = _Held(self._cluster, node, conn)
        return _Lease(conn, node, purpose, self, held)

    def give_back(self, lease: Lease[Any], *, keep: bool) -> None:
        assert isinstance(lease, _Lease)
        lease.held.end()
        conn = lease.conn
        if keep and not conn.closed and self._cluster.monitor is not None:
            key = (lease.node, lease.purpose, conn.conninfo)
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if len(idle) < _MAX_IDLE:
                    idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _connect(self, node: str, dsn: str) -> _NodeConnection:
        try:
            conn: _NodeConnection = psycopg2.connect(dsn, connection_factory=_NodeConnection)
        except psycopg2.OperationalError as exc:
            raise psycopg2.OperationalError(_connect_error(node, dsn, exc)) from None
        conn.conninfo = dsn
        conn.autocommit = True  # statements commit one by one; transactions say BEGIN
        return conn


def _connect_error(node: str, dsn: str, exc: BaseException) -> str:
    return f"{node}: {scrub(str(exc).strip(), password_of(dsn)) or 'connection failed'}"


_registry: weakref.WeakKeyDictionary[Cluster, _NodePools] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _pools_for(cluster: Cluster) -> _NodePools:
    with _registry_lock:
        pools = _registry.get(cluster)
        if pools is None:
            pools = _registry[cluster] = _NodePools(cluster)
        return pools


# psycopg2's own accessors, for the routed connection's libpq connection (its Python
# attributes of the same names answer for the routed session instead).
_Connection: Final[Any] = psycopg2.extensions.connection
_Cursor: Final[Any] = psycopg2.extensions.cursor
_NATIVE_CLOSED: Final[Any] = _Connection.closed
_NATIVE_NOTIFIES: Final[Any] = _Connection.notifies
_NATIVE_AUTOCOMMIT: Final[Any] = _Connection.autocommit


def _broken(conn: Any) -> bool:
    """Whether a node connection (or the routed connection's own) is closed."""
    return bool(_NATIVE_CLOSED.__get__(conn))


def _hung_up(conn: Any) -> bool:
    """:func:`~replica_router.sources.server_hung_up` for an idle psycopg2 node
    connection: closed, or its socket readable (the server left or is ending the
    session); one that cannot be polled is not trusted either."""
    return _broken(conn) or socket_hung_up(conn)


class _Socket:
    """The routed connection's own socket, for the cluster to shut down if its node hangs
    (a weak reference: what the cluster holds never keeps a dropped connection alive)."""

    __slots__ = ("__weakref__", "_conn")

    def __init__(self, conn: Any) -> None:
        self._conn = weakref.ref(conn)

    def fileno(self) -> int:
        conn = self._conn()
        if conn is None:
            raise psycopg2.InterfaceError("connection already closed")
        return int(_Connection.fileno(conn))


class _Home:
    """The routed connection's own libpq connection, a link like the pooled ones.

    Made to the primary when there is one (else to a read node) when the routed
    connection is made; it serves as the write link while its node is the primary
    under the same connection string, and is never given to anyone else.
    """

    __slots__ = ("cluster", "conn", "conninfo", "free", "node", "purpose")

    def __init__(self, conn: RoutedConnection, node: str, purpose: Purpose, conninfo: str) -> None:
        self.cluster = conn._cluster
        self.conn = conn
        self.node = node
        self.purpose = purpose
        self.conninfo = conninfo
        self.free = True

    def take(self, node: str, purpose: Purpose) -> Lease[Any] | None:
        if not self.free or node != self.node or purpose != self.purpose or _broken(self.conn):
            return None
        try:
            if self.cluster.conninfo(node, purpose) != self.conninfo:
                return None  # another server under the same name
        except NodeUnavailable:
            return None
        self.free = False
        return _Lease(self.conn, node, purpose, self, _Held(self.cluster, node, _Socket(self.conn)))

    def give_back(self, lease: Lease[Any], *, keep: bool) -> None:
        assert isinstance(lease, _Lease)
        lease.held.end()
        self.free = True
        if not keep and not _broken(self.conn):
            _Connection.close(self.conn)


class RoutedConnection(RoutedSession, psycopg2.extensions.connection):  # type: ignore[misc]
    """psycopg2's ``connection``, routed (see the module doc).

    Made by :func:`connect`, or by ``psycopg2.connect`` with
    :func:`connection_factory`.
    """

    _cluster: Cluster
    _errors = psycopg2
    _read_only_in_autocommit = True

    def __init__(
        self,
        dsn: str = "",
        async_: int = 0,
        *,
        cluster: Cluster,
        autocommit: bool = False,
        readonly: bool | None = None,
        cursor_factory: Any = None,
    ) -> None:
        if async_:
            raise psycopg2.NotSupportedError("asynchronous connections are not routed")
        if cluster.monitor is None:
            raise Error("Cluster is not open: call open() or use it in a with block")
        RoutedSession.__init__(self, cluster, autocommit=autocommit, read_only=readonly)
        self._pools = _pools_for(cluster)
        self._with_block = False
        self._home = self._connect_home()
        if cursor_factory is not None:
            self.cursor_factory = cursor_factory

    def _connect_home(self) -> _Home:
        """Open this object's own libpq connection: to the primary, else a read node."""
        cluster = self._cluster
        causes: list[str] = []
        purpose: Purpose
        for purpose in ("write", "read"):
            try:
                node = cluster.route_write() if purpose == "write" else cluster.route_read()
                dsn = cluster.conninfo(node, purpose)
            except Error as exc:
                causes.append(str(exc))
                continue
            try:
                _Connection.__init__(self, dsn)
            except psycopg2.OperationalError as exc:
                message = _connect_error(node, dsn, exc)
                self._suspect(node, message)
                causes.append(message)
                continue
            _NATIVE_AUTOCOMMIT.__set__(self, True)  # transactions say BEGIN, as on every link
            return _Home(self, node, purpose, dsn)
        raise psycopg2.OperationalError("no node to connect to: " + "; ".join(causes))

    # -- psycopg2's connection attributes -----------------------------------------------------

    def _closed_error(self) -> Exception:
        error: Exception = psycopg2.InterfaceError("connection already closed")
        return error

    @property
    def closed(self) -> int:  # type: ignore[override]
        """0 while open, like psycopg2's (nonzero once closed)."""
        return 1 if self._closed else 0

    @property
    def status(self) -> int:
        """``psycopg2.extensions.STATUS_BEGIN`` while a routed transaction is open."""
        if self._tx is not None or self._tx_lost is not None:
            return int(psycopg2.extensions.STATUS_BEGIN)
        return int(psycopg2.extensions.STATUS_READY)

    @property
    def info(self) -> _Info:
        """psycopg2's ``ConnectionInfo`` of this object's own connection (to the primary),
        but ``transaction_status`` is the routed transaction's."""
        return _Info(self)

    @property
    def readonly(self) -> bool | None:
        return self._read_only

    @readonly.setter
    def readonly(self, value: bool | None) -> None:
        self.read_only = value

    @property
    def isolation_level(self) -> int | None:
        level: int | None = self._isolation_level
        return level

    @isolation_level.setter
    def isolation_level(self, value: int | str | None) -> None:
        self.set_session(isolation_level=value)

    def set_session(
        self,
        isolation_level: int | str | None = None,
        readonly: bool | str | None = None,
        deferrable: bool | str | None = None,
        autocommit: bool | None = None,
    ) -> None:
        """psycopg2's ``set_session``; ``readonly=True`` lets transactions run on a replica."""
        self._check_no_transaction("set_session")
        if isolation_level is not None:
            self._isolation_level = _level(isolation_level)
        if readonly is not None:
            self._read_only = None if readonly == "default" else bool(readonly)
        if deferrable is not None:
            self._deferrable = None if deferrable == "default" else bool(deferrable)
        if autocommit is not None:
            self._autocommit = bool(autocommit)
        self._rebuild_begin()

    def set_isolation_level(self, level: int | None) -> None:
        """psycopg2's: roll back what is open, then ``ISOLATION_LEVEL_AUTOCOMMIT`` (0)
        turns autocommit on, any other level (or None, the default) turns it off."""
        self._check_open()
        if level is not None and (not isinstance(level, int) or not 0 <= level <= 4):
            raise ValueError("isolation level must be between 0 and 4")
        self.rollback()
        if level == psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT:
            self._autocommit = True
        else:
            self._autocommit = False
            self._isolation_level = None if level is None else _level(level)
        self._rebuild_begin()

    def _isolation_sql(self) -> str | None:
        level = self._isolation_level
        return None if level is None else _LEVELS[level]

    def get_transaction_status(self) -> int:
        """``psycopg2.extensions.TRANSACTION_STATUS_*`` of the open transaction (IDLE if none)."""
        link = self._tx
        if self._closed:
            return int(psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN)
        return _IDLE if link is None else _status(link)

    @property
    def notifies(self) -> list[Any]:
        """Notifications received after ``LISTEN`` (which pins the session); see :meth:`poll`."""
        writer = self._writer
        conn = writer.conn if self._pinned and writer is not None else self
        notifies: list[Any] = _NATIVE_NOTIFIES.__get__(conn)
        return notifies

    def poll(self) -> int:
        """Read what the server sent (notifications) on the pinned session's connection."""
        self._check_open()
        writer = self._writer
        if not self._pinned or writer is None:
            raise psycopg2.ProgrammingError("no LISTEN on this connection yet: nothing to poll")
        return int(_Connection.poll(writer.conn))

    def fileno(self) -> int:
        """The socket notifications arrive on: the pinned session's (after ``LISTEN``),
        else this object's own connection's."""
        writer = self._writer
        conn = writer.conn if self._pinned and writer is not None else self
        return int(_Connection.fileno(conn))

    def cancel(self) -> None:
        """Cancel what runs now on any node connection this one holds."""
        for link in self._links():
            with contextlib.suppress(psycopg2.Error):
                _Connection.cancel(link.conn)

    def set_client_encoding(self, encoding: str) -> None:
        names = psycopg2.extensions.encodings
        if names.get(encoding.upper().replace("-", "").replace("_", "")) != names.get(
            self.encoding
        ):
            raise psycopg2.NotSupportedError(
                f"set_client_encoding() is not routed: the nodes' connections keep {self.encoding}"
            )

    def _not_routed(self, *args: object, **kwargs: object) -> Any:
        raise psycopg2.NotSupportedError(
            "two-phase commit, large objects and reset() are not routed: "
            "use a plain psycopg2 connection to the primary"
        )

    tpc_begin = tpc_prepare = tpc_commit = tpc_rollback = tpc_recover = _not_routed
    lobject = reset = _not_routed

    # -- the psycopg2 surface ----------------------------------------------------------------

    def cursor(
        self,
        name: str | None = None,
        cursor_factory: Any = None,
        withhold: bool = False,
        scrollable: bool | None = None,
    ) -> RoutedCursor:
        self._check_open()
        cursor: RoutedCursor = _routed_factory(cursor_factory or self.cursor_factory)(self, name)
        if withhold:
            cursor.withhold = withhold
        if scrollable is not None:
            cursor.scrollable = scrollable
        return cursor

    def commit(self) -> None:
        self._before_commit()
        self._finish(commit=True)

    def rollback(self) -> None:
        self._before_rollback()
        self._finish(commit=False)

    def close(self) -> None:
        for link in self._closing_links():
            self._release(link)
        if not _broken(self):
            _Connection.close(self)

    def __del__(self) -> None:
        """Dropped without ``close()``: the node connections it held are closed, not
        given back (no I/O here), and no longer count as in use."""
        if self.__dict__.get("_closed", True):
            return
        self._closed = True
        for link in self._links():
            with contextlib.suppress(Exception):
                lease = link.lease
                assert isinstance(lease, _Lease)
                lease.held.end()
                if lease.conn is not self:
                    lease.conn.close()

    def __enter__(self) -> RoutedConnection:
        self._check_open()
        if self._with_block:
            raise psycopg2.ProgrammingError("the connection cannot be re-entered recursively")
        self._with_block = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._with_block = False
        if self._closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    # -- routing one statement ------------------------------------------------------------------

    def _execute(self, rc: RoutedCursor, query: Any, params: Any, many: bool) -> None:
        if self._attention:
            self._check_open()
            self._attention = False
            self._cluster.learn_functions()
        st = self._analyze(query if type(query) is str else self._text(query))
        if self._tx is not None:
            self._in_transaction(rc, st, query, params, many)
            return
        autocommit = self._autocommit and not self._with_block
        refused_is_final = self._autocommit_read_only(autocommit)
        reads = st.intent is Intent.READ or refused_is_final
        if autocommit and reads and not st.session and not self._pinned:
            link = self._read_link()
            try:
                self._run(rc, link, query, params, many)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                if not _broken(link.conn) or rc._copy is not None:
                    raise  # (a COPY may have written part of its file: not run twice)
                self._lost(link)  # a read changed nothing: run it once more elsewhere
                link = self._read_link()
                self._run(rc, link, query, params, many)
            except psycopg2.errors.ReadOnlySqlTransaction:
                if refused_is_final:
                    raise  # readonly=True: the server refuses writes, as psycopg2's would
                self._cluster.learn_functions(refused_on=link.node)
                st = refused_read(st)  # routed below as the write it turned out to be
            if st.intent is Intent.READ or refused_is_final:  # it ran, and wrote nothing
                self._count(link, st)
                if self._cluster.monotonic_reads:
                    self._note_read(link)
                return
        where = route(
            st,
            autocommit=autocommit,
            read_only=self._read_only,
            pinned=self._pinned,
            serializable=self._serializable,
        )
        if where in (ROUTE_BEGIN_READ, ROUTE_BEGIN_WRITE):
            if where == ROUTE_BEGIN_READ:
                refuse_on_replica(st, psycopg2)
            link = self._read_link() if where == ROUTE_BEGIN_READ else self._write_link()
            if link.gen != self._settings_gen:
                self._sync_settings(link)
            if st.transaction not in BEGINS:
                self._send(link, self._begin)
            self._begin_transaction_on(link)
            self._in_transaction(rc, st, query, params, many)
            return
        if where == ROUTE_SETTING:
            for attempt in (1, 2):
                link = self._read_link() if self._setting_on_reader() else self._write_link()
                try:
                    self._checked(link, rc, query, params, many)
                    break
                except psycopg2.Error:
                    if attempt == 2 or not _broken(link.conn):
                        raise  # a SET changes nothing else: safe to send again elsewhere
            if self._record_setting(link, query, params):
                self._capture_settings(link)
            return
        if st.session & PINNING_EFFECTS and not self._pinned:
            self._pin()
        link = self._write_link()
        if st.session:
            link.dirty = True
        try:
            self._checked(link, rc, query, params, many)
        except psycopg2.Error:
            self._after_failure(link, st, in_transaction=False, many=many)
            raise
        self._count(link, st)
        committed, settings = self._after_autocommit(link, st, _status(link), rc.statusmessage)
        if committed:
            self._after_write(link)
        if settings:
            self._capture_settings(link)

    def _in_transaction(
        self, rc: RoutedCursor, st: Statement, query: Any, params: Any, many: bool
    ) -> None:
        link = self._tx
        assert link is not None
        self._note_statement(link, st)
        if self._pinned and self._reader is not None and self._reader is not link:
            self._release(self._reader)
        try:
            self._checked(link, rc, query, params, many)
        except psycopg2.Error:
            if link.role == "write":
                self._after_failure(link, st, in_transaction=True, many=many)
            if self._tx is link and _status(link) == _IDLE:
                self._end_transaction(link)  # e.g. "INSERT ...; COMMIT; SELECT 1/0"
            raise
        self._count(link, st)
        settle, note_read, ended = self._after_in_transaction(
            link, st, _status(link), rc.statusmessage
        )
        if settle:
            self._settle(link)
        if note_read:
            self._note_read(link)  # what the transaction read so far
        if ended:  # COMMIT, ROLLBACK, PREPARE TRANSACTION
            self._end_transaction(link)

    def _text(self, query: Any) -> str:
        """The SQL of ``bytes`` or a ``psycopg2.sql.Composable`` (rendered on this
        object's own connection, else a held node's)."""
        if isinstance(query, (bytes, bytearray, memoryview)):
            codec = psycopg2.extensions.encodings.get(self.encoding, "utf-8")
            return bytes(query).decode(codec, "replace")
        if hasattr(query, "as_string"):
            return str(query.as_string(self._render_on()))
        raise TypeError(
            f"a query is str, bytes or psycopg2.sql.Composable, not {type(query).__name__}"
        )

    def _render_on(self) -> Any:
        """A connection to render SQL on: this one's own, or a held node's if it broke."""
        if not _broken(self):
            return self
        link = self._tx or self._reader or self._writer or self._read_link()
        return link.conn

    def _run(self, rc: RoutedCursor, link: Link, query: Any, params: Any, many: bool) -> None:
        if link.gen != self._settings_gen:
            self._sync_settings(link)
        cursor = rc._cursor_on(link.conn)
        copy = rc._copy
        if copy is not None:
            copy(cursor)
        elif many:
            cursor.executemany(query, params)
        else:
            cursor.execute(query, params)

    def _checked(self, link: Link, rc: RoutedCursor, query: Any, params: Any, many: bool) -> None:
        try:
            self._run(rc, link, query, params, many)
        except psycopg2.Error:
            if _broken(link.conn):
                self._lost(link)
            raise

    def _send(self, link: Link, query: str, params: Any = None) -> Any:
        """Run one statement of ours on ``link``; returns the psycopg2 cursor."""
        try:
            cursor = _Cursor(link.conn)
            cursor.execute(query, params)
        except psycopg2.Error:
            if _broken(link.conn):
                self._lost(link)
            raise
        return cursor

    # -- node links -----------------------------------------------------------------------------

    def _read_link(self) -> Link:
        topology, mark = self._read_key()
        link = self._reader
        if link is not None:
            if self._keeps_reader(link, topology, mark):
                return link
            self._release(link)
        cluster = self._cluster
        exclude: frozenset[str] = frozenset()
        while True:
            node = cluster.route_read(exclude=exclude)
            try:
                lease = self._home.take(node, "read") or self._pools.lease(node, "read")
            except psycopg2.OperationalError as exc:
                self._suspect(node, str(exc))
                exclude |= {node}  # another node, or NoReplicaAvailable once none is left
                continue
            return self._hold(lease, "read", topology, mark)

    def _write_link(self) -> Link:
        """The primary; a held link the server ended while idle is replaced before a
        write goes on it (see RoutedConnection)."""
        link = self._writer
        topology = self._cluster.topology
        if link is not None:
            if _hung_up(link.conn):
                self._lost(link)
                self._check_open()
            elif self._keeps_writer(link, topology):
                return link
            else:
                self._release(link)
        node = self._cluster.route_write()
        try:
            lease = self._home.take(node, "write") or self._pools.lease(node, "write")
        except psycopg2.OperationalError as exc:
            self._suspect(node, str(exc))
            raise
        return self._hold(lease, "write", topology)

    def _suspect(self, node: str, message: str) -> None:
        monitor = self._cluster.monitor
        if monitor is not None:
            monitor.mark_suspect(node, message)

    def _pin(self) -> None:
        self._pinned = True
        reader = self._reader
        if reader is not None and reader is not self._tx:
            self._release(reader)

    def _release(self, link: Link) -> None:
        self._forget(link)
        conn = link.conn
        keep = not _broken(conn)
        try:
            if keep:
                with _Cursor(conn) as cursor:
                    if _Connection.info.__get__(conn).transaction_status != _IDLE:
                        cursor.execute("ROLLBACK")
                    if link.dirty:
                        cursor.execute("DISCARD ALL")
                    if link.role == "read" and self._cluster.monotonic_reads:
                        cursor.execute(NODE_POSITION_SQL)
                        row = cursor.fetchone()
                        self._cluster.record_read(row[0] if row else None)
        except psycopg2.Error:
            keep = False
        finally:
            link.lease.source.give_back(link.lease, keep=keep)

    def _lost(self, link: Link) -> None:
        self._note_lost(link)
        link.lease.source.give_back(link.lease, keep=False)

    # -- transactions, positions, settings --------------------------------------------------------

    def _finish(self, *, commit: bool) -> None:
        link = self._tx
        if link is None:
            return
        try:
            failed = _status(link) != psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            if commit and self._tx_wrote and not failed:
                self._commit_and_capture(link)
            elif commit and not failed and link.role == "write" and self._wrote(link):
                self._commit_and_capture(link)  # the server says it wrote
            else:
                self._send(link, "COMMIT" if commit and not failed else "ROLLBACK")
            if self._commit_owed and self._tx is link:
                self._settle(link)
        finally:
            if self._tx is link:
                self._end_transaction(link)

    def _commit_and_capture(self, link: Link) -> None:
        """COMMIT and the position after it, one round trip (psycopg2 returns the last result)."""
        wanted = self._position_wanted()
        if not wanted:
            self._send(link, "COMMIT")
            if wanted is not None:
                self._cluster.record_write(None)
            return
        row = self._send(link, _COMMIT_AND_POSITION).fetchone()
        self._cluster.record_write(row[0] if row and row[0] else None)

    def _end_transaction(self, link: Link) -> None:
        self._tx = None
        self._tx_wrote = False
        if self._tx_settings:
            self._tx_settings = False
            if not self._pinned and not _broken(link.conn):
                self._capture_settings(link)

    def _wrote(self, link: Link) -> bool:
        """Whether the open transaction on ``link`` changed data (it was assigned a
        transaction id): asked before a COMMIT in which the classifier saw no write.
        Its own round trip: psycopg2 returns only a string's last result."""
        if self._position_wanted() is None:
            return False
        row = self._send(link, WROTE_SQL).fetchone()
        return bool(row and row[0])

    def _after_failure(
        self, link: Link, st: Statement, *, in_transaction: bool, many: bool
    ) -> None:
        """A statement failed on the primary link: it may have committed before it
        failed (``executemany`` in autocommit, ``INSERT ...; COMMIT; SELECT 1/0``)."""
        if _broken(link.conn):
            return  # lost: the outcome is unknown, and no position can be asked
        if self._after_failure_on(link, st, _status(link),
                                  in_transaction=in_transaction, many=many):  # fmt: skip
            with contextlib.suppress(psycopg2.Error):  # the statement's error is raised
                self._settle(link)

    def _settle(self, link: Link) -> None:
        self._commit_owed = False
        self._after_write(link)

    def _after_write(self, link: Link) -> None:
        ask = self._position_after_write()
        if ask is not None:
            self._written_at(self._position_on(link, POSITION_SQL) if ask else None)

    def _note_read(self, link: Link) -> None:
        """Monotonic reads: the floor rises when a read is served (see RoutedConnection)."""
        self._cluster.record_read(self._position_on(link, NODE_POSITION_SQL))

    def _position_on(self, link: Link, sql: str) -> int | None:
        """The WAL position ``sql`` reads on ``link``."""
        row = self._send(link, sql).fetchone()
        return parse_lsn(row[0]) if row and row[0] else None

    def _capture_settings(self, link: Link) -> None:
        self._replace_settings(link, self._send(link, SESSION_SETTINGS_SQL).fetchall())

    def _sync_settings(self, link: Link) -> None:
        reset, statements = self._replay_plan(link)
        if reset:
            self._send(link, "RESET ALL")
        for query, params in statements:
            self._send(link, query, params)
        self._replayed(link)


def _level(value: int | str) -> int | None:
    if isinstance(value, str):
        word = value.strip().upper().replace("_", " ")
        if word == "DEFAULT":
            return None
        for number, name in _LEVELS.items():
            if name == word:
                return int(number)
    elif value in _LEVELS:
        return int(value)
    raise ValueError(f"bad isolation level value: {value!r}")


def _status(link: Link) -> int:
    """The transaction status of ``link``'s connection (psycopg2's own ``info``)."""
    return int(_Connection.info.__get__(link.conn).transaction_status)


class _Info(psycopg2.extensions.ConnectionInfo):  # type: ignore[misc]
    """``conn.info``: the routed connection's own connection, the routed transaction."""

    def __init__(self, conn: RoutedConnection) -> None:
        super().__init__(conn)
        self._routed = conn

    @property
    def transaction_status(self) -> int:
        return self._routed.get_transaction_status()


_FACTORIES: dict[type, type] = {}
_FACTORIES_LOCK = threading.Lock()


def _routed_factory(factory: Any) -> Any:
    """The cursor class for ``cursor_factory``: itself if routed, else a routed subclass
    (``RealDictCursor`` -> a class that is both, so its row building still applies)."""
    if factory is None:
        return RoutedCursor
    if isinstance(factory, type) and issubclass(factory, RoutedCursor):
        return factory
    if not (isinstance(factory, type) and issubclass(factory, _Cursor)):
        raise TypeError(
            f"cursor_factory must be a subclass of psycopg2.extensions.cursor, not {factory!r}"
        )
    with _FACTORIES_LOCK:
        routed = _FACTORIES.get(factory)
        if routed is None:
            routed = _FACTORIES[factory] = type(
                factory.__name__,
                (factory, RoutedCursor),
                {"__module__": __name__, "__doc__": f"A routed {factory.__qualname__}."},
            )
        return routed


class RoutedCursor(psycopg2.extensions.cursor):  # type: ignore[misc]
    """psycopg2's ``cursor``, routed: each ``execute`` goes where its statement may run.

    A real ``psycopg2.extensions.cursor`` of the routed connection (``mogrify``,
    typecasters registered on it, ``psycopg2.extras`` helpers work as usual); the
    results are those of the node connection the statement ran on, with the
    typecasters registered on the routed connection and this cursor applied.

    Named (server-side) cursors are ``DECLARE``/``FETCH``/``MOVE``/``CLOSE`` sent
    through the same rules: inside the transaction they run in (the primary, or a
    replica in a read-only one), or, ``withhold=True`` in autocommit, in a session
    pinned to the primary.
    """

    def __init__(self, conn: Any, name: str | bytes | None = None) -> None:
        if not isinstance(conn, RoutedConnection):
            raise TypeError(f"a RoutedCursor needs a RoutedConnection, not {type(conn).__name__}")
        super().__init__(conn)
        if isinstance(name, bytes):
            name = name.decode()
        self._name: str | None = name
        self._node_cur: Any = None  # the node connection's cursor holding the last result
        self._copy: Callable[[Any], Any] | None = None  # a copy_* call for the next _run
        self._is_closed = False
        self._withhold = False
        self._scrollable: bool | None = None
        self._declared = False
        self._buffer: collections.deque[Any] = collections.deque()

    # -- where the statements go --------------------------------------------------------------

    def _routed(self) -> RoutedConnection:
        if self._is_closed:
            raise psycopg2.InterfaceError("cursor already closed")
        conn: RoutedConnection = self.connection
        return conn

    def _cursor_on(self, node_conn: Any) -> Any:
        """The cursor on ``node_conn`` a statement runs on, with this cursor's typecasters."""
        cursor = self._node_cur
        if cursor is None or cursor.connection is not node_conn:
            if cursor is not None:
                cursor.close()
            cursor = self._node_cur = _Cursor(node_conn)
        types = self.connection.string_types  # register_type(..., conn)
        own = self.string_types  # register_type(..., this cursor)
        if types or own:
            cursor.string_types = {**types, **own} if own else dict(types)
        elif cursor.string_types:
            cursor.string_types = None
        cursor.tzinfo_factory = self.tzinfo_factory
        return cursor

    def _result(self) -> Any:
        self._routed()
        if self._node_cur is None:
            raise psycopg2.ProgrammingError("no results to fetch")
        return self._node_cur

    def execute(self, query: Any, vars: Any = None) -> None:
        conn = self._routed()
        if self._name is not None:
            self._declare(conn, query, vars)
            return
        conn._execute(self, query, vars, False)

    def executemany(self, query: Any, vars_list: Iterable[Any]) -> None:
        conn = self._routed()
        if self._name is not None:
            raise psycopg2.ProgrammingError("can't call .executemany() on named cursors")
        conn._execute(self, query, vars_list, True)

    def callproc(self, procname: str, parameters: Any = None) -> Any:
        """psycopg2's: ``SELECT * FROM procname(...)``, routed like that statement."""
        self._routed()
        if self._name is not None:
            raise psycopg2.ProgrammingError("can't call .callproc() on named cursors")
        if isinstance(parameters, dict) and parameters:
            names = ",".join(
                psycopg2.extensions.quote_ident(str(k), self) + ":=%s" for k in parameters
            )
            RoutedCursor.execute(
                self, f"SELECT * FROM {procname}({names})", list(parameters.values())
            )
            return None
        count = 0 if parameters is None else len(parameters)
        RoutedCursor.execute(
            self, f"SELECT * FROM {procname}({','.join(['%s'] * count)})", parameters
        )
        return parameters

    def _copy_via(self, text: str, copy: Callable[[Any], Any]) -> None:
        conn = self._routed()
        if self._name is not None:
            raise psycopg2.ProgrammingError("can't use COPY on named cursors")
        self._copy = copy
        try:
            conn._execute(self, text, None, False)
        finally:
            self._copy = None

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> None:
        """psycopg2's; ``COPY ... TO STDOUT`` of a read goes where reads go, ``COPY ...
        FROM STDIN`` to the primary (and the scope's token advances)."""
        text = sql if isinstance(sql, str) else self._routed()._text(sql)
        self._copy_via(text, lambda cursor: cursor.copy_expert(sql, file, size))

    def copy_from(  # noqa: PLR0917 (psycopg2's signature)
        self,
        file: Any,
        table: str,
        sep: str = "\t",
        null: str = "\\N",
        size: int = 8192,
        columns: Iterable[str] | None = None,
    ) -> None:
        """psycopg2's, on the primary (the scope's token advances)."""
        self._copy_via(
            f"COPY {table} FROM STDIN",
            lambda cursor: cursor.copy_from(file, table, sep, null, size, columns),
        )

    def copy_to(
        self,
        file: Any,
        table: str,
        sep: str = "\t",
        null: str = "\\N",
        columns: Iterable[str] | None = None,
    ) -> None:
        """psycopg2's, where reads go."""
        self._copy_via(
            f"COPY {table} TO STDOUT",
            lambda cursor: cursor.copy_to(file, table, sep, null, columns),
        )

    def mogrify(self, query: Any, vars: Any = None) -> bytes:
        """The query as psycopg2 would send it."""
        conn = self._routed()
        conn._check_open()
        if not _broken(conn):
            return bytes(_Cursor.mogrify(self, query, vars))
        return bytes(_Cursor(conn._render_on()).mogrify(query, vars))

    # -- named (server-side) cursors ----------------------------------------------------------

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def withhold(self) -> bool:
        return self._withhold

    @withhold.setter
    def withhold(self, value: bool) -> None:
        if self._name is None:
            raise psycopg2.ProgrammingError("trying to set .withhold on unnamed cursor")
        self._withhold = bool(value)

    @property
    def scrollable(self) -> bool | None:
        return self._scrollable

    @scrollable.setter
    def scrollable(self, value: bool | None) -> None:
        if self._name is None:
            raise psycopg2.ProgrammingError("trying to set .scrollable on unnamed cursor")
        if self._declared:
            raise psycopg2.ProgrammingError("can't set .scrollable after .execute()")
        self._scrollable = None if value is None else bool(value)

    def _qname(self) -> str:
        assert self._name is not None
        return '"' + self._name.replace('"', '""') + '"'

    def _declare(self, conn: RoutedConnection, query: Any, vars: Any) -> None:
        if self._declared:
            raise psycopg2.ProgrammingError("can't call .execute() on named cursors more than once")
        if conn._autocommit and not conn._with_block and conn._tx is None and not self._withhold:
            raise psycopg2.ProgrammingError("can't use a named cursor outside of transactions")
        scroll = {None: "", True: "SCROLL ", False: "NO SCROLL "}[self._scrollable]
        hold = "WITH HOLD" if self._withhold else "WITHOUT HOLD"
        head = f"DECLARE {self._qname()} {scroll}CURSOR {hold} FOR "
        conn._execute(self, head.encode() + self.mogrify(query, vars), None, False)
        self._declared = True

    def _fetch_named(self, count: int | None) -> list[Any]:
        """Up to ``count`` rows (None: all) of the named cursor, the buffer's first."""
        if not self._declared:
            self._routed()
            raise psycopg2.ProgrammingError("no results to fetch")
        buffer = self._buffer
        rows = [buffer.popleft() for _ in range(min(len(buffer), count or len(buffer)))]
        if count is None or len(rows) < count:
            rest = "ALL" if count is None else str(count - len(rows))
            self._routed()._execute(self, f"FETCH FORWARD {rest} FROM {self._qname()}", None, False)
            rows += self._rows(self._node_cur.fetchall())
        return rows

    def scroll(self, value: int, mode: str = "relative") -> None:
        if mode not in ("relative", "absolute"):
            raise psycopg2.ProgrammingError("scroll mode must be 'relative' or 'absolute'")
        if self._name is None:
            self._result().scroll(value, mode)
            return
        if not self._declared:
            raise psycopg2.ProgrammingError("scroll() before execute()")
        if mode == "relative":  # the server is past what the buffer holds
            move = f"MOVE {int(value) - len(self._buffer)}"
        else:
            move = f"MOVE ABSOLUTE {int(value)}"
        self._buffer.clear()
        self._routed()._execute(self, f"{move} FROM {self._qname()}", None, False)

    # -- results ------------------------------------------------------------------------------

    def _rows(self, rows: list[Any]) -> list[Any]:
        factory = self.row_factory  # DictCursor & co.: as psycopg2 builds their rows
        if factory is None:
            return rows
        made = []
        for row in rows:
            record = factory(self)
            for i, value in enumerate(row):
                record[i] = value
            made.append(record)
        return made

    def fetchone(self) -> Any:
        if self._name is not None:
            rows = self._fetch_named(1)
            return rows[0] if rows else None
        row = self._result().fetchone()
        return row if row is None or self.row_factory is None else self._rows([row])[0]

    def fetchmany(self, size: int | None = None) -> list[Any]:
        count = self.arraysize if size is None else size
        if self._name is not None:
            return self._fetch_named(count)
        return self._rows(self._result().fetchmany(count))

    def fetchall(self) -> list[Any]:
        if self._name is not None:
            return self._fetch_named(None)
        return self._rows(self._result().fetchall())

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._name is not None:
            if not self._buffer:
                self._buffer.extend(self._fetch_named(self.itersize))
            if not self._buffer:
                raise StopIteration
            return self._buffer.popleft()
        row = RoutedCursor.fetchone(self)
        if row is None:
            raise StopIteration
        return row

    @property
    def rowcount(self) -> int:
        return -1 if self._node_cur is None else int(self._node_cur.rowcount)

    @property
    def rownumber(self) -> int | None:
        return None if self._node_cur is None else int(self._node_cur.rownumber)

    @property
    def lastrowid(self) -> int | None:
        return None if self._node_cur is None else self._node_cur.lastrowid

    @property
    def description(self) -> Sequence[Any] | None:
        return None if self._node_cur is None else self._node_cur.description

    @property
    def statusmessage(self) -> str | None:
        return None if self._node_cur is None else self._node_cur.statusmessage

    @property
    def query(self) -> bytes | None:
        return None if self._node_cur is None else self._node_cur.query

    @property
    def pgresult_ptr(self) -> int | None:
        return None if self._node_cur is None else self._node_cur.pgresult_ptr

    @property
    def closed(self) -> bool:
        return self._is_closed

    def close(self) -> None:
        if self._is_closed:
            return
        conn: RoutedConnection = self.connection
        if self._declared and not conn._closed and (conn._tx is not None or self._withhold):
            with contextlib.suppress(psycopg2.errors.InvalidCursorName):
                conn._execute(self, f"CLOSE {self._qname()}", None, False)
        self._is_closed = True
        if self._node_cur is not None:
            self._node_cur.close()
        _Cursor.close(self)

    def __enter__(self) -> RoutedCursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._is_closed else "open"
        return f"<{type(self).__name__} {state} of {self.connection!r}>"
