"""``RoutedConnection``: one psycopg-shaped connection that sends each statement where it may run.

``cluster.connection()`` returns one (``AsyncCluster.connection()`` an
:class:`AsyncRoutedConnection`). The rules, with their reasons, are in
``docs/routing-rules.md``; in short:

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

import dataclasses
import logging
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, cast

import psycopg
from psycopg import sql
from psycopg.abc import Params, Query
from psycopg.errors import ReadOnlySqlTransaction
from psycopg.pq import TransactionStatus
from psycopg.rows import RowFactory, tuple_row

from .classify import Intent, SessionEffect, Statement
from .consistency import POSITION_SQL, peek_scope
from .lsn import parse_lsn
from .routing import route_write

if TYPE_CHECKING:
    from psycopg import IsolationLevel, Notify

    from .cluster import AsyncCluster, Cluster, Lease
    from .consistency import Mark
    from .topology import Topology

__all__ = [
    "AsyncRoutedConnection",
    "AsyncRoutedCursor",
    "AsyncRoutedTransaction",
    "RoutedConnection",
    "RoutedCursor",
    "RoutedTransaction",
]

log = logging.getLogger("replica_router.connection")

_IDLE: Final = TransactionStatus.IDLE
_READ: Final = Intent.READ


def refused_read(st: Statement) -> Statement:
    """A statement judged a read that a read-only node refused: it writes after all.

    The classifier misses writes it cannot see (a function re-declared VOLATILE after
    we learned it, a view calling one): the node refused before changing anything,
    so running it on the primary instead is safe.
    """
    return dataclasses.replace(st, intent=Intent.WRITE, reason="refused by a read-only node")


_BEGINS: Final = frozenset({"begin", "begin_read_only"})
# Session state that lives in one backend and cannot be copied to another one.
PINNING_EFFECTS: Final[frozenset[SessionEffect]] = frozenset(
    {"temp_table", "listen", "advisory_lock", "prepare", "discard", "cursor", "load"}
)
# Statements the classifier calls writes that change no data (no token needed).
_SETTING_REASONS: Final = frozenset({"SET", "RESET", "SET LOCAL", "SET TRANSACTION"})
_PLAIN_SETTING_REASONS: Final = frozenset({"SET", "RESET"})
_SET_ONLY: Final = frozenset({"set"})
_MAX_RECORDED_SETTINGS: Final = 32  # then compact them into one read-back from pg_settings

# Session-level settings of this backend, as set_config() can replay them; role is
# not in pg_settings (GUC_NO_SHOW_ALL), so it is asked for by name.
SESSION_SETTINGS_SQL: Final = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"
    " UNION ALL SELECT 'role', pg_catalog.current_setting('role')"
)
REPLAY_SETTINGS_SQL: Final = (
    "SELECT pg_catalog.set_config(s.name, s.setting, false)"
    " FROM unnest(%s::text[], %s::text[]) AS s(name, setting)"
)

# What to do with a statement that is not inside a transaction (see route()).
ROUTE_READ: Final = 0  # autocommit read: the read node
ROUTE_WRITE: Final = 1  # autocommit: the primary (also every statement of a pinned session)
ROUTE_SETTING: Final = 2  # plain SET/RESET: any held node, recorded for replay
ROUTE_BEGIN_READ: Final = 3  # opens a transaction on the read node (declared read-only)
ROUTE_BEGIN_WRITE: Final = 4  # opens a transaction on the primary


def route(st: Statement, *, autocommit: bool, read_only: bool | None, pinned: bool) -> int:
    """Where a statement goes when no transaction is open (a pure decision)."""
    control = st.transaction
    if not autocommit or control in _BEGINS:
        declared = (
            read_only is True
            or control == "begin_read_only"
            or (control == "set_read_only" and not autocommit)
        )
        return ROUTE_BEGIN_READ if declared and not pinned else ROUTE_BEGIN_WRITE
    if pinned:
        return ROUTE_WRITE
    session = st.session
    if session:
        return ROUTE_SETTING if session == _SET_ONLY and is_plain_setting(st) else ROUTE_WRITE
    return ROUTE_READ if st.intent is _READ else ROUTE_WRITE


def refuse_on_replica(st: Statement, errors: Any = psycopg) -> None:
    """A read-only transaction runs on a replica: session state taken there would be lost."""
    if st.session & PINNING_EFFECTS:
        raise errors.NotSupportedError(
            f"{st.reason}: a read-only transaction runs on a replica, where this session "
            "state would be lost; run it outside the read-only transaction"
        )


def is_plain_setting(st: Statement) -> bool:
    """One ``SET``/``RESET`` statement: its text can be replayed on another node as is."""
    return st.statements == 1 and st.reason in _PLAIN_SETTING_REASONS


def writes_data(st: Statement) -> bool:
    """True when committing the statement may change data (the token must advance)."""
    if st.intent is _READ or st.reason in _SETTING_REASONS:
        return False
    return st.transaction is None or st.transaction == "commit_prepared"


def begin_sql(isolation_level: int | None, read_only: bool | None, deferrable: bool | None) -> str:
    """``BEGIN`` with the connection's transaction characteristics, as psycopg spells it."""
    from psycopg import IsolationLevel

    parts = ["BEGIN"]
    if isolation_level is not None:
        parts.append("ISOLATION LEVEL " + IsolationLevel(isolation_level).name.replace("_", " "))
    if read_only is not None:
        parts.append("READ ONLY" if read_only else "READ WRITE")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def query_text(query: object) -> str:
    """The SQL text of a psycopg query (``str``, ``bytes``, ``sql.Composable``) to classify."""
    if isinstance(query, str):
        return query
    if isinstance(query, (bytes, bytearray, memoryview)):
        return bytes(query).decode("utf-8", "replace")
    if isinstance(query, sql.Composable):
        return query.as_string(None)
    raise TypeError(f"a query is str, bytes or psycopg.sql.Composable, not {type(query).__name__}")


class Many:
    """Marks an ``executemany`` call on its way to a node (else ``prepare`` is passed)."""

    __slots__ = ("returning",)

    def __init__(self, returning: bool) -> None:
        self.returning = returning


class _ClosedError(psycopg.InterfaceError, psycopg.OperationalError):
    """Using a closed routed connection (psycopg raises OperationalError, psycopg2
    InterfaceError: this is both)."""


def _closed_error() -> _ClosedError:
    return _ClosedError("the connection is closed")


class _Link:
    """A node connection a routed connection holds, and how far its session is replayed."""

    __slots__ = ("applied", "conn", "dirty", "fresh", "gen", "lease", "node", "role", "version")

    def __init__(self, lease: Lease[Any], role: str) -> None:
        self.lease = lease
        self.conn: Any = lease.conn
        self.node = lease.node
        self.role = role  # "read" (a read-pool connection) or "write" (the primary's write pool)
        self.fresh = True  # the cluster counted the route that leased it
        self.dirty = False  # carries session state: DISCARD ALL before it goes back
        self.version = 0  # settings list version replayed here
        self.applied = 0  # entries of that version replayed here
        self.gen = 0  # the connection's settings generation this link matches

    def __repr__(self) -> str:
        return f"<link {self.role} {self.node}>"


class _Base:
    """State and pure bookkeeping shared by the routed connections (psycopg sync and
    async, and psycopg2's in :mod:`replica_router.integrations.psycopg2`)."""

    _cluster: Any
    _errors: Any = psycopg  # the driver module whose exception classes users catch

    def __init__(
        self,
        cluster: Any,
        *,
        autocommit: bool,
        read_only: bool | None,
        row_factory: RowFactory[Any] | None,
    ) -> None:
        self._cluster = cluster
        self._analyze = cluster.classifier.analyze
        self._autocommit = bool(autocommit)
        self._read_only = read_only
        self._isolation_level: IsolationLevel | None = None
        self._deferrable: bool | None = None
        self._begin = begin_sql(None, read_only, None)
        self.row_factory: RowFactory[Any] = row_factory or tuple_row
        self._closed = False
        # Look before the next statement: closed, a lost link, function volatility to learn.
        self._attention = True
        self._reader: _Link | None = None
        self._writer: _Link | None = None
        self._read_topology: Topology | None = None
        self._read_mark: Mark | None = None
        self._write_topology: Topology | None = None
        self._tx: _Link | None = None  # the node the open transaction runs on
        self._tx_wrote = False
        self._tx_settings = False  # a session SET ran inside it: read settings back at its end
        self._tx_lost: str | None = None  # its node connection broke: fail until rollback
        self._blocks = 0  # transaction() blocks entered
        self._pinned = False
        self._failed: str | None = None  # a pinned session's connection broke
        self._settings: list[tuple[Any, Any]] = []
        self._settings_version = 0
        self._settings_gen = 0

    # -- psycopg's connection attributes -------------------------------------------------

    @property
    def cluster(self) -> Any:
        return self._cluster

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pinned(self) -> bool:
        """True once session state bound this connection to the primary (see module doc)."""
        return self._pinned

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._check_no_transaction("autocommit")
        self._autocommit = bool(value)

    @property
    def read_only(self) -> bool | None:
        """``True``: transactions are declared read-only and may run on a replica."""
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._check_no_transaction("read_only")
        self._read_only = None if value is None else bool(value)
        self._rebuild_begin()

    @property
    def isolation_level(self) -> IsolationLevel | None:
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: IsolationLevel | None) -> None:
        from psycopg import IsolationLevel

        self._check_no_transaction("isolation_level")
        self._isolation_level = None if value is None else IsolationLevel(value)
        self._rebuild_begin()

    @property
    def deferrable(self) -> bool | None:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self._check_no_transaction("deferrable")
        self._deferrable = None if value is None else bool(value)
        self._rebuild_begin()

    @property
    def nodes(self) -> dict[str, str]:
        """The nodes held right now: ``{"read": name, "write": name, "transaction": name}``."""
        held = {"read": self._reader, "write": self._writer, "transaction": self._tx}
        return {role: link.node for role, link in held.items() if link is not None}

    def _rebuild_begin(self) -> None:
        self._begin = begin_sql(self._isolation_level, self._read_only, self._deferrable)

    def _check_no_transaction(self, attribute: str) -> None:
        self._check_open()
        if self._tx is not None or self._tx_lost is not None:
            raise self._errors.ProgrammingError(
                f"can't change {attribute!r} now: connection in transaction status INTRANS"
            )

    def _closed_error(self) -> Exception:
        return _closed_error()

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()
        if self._failed is not None:
            raise self._errors.OperationalError(self._failed)
        if self._tx_lost is not None:
            raise self._errors.OperationalError(self._tx_lost)

    def _check_commit(self, verb: str) -> None:
        if self._closed:
            raise self._closed_error()
        if self._blocks:
            raise self._errors.ProgrammingError(
                f"Explicit {verb}() forbidden within a Transaction context. "
                f"(Transaction will be automatically committed on successful exit from context.)"
            )

    def _keeps_writer(self, link: _Link, topology: Topology) -> bool:
        """Whether the held write ``link`` still goes where writes go (pinned sessions stay)."""
        if self._pinned or topology is self._write_topology:
            return True
        if route_write(topology) == link.node:
            self._write_topology = topology
            return True
        return False

    def _before_commit(self) -> None:
        """Raise unless ``commit()`` may run now: a transaction whose node was lost cannot."""
        self._check_commit("commit")
        if self._tx_lost is not None:
            raise self._errors.OperationalError(self._tx_lost)

    def _before_rollback(self) -> None:
        """Raise unless ``rollback()`` may run now; it ends a lost transaction too."""
        self._check_commit("rollback")
        self._tx_lost = None

    def _closing_links(self) -> list[_Link]:
        """Mark the connection closed; the links ``close()`` must release (none twice)."""
        if self._closed:
            return []
        self._closed = self._attention = True
        return self._links()

    # -- bookkeeping (no I/O) -------------------------------------------------------------

    def _begin_transaction_on(self, link: _Link) -> None:
        self._tx = link
        self._tx_wrote = False
        self._tx_settings = False

    def _note_statement(self, link: _Link, st: Statement) -> None:
        """Before a statement runs inside the transaction on ``link``."""
        session = st.session
        if session:
            if session & PINNING_EFFECTS:
                if link.role == "read":
                    refuse_on_replica(st, self._errors)
                self._pinned = True
                link.dirty = True
            if "set" in session and not self._pinned:
                self._tx_settings = True
                link.dirty = True
        if link.role == "write" and not self._tx_wrote and writes_data(st):
            self._tx_wrote = True  # a transaction on a replica writes nothing (the server refuses)

    def _record_setting(self, link: _Link, query: Any, params: Any) -> bool:
        """A plain SET/RESET ran on ``link``; True when the list should be compacted."""
        self._settings.append((query, params))
        self._settings_gen += 1
        link.applied = len(self._settings)
        link.gen = self._settings_gen
        link.dirty = True
        return len(self._settings) > _MAX_RECORDED_SETTINGS

    def _replace_settings(self, link: _Link, rows: Iterable[Sequence[Any]]) -> None:
        """The session's settings, read back from ``link``, become what is replayed."""
        names, values = [], []
        for name, value in rows:
            names.append(name)
            values.append(value)
        self._settings = [(REPLAY_SETTINGS_SQL, (names, values))]
        self._settings_version += 1
        self._settings_gen += 1
        link.version = self._settings_version
        link.applied = 1
        link.gen = self._settings_gen
        link.dirty = True

    def _replay_plan(self, link: _Link) -> tuple[bool, list[tuple[Any, Any]]]:
        """What ``link`` must run to match the session: (RESET ALL first?, statements)."""
        if link.version == self._settings_version:
            return False, self._settings[link.applied :]
        return link.dirty, list(self._settings)

    def _replayed(self, link: _Link) -> None:
        link.version = self._settings_version
        link.applied = len(self._settings)
        link.gen = self._settings_gen
        if self._settings:
            link.dirty = True

    def _forget(self, link: _Link) -> None:
        if link is self._reader:
            self._reader = None
        if link is self._writer:
            self._writer = None
        if link is self._tx:
            self._tx = None

    def _links(self) -> list[_Link]:
        links: list[_Link] = []
        for link in (self._tx, self._reader, self._writer):
            if link is not None and link not in links:
                links.append(link)
        return links

    def _note_lost(self, link: _Link) -> None:
        """``link``'s connection broke: forget it and say what the session lost."""
        node = link.node
        self._attention = True
        if link is self._tx:
            self._tx_lost = (
                f"the transaction was lost: the connection to {node} broke; "
                "roll back to go on (the server rolled the transaction back)"
            )
        if self._pinned and link.role == "write":
            self._failed = (
                f"the connection to {node}, which held this session's state (temp tables, "
                "LISTEN, locks, prepared statements), was lost"
            )
        self._forget(link)
        monitor = self._cluster.monitor
        if monitor is not None:
            monitor.mark_suspect(node, "a routed connection's link broke")

    def _count(self, link: _Link, st: Statement) -> None:
        if link.fresh:
            link.fresh = False  # the lease was counted when it was routed
            return
        self._cluster._count_route("read" if st.intent is _READ else "write", link.node)

    def _read_key(self) -> tuple[Topology, Mark | None]:
        cluster = self._cluster
        topology = cluster._require_monitor().topology
        scope = peek_scope()
        return topology, None if scope is None else scope.mark(cluster.system_identifier)

    def _still_readable(self, link: _Link, topology: Topology) -> bool:
        """Does the routing still allow reading on ``link``'s node? (counts a fallback)"""
        cluster = self._cluster
        plan = cluster._plan_read(topology, None, None, None)
        decision = cluster._decide(topology, plan, frozenset(), prefer=link.node)
        if decision.target != link.node:
            return False
        if decision.fallback is not None:
            cluster._count_fallback(decision.fallback, link.node)
        return True

    def _position_wanted(self) -> bool | None:
        """None: read-your-writes is off; False: a write is noted without a position."""
        ryw = self._cluster._ryw
        return None if ryw is None else ryw == "lsn"

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        mode = "autocommit" if self._autocommit else "transactional"
        held = " ".join(f"{k}={v}" for k, v in self.nodes.items())
        pinned = " pinned" if self._pinned else ""
        return f"<{type(self).__name__} {state} {mode}{pinned}{' ' + held if held else ''}>"


def _lsn_of(cursor: Any) -> int | None:
    result = cursor.pgresult
    value = result.get_value(0, 0) if result is not None and result.ntuples else None
    return None if value is None else parse_lsn(value.decode())


def _quote_savepoint(name: str) -> sql.Composed:
    return sql.SQL("SAVEPOINT {}").format(sql.Identifier(name))


def _release_savepoint(name: str) -> sql.Composed:
    return sql.SQL("RELEASE SAVEPOINT {}").format(sql.Identifier(name))


def _rollback_to_savepoint(name: str) -> sql.Composed:
    return sql.SQL("ROLLBACK TO SAVEPOINT {}").format(sql.Identifier(name))


def _swallows(exc: BaseException | None, block: object) -> bool:
    return isinstance(exc, psycopg.Rollback) and exc.transaction in (None, block)


_Conn = TypeVar("_Conn")
_Cur = TypeVar("_Cur", psycopg.Cursor[Any], psycopg.AsyncCursor[Any])


class _CursorBase(Generic[_Conn, _Cur]):
    """What the sync and async routed cursors share: state and the accessors that
    read the last result without I/O (the node's own cursor holds it client-side)."""

    __slots__ = ("_binary", "_closed", "_conn", "_cur", "_row_factory", "arraysize")

    def __init__(self, conn: _Conn, row_factory: RowFactory[Any], binary: bool) -> None:
        self._conn = conn
        self._row_factory = row_factory
        self._binary = binary
        self._cur: _Cur | None = None
        self._closed = False
        self.arraysize = 1

    def _check_open(self) -> None:
        if self._closed:
            raise psycopg.InterfaceError("the cursor is closed")

    def _result(self) -> _Cur:
        self._check_open()
        cursor = self._cur
        if cursor is None:
            raise psycopg.ProgrammingError("no result available")
        return cursor

    @property
    def connection(self) -> _Conn:
        return self._conn

    def nextset(self) -> bool | None:
        return self._result().nextset()

    @property
    def rowcount(self) -> int:
        return -1 if self._cur is None else self._cur.rowcount

    @property
    def rownumber(self) -> int | None:
        return None if self._cur is None else self._cur.rownumber

    @property
    def description(self) -> list[psycopg.Column] | None:
        return None if self._cur is None else self._cur.description

    @property
    def statusmessage(self) -> str | None:
        return None if self._cur is None else self._cur.statusmessage

    @property
    def pgresult(self) -> Any:
        return None if self._cur is None else self._cur.pgresult

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {state} of {self._conn!r}>"


# ======================================================================================
# sync
# ======================================================================================


class RoutedConnection(_Base):
    """A psycopg-like connection whose statements are routed (see the module doc).

    Made by :meth:`Cluster.connection`; use it in a ``with`` block: on exit an
    open transaction is committed (rolled back on error) and the node
    connections go back to the cluster's pools.
    """

    _cluster: Cluster

    def __init__(
        self,
        cluster: Cluster,
        *,
        autocommit: bool = True,
        read_only: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> None:
        super().__init__(
            cluster, autocommit=autocommit, read_only=read_only, row_factory=row_factory
        )

    # -- the psycopg surface --------------------------------------------------------------

    def cursor(
        self,
        name: str = "",
        *,
        binary: bool = False,
        row_factory: RowFactory[Any] | None = None,
    ) -> RoutedCursor:
        """A cursor whose statements are routed like the connection's."""
        self._check_open()
        if name:
            raise psycopg.NotSupportedError(
                "server-side (named) cursors are not routed: use cluster.read() or "
                "cluster.write() for a connection to one node"
            )
        return RoutedCursor(self, row_factory or self.row_factory, binary)

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> RoutedCursor:
        """Run one statement where it may run; returns a cursor to fetch from."""
        cursor = RoutedCursor(self, self.row_factory, binary)
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
            scope = peek_scope()
            if (
                st.intent is _READ
                and not st.session
                and monitor is not None
                and monitor.topology is self._read_topology
                and (None if scope is None else scope.mark(cluster.system_identifier))
                is self._read_mark
            ):
                node_cursor = cursor._cur = link.conn.cursor(row_factory=self.row_factory,
                                                             binary=binary)  # fmt: skip
                try:
                    node_cursor.execute(query, params, prepare=prepare)
                except psycopg.OperationalError:
                    if not link.conn.broken:
                        raise
                    self._lost(link)
                    self._execute(cursor, query, params, prepare)  # routed afresh, once
                    return cursor
                except ReadOnlySqlTransaction:
                    self._cluster._relearn_functions(link.node)
                    self._route(cursor, refused_read(st), query, params, prepare)
                    return cursor
                if link.fresh:
                    link.fresh = False  # the lease was counted when it was routed
                else:
                    cluster._count_route("read", link.node)
                return cursor
        self._execute(cursor, query, params, prepare)
        return cursor

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> RoutedTransaction:
        """A transaction block pinned to one node; nested blocks are savepoints."""
        self._check_open()
        return RoutedTransaction(self, savepoint_name, force_rollback)

    def commit(self) -> None:
        """Commit the open transaction (capturing its position when it wrote)."""
        self._before_commit()
        self._finish(commit=True)

    def rollback(self) -> None:
        self._before_rollback()
        self._finish(commit=False)

    def close(self) -> None:
        """Roll back an open transaction and give the node connections back."""
        for link in self._closing_links():
            self._release(link)

    def notifies(
        self, *, timeout: float | None = None, stop_after: int | None = None
    ) -> Iterator[Notify]:
        """Notifications received by the session (after ``LISTEN``, which pins it)."""
        self._check_open()
        if not self._pinned or self._writer is None:
            raise psycopg.ProgrammingError("no LISTEN on this connection yet: nothing to wait for")
        return self._writer.conn.notifies(timeout=timeout, stop_after=stop_after)  # type: ignore[no-any-return]

    def __enter__(self) -> RoutedConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed:
            return
        try:
            if exc_type is None and self._failed is None:
                self.commit()
            elif self._tx is not None:
                try:
                    self._finish(commit=False)
                except Exception as error:
                    log.warning("rollback on exit failed: %s", error)
        finally:
            self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"{self!r} was not closed: its node connections never went back to the "
                "pools (use it in a with block)",
                ResourceWarning,
                stacklevel=2,
            )

    # -- routing one statement ------------------------------------------------------------

    def _execute(
        self,
        rc: RoutedCursor,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        if self._attention:
            self._check_open()
            self._attention = False
            self._cluster._learn_functions()  # once per cluster; then an attribute check
        st = self._analyze(query if type(query) is str else query_text(query))
        if self._tx is not None:
            self._in_transaction(rc, st, query, params, how)
        elif self._autocommit and st.intent is _READ and not st.session and not self._pinned:
            link = self._read_link()  # the hot path: an autocommit read
            try:
                self._run(rc, link, query, params, how)
            except psycopg.OperationalError:
                if not link.conn.broken:
                    raise
                self._lost(link)  # a read changed nothing: run it once more elsewhere
                link = self._read_link()
                self._run(rc, link, query, params, how)
            except ReadOnlySqlTransaction:
                self._cluster._relearn_functions(link.node)
                self._route(rc, refused_read(st), query, params, how)
                return
            if link.fresh:
                link.fresh = False  # the lease was counted when it was routed
            else:
                self._cluster._count_route("read", link.node)
        else:
            self._route(rc, st, query, params, how)

    def _route(
        self,
        rc: RoutedCursor,
        st: Statement,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        where = route(st, autocommit=self._autocommit, read_only=self._read_only,
                      pinned=self._pinned)  # fmt: skip
        if where in (ROUTE_BEGIN_READ, ROUTE_BEGIN_WRITE):
            if where == ROUTE_BEGIN_READ:
                refuse_on_replica(st)
            link = self._read_link() if where == ROUTE_BEGIN_READ else self._write_link()
            if link.gen != self._settings_gen:
                self._sync_settings(link)  # before BEGIN: a rollback must not undo it
            if st.transaction not in _BEGINS:
                self._checked(link, link.conn.execute, self._begin)
            self._begin_transaction_on(link)
            self._in_transaction(rc, st, query, params, how)
            return
        if where == ROUTE_SETTING:
            link = self._reader or self._writer or self._read_link()
            self._checked(link, self._run, rc, link, query, params, how)
            if self._record_setting(link, query, params):
                self._capture_settings(link)
            return
        if st.session & PINNING_EFFECTS and not self._pinned:
            self._pin()
        link = self._write_link()
        if st.session:
            link.dirty = True  # it may leave state behind: cleaned before it goes back
        self._checked(link, self._run, rc, link, query, params, how)
        self._count(link, st)
        if link.conn.pgconn.transaction_status != _IDLE:  # e.g. "BEGIN; INSERT ..."
            self._begin_transaction_on(link)
            self._tx_wrote = writes_data(st)
            return
        if writes_data(st):
            self._after_write(link)
        if "set" in st.session and not self._pinned:
            self._capture_settings(link)

    def _in_transaction(
        self,
        rc: RoutedCursor,
        st: Statement,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        link = cast(_Link, self._tx)
        self._note_statement(link, st)
        if self._pinned and self._reader is not None and self._reader is not link:
            self._release(self._reader)
        self._checked(link, self._run, rc, link, query, params, how)
        self._count(link, st)
        if link.conn.pgconn.transaction_status == _IDLE:  # COMMIT, ROLLBACK, PREPARE TRANSACTION
            if self._tx_wrote and st.transaction == "commit":
                self._after_write(link)
            self._end_transaction(link)
        elif st.transaction == "commit_and_chain" and self._tx_wrote:
            self._after_write(link)
            self._tx_wrote = False

    def _run(
        self,
        rc: RoutedCursor,
        link: _Link,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        if link.gen != self._settings_gen:
            self._sync_settings(link)
        cursor = rc._cur
        if cursor is None or cursor.connection is not link.conn:
            cursor = rc._attach(link.conn)
        if isinstance(how, Many):
            cursor.executemany(query, params, returning=how.returning)
        else:
            cursor.execute(query, params, prepare=how)

    def _checked(self, link: _Link, call: Any, *args: Any) -> Any:
        """``call(*args)``; if ``link``'s connection broke doing it, forget the link."""
        try:
            return call(*args)
        except psycopg.Error:
            if link.conn.broken:
                self._lost(link)
            raise

    # -- node links -------------------------------------------------------------------------

    def _read_link(self) -> _Link:
        """The node for reads: the one held while routing still allows it, else a new lease."""
        cluster = self._cluster
        monitor = cluster._monitor
        topology = (monitor or cluster._require_monitor()).topology
        scope = peek_scope()
        mark = None if scope is None else scope.mark(cluster.system_identifier)
        link = self._reader
        if link is not None:
            if topology is self._read_topology and mark is self._read_mark:
                return link
            if self._still_readable(link, topology):
                self._read_topology, self._read_mark = topology, mark
                return link
            self._release(link)
        lease = self._cluster._acquire_read()
        link = self._reader = _Link(lease, "read")
        self._read_topology, self._read_mark = topology, mark
        return link

    def _write_link(self) -> _Link:
        """The primary (the pinned session's node, whatever the topology says since)."""
        link = self._writer
        topology = self._cluster._require_monitor().topology
        if link is not None:
            if self._keeps_writer(link, topology):
                return link
            self._release(link)
        lease = self._cluster._acquire_write()
        try:
            lease.conn.autocommit = True  # statements commit one by one; transactions say BEGIN
        except BaseException:
            self._cluster._checkin(lease)
            raise
        link = self._writer = _Link(lease, "write")
        self._write_topology = topology
        return link

    def _pin(self) -> None:
        self._pinned = True
        reader = self._reader
        if reader is not None and reader is not self._tx:
            self._release(reader)

    def _release(self, link: _Link) -> None:
        """Give ``link`` back to its pool, clean: no transaction, no session state."""
        self._forget(link)
        conn = link.conn
        try:
            if not conn.closed and not conn.broken:
                if conn.pgconn.transaction_status != _IDLE:
                    conn.rollback()
                if link.dirty:
                    conn.execute("DISCARD ALL")
                if link.role == "write":
                    conn.autocommit = False
        except psycopg.Error as exc:
            log.warning("closing a connection to %s that could not be cleaned: %s", link.node, exc)
            conn.close()
        finally:
            if link.role == "read":
                self._cluster._release_read(link.lease)
            else:
                self._cluster._checkin(link.lease)

    def _lost(self, link: _Link) -> None:
        self._note_lost(link)
        self._cluster._checkin(link.lease)  # the pool discards a broken connection

    # -- transactions, positions, settings ------------------------------------------------

    def _open_transaction(self) -> _Link:
        """BEGIN on the node the connection's declarations call for (``transaction()``)."""
        declared = self._read_only is True and not self._pinned
        link = self._read_link() if declared else self._write_link()
        if link.gen != self._settings_gen:
            self._sync_settings(link)
        self._checked(link, link.conn.execute, self._begin)
        self._begin_transaction_on(link)
        return link

    def _finish(self, *, commit: bool) -> None:
        link = self._tx
        if link is None:
            return
        conn = link.conn
        try:
            if commit and self._tx_wrote:
                self._checked(link, self._cluster._capture_commit, conn)
            elif commit:
                self._checked(link, conn.commit)
            else:
                self._checked(link, conn.rollback)
        finally:
            if self._tx is link:
                self._end_transaction(link)

    def _end_transaction(self, link: _Link) -> None:
        self._tx = None
        self._tx_wrote = False
        if self._tx_settings:
            self._tx_settings = False
            if not self._pinned and not link.conn.broken:
                self._capture_settings(link)

    def _after_write(self, link: _Link) -> None:
        """A write committed on ``link`` (the primary): advance the scope past it."""
        wanted = self._position_wanted()
        if wanted is None:
            return
        position = None
        if wanted:
            cursor = link.conn.cursor(row_factory=tuple_row)
            self._checked(link, cursor.execute, POSITION_SQL)
            position = _lsn_of(cursor)
        self._cluster._note_write(position)

    def _capture_settings(self, link: _Link) -> None:
        cursor = link.conn.cursor(row_factory=tuple_row)
        self._checked(link, cursor.execute, SESSION_SETTINGS_SQL)
        self._replace_settings(link, cursor.fetchall())

    def _sync_settings(self, link: _Link) -> None:
        reset, statements = self._replay_plan(link)
        conn = link.conn
        if reset:
            self._checked(link, conn.execute, "RESET ALL")
        for query, params in statements:
            self._checked(link, conn.execute, query, params)
        self._replayed(link)


class RoutedTransaction:
    """``with conn.transaction():`` — psycopg's ``Transaction`` semantics on a routed connection.

    The outermost block opens a transaction on one node (BEGIN) and commits it
    on exit (capturing its position when it wrote) or rolls it back on an
    exception; nested blocks are savepoints. ``raise psycopg.Rollback`` (or
    ``Rollback(tx)``) leaves the block, or the block ``tx``, rolled back,
    without an error.
    """

    __slots__ = ("_conn", "_force_rollback", "_outer", "_savepoint", "savepoint_name")

    def __init__(
        self, conn: RoutedConnection, savepoint_name: str | None, force_rollback: bool
    ) -> None:
        self._conn = conn
        self.savepoint_name = savepoint_name
        self._force_rollback = force_rollback
        self._outer = False
        self._savepoint: str | None = None

    @property
    def connection(self) -> RoutedConnection:
        return self._conn

    def __enter__(self) -> RoutedTransaction:
        conn = self._conn
        conn._check_open()
        if conn._tx is None:
            self._outer = True
            link = conn._open_transaction()
            self._savepoint = self.savepoint_name
        else:
            link = conn._tx
            self._savepoint = self.savepoint_name or f"_rr_{conn._blocks + 1}"
        if self._savepoint is not None:
            conn._checked(link, link.conn.execute, _quote_savepoint(self._savepoint))
        conn._blocks += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        conn = self._conn
        conn._blocks -= 1
        swallow = _swallows(exc, self)
        link = conn._tx
        if link is None:  # lost, or ended by a COMMIT/ROLLBACK statement in the block
            if self._outer:
                conn._tx_lost = None
            return swallow
        failed = exc_type is not None or self._force_rollback
        try:
            if self._outer:
                conn._finish(commit=not failed)
            elif self._savepoint is not None:
                if failed:
                    conn._checked(link, link.conn.execute, _rollback_to_savepoint(self._savepoint))
                conn._checked(link, link.conn.execute, _release_savepoint(self._savepoint))
        except Exception as error:
            if exc_type is None:
                raise
            log.warning("error ignored ending %r after %r: %s", self, exc, error)
        return swallow

    def __repr__(self) -> str:
        return f"<RoutedTransaction {'outer' if self._outer else self._savepoint}>"


class RoutedCursor(_CursorBase[RoutedConnection, psycopg.Cursor[Any]]):
    """A cursor of a :class:`RoutedConnection`: each ``execute`` is routed on its own.

    Results come from the node the statement ran on and stay readable after
    the next statement went elsewhere (psycopg's results are client-side).
    """

    __slots__ = ()

    def _attach(self, conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
        old = self._cur
        self._cur = cursor = conn.cursor(row_factory=self._row_factory, binary=self._binary)
        if old is not None:
            old.close()
        return cursor

    @property
    def row_factory(self) -> RowFactory[Any]:
        return self._row_factory

    @row_factory.setter
    def row_factory(self, row_factory: RowFactory[Any]) -> None:
        self._row_factory = row_factory
        if self._cur is not None:
            self._cur.row_factory = row_factory

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> RoutedCursor:
        self._check_open()
        if binary is not None and binary != self._binary:
            self._binary = binary
            self._cur = None
        self._conn._execute(self, query, params, prepare)
        return self

    def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        self._check_open()
        self._conn._execute(self, query, params_seq, Many(returning))

    def fetchone(self) -> Any:
        cursor = self._cur
        if cursor is None or self._closed:
            cursor = self._result()  # raises
        return cursor.fetchone()

    def fetchmany(self, size: int = 0) -> list[Any]:
        return self._result().fetchmany(size or self.arraysize)

    def fetchall(self) -> list[Any]:
        cursor = self._cur
        if cursor is None or self._closed:
            cursor = self._result()
        return cursor.fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._result())

    def scroll(self, value: int, mode: str = "relative") -> None:
        self._result().scroll(value, mode)

    def close(self) -> None:
        self._closed = True
        if self._cur is not None:
            self._cur.close()

    def __enter__(self) -> RoutedCursor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ======================================================================================
# async
# ======================================================================================


class AsyncRoutedConnection(_Base):
    """:class:`RoutedConnection` for :class:`AsyncCluster` (``async with``, ``await``)."""

    _cluster: AsyncCluster

    def __init__(
        self,
        cluster: AsyncCluster,
        *,
        autocommit: bool = True,
        read_only: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> None:
        super().__init__(
            cluster, autocommit=autocommit, read_only=read_only, row_factory=row_factory
        )

    async def set_autocommit(self, value: bool) -> None:
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
        cursor = AsyncRoutedCursor(self, self.row_factory, binary)
        await self._execute(cursor, query, params, prepare)
        return cursor

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncRoutedTransaction:
        self._check_open()
        return AsyncRoutedTransaction(self, savepoint_name, force_rollback)

    async def commit(self) -> None:
        self._before_commit()
        await self._finish(commit=True)

    async def rollback(self) -> None:
        self._before_rollback()
        await self._finish(commit=False)

    async def close(self) -> None:
        for link in self._closing_links():
            await self._release(link)

    def notifies(
        self, *, timeout: float | None = None, stop_after: int | None = None
    ) -> AsyncIterator[Notify]:
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
                "pools (use it in an async with block)",
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
        if self._attention:
            self._check_open()
            self._attention = False
            await self._cluster._learn_functions()
        st = self._analyze(query if type(query) is str else query_text(query))
        if self._tx is not None:
            await self._in_transaction(rc, st, query, params, how)
        elif self._autocommit and st.intent is _READ and not st.session and not self._pinned:
            link = await self._read_link()
            try:
                await self._run(rc, link, query, params, how)
            except psycopg.OperationalError:
                if not link.conn.broken:
                    raise
                await self._lost(link)
                link = await self._read_link()
                await self._run(rc, link, query, params, how)
            except ReadOnlySqlTransaction:
                await self._cluster._relearn_functions(link.node)
                await self._route(rc, refused_read(st), query, params, how)
                return
            self._count(link, st)
        else:
            await self._route(rc, st, query, params, how)

    async def _route(
        self,
        rc: AsyncRoutedCursor,
        st: Statement,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        where = route(st, autocommit=self._autocommit, read_only=self._read_only,
                      pinned=self._pinned)  # fmt: skip
        if where in (ROUTE_BEGIN_READ, ROUTE_BEGIN_WRITE):
            if where == ROUTE_BEGIN_READ:
                refuse_on_replica(st)
            link = await (self._read_link() if where == ROUTE_BEGIN_READ else self._write_link())
            if link.gen != self._settings_gen:
                await self._sync_settings(link)
            if st.transaction not in _BEGINS:
                await self._checked(link, link.conn.execute, self._begin)
            self._begin_transaction_on(link)
            await self._in_transaction(rc, st, query, params, how)
            return
        if where == ROUTE_SETTING:
            link = self._reader or self._writer or await self._read_link()
            await self._checked(link, self._run, rc, link, query, params, how)
            if self._record_setting(link, query, params):
                await self._capture_settings(link)
            return
        if st.session & PINNING_EFFECTS and not self._pinned:
            await self._pin()
        link = await self._write_link()
        if st.session:
            link.dirty = True
        await self._checked(link, self._run, rc, link, query, params, how)
        self._count(link, st)
        if link.conn.pgconn.transaction_status != _IDLE:
            self._begin_transaction_on(link)
            self._tx_wrote = writes_data(st)
            return
        if writes_data(st):
            await self._after_write(link)
        if "set" in st.session and not self._pinned:
            await self._capture_settings(link)

    async def _in_transaction(
        self,
        rc: AsyncRoutedCursor,
        st: Statement,
        query: Any,
        params: Any,
        how: bool | Many | None,
    ) -> None:
        link = cast(_Link, self._tx)
        self._note_statement(link, st)
        if self._pinned and self._reader is not None and self._reader is not link:
            await self._release(self._reader)
        await self._checked(link, self._run, rc, link, query, params, how)
        self._count(link, st)
        if link.conn.pgconn.transaction_status == _IDLE:
            if self._tx_wrote and st.transaction == "commit":
                await self._after_write(link)
            await self._end_transaction(link)
        elif st.transaction == "commit_and_chain" and self._tx_wrote:
            await self._after_write(link)
            self._tx_wrote = False

    async def _run(
        self,
        rc: AsyncRoutedCursor,
        link: _Link,
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

    async def _checked(self, link: _Link, call: Any, *args: Any) -> Any:
        try:
            return await call(*args)
        except psycopg.Error:
            if link.conn.broken:
                await self._lost(link)
            raise

    async def _read_link(self) -> _Link:
        topology, mark = self._read_key()
        link = self._reader
        if link is not None:
            if topology is self._read_topology and mark is self._read_mark:
                return link
            if self._still_readable(link, topology):
                self._read_topology, self._read_mark = topology, mark
                return link
            await self._release(link)
        lease = await self._cluster._acquire_read()
        link = self._reader = _Link(lease, "read")
        self._read_topology, self._read_mark = topology, mark
        return link

    async def _write_link(self) -> _Link:
        link = self._writer
        topology = self._cluster._require_monitor().topology
        if link is not None:
            if self._keeps_writer(link, topology):
                return link
            await self._release(link)
        lease = await self._cluster._acquire_write()
        try:
            await lease.conn.set_autocommit(True)
        except BaseException:
            await self._cluster._checkin(lease)
            raise
        link = self._writer = _Link(lease, "write")
        self._write_topology = topology
        return link

    async def _pin(self) -> None:
        self._pinned = True
        reader = self._reader
        if reader is not None and reader is not self._tx:
            await self._release(reader)

    async def _release(self, link: _Link) -> None:
        self._forget(link)
        conn = link.conn
        try:
            if not conn.closed and not conn.broken:
                if conn.pgconn.transaction_status != _IDLE:
                    await conn.rollback()
                if link.dirty:
                    await conn.execute("DISCARD ALL")
                if link.role == "write":
                    await conn.set_autocommit(False)
        except psycopg.Error as exc:
            log.warning("closing a connection to %s that could not be cleaned: %s", link.node, exc)
            await conn.close()
        finally:
            if link.role == "read":
                await self._cluster._release_read(link.lease)
            else:
                await self._cluster._checkin(link.lease)

    async def _lost(self, link: _Link) -> None:
        self._note_lost(link)
        await self._cluster._checkin(link.lease)

    async def _open_transaction(self) -> _Link:
        declared = self._read_only is True and not self._pinned
        link = await (self._read_link() if declared else self._write_link())
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
            elif commit:
                await self._checked(link, conn.commit)
            else:
                await self._checked(link, conn.rollback)
        finally:
            if self._tx is link:
                await self._end_transaction(link)

    async def _end_transaction(self, link: _Link) -> None:
        self._tx = None
        self._tx_wrote = False
        if self._tx_settings:
            self._tx_settings = False
            if not self._pinned and not link.conn.broken:
                await self._capture_settings(link)

    async def _after_write(self, link: _Link) -> None:
        wanted = self._position_wanted()
        if wanted is None:
            return
        position = None
        if wanted:
            cursor = link.conn.cursor(row_factory=tuple_row)
            await self._checked(link, cursor.execute, POSITION_SQL)
            position = _lsn_of(cursor)
        self._cluster._note_write(position)

    async def _capture_settings(self, link: _Link) -> None:
        cursor = link.conn.cursor(row_factory=tuple_row)
        await self._checked(link, cursor.execute, SESSION_SETTINGS_SQL)
        self._replace_settings(link, await cursor.fetchall())

    async def _sync_settings(self, link: _Link) -> None:
        reset, statements = self._replay_plan(link)
        conn = link.conn
        if reset:
            await self._checked(link, conn.execute, "RESET ALL")
        for query, params in statements:
            await self._checked(link, conn.execute, query, params)
        self._replayed(link)


class AsyncRoutedTransaction:
    """:class:`RoutedTransaction` for ``async with conn.transaction():``."""

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
        if conn._tx is None:
            self._outer = True
            link = await conn._open_transaction()
            self._savepoint = self.savepoint_name
        else:
            link = conn._tx
            self._savepoint = self.savepoint_name or f"_rr_{conn._blocks + 1}"
        if self._savepoint is not None:
            await conn._checked(link, link.conn.execute, _quote_savepoint(self._savepoint))
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
        swallow = _swallows(exc, self)
        link = conn._tx
        if link is None:
            if self._outer:
                conn._tx_lost = None
            return swallow
        failed = exc_type is not None or self._force_rollback
        try:
            if self._outer:
                await conn._finish(commit=not failed)
            elif self._savepoint is not None:
                if failed:
                    await conn._checked(
                        link, link.conn.execute, _rollback_to_savepoint(self._savepoint)
                    )
                await conn._checked(link, link.conn.execute, _release_savepoint(self._savepoint))
        except Exception as error:
            if exc_type is None:
                raise
            log.warning("error ignored ending %r after %r: %s", self, exc, error)
        return swallow

    def __repr__(self) -> str:
        return f"<AsyncRoutedTransaction {'outer' if self._outer else self._savepoint}>"


class AsyncRoutedCursor(_CursorBase[AsyncRoutedConnection, psycopg.AsyncCursor[Any]]):
    """:class:`RoutedCursor` for :class:`AsyncRoutedConnection`."""

    __slots__ = ()

    def _attach(self, conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncCursor[Any]:
        self._cur = cursor = conn.cursor(row_factory=self._row_factory, binary=self._binary)
        return cursor

    @property
    def row_factory(self) -> RowFactory[Any]:
        return self._row_factory

    @row_factory.setter
    def row_factory(self, row_factory: RowFactory[Any]) -> None:
        self._row_factory = row_factory
        if self._cur is not None:
            self._cur.row_factory = row_factory

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

    async def fetchone(self) -> Any:
        return await self._result().fetchone()

    async def fetchmany(self, size: int = 0) -> list[Any]:
        return await self._result().fetchmany(size or self.arraysize)

    async def fetchall(self) -> list[Any]:
        return await self._result().fetchall()

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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
