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

A connection handed back carries nothing to its next user: when a pooled
connection is checked out *again*, its check is ``DISCARD ALL`` instead of the
empty query (role, session authorization, ``search_path`` and every other GUC,
prepared statements, temp tables, LISTEN, advisory locks; psycopg's own
prepared-statement cache is cleared with it), and its ``autocommit`` and
``row_factory`` are put back. (``isolation_level``, ``read_only`` and ``deferrable``
are left as they are: SQLAlchemy sets an engine's isolation level on a connection
once, when it first sees it.) It is the same single round trip the check costs
anyway, made when the connection is handed out rather than in a pool worker when it
comes back, so a checkout costs what it did. Values given at connect time survive
it (``RESET ALL`` goes back to them): the read pools' ``default_transaction_read_only``
stays on, ``connect_kwargs={"options": ...}`` stays, and a pool's ``configure``
callback is run again after it.

The check on checkout is done here, not by psycopg_pool: after a failed check
psycopg_pool backs off about a second before it tries again, but a failed check
means the node is likely gone, and the cluster wants to try *another* node at
once (and mark this one suspect).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import psycopg
from psycopg import conninfo
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
    "shut_down_socket",
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
_RESET_SQL = "DISCARD ALL"


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


class _Reset:
    """Which of a pool's connections have been handed out, and how to make one as
    new again: the server side with ``DISCARD ALL``, the client side from the
    connect arguments (one object per pool; the decision, not the I/O)."""

    __slots__ = ("autocommit", "configure", "handed_out", "row_factory")

    def __init__(self, connect_kwargs: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        self.autocommit = bool(connect_kwargs.get("autocommit", False))
        self.row_factory = connect_kwargs.get("row_factory", tuple_row)
        self.configure = settings.get("configure")
        self.handed_out: weakref.WeakSet[Any] = weakref.WeakSet()

    def needed(self, conn: Any) -> bool:
        """True when ``conn`` served someone before (then it must be reset); marks it."""
        if conn in self.handed_out:
            return True
        self.handed_out.add(conn)
        return False

    def client_side(self, conn: Any) -> None:
        """Put back what psycopg keeps on the connection object (no round trip)."""
        conn.autocommit = True  # DISCARD ALL runs outside a transaction block
        conn.row_factory = self.row_factory


def _forget_prepared(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """DISCARD ALL deallocated psycopg's automatically prepared statements too. psycopg
    clears its cache when it sees a DISCARD ALL, but only the first time that text runs
    on the connection, so its cache is told here (it then sends one DEALLOCATE ALL with
    the next query, only if it had prepared anything)."""
    prepared = getattr(conn, "_prepared", None)
    if prepared is not None:
        prepared.clear()


def reset_session(conn: psycopg.Connection[Any], reset: _Reset) -> None:
    """Make ``conn`` as new for its next user (one round trip; raises if it is dead)."""
    reset.client_side(conn)
    try:
        conn.execute(_RESET_SQL, prepare=False)
        _forget_prepared(conn)
    finally:
        with contextlib.suppress(Exception):
            conn.autocommit = reset.autocommit
    if reset.configure is not None:
        reset.configure(conn)


async def areset_session(conn: psycopg.AsyncConnection[Any], reset: _Reset) -> None:
    """:func:`reset_session` for an async connection."""
    await conn.set_autocommit(True)
    conn.row_factory = reset.row_factory
    try:
        await conn.execute(_RESET_SQL, prepare=False)
        _forget_prepared(conn)
    finally:
        with contextlib.suppress(Exception):
            await conn.set_autocommit(reset.autocommit)
    if reset.configure is not None:
        await reset.configure(conn)


class PoolSource:
    """A ``psycopg_pool.ConnectionPool`` for one node and purpose."""

    __slots__ = ("_check", "_reset", "pool")

    def __init__(
        self,
        spec: NodeSpec,
        purpose: Purpose,
        settings: Mapping[str, Any],
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        pool_settings, self._check = _split(settings, ConnectionPool.check_connection)
        self._reset = _Reset(connect_kwargs, pool_settings)
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            spec.dsn,
            kwargs=dict(connect_kwargs),
            open=False,
            name=f"replica-router/{spec.name}/{purpose}",
            **pool_settings,
        )

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self, timeout: float = 5.0) -> None:
        self.pool.close(timeout=timeout)

    def getconn(self, timeout: float) -> psycopg.Connection[Any]:
        return self.pool.getconn(timeout=timeout)

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        self.pool.putconn(conn)

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """The checkout check; a connection handed out before is reset by it."""
        check = self._check
        if self._reset.needed(conn):
            reset_session(conn, self._reset)  # also proves the connection works
            if check is ConnectionPool.check_connection:
                return
        if check is not None:
            check(conn)

    def __repr__(self) -> str:
        return f"<PoolSource {self.pool.name}>"


class AsyncPoolSource:
    """A ``psycopg_pool.AsyncConnectionPool`` for one node and purpose."""

    __slots__ = ("_check", "_reset", "pool")

    def __init__(
        self,
        spec: NodeSpec,
        purpose: Purpose,
        settings: Mapping[str, Any],
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        pool_settings, self._check = _split(settings, AsyncConnectionPool.check_connection)
        self._reset = _Reset(connect_kwargs, pool_settings)
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            spec.dsn,
            kwargs=dict(connect_kwargs),
            open=False,
            name=f"replica-router/{spec.name}/{purpose}",
            **pool_settings,
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self, timeout: float = 5.0) -> None:
        await self.pool.close(timeout=timeout)

    async def getconn(self, timeout: float) -> psycopg.AsyncConnection[Any]:
        return await self.pool.getconn(timeout=timeout)

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self.pool.putconn(conn)

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The checkout check; a connection handed out before is reset by it."""
        check = self._check
        if self._reset.needed(conn):
            await areset_session(conn, self._reset)
            if check is AsyncConnectionPool.check_connection:
                return
        if check is not None:
            await check(conn)

    def __repr__(self) -> str:
        return f"<AsyncPoolSource {self.pool.name}>"


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
