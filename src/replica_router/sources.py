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

The check on checkout is done here, not by psycopg_pool: after a failed check
psycopg_pool backs off about a second before it tries again, but a failed check
means the node is likely gone, and the cluster wants to try *another* node at
once (and mark this one suspect).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import psycopg
from psycopg import conninfo
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
    "pool_sources",
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


def connection_kwargs(
    spec: NodeSpec, purpose: Purpose, connect_kwargs: Mapping[str, Any], connect_timeout: float
) -> dict[str, Any]:
    """psycopg ``connect()`` arguments for one node and purpose (see module doc)."""
    params = conninfo.conninfo_to_dict(spec.dsn)
    kwargs = dict(connect_kwargs)
    if "connect_timeout" not in params and "connect_timeout" not in kwargs:
        kwargs["connect_timeout"] = max(2, math.ceil(connect_timeout))  # libpq's minimum is 2
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


class PoolSource:
    """A ``psycopg_pool.ConnectionPool`` for one node and purpose."""

    __slots__ = ("_check", "pool")

    def __init__(
        self,
        spec: NodeSpec,
        purpose: Purpose,
        settings: Mapping[str, Any],
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        pool_settings, self._check = _split(settings, ConnectionPool.check_connection)
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
        if self._check is not None:
            self._check(conn)

    def __repr__(self) -> str:
        return f"<PoolSource {self.pool.name}>"


class AsyncPoolSource:
    """A ``psycopg_pool.AsyncConnectionPool`` for one node and purpose."""

    __slots__ = ("_check", "pool")

    def __init__(
        self,
        spec: NodeSpec,
        purpose: Purpose,
        settings: Mapping[str, Any],
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        pool_settings, self._check = _split(settings, AsyncConnectionPool.check_connection)
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
        if self._check is not None:
            await self._check(conn)

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
