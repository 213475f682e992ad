"""Where a node's connections come from: psycopg_pool by default, pluggable.

The cluster asks a *source* for a connection to one node for one purpose
(``"read"`` or ``"write"``) and gives it back when done. The default source is
a ``psycopg_pool`` pool per (node, purpose). Anything that can hand out psycopg
connections can stand in: write a class with the four methods of
:class:`ConnectionSource` and pass a factory as ``Cluster(sources=...)``.
Integrations that manage connections themselves (Django aliases, SQLAlchemy
engines) do not need a source at all: ``cluster.route_read()`` names the node a
read should use now, they run it on their own connection to that node, and hand
a commit's WAL position back with ``cluster.record_write(position)``.

Read connections are autocommit and open with ``default_transaction_read_only``
on, on every node, the primary included: a write inside ``cluster.read()`` then
fails the same way ("cannot execute ... in a read-only transaction") whether the
read went to a replica or fell back to the primary, instead of succeeding only
when the replicas happen to lag. It is set at connect time through libpq
``options``, so it costs no round trip per checkout.

A connection handed back carries nothing to its next user: ``DISCARD ALL`` resets
the server side (role, session authorization, ``search_path`` and every other GUC,
prepared statements, temp tables, LISTEN, advisory locks; psycopg's own
prepared-statement cache is told), and ``autocommit`` and ``row_factory`` are put
back. (``isolation_level``, ``read_only`` and ``deferrable`` are left as they are:
SQLAlchemy sets an engine's isolation level on a connection once, when it first sees
it.) Values given at connect time survive it (``RESET ALL`` goes back to them): the
read pools' ``default_transaction_read_only`` stays on, ``connect_kwargs={"options":
...}`` stays, and a pool's ``configure`` callback is run again after it.

The reset costs no round trip of its own. A connection that comes back idle gets its
client side put back at once and *owes* its ``DISCARD ALL``, which goes to the server
with the next user's first statement, in the same round trip (libpq's pipeline mode:
``DISCARD ALL``, a Sync, the statement, a Sync; the Sync keeps the reset out of the
statement's transaction, so an error there cannot roll it back). That is
``connection.BeginningCursor``, the cursor class the cluster installs on every
connection it checks out; anything else that does I/O on the connection first
(``transaction()``, ``copy()``, a pipeline, another cursor class) sends the reset
before it, as its own round trip (:class:`PooledConnection`). Meanwhile the connection
is parked beside its pool and the next checkout takes the newest parked one; parked
longer than a second, it goes back into the pool (where ``max_idle`` and
``max_lifetime`` apply). A checkout within half a second of the connection's last
answer looks only at its socket (a server that went away sends FIN or RST, a
terminated backend its FATAL error, and an idle healthy connection has nothing to
read: HikariCP's 500 ms); later, or on any event, it sends the reset and waits for
it, which proves the connection alive. A connection that comes back in a transaction
or broken, or from a pool with a ``configure`` callback (which must run after the
reset), is reset at its next checkout. A hung server cannot be told from a slow one
without waiting: a checkout in the moment between a node freezing and the monitor
noticing gets a connection whose first query fails when the monitor abandons it
(design rule 10), where a checkout round trip would have moved on.

The check on checkout is done here, not by psycopg_pool: after a failed check
psycopg_pool backs off about a second before it tries again, but a failed check
means the node is likely gone, and the cluster wants to try *another* node at
once (and mark this one suspect).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import psycopg
from psycopg import conninfo
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from .errors import ConfigurationError
from .topology import NodeSpec, Role

__all__ = [
    "DEFAULT_POOL_KWARGS",
    "AsyncConnectionSource",
    "AsyncPoolSource",
    "AsyncSourceFactory",
    "ConnectionSource",
    "PoolSource",
    "PoolTimeout",
    "Purpose",
    "SourceFactory",
    "async_pool_sources",
    "hung_peer_kwargs",
    "pool_sources",
    "server_hung_up",
    "shut_down_socket",
    "socket_hung_up",
    "socket_of",
    "validate_pool_kwargs",
]

Purpose: TypeAlias = Literal["read", "write"]

# Seed 004 sizes replica pools larger than the primary's (reads outnumber
# writes); these are the same shape, scaled for a laptop, not a server farm.
DEFAULT_POOL_KWARGS: Mapping[str, Mapping[str, Any]] = {
    "primary": {
        "min_size": 1,
        "max_size": 10,
        "max_lifetime": 1800.0,  # seed 004's pool_recycle
        "max_idle": 300.0,
        "num_workers": 2,
    },
    "replica": {
        "min_size": 1,
        "max_size": 20,
        "max_lifetime": 1800.0,
        "max_idle": 300.0,
        "num_workers": 2,
    },
}
_ROLES = ("primary", "replica")
# Set by the source itself; ``connect_kwargs`` is the place for connection options.
_RESERVED = frozenset({"conninfo", "kwargs", "open", "name", "timeout"})
_INSTEAD = {
    "kwargs": " (use Cluster(connect_kwargs=...) for connection options)",
    "timeout": " (use Cluster(checkout_timeout=...))",
}
_READ_ONLY_OPTION = "-c default_transaction_read_only=on"
# Everything a session can carry, back to what the connection started with (see the
# module docstring). Never prepared: it deallocates the statement it would run as.
RESET_SQL = b"DISCARD ALL"


class ConnectionSource(Protocol):
    """Connections to one node for one purpose (a pool, or anything like one)."""

    def open(self) -> None:
        """Start filling; must not block on an unreachable node."""

    def close(self, timeout: float = 5.0) -> None: ...

    def getconn(self, timeout: float) -> psycopg.Connection[Any]:
        """A connection within ``timeout`` seconds, else raise ``PoolTimeout``."""

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        """Take back a connection from ``getconn`` (broken ones are discarded)."""

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """Raise if ``conn`` cannot be used (called on every checkout)."""


class AsyncConnectionSource(Protocol):
    """:class:`ConnectionSource` for ``AsyncCluster``."""

    async def open(self) -> None: ...
    async def close(self, timeout: float = 5.0) -> None: ...
    async def getconn(self, timeout: float) -> psycopg.AsyncConnection[Any]: ...
    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None: ...
    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None: ...


SourceFactory: TypeAlias = Callable[[NodeSpec, Purpose, Role], ConnectionSource]
AsyncSourceFactory: TypeAlias = Callable[[NodeSpec, Purpose, Role], AsyncConnectionSource]
Check: TypeAlias = Callable[[psycopg.Connection[Any]], None]
AsyncCheck: TypeAlias = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]


def validate_pool_kwargs(
    pool_kwargs: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """Defaults merged with the user's per-role settings; unknown names are errors.

    ``pool_kwargs={"replica": {"max_size": 50}}`` changes only that setting.
    ``check`` is the checkout check (default ``ConnectionPool.check_connection``,
    one empty query; ``None`` turns it off); the rest go to the pool.
    """
    merged = {role: dict(DEFAULT_POOL_KWARGS[role]) for role in _ROLES}
    if pool_kwargs is None:
        return merged
    if not isinstance(pool_kwargs, Mapping):
        raise ConfigurationError(
            f"pool_kwargs: expected a mapping like {{'replica': {{'max_size': 30}}}}, "
            f"got {type(pool_kwargs).__name__}"
        )
    allowed = set(inspect.signature(ConnectionPool.__init__).parameters) - {"self"}
    for role, settings in pool_kwargs.items():
        if role not in merged:
            raise ConfigurationError(
                f"pool_kwargs: unknown role {role!r}; expected 'primary' or 'replica'"
            )
        if not isinstance(settings, Mapping):
            raise ConfigurationError(f"pool_kwargs[{role!r}]: expected a mapping of settings")
        for key, value in settings.items():
            if key in _RESERVED:
                raise ConfigurationError(
                    f"pool_kwargs[{role!r}][{key!r}]: set by replica-router{_INSTEAD.get(key, '')}"
                )
            if key not in allowed:
                raise ConfigurationError(
                    f"pool_kwargs[{role!r}][{key!r}]: not a psycopg_pool setting "
                    f"(valid: check, {', '.join(sorted(allowed - _RESERVED))})"
                )
            merged[role][key] = value
        _check_sizes(role, merged[role])
    return merged


def _check_sizes(role: str, settings: Mapping[str, Any]) -> None:
    low, high = settings.get("min_size"), settings.get("max_size")
    for key, value in (("min_size", low), ("max_size", high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigurationError(f"pool_kwargs[{role!r}][{key!r}]: expected an int")
    if isinstance(low, int) and low < 0:
        raise ConfigurationError(f"pool_kwargs[{role!r}]['min_size']: must be >= 0")
    if isinstance(low, int) and isinstance(high, int) and high < max(low, 1):
        raise ConfigurationError(
            f"pool_kwargs[{role!r}]: max_size {high} must be >= 1 and >= min_size {low}"
        )


def hung_peer_kwargs(seconds: float) -> dict[str, Any]:
    """libpq settings that drop a connection whose peer stopped answering at the TCP
    level (a host gone or a partition: nothing acknowledged within ``seconds``; idle
    connections probed by keepalives). They do not help against a stopped server
    whose kernel still acknowledges: that takes a client-side deadline."""
    whole = max(1, math.ceil(seconds))
    return {
        "tcp_user_timeout": whole * 1000,
        "keepalives": 1,
        "keepalives_idle": max(1, whole * 5),
        "keepalives_interval": whole,
        "keepalives_count": 3,
    }


def socket_of(conn: Any) -> int:
    """The socket descriptor of a database connection: a psycopg 3 connection (sync or
    asyncio), a psycopg2 connection or anything else with ``fileno()``, or a descriptor
    itself. Raises when the connection has no socket (closed)."""
    if isinstance(conn, int):
        return conn
    pgconn = getattr(conn, "pgconn", None)  # psycopg 3: no Python-level call in between
    if pgconn is not None:
        return int(pgconn.socket)
    return int(conn.fileno())


def shut_down_socket(conn: Any) -> None:
    """Make a wait on ``conn`` return an error now, from any thread.

    A hung server (SIGSTOP, a stalled host) sends no FIN or RST and its kernel may
    still acknowledge what we send, so no TCP timeout fires and statement_timeout
    cannot run: only the client can give up. Shutting the socket down (not closing
    the descriptor someone may be blocked on) makes libpq's wait return an error;
    the connection is then broken and its pool discards it. ``conn`` is anything
    :func:`socket_of` takes (psycopg 3, psycopg2, a descriptor); a closed one is left.
    """
    with contextlib.suppress(Exception):
        fd = os.dup(socket_of(conn))
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)


# A pooled connection gives up on a peer that acknowledges nothing for this long.
_HUNG_PEER_SECONDS = 3.0


def connection_kwargs(
    spec: NodeSpec, purpose: Purpose, connect_kwargs: Mapping[str, Any], connect_timeout: float
) -> dict[str, Any]:
    """psycopg ``connect()`` arguments for one node and purpose (see module doc).

    Settings the DSN or ``connect_kwargs`` give win; otherwise ``connect_timeout``,
    and TCP settings that drop a connection to a vanished peer (:func:`hung_peer_kwargs`).
    """
    params = conninfo.conninfo_to_dict(spec.dsn)
    kwargs = dict(connect_kwargs)
    if "connect_timeout" not in params and "connect_timeout" not in kwargs:
        kwargs["connect_timeout"] = max(2, math.ceil(connect_timeout))  # libpq's minimum is 2
    for key, value in hung_peer_kwargs(max(_HUNG_PEER_SECONDS, connect_timeout)).items():
        if key not in params and key not in kwargs:
            kwargs[key] = value
    if purpose == "read":
        kwargs["autocommit"] = True
        options = str(kwargs.get("options") or params.get("options") or "").strip()
        kwargs["options"] = f"{options} {_READ_ONLY_OPTION}".strip()
    else:
        kwargs.setdefault("autocommit", False)
    return kwargs


def _split(settings: Mapping[str, Any], default_check: Any) -> tuple[dict[str, Any], Any]:
    pool_settings = dict(settings)
    check = pool_settings.pop("check", default_check)
    return pool_settings, check


# A connection handed back waits this long for its next user with its reset on the
# way; then it goes back into the pool, where max_idle and max_lifetime apply.
_PARKED_FOR = 1.0
# A connection reset (or checked) this recently, whose socket shows nothing, is handed
# out without a round trip (HikariCP skips its check within 500 ms of a use).
_ALIVE_WINDOW = 0.5


class _Reset:
    """Where each of a pool's connections stands, and how to make one as new again:
    the server side with ``DISCARD ALL``, the client side from the connect arguments
    (one object per pool; the bookkeeping, not the I/O).

    A connection is *fresh* (never handed out: the pool's own check is enough),
    *owing* (handed back idle: its client side is put back and its ``DISCARD ALL``
    goes with its next user's first statement; ``PooledConnection.owed_since``) or
    *dirty* (handed back in a transaction or an error: reset at checkout).
    """

    __slots__ = (
        "autocommit",
        "configure",
        "cursor_factory",
        "ending",
        "handed_out",
        "row_factory",
    )

    def __init__(self, connect_kwargs: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        self.autocommit = bool(connect_kwargs.get("autocommit", False))
        self.row_factory = connect_kwargs.get("row_factory", tuple_row)
        self.cursor_factory = connect_kwargs.get("cursor_factory")
        self.configure = settings.get("configure")
        self.handed_out: weakref.WeakSet[Any] = weakref.WeakSet()
        self.ending: weakref.WeakSet[Any] = weakref.WeakSet()

    def fresh(self, conn: Any) -> bool:
        """True when ``conn`` never served anyone; marks it as handed out."""
        if conn in self.handed_out:
            return False
        self.handed_out.add(conn)
        self._listen(conn)
        return True

    def settled(self, conn: Any) -> bool:
        """Whether an idle ``conn`` looks alive without a round trip: its socket has
        nothing to read (a server going away sends FIN or RST) and the server did not
        say it is ending the session (a backend terminated while idle sends its FATAL
        error before it closes the socket, so that message may be all there is yet)."""
        conn.pgconn.is_busy()  # parses what arrived: an error while idle is a notice
        return conn not in self.ending and not server_hung_up(conn)

    def _listen(self, conn: Any) -> None:
        ref = weakref.ref(conn)

        def heard(diag: psycopg.errors.Diagnostic) -> None:
            if diag.severity_nonlocalized in ("FATAL", "PANIC") and (c := ref()) is not None:
                self.ending.add(c)

        conn.add_notice_handler(heard)

    def can_owe(self, conn: Any) -> bool:
        """Whether a connection handed back may owe its reset: idle, ours, and no
        ``configure`` to run after the reset (such a pool resets at checkout)."""
        return (
            self.configure is None
            and isinstance(conn, (PooledConnection, AsyncPooledConnection))
            and not conn.closed
            and conn.pgconn.transaction_status == TransactionStatus.IDLE
        )

    def client_side(self, conn: Any) -> None:
        """Put back what psycopg keeps on the connection object (no round trip)."""
        _forget_prepared(conn)
        conn.row_factory = self.row_factory
        conn.cursor_factory = self.cursor_factory or (
            psycopg.AsyncCursor if isinstance(conn, psycopg.AsyncConnection) else psycopg.Cursor
        )
        if (
            conn._isolation_level is not None
            or conn._read_only is not None
            or (conn._deferrable is not None)
        ):  # the characteristics psycopg's BEGIN gives a transaction: its defaults
            conn._isolation_level = conn._read_only = conn._deferrable = None
            conn._begin_statement = b""


def _forget_prepared(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """``DISCARD ALL`` deallocated psycopg's automatically prepared statements too; tell
    its cache, without the ``DEALLOCATE ALL`` it would otherwise send with the next
    query (the server has nothing left to deallocate)."""
    prepared = getattr(conn, "_prepared", None)
    if prepared is not None:
        prepared.clear()
        prepared._to_flush.clear()


def _send_reset(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Send ``DISCARD ALL`` on an idle connection without waiting for the answer
    (False, nothing sent, when it is not idle and healthy)."""
    pgconn = conn.pgconn
    if conn.closed or pgconn.transaction_status != TransactionStatus.IDLE:
        return False
    try:
        pgconn.send_query(RESET_SQL)
        while pgconn.flush():  # a few bytes: sent at once unless the socket is full
            if not _wait_socket(pgconn.socket, _HUNG_PEER_SECONDS, write=True):
                return False
    except psycopg.Error:
        return False
    return True


def _wait_socket(fd: int, timeout: float, *, write: bool = False) -> bool:
    """Whether ``fd`` became readable (or writable) within ``timeout`` seconds."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    ready = select.select([], [fd], [], timeout) if write else select.select([fd], [], [], timeout)
    return bool(ready[0] or ready[1])


def _answer_ready(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Read what arrived; True when the reset's answer is complete (raises if broken)."""
    pgconn = conn.pgconn
    pgconn.consume_input()
    return not pgconn.is_busy()


def _take_answer(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """The reset's answer, which has arrived: raise unless it succeeded."""
    pgconn = conn.pgconn
    result = pgconn.get_result()
    while pgconn.get_result() is not None:
        pass
    if result is None or result.status != ExecStatus.COMMAND_OK:
        message = (result.error_message if result is not None else b"") or b"no answer"
        why = message.decode(errors="replace").strip()
        raise psycopg.OperationalError(f"session reset failed: {why}")


def server_hung_up(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection is closed, broken, or has something to read: a server
    that went away or is ending the session (FIN, RST, a termination message) makes its
    socket readable. One socket poll, no round trip; a quiet socket still says nothing
    of a hung server (only a timeout tells that). A socket that cannot be polled is not
    trusted either. The poll is made once per connection (:class:`HangupWatch`)."""
    return conn.closed or conn.broken or socket_hung_up(conn)


def socket_hung_up(conn: Any) -> bool:
    """Whether the socket of ``conn``, an open psycopg or psycopg2 connection
    (``fileno()``), is readable now, polled with the :class:`HangupWatch` kept on
    ``conn`` (made on first use; each time for a class that cannot keep one). One that
    cannot be polled counts as hung up: whatever the driver raises, it is not trusted."""
    try:
        fd = conn.fileno()
        watch: HangupWatch | None = getattr(conn, "hangup_watch", None)
        if watch is None or watch.fd != fd:
            watch = HangupWatch(fd)
            with contextlib.suppress(AttributeError):
                conn.hangup_watch = watch
        return watch.readable()
    except Exception:  # OSError, ValueError, psycopg's or psycopg2's own error
        return True


class HangupWatch:
    """A poll of one open socket for "readable", made once and kept with its connection:
    between round trips, making a ``select.poll`` and registering the socket cost 3-4 us
    more than the poll itself (1.3 us), on every checkout and every write on a held
    link. Only for a socket that stays open as long as the watch is used (a closed
    connection is never polled: its descriptor may be another socket's by then)."""

    __slots__ = ("_poll", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll: Any = None
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)

    def readable(self) -> bool:
        """Whether the socket has something to read, or an end of stream, right now."""
        if self._poll is not None:
            return bool(self._poll.poll(0))
        return bool(select.select([self.fd], [], [], 0)[0])


def _lifetime_over(conn: Any, now: float) -> bool:
    """psycopg_pool replaces a connection past ``max_lifetime`` when it comes back: let
    it see that one instead of keeping it parked."""
    expire_at = getattr(conn, "_expire_at", None)
    return isinstance(expire_at, float) and expire_at <= now


def reset_session(conn: psycopg.Connection[Any], reset: _Reset) -> None:
    """Make ``conn`` as new for its next user (one round trip; raises if it is dead)."""
    if not _send_reset(conn):
        conn.rollback()  # handed back in a transaction (the pool rolls back only INTRANS)
        if not _send_reset(conn):
            raise psycopg.OperationalError("session reset failed: the connection is not idle")
    finish_reset(conn, reset, _HUNG_PEER_SECONDS)


def _read_answer(conn: psycopg.Connection[Any], timeout: float) -> None:
    """Wait for the answer to the reset sent on ``conn``; raises if the connection is
    dead, the reset failed or no answer came in ``timeout``."""
    if not _answer_ready(conn):
        deadline = time.monotonic() + timeout
        while not _answer_ready(conn):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _wait_socket(conn.pgconn.socket, remaining):
                raise psycopg.OperationalError("no answer to the session reset in time")
    _take_answer(conn)


def settle_reset(conn: psycopg.Connection[Any]) -> None:
    """Send the ``DISCARD ALL`` ``conn`` owes and wait for it (one round trip)."""
    conn.owed_since = None  # type: ignore[attr-defined]
    if not _send_reset(conn):
        raise psycopg.OperationalError("session reset failed: the connection is closed or busy")
    _read_answer(conn, _HUNG_PEER_SECONDS)


def finish_reset(conn: psycopg.Connection[Any], reset: _Reset, timeout: float) -> None:
    """Read the answer to a reset sent before (at once if it arrived), then put back
    the client side; raises if the connection is dead or no answer came in ``timeout``."""
    _read_answer(conn, timeout)
    if not reset.settled(conn):
        ConnectionPool.check_connection(conn)
    reset.client_side(conn)
    if conn.autocommit != reset.autocommit:
        conn.autocommit = reset.autocommit
    if reset.configure is not None:
        reset.configure(conn)


async def _await_socket(fd: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(True))
    try:
        return await asyncio.wait_for(ready, timeout)
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def areset_session(conn: psycopg.AsyncConnection[Any], reset: _Reset) -> None:
    """:func:`reset_session` for an async connection."""
    if not _send_reset(conn):
        await conn.rollback()
        if not _send_reset(conn):
            raise psycopg.OperationalError("session reset failed: the connection is not idle")
    await afinish_reset(conn, reset, _HUNG_PEER_SECONDS)


async def _aread_answer(conn: psycopg.AsyncConnection[Any], timeout: float) -> None:
    """:func:`_read_answer` for an async connection."""
    if not _answer_ready(conn):
        deadline = time.monotonic() + timeout
        while not _answer_ready(conn):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await _await_socket(conn.pgconn.socket, remaining):
                raise psycopg.OperationalError("no answer to the session reset in time")
    _take_answer(conn)


async def asettle_reset(conn: psycopg.AsyncConnection[Any]) -> None:
    """:func:`settle_reset` for an async connection."""
    conn.owed_since = None  # type: ignore[attr-defined]
    if not _send_reset(conn):
        raise psycopg.OperationalError("session reset failed: the connection is closed or busy")
    await _aread_answer(conn, _HUNG_PEER_SECONDS)


async def afinish_reset(conn: psycopg.AsyncConnection[Any], reset: _Reset, timeout: float) -> None:
    """:func:`finish_reset` for an async connection."""
    await _aread_answer(conn, timeout)
    if not reset.settled(conn):
        await AsyncConnectionPool.check_connection(conn)
    reset.client_side(conn)
    if conn.autocommit != reset.autocommit:
        await conn.set_autocommit(reset.autocommit)
    if reset.configure is not None:
        await reset.configure(conn)


_Pooled = TypeVar("_Pooled", bound="PooledConnection")
_APooled = TypeVar("_APooled", bound="AsyncPooledConnection")


class PooledConnection(psycopg.Connection[Any]):
    """The pools' connection class. One handed back idle *owes* its ``DISCARD ALL``
    (``owed_since``: when it last answered) until its next user's first statement
    carries it (``connection.BeginningCursor``); any other I/O through psycopg sends
    it first, so nothing reaches the server ahead of the reset.

    ``connect_started`` is when its connect began: a connection started before a loss
    was seen may have been hit by the same event (``died_while_pooled``). psycopg_pool
    stamps a connection only once its handshake is over, which an asyncio pool sees
    when its task next runs: a backend killed meanwhile looked like a fresh one."""

    owed_since: float | None = None
    connect_started: float | None = None
    hangup_watch: HangupWatch | None = None  # server_hung_up's poll, made once

    @classmethod
    def connect(cls: type[_Pooled], *args: Any, **kwargs: Any) -> _Pooled:
        started = time.monotonic()
        conn = super().connect(*args, **kwargs)
        conn.connect_started = started
        return conn

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self.owed_since is not None:
            settle_reset(self)
        return super().wait(gen, *args, **kwargs)


class AsyncPooledConnection(psycopg.AsyncConnection[Any]):
    """:class:`PooledConnection` for asyncio."""

    owed_since: float | None = None
    connect_started: float | None = None
    hangup_watch: HangupWatch | None = None  # server_hung_up's poll, made once

    @classmethod
    async def connect(cls: type[_APooled], *args: Any, **kwargs: Any) -> _APooled:
        started = time.monotonic()
        conn = await super().connect(*args, **kwargs)
        conn.connect_started = started
        return conn

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self.owed_since is not None:
            await asettle_reset(self)
        return await super().wait(gen, *args, **kwargs)


def queue_owed_reset(conn: Any) -> int:
    """Queue the reset ``conn`` owes, and a Sync, at the head of a pipeline (it is owed
    no longer); the result groups they add (0 when nothing is owed). The Sync keeps the
    statement after it from undoing the reset: in one implicit transaction a failing
    statement would roll back its GUC part."""
    if getattr(conn, "owed_since", None) is None:
        return 0
    conn.owed_since = None
    conn.pgconn.send_query_params(RESET_SQL, None)
    conn.pgconn.pipeline_sync()
    return 2


def check_queued_reset(conn: Any, groups: list[Any], owed: int) -> None:
    """Take the queued reset's answer off the front of ``groups``. Should it have failed,
    the session still carries its last user's state: the connection is closed (its pool
    replaces it) and the error raised, whatever the statement after it did."""
    if not owed:
        return
    (discarded,) = groups.pop(0)
    groups.pop(0)  # its Sync
    if discarded.status != ExecStatus.COMMAND_OK:
        message = discarded.error_message.decode(errors="replace").strip()
        conn.pgconn.finish()
        raise psycopg.OperationalError(f"session reset failed: {message or 'no answer'}")


def set_autocommit_owing(conn: psycopg.Connection[Any], value: bool) -> None:
    """``conn.autocommit = value`` on an idle connection, which psycopg does without
    I/O: the reset it may owe stays owed, for its first statement to carry."""
    owed, conn.owed_since = getattr(conn, "owed_since", None), None  # type: ignore[attr-defined]
    try:
        conn.set_autocommit(value)
    finally:
        conn.owed_since = owed  # type: ignore[attr-defined]


async def aset_autocommit_owing(conn: psycopg.AsyncConnection[Any], value: bool) -> None:
    """:func:`set_autocommit_owing` for an async connection."""
    owed, conn.owed_since = getattr(conn, "owed_since", None), None  # type: ignore[attr-defined]
    try:
        await conn.set_autocommit(value)
    finally:
        conn.owed_since = owed  # type: ignore[attr-defined]


def _owe_reset(conn: psycopg.Connection[Any], reset: _Reset, now: float) -> bool:
    """A connection handed back: its client side put back and its reset owed (no I/O);
    False when it cannot owe one (in a transaction, broken, a ``configure`` pool)."""
    if not reset.can_owe(conn):
        return False
    reset.client_side(conn)
    if conn.autocommit != reset.autocommit:
        set_autocommit_owing(conn, reset.autocommit)
    if conn.owed_since is None:  # type: ignore[attr-defined]
        conn.owed_since = now  # type: ignore[attr-defined]  # (unless its user sent nothing)
    return True


async def _aowe_reset(conn: psycopg.AsyncConnection[Any], reset: _Reset, now: float) -> bool:
    """:func:`_owe_reset` for an async connection."""
    if not reset.can_owe(conn):
        return False
    reset.client_side(conn)
    if conn.autocommit != reset.autocommit:
        await aset_autocommit_owing(conn, reset.autocommit)
    if conn.owed_since is None:  # type: ignore[attr-defined]
        conn.owed_since = now  # type: ignore[attr-defined]  # (unless its user sent nothing)
    return True


def _pooled_class(settings: dict[str, Any], ours: type[Any]) -> type[Any]:
    """The pool's connection class: ours, or one made of ours and the user's."""
    theirs = settings.pop("connection_class", None)
    if theirs is None or issubclass(theirs, ours):
        return ours
    return type(f"Pooled{theirs.__name__}", (ours, theirs), {})


class PoolSource:
    """A ``psycopg_pool.ConnectionPool`` for one node and purpose, with the connections
    handed back most recently parked beside it, owing their reset (see the module
    docstring): the next checkout takes the newest of them."""

    __slots__ = ("_asking", "_check", "_lock", "_parked", "_reset", "pool")

    def __init__(
        self,
        spec: NodeSpec,
        purpose: Purpose,
        settings: Mapping[str, Any],
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        pool_settings, self._check = _split(settings, ConnectionPool.check_connection)
        self._reset = _Reset(connect_kwargs, pool_settings)
        self._parked: deque[tuple[psycopg.Connection[Any], float]] = deque()
        self._asking = 0  # checkouts waiting on the pool: a connection handed back goes there
        self._lock = threading.Lock()
        connection_class = _pooled_class(pool_settings, PooledConnection)
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            spec.dsn,
            connection_class=connection_class,
            kwargs=dict(connect_kwargs),
            open=False,
            name=f"replica-router/{spec.name}/{purpose}",
            **pool_settings,
        )

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self, timeout: float = 5.0) -> None:
        self.pool.close(timeout=timeout)
        self._unpark(0.0, math.inf)

    def getconn(self, timeout: float) -> psycopg.Connection[Any]:
        try:
            return self._parked.pop()[0]
        except IndexError:
            pass
        with self._lock:
            self._asking += 1
        try:
            return self.pool.getconn(timeout=timeout)
        finally:
            with self._lock:
                self._asking -= 1

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        now = time.monotonic()
        pool = self.pool
        if _owe_reset(conn, self._reset, now) and not (
            self._asking or pool.closed or _lifetime_over(conn, now)
        ):
            self._parked.append((conn, now))
            if pool.closed:  # closed meanwhile: nobody else would close it
                self._unpark(0.0, math.inf)
        else:  # for a waiting checkout, to be replaced, in a transaction or broken
            pool.putconn(conn)
        self._unpark(_PARKED_FOR, now)

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """The checkout check: one that owes its reset and answered within the window,
        its socket quiet, needs nothing (its first statement carries the reset); later,
        or on a socket event, the reset is sent now and its answer proves it alive, as
        does a reset at checkout; a fresh one gets the pool's usual check."""
        reset, check = self._reset, self._check
        owed_since = getattr(conn, "owed_since", None)
        if owed_since is not None:
            if time.monotonic() - owed_since >= _ALIVE_WINDOW or not reset.settled(conn):
                settle_reset(conn)
            proven = True
        elif reset.fresh(conn):
            proven = False
        else:
            reset_session(conn, reset)  # handed back in a transaction or an error
            proven = True
        if check is not None and not (proven and check is ConnectionPool.check_connection):
            check(conn)

    def _unpark(self, older_than: float, now: float) -> None:
        """Hand back into the pool what has been parked longer than ``older_than``."""
        parked = self._parked
        while parked and now - parked[0][1] > older_than:
            try:
                conn, _ = parked.popleft()
            except IndexError:
                return
            self.pool.putconn(conn)  # still owing its reset

    def __repr__(self) -> str:
        return f"<PoolSource {self.pool.name}>"


class AsyncPoolSource:
    """:class:`PoolSource` on a ``psycopg_pool.AsyncConnectionPool``.

    When every connection of the pool is out with this source's users (handed out or
    parked), a checkout does not queue on the pool: it waits here, and a connection
    handed back goes straight to the oldest such waiter, owing its reset, as a parked
    one would (the waiter's first statement carries it). Queued on the pool, each
    waiter would get its connection only through the pool's own queue and its
    event-loop hand-offs.
    """

    __slots__ = ("_asking", "_check", "_out", "_parked", "_reset", "_waiting", "pool")

    def __init__(
        self,
        spec: NodeSpec,
        purpose: Purpose,
        settings: Mapping[str, Any],
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        pool_settings, self._check = _split(settings, AsyncConnectionPool.check_connection)
        self._reset = _Reset(connect_kwargs, pool_settings)
        self._parked: deque[tuple[psycopg.AsyncConnection[Any], float]] = deque()
        self._asking = 0  # checkouts waiting on the pool: a connection handed back goes there
        self._out = 0  # connections taken from the pool and not given back to it
        # Checkouts waiting here for a connection handed back (None: ask the pool).
        self._waiting: deque[asyncio.Future[psycopg.AsyncConnection[Any] | None]] = deque()
        connection_class = _pooled_class(pool_settings, AsyncPooledConnection)
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            spec.dsn,
            connection_class=connection_class,
            kwargs=dict(connect_kwargs),
            open=False,
            name=f"replica-router/{spec.name}/{purpose}",
            **pool_settings,
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self, timeout: float = 5.0) -> None:
        await self.pool.close(timeout=timeout)
        self._wake_all()
        await self._unpark(0.0, math.inf)

    async def getconn(self, timeout: float) -> psycopg.AsyncConnection[Any]:
        try:
            return self._parked.pop()[0]
        except IndexError:
            pass
        pool = self.pool
        if self._out >= pool.max_size and not pool.closed:
            deadline = time.monotonic() + timeout
            handed = await self._handed(timeout)
            if handed is not None:
                return handed
            timeout = max(0.0, deadline - time.monotonic())  # told to ask the pool
        self._asking += 1
        try:
            conn = await pool.getconn(timeout=timeout)
        finally:
            self._asking -= 1
        self._out += 1
        return conn

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        now = time.monotonic()
        pool = self.pool
        if not await _aowe_reset(conn, self._reset, now) or (
            pool.closed or _lifetime_over(conn, now) or (self._asking and not self._waiting)
        ):  # in a transaction or broken, to be replaced, or for a checkout waiting there
            await self._to_pool(conn)
        elif not self._give(conn):
            self._parked.append((conn, now))
            if pool.closed:  # closed meanwhile: nobody else would close it
                await self._unpark(0.0, math.inf)
        await self._unpark(_PARKED_FOR, now)

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """:meth:`PoolSource.check` for asyncio."""
        reset, check = self._reset, self._check
        owed_since = getattr(conn, "owed_since", None)
        if owed_since is not None:
            if time.monotonic() - owed_since >= _ALIVE_WINDOW or not reset.settled(conn):
                await asettle_reset(conn)
            proven = True
        elif reset.fresh(conn):
            proven = False
        else:
            await areset_session(conn, reset)  # handed back in a transaction or an error
            proven = True
        if check is not None and not (proven and check is AsyncConnectionPool.check_connection):
            await check(conn)

    async def _handed(self, timeout: float) -> psycopg.AsyncConnection[Any] | None:
        """Wait up to ``timeout`` for a connection handed back by another checkout
        (None: one went back into the pool, ask it); raises ``PoolTimeout``."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[psycopg.AsyncConnection[Any] | None] = loop.create_future()
        self._waiting.append(waiter)
        timer = loop.call_later(timeout, _expire, waiter, timeout)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled just after a connection was handed to us: pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                conn = waiter.result()
                if conn is not None and not self._give(conn):
                    self._parked.append((conn, time.monotonic()))
            raise
        finally:
            timer.cancel()

    def _give(self, conn: psycopg.AsyncConnection[Any] | None) -> bool:
        """Hand ``conn`` to the oldest checkout waiting here, if any still waits."""
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _wake_all(self) -> None:
        while self._give(None):
            pass

    async def _to_pool(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give ``conn`` back to the pool; a checkout waiting here then asks the pool."""
        self._out -= 1
        try:
            await self.pool.putconn(conn)
        finally:
            self._give(None)

    async def _unpark(self, older_than: float, now: float) -> None:
        """Hand back into the pool what has been parked longer than ``older_than``."""
        parked = self._parked
        while parked and now - parked[0][1] > older_than:
            try:
                conn, _ = parked.popleft()
            except IndexError:
                return
            await self._to_pool(conn)  # still owing its reset

    def __repr__(self) -> str:
        return f"<AsyncPoolSource {self.pool.name}>"


def _expire(waiter: asyncio.Future[Any], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(PoolTimeout(f"no connection handed back within {timeout:g} s"))


def pool_sources(
    pool_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    connect_kwargs: Mapping[str, Any] | None = None,
    *,
    connect_timeout: float = 5.0,
) -> SourceFactory:
    """The default factory: a ``ConnectionPool`` per node and purpose.

    A node's pools are sized by its role when they are made (``"primary"`` or
    ``"replica"`` settings of ``pool_kwargs``, over :data:`DEFAULT_POOL_KWARGS`).
    """
    return _factory(PoolSource, pool_kwargs, connect_kwargs, connect_timeout)


def async_pool_sources(
    pool_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    connect_kwargs: Mapping[str, Any] | None = None,
    *,
    connect_timeout: float = 5.0,
) -> AsyncSourceFactory:
    """:func:`pool_sources` for ``AsyncCluster`` (``AsyncConnectionPool``)."""
    return _factory(AsyncPoolSource, pool_kwargs, connect_kwargs, connect_timeout)


_Source = TypeVar("_Source", PoolSource, AsyncPoolSource)


def _factory(
    source: type[_Source],
    pool_kwargs: Mapping[str, Mapping[str, Any]] | None,
    connect_kwargs: Mapping[str, Any] | None,
    connect_timeout: float,
) -> Callable[[NodeSpec, Purpose, Role], _Source]:
    settings = validate_pool_kwargs(pool_kwargs)
    extra = dict(connect_kwargs or {})

    def make(spec: NodeSpec, purpose: Purpose, role: Role) -> _Source:
        role_settings = settings["primary" if role is Role.PRIMARY else "replica"]
        kwargs = connection_kwargs(spec, purpose, extra, connect_timeout)
        return source(spec, purpose, role_settings, kwargs)

    return make
