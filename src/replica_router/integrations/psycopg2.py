"""psycopg2 connections that send each statement where it may run.

For code written against psycopg2 (seed 001's readers expect one connection that
sends SELECTs to a replica and writes to the primary by itself)::

    from replica_router import Cluster
    from replica_router.integrations import psycopg2 as routed

    cluster = Cluster(primary=PRIMARY_DSN, replicas=[REPLICA_DSN, ...]).open()
    conn = routed.connect(cluster, autocommit=True)
    cur = conn.cursor()
    cur.execute("SELECT * FROM users")          # a replica
    cur.execute("INSERT INTO users ...")        # the primary
    conn.commit()                               # (nothing to commit in autocommit)

The objects behave like psycopg2's ``connection`` and ``cursor`` and raise
psycopg2's exceptions; the statements run on real psycopg2 connections to the
nodes. The rules are the :class:`~replica_router.connection.RoutedConnection`'s
(``docs/routing-rules.md``), with psycopg2's defaults:

* psycopg2 is **not** autocommit by default: the first statement opens a
  transaction, and a transaction is never split across nodes, so it runs on the
  primary — even when it starts with a SELECT, since it may write later. Declare
  read-only work (``conn.set_session(readonly=True)`` or ``connect(cluster,
  readonly=True)``) to run it on a replica; set ``conn.autocommit = True`` to
  route statement by statement.
* ``with conn:`` is a transaction (psycopg2 >= 2.9 semantics, also in
  autocommit): committed on exit, rolled back on an exception; it does not
  close the connection.
* Writes advance the cluster's consistency token like every other path.

The routing, lag, consistency and failover decisions are the cluster's; only the
connections differ. Idle node connections are kept per cluster (a few per node,
checked before reuse); :func:`close_pools` closes them after ``cluster.close()``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
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
    TX_INERROR,
    TX_INTRANS,
    Link,
    RoutedSession,
    commit_possible,
    refuse_on_replica,
    refused_read,
    route,
    writes_data,
)
from ..sources import Purpose

if TYPE_CHECKING:
    from ..classify import Statement
    from ..cluster import Cluster

__all__ = ["RoutedConnection", "RoutedCursor", "close_pools", "connect"]

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
    """A psycopg2-like connection routed through ``cluster`` (which must be open).

    ``autocommit=False`` is psycopg2's default (transactions, on the primary
    unless ``readonly``); ``autocommit=True`` routes statement by statement.
    ``cursor_factory`` (e.g. ``psycopg2.extras.RealDictCursor``) is used for
    every cursor, as with ``psycopg2.connect(cursor_factory=...)``.
    """
    if cluster.monitor is None:
        raise Error("Cluster is not open: call open() or use it in a with block")
    return RoutedConnection(
        cluster, _pools_for(cluster), autocommit=autocommit, readonly=readonly,
        cursor_factory=cursor_factory,
    )  # fmt: skip


def close_pools(cluster: Cluster) -> None:
    """Close the idle psycopg2 connections kept for ``cluster`` (after ``cluster.close()``)."""
    with _registry_lock:
        pools = _registry.pop(cluster, None)
    if pools is not None:
        pools.close()


class _NodeConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A node connection that remembers the connection string it was made with."""

    conninfo: str


class _NodePools:
    """Idle psycopg2 connections per node, purpose and connection string; no threads.

    Keyed by the connection string too, so a node removed and added again under the
    same name (another server) never gets the old server's idle connections.
    An idle connection is checked with ``SELECT 1`` before it is handed out
    again (a routed connection keeps its node connections for its whole life,
    so this is once per routed connection and node, not per statement).
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
        if conn is not None:
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except psycopg2.Error:
                conn.close()
                conn = None
        if conn is None:
            conn = self._connect(node, dsn)
        self._cluster.note_in_use(node, +1)
        return Lease(conn, node, purpose, self)

    def give_back(self, lease: Lease[Any], *, keep: bool) -> None:
        cluster = self._cluster
        cluster.note_in_use(lease.node, -1)
        conn = lease.conn
        if keep and not conn.closed and cluster.monitor is not None:
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
            message = scrub(str(exc).strip(), password_of(dsn)) or "connection failed"
            raise psycopg2.OperationalError(f"{node}: {message}") from None
        conn.conninfo = dsn
        conn.autocommit = True  # statements commit one by one; transactions say BEGIN
        return conn


_registry: weakref.WeakKeyDictionary[Cluster, _NodePools] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _pools_for(cluster: Cluster) -> _NodePools:
    with _registry_lock:
        pools = _registry.get(cluster)
        if pools is None:
            pools = _registry[cluster] = _NodePools(cluster)
        return pools


def _broken(conn: Any) -> bool:
    return bool(conn.closed)


class RoutedConnection(RoutedSession):
    """psycopg2's ``connection``, routed (see the module doc). Made by :func:`connect`."""

    _cluster: Cluster
    _errors = psycopg2
    _read_only_in_autocommit = True

    def __init__(
        self,
        cluster: Cluster,
        pools: _NodePools,
        *,
        autocommit: bool,
        readonly: bool | None,
        cursor_factory: Any,
    ) -> None:
        super().__init__(cluster, autocommit=autocommit, read_only=readonly)
        self._pools = pools
        self._with_block = False
        self.cursor_factory = cursor_factory

    # -- psycopg2's connection attributes -----------------------------------------------------

    def _closed_error(self) -> Exception:
        error: Exception = psycopg2.InterfaceError("connection already closed")
        return error

    @property
    def closed(self) -> int:  # type: ignore[override]
        """0 while open, like psycopg2's (nonzero once closed)."""
        return 1 if self._closed else 0

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

    def _isolation_sql(self) -> str | None:
        level = self._isolation_level
        return None if level is None else _LEVELS[level]

    def get_transaction_status(self) -> int:
        """``psycopg2.extensions.TRANSACTION_STATUS_*`` of the open transaction (IDLE if none)."""
        link = self._tx
        if self._closed:
            return int(psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN)
        return _IDLE if link is None else int(link.conn.info.transaction_status)

    @property
    def notifies(self) -> list[Any]:
        """Notifications received after ``LISTEN`` (which pins the session); see :meth:`poll`."""
        writer = self._writer
        return writer.conn.notifies if self._pinned and writer is not None else []

    def poll(self) -> int:
        """Read what the server sent (notifications) on the pinned session's connection."""
        self._check_open()
        writer = self._writer
        if not self._pinned or writer is None:
            raise psycopg2.ProgrammingError("no LISTEN on this connection yet: nothing to poll")
        return int(writer.conn.poll())

    def fileno(self) -> int:
        """The pinned session's socket (for ``select()`` after ``LISTEN``)."""
        writer = self._writer
        if not self._pinned or writer is None:
            raise psycopg2.ProgrammingError(
                "no LISTEN on this connection yet: no socket to wait on"
            )
        return int(writer.conn.fileno())

    # -- the psycopg2 surface ----------------------------------------------------------------

    def cursor(
        self, name: str | None = None, cursor_factory: Any = None, **kwargs: Any
    ) -> RoutedCursor:
        self._check_open()
        if name is not None:
            raise psycopg2.NotSupportedError(
                "named (server-side) cursors are not routed: use a connection to one node"
            )
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        return RoutedCursor(self, cursor_factory or self.cursor_factory)

    def commit(self) -> None:
        self._before_commit()
        self._finish(commit=True)

    def rollback(self) -> None:
        self._before_rollback()
        self._finish(commit=False)

    def close(self) -> None:
        for link in self._closing_links():
            self._release(link)

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
                if not _broken(link.conn):
                    raise
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
        status = link.conn.info.transaction_status
        if status != _IDLE:  # e.g. "BEGIN; INSERT ..."
            self._begin_transaction_on(link)
            self._tx_wrote = writes_data(st)
        if writes_data(st) or commit_possible(
            st, in_transaction=False, status=status, failed=False, tag=rc.statusmessage
        ):  # it ran in autocommit on the primary: the server says whether it committed
            self._after_write(link)
        if status == _IDLE and "set" in st.session and not self._pinned:
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
            if self._tx is link and link.conn.info.transaction_status == _IDLE:
                self._end_transaction(link)  # e.g. "INSERT ...; COMMIT; SELECT 1/0"
            raise
        self._count(link, st)
        status = link.conn.info.transaction_status
        if link.role == "write":
            if commit_possible(
                st, in_transaction=True, status=status, failed=False, tag=rc.statusmessage
            ):  # COMMIT (AND CHAIN), or a string with a COMMIT in it: what the server did
                self._commit_owed = True
                self._tx_wrote = False
            if self._commit_owed and status != TX_INERROR:
                self._settle(link)
        if status == TX_INTRANS and self._cluster.monotonic_reads:
            self._note_read(link)  # what the transaction read so far
        if status == _IDLE:  # COMMIT, ROLLBACK, PREPARE TRANSACTION
            self._end_transaction(link)

    def _text(self, query: Any) -> str:
        """The SQL of ``bytes`` or a ``psycopg2.sql.Composable`` (rendered on a held node)."""
        if isinstance(query, (bytes, bytearray, memoryview)):
            return bytes(query).decode("utf-8", "replace")
        if hasattr(query, "as_string"):
            link = self._tx or self._reader or self._writer or self._read_link()
            return str(query.as_string(link.conn))
        raise TypeError(
            f"a query is str, bytes or psycopg2.sql.Composable, not {type(query).__name__}"
        )

    def _run(self, rc: RoutedCursor, link: Link, query: Any, params: Any, many: bool) -> None:
        if link.gen != self._settings_gen:
            self._sync_settings(link)
        cursor = rc._cursor_on(link.conn)
        if many:
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
            cursor = link.conn.cursor()
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
                lease = self._pools.lease(node, "read")
            except psycopg2.OperationalError as exc:
                self._suspect(node, str(exc))
                exclude |= {node}  # another node, or NoReplicaAvailable once none is left
                continue
            return self._hold(lease, "read", topology, mark)

    def _write_link(self) -> Link:
        link = self._writer
        topology = self._cluster.topology
        if link is not None:
            if self._keeps_writer(link, topology):
                return link
            self._release(link)
        node = self._cluster.route_write()
        try:
            lease = self._pools.lease(node, "write")
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
        keep = not conn.closed
        try:
            if keep:
                with conn.cursor() as cursor:
                    if conn.info.transaction_status != _IDLE:
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
            self._pools.give_back(link.lease, keep=keep)

    def _lost(self, link: Link) -> None:
        self._note_lost(link)
        self._pools.give_back(link.lease, keep=False)

    # -- transactions, positions, settings --------------------------------------------------------

    def _finish(self, *, commit: bool) -> None:
        link = self._tx
        if link is None:
            return
        try:
            failed = (
                link.conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            )
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
        conn = link.conn
        if _broken(conn) or link not in (self._writer, self._tx):
            return
        status = conn.info.transaction_status
        if not commit_possible(st, in_transaction=in_transaction, status=status, failed=True,
                               tag=None, many=many):  # fmt: skip
            return
        self._commit_owed = True
        if status != TX_INERROR:
            with contextlib.suppress(psycopg2.Error):  # the statement's error is raised
                self._settle(link)

    def _settle(self, link: Link) -> None:
        self._commit_owed = False
        self._after_write(link)

    def _after_write(self, link: Link) -> None:
        wanted = self._position_wanted()
        monotonic = self._cluster.monotonic_reads
        if wanted is None and not monotonic:
            return
        position = None
        if wanted or monotonic:
            row = self._send(link, POSITION_SQL).fetchone()
            position = parse_lsn(row[0]) if row and row[0] else None
        if wanted is not None:
            self._cluster.record_write(position)
        self._cluster.record_read(position)  # monotonic reads: a no-op without them

    def _note_read(self, link: Link) -> None:
        """Monotonic reads: the floor rises when a read is served (see RoutedConnection)."""
        row = self._send(link, NODE_POSITION_SQL).fetchone()
        self._cluster.record_read(row[0] if row and row[0] else None)

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


class RoutedCursor:
    """psycopg2's ``cursor``, routed: each ``execute`` goes where its statement may run."""

    __slots__ = ("_closed", "_conn", "_cur", "_factory", "arraysize")

    def __init__(self, conn: RoutedConnection, cursor_factory: Any) -> None:
        self._conn = conn
        self._factory = cursor_factory
        self._cur: Any = None
        self._closed = False
        self.arraysize = 1

    def _cursor_on(self, node_conn: Any) -> Any:
        cursor = self._cur
        if cursor is None or cursor.connection is not node_conn:
            if cursor is not None:
                cursor.close()
            factory = self._factory
            cursor = (
                node_conn.cursor() if factory is None else node_conn.cursor(cursor_factory=factory)
            )
            cursor.arraysize = self.arraysize
            self._cur = cursor
        return cursor

    def _result(self) -> Any:
        if self._closed:
            raise psycopg2.InterfaceError("cursor already closed")
        if self._cur is None:
            raise psycopg2.ProgrammingError("no results to fetch")
        return self._cur

    @property
    def connection(self) -> RoutedConnection:
        return self._conn

    def execute(self, query: Any, vars: Any = None) -> None:
        if self._closed:
            raise psycopg2.InterfaceError("cursor already closed")
        self._conn._execute(self, query, vars, False)

    def executemany(self, query: Any, vars_list: Iterable[Any]) -> None:
        if self._closed:
            raise psycopg2.InterfaceError("cursor already closed")
        self._conn._execute(self, query, vars_list, True)

    def mogrify(self, query: Any, vars: Any = None) -> bytes:
        """The query as psycopg2 would send it (rendered on a node this connection holds)."""
        conn = self._conn
        conn._check_open()
        link = conn._tx or conn._reader or conn._writer or conn._read_link()
        return bytes(self._cursor_on(link.conn).mogrify(query, vars))

    def fetchone(self) -> Any:
        return self._result().fetchone()

    def fetchmany(self, size: int | None = None) -> list[Any]:
        return list(self._result().fetchmany(self.arraysize if size is None else size))

    def fetchall(self) -> list[Any]:
        return list(self._result().fetchall())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._result())

    @property
    def rowcount(self) -> int:
        return -1 if self._cur is None else int(self._cur.rowcount)

    @property
    def rownumber(self) -> int | None:
        return None if self._cur is None else int(self._cur.rownumber)

    @property
    def description(self) -> Sequence[Any] | None:
        return None if self._cur is None else self._cur.description

    @property
    def statusmessage(self) -> str | None:
        return None if self._cur is None else self._cur.statusmessage

    @property
    def query(self) -> bytes | None:
        return None if self._cur is None else self._cur.query

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        if self._cur is not None:
            self._cur.close()

    def __enter__(self) -> RoutedCursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RoutedCursor {'closed' if self._closed else 'open'} of {self._conn!r}>"
