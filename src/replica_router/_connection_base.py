"""What the psycopg routed connections (sync and asyncio) share beyond the session rules.

The psycopg flavour of :class:`~replica_router.session.RoutedSession` (psycopg's
exceptions, ``isolation_level`` as ``psycopg.IsolationLevel``, row factories),
the cursor state both cursors read without I/O, and the small SQL helpers.
Decides nothing (the rules are :mod:`session`'s) and does no I/O: the shells are
:mod:`connection_async` and its generated sync twin :mod:`connection`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

import psycopg
from psycopg import sql
from psycopg.adapt import AdaptersMap
from psycopg.generators import fetch_many as _fetch_many
from psycopg.generators import send as _send
from psycopg.rows import RowFactory, tuple_row

from .lsn import parse_lsn
from .session import RoutedSession

if TYPE_CHECKING:
    from psycopg import IsolationLevel

__all__ = ["ClosedError", "CursorBase", "Many", "PsycopgSession", "query_text"]


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


class ClosedError(psycopg.InterfaceError, psycopg.OperationalError):
    """Using a closed routed connection (psycopg raises OperationalError, psycopg2
    InterfaceError: this is both)."""


def lsn_of(cursor: Any) -> int | None:
    """The LSN in the first column of a cursor's result (the position queries)."""
    result = cursor.pgresult
    value = result.get_value(0, 0) if result is not None and result.ntuples else None
    return None if value is None else parse_lsn(value.decode())


# psycopg's pipeline queues a Sync without waiting for results only through its
# private ``_enqueue_sync`` (``Pipeline.sync()`` is a round trip of its own): checked
# once, so another psycopg falls back to a second round trip instead of breaking.
PIPELINE_SYNC_NO_WAIT: bool = psycopg.Pipeline.is_supported() and callable(
    getattr(psycopg.Pipeline, "_enqueue_sync", None)
)


def exchange_gen(pgconn: Any, groups: int) -> Any:
    """A psycopg generator (run it with ``conn.wait()``): flush what was sent on
    ``pgconn`` in pipeline mode, then read ``groups`` groups of results (one per
    query, one per Sync), once the server answers them all: one round trip."""
    yield from _send(pgconn)
    out = []
    for _ in range(groups):
        out.append((yield from _fetch_many(pgconn)))
    return out


def queue_sync(pipeline: Any) -> None:
    """Queue a Sync in ``pipeline`` (sent with the next flush, no wait): the
    statements before it end their implicit transaction there, so it commits them."""
    pipeline._enqueue_sync()


def savepoint_sql(verb: str, name: str) -> sql.Composed:
    """``SAVEPOINT x`` / ``RELEASE SAVEPOINT x`` / ``ROLLBACK TO SAVEPOINT x``, quoted."""
    return sql.SQL("{} {}").format(sql.SQL(verb), sql.Identifier(name))


def swallows(exc: BaseException | None, block: object) -> bool:
    """Whether a transaction block ends ``exc`` (``raise psycopg.Rollback``, for it)."""
    return isinstance(exc, psycopg.Rollback) and exc.transaction in (None, block)


_Conn = TypeVar("_Conn")
_Cur = TypeVar("_Cur", psycopg.Cursor[Any], psycopg.AsyncCursor[Any])


class PsycopgSession(RoutedSession):
    """:class:`RoutedSession` with psycopg's attributes and exceptions."""

    _errors: Any = psycopg

    def __init__(
        self,
        cluster: Any,
        *,
        autocommit: bool,
        read_only: bool | None,
        row_factory: RowFactory[Any] | None,
    ) -> None:
        super().__init__(cluster, autocommit=autocommit, read_only=read_only)
        self.row_factory: RowFactory[Any] = row_factory or tuple_row
        self._adapters: AdaptersMap | None = None
        self._pipeline: Any = None  # the open pipeline() block's object

    @property
    def adapters(self) -> AdaptersMap:
        """psycopg's ``conn.adapters``: the dumpers, loaders and types of this routed
        connection (based on the global ``psycopg.adapters``). What is registered here
        (``register_dumper``, ``register_loader``, ``psycopg.types.*.register_*(info,
        conn)``, ``set_json_loads(..., context=conn)``) applies to each statement on
        every node it runs on, and never reaches the pooled node connections' other
        users: each node cursor gets a copy, as psycopg's cursors take of theirs."""
        if self._adapters is None:
            self._adapters = AdaptersMap(psycopg.adapters)
        return self._adapters

    @property
    def connection(self) -> Any:
        """psycopg's adaptation context asks for it (``register_*(info, conn)`` read the
        encoding from it): a node connection this routed connection holds, else None
        (psycopg then assumes UTF-8, as for a context without a connection)."""
        link = self._tx or self._last or self._writer or self._reader
        return None if link is None else link.conn

    @property
    def info(self) -> psycopg.ConnectionInfo:
        """psycopg's ``conn.info`` (server version, backend pid, host, port,
        transaction status, parameters) of the node connection this routed connection
        last ran a statement on: the open transaction's node while there is one.
        Read it right away: the node connection goes back to its pool at ``close()``
        or when routing moves on. Raises ``ProgrammingError`` before any statement."""
        info: psycopg.ConnectionInfo = self._info_link().conn.info
        return info

    def _adapted(self, cursor: _Cur) -> _Cur:
        """``cursor`` (on a node connection) with this connection's adapters, if any
        were asked for (``adapters``); else psycopg's copy of its connection's."""
        adapters = self._adapters
        if adapters is not None:
            cursor._adapters = AdaptersMap(adapters)  # what psycopg's cursor copies
        return cursor

    @property
    def isolation_level(self) -> IsolationLevel | None:
        level: IsolationLevel | None = self._isolation_level
        return level

    @isolation_level.setter
    def isolation_level(self, value: IsolationLevel | None) -> None:
        from psycopg import IsolationLevel

        self._check_no_transaction("isolation_level")
        self._isolation_level = None if value is None else IsolationLevel(value)
        self._rebuild_begin()

    def _isolation_sql(self) -> str | None:
        level = self._isolation_level
        return None if level is None else str(level.name).replace("_", " ")

    def _closed_error(self) -> Exception:
        return ClosedError("the connection is closed")


class CursorBase(Generic[_Conn, _Cur]):
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

    @property
    def row_factory(self) -> RowFactory[Any]:
        return self._row_factory

    @row_factory.setter
    def row_factory(self, row_factory: RowFactory[Any]) -> None:
        self._row_factory = row_factory
        cursor: Any = self._cur
        if cursor is not None:
            cursor.row_factory = row_factory

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
