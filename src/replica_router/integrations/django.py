"""Django: a database router, a middleware and settings for read replicas.

``settings.py``::

    DATABASES = {"default": {...primary...}, "replica1": {...}, "replica2": {...}}
    DATABASE_ROUTERS = ["replica_router.integrations.django.ReplicaRouter"]
    MIDDLEWARE = ["replica_router.integrations.django.ConsistencyMiddleware", ...]
    REPLICA_ROUTER = {"PRIMARY": "default", "REPLICAS": ["replica1", "replica2"],
                      "OPTIONS": {"max_lag": 2.0}}   # any Cluster keyword argument

The DATABASES aliases are the cluster's nodes (the node names *are* the
aliases). Django keeps its own connection per alias; the process's
:class:`~replica_router.Cluster` (:func:`get_cluster`) measures every node's
role and lag and decides where each read goes. Nothing here keeps a
thread-local: what follows a request lives in ``contextvars``, so it works the
same under WSGI threads, ASGI tasks and the async ORM.

How writes are seen: an execute wrapper on every cluster alias's connection.
On the primary it notes each statement the classifier does not prove to be a
read, once it has run; it counts when it commits (autocommit at once, an
``atomic()`` block through ``on_commit``). On a replica alias it sends such a
statement to the primary instead (the replica's read-only refusal is the
backstop). Never the HTTP method, never ``db_for_write`` calls (``get_or_create``
makes one and may not write).

How the token is learned: one ``SELECT pg_current_wal_insert_lsn()`` on the
primary after the write committed, which is at or past its commit record.
Inside a request (the middleware) that is done once, when the response
leaves, and the request's reads after its first write go to the primary;
outside a request, at each commit.
"""

from __future__ import annotations

import atexit
import contextvars
import inspect
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signing
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_started, setting_changed
from django.db import DatabaseError, connections
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.signals import connection_created
from django.db.transaction import TransactionManagementError
from django.http import HttpRequest, HttpResponseBase

from .. import Cluster, Intent, consistency
from .. import classify as default_classify
from .._web import Incoming, TokenTransport, enter_scope
from ..consistency import NODE_POSITION_SQL, POSITION_SQL, Scope, Token, current_scope
from ..errors import ConfigurationError, Error, PrimaryUnavailable, TokenError
from ..lsn import parse_lsn
from ..sources import ConnectionSource, Purpose, SourceFactory, pool_sources, socket_hung_up
from ..topology import NodeSpec, Role

__all__ = [
    "ConsistencyMiddleware",
    "ReplicaRouter",
    "ReplicaWriteError",
    "get_cluster",
    "use_primary",
]

log = logging.getLogger("replica_router.django")

_SETTING = "REPLICA_ROUTER"
_KEYS = frozenset({"PRIMARY", "REPLICAS", "OPTIONS", "TOKEN"})
_SET_BY_SETTINGS = frozenset({"primary", "replicas", "nodes", "primary_name"})
_CLUSTER_KWARGS = frozenset(inspect.signature(Cluster.__init__).parameters) - {"self"}
_TOKEN_KWARGS = frozenset(inspect.signature(TokenTransport).parameters) | {"signed"}
_LIBPQ_KEYWORDS = frozenset(o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults())
_SIGNING_SALT = "replica_router.token"
_NOT_A_NODE = nullcontext()  # a mirror alias, or before the cluster opened
_READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction: a replica refused a write


class ReplicaWriteError(Error, TransactionManagementError):  # type: ignore[misc]
    """A write reached a replica alias inside a transaction opened on that alias.

    It cannot move to the primary there (the transaction's other statements are
    on the replica), and running it on the replica is refused: open the
    transaction on the primary (``atomic()`` without ``using``, or
    ``using=`` the primary) instead.
    """


# -- settings -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Config:
    """``REPLICA_ROUTER`` checked against ``DATABASES`` (pure: reads settings only)."""

    primary: str
    replicas: tuple[str, ...]
    options: Mapping[str, Any]
    token: Mapping[str, Any]
    aliases: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", frozenset((self.primary, *self.replicas)))


def _load_config() -> _Config:
    raw = getattr(settings, _SETTING, None)
    if raw is None:
        raise ImproperlyConfigured(
            f"{_SETTING} is not set: add {_SETTING} = {{'PRIMARY': 'default', "
            "'REPLICAS': ['replica1', ...]}} to your settings"
        )
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(f"{_SETTING}: expected a dict, got {type(raw).__name__}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ImproperlyConfigured(
            f"{_SETTING}[{sorted(unknown)[0]!r}]: unknown key (expected {', '.join(sorted(_KEYS))})"
        )
    databases = settings.DATABASES
    primary = raw.get("PRIMARY", "default")
    if not isinstance(primary, str) or primary not in databases:
        raise ImproperlyConfigured(f"{_SETTING}['PRIMARY']: {primary!r} is not in DATABASES")
    replicas = raw.get("REPLICAS", ())
    if isinstance(replicas, str) or not isinstance(replicas, (list, tuple)):
        raise ImproperlyConfigured(f"{_SETTING}['REPLICAS']: expected a list of DATABASES aliases")
    for i, alias in enumerate(replicas):
        if not isinstance(alias, str) or alias not in databases:
            raise ImproperlyConfigured(
                f"{_SETTING}['REPLICAS'][{i}]: {alias!r} is not in DATABASES"
            )
        if alias == primary or replicas.index(alias) != i:
            raise ImproperlyConfigured(
                f"{_SETTING}['REPLICAS'][{i}]: {alias!r} is listed twice (or is the PRIMARY)"
            )
    for key, allowed in (("OPTIONS", _CLUSTER_KWARGS), ("TOKEN", _TOKEN_KWARGS)):
        given = raw.get(key, {})
        if not isinstance(given, Mapping):
            raise ImproperlyConfigured(f"{_SETTING}[{key!r}]: expected a dict")
        for name in given:
            if key == "OPTIONS" and name in _SET_BY_SETTINGS:
                raise ImproperlyConfigured(
                    f"{_SETTING}['OPTIONS'][{name!r}]: set by PRIMARY and REPLICAS"
                )
            if name not in allowed:
                raise ImproperlyConfigured(f"{_SETTING}[{key!r}][{name!r}]: unknown option")
    for alias in (primary, *replicas):
        engine = databases[alias].get("ENGINE", "")
        if "postgresql" not in engine and "postgis" not in engine:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['ENGINE']: {engine!r} is not a PostgreSQL backend"
            )
    return _Config(primary, tuple(replicas), dict(raw.get("OPTIONS", {})),
                   dict(raw.get("TOKEN", {})))  # fmt: skip


def _dsn(alias: str) -> str:
    """The libpq DSN of an alias: HOST, PORT, NAME, USER, PASSWORD and the libpq OPTIONS.

    Django-only options (``pool``, ``isolation_level``, ``server_side_binding``,
    ``assume_role``, ``cursor_factory``...) are not libpq's and are left out.
    """
    db = connections[alias].settings_dict
    params: dict[str, Any] = {
        key: value for key, value in (db.get("OPTIONS") or {}).items() if key in _LIBPQ_KEYWORDS
    }
    for key, name in (("NAME", "dbname"), ("USER", "user"), ("PASSWORD", "password"),
                      ("HOST", "host"), ("PORT", "port")):  # fmt: skip
        value = db.get(key)
        if value not in (None, ""):
            params[name] = str(value)
    return psycopg.conninfo.make_conninfo(**params)


def _server(alias: str) -> tuple[str, str]:
    """Where an alias's server is. An alias on the primary's own server is the
    primary's data: a test mirror (its NAME becomes the test database's once the
    test runner has made it), never a replica to measure."""
    db = connections[alias].settings_dict
    return (str(db.get("HOST") or ""), str(db.get("PORT") or ""))


class _LazySource:
    """A pool opened on first use: Django holds its own connections, so the
    cluster's pools usually stay empty, and would otherwise each keep a
    connection and worker threads."""

    def __init__(self, make: Callable[[], ConnectionSource]) -> None:
        self._make = make
        self._source: ConnectionSource | None = None
        self._lock = threading.Lock()

    def _get(self) -> ConnectionSource:
        source = self._source
        if source is None:
            with self._lock:
                source = self._source
                if source is None:
                    source = self._make()
                    source.open()
                    self._source = source
        return source

    def open(self) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            source, self._source = self._source, None
        if source is not None:
            source.close(timeout)

    def getconn(self, timeout: float) -> psycopg.Connection[Any]:
        return self._get().getconn(timeout)

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        self._get().putconn(conn)

    def check(self, conn: psycopg.Connection[Any]) -> None:
        self._get().check(conn)


def _lazy(factory: SourceFactory) -> SourceFactory:
    def make(spec: NodeSpec, purpose: Purpose, role: Role) -> ConnectionSource:
        return _LazySource(lambda: factory(spec, purpose, role))

    return make


@dataclass(slots=True)
class _Process:
    """This process's cluster and what the router derived from the settings."""

    config: _Config
    cluster: Cluster
    pid: int
    # Aliases on the primary's own server and database (test mirrors: TEST
    # {"MIRROR": ...} points them at the test database): read there freely.
    mirrors: tuple[str, ...]
    turn: Iterator[int] = field(default_factory=itertools.count)

    def primary(self) -> str:
        """The alias the monitor measures as primary (the configured one until known)."""
        return self.cluster.topology.primary or self.config.primary


class _Registry:
    """This process's cluster and settings; replaced whole, read without a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: _Process | None = None
        self.config: _Config | None = None
        self.abandoned: list[Cluster] = []  # a parent's clusters, kept from the child's GC


_registry = _Registry()


def _settings() -> _Config:
    config = _registry.config
    if config is None:
        config = _registry.config = _load_config()
    return config


def _current() -> _Process | None:
    """This process's state if it has started (never starts it)."""
    process = _registry.process
    return process if process is not None and process.pid == os.getpid() else None


def _state() -> _Process:
    return _current() or _start()


def _start() -> _Process:
    with _registry.lock:
        if _registry.process is not None and _registry.process.pid != os.getpid():
            _forget_in_child()
        process = _registry.process
        if process is not None:
            return process
        config = _settings()
        home = _server(config.primary)
        mirrors = tuple(a for a in config.replicas if _server(a) == home)
        options = dict(config.options)
        if "sources" not in options:
            options["sources"] = _lazy(
                pool_sources(
                    options.get("pool_kwargs"),
                    options.get("connect_kwargs"),
                    connect_timeout=options.get("connect_timeout", 2.0),
                )
            )
        try:
            cluster = Cluster(
                primary=_dsn(config.primary),
                replicas={a: _dsn(a) for a in config.replicas if a not in mirrors},
                primary_name=config.primary,
                **options,
            )
        except (ConfigurationError, TypeError) as exc:
            raise ImproperlyConfigured(f"{_SETTING}['OPTIONS']: {exc}") from None
        cluster.open()
        process = _registry.process = _Process(config, cluster, os.getpid(), mirrors)
        for conn in connections.all(initialized_only=True):
            _install(conn)
        return process


def get_cluster() -> Cluster:
    """The process's :class:`~replica_router.Cluster`, opened on first use.

    Its nodes are the ``REPLICA_ROUTER`` aliases. It is closed at exit; a
    process forked from one that had it (gunicorn, uwsgi with a preloaded app)
    opens its own on first use and leaves the parent's alone. A bad setting
    raises ``ImproperlyConfigured`` naming the key.
    """
    return _state().cluster


def _close() -> None:
    """Close this process's cluster (at exit, or when the settings change)."""
    with _registry.lock:
        process, _registry.process, _registry.config = _registry.process, None, None
    if process is not None and process.pid == os.getpid():
        process.cluster.close()


def _forget_in_child() -> None:
    """After fork: the parent's monitor threads did not come along, and its
    connections are the parent's to close; start afresh without touching them."""
    process, _registry.process = _registry.process, None
    if process is not None:
        _registry.abandoned.append(process.cluster)


atexit.register(_close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in (_SETTING, "DATABASES"):
        _close()


setting_changed.connect(_settings_changed, dispatch_uid="replica_router.django.settings")


# -- the unit of work -------------------------------------------------------------------


class _Request:
    """What one request (the middleware's scope) knows beyond the cluster's scope."""

    __slots__ = ("replica", "wrote_on")

    def __init__(self) -> None:
        self.wrote_on: str | None = None  # committed here, position not captured yet
        self.replica: str | None = None  # the replica its reads stay on


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "replica_router.django.request", default=None
)
_USE_PRIMARY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "replica_router.django.use_primary", default=False
)


@contextmanager
def use_primary() -> Iterator[None]:
    """Every read in the block goes to the primary (also usable as a decorator)."""
    reset = _USE_PRIMARY.set(True)
    try:
        yield
    finally:
        _USE_PRIMARY.reset(reset)


def _in_transaction(conn: Any) -> bool:
    """A transaction is open on the connection (Django's, or a test case's)."""
    return conn.connection is not None and (conn.in_atomic_block or not conn.autocommit)


_MANUAL = object()  # the transaction of a connection with autocommit off


def _transaction_of(conn: Any) -> object:
    """What identifies the connection's open transaction (None: none is open).

    The outermost atomic block: a test case opens a new one for each test (and
    one per class, around ``setUpTestData``), so a write of one test does not
    keep the next test's reads on the primary.
    """
    if conn.connection is None:
        return None
    if conn.in_atomic_block:
        return conn.atomic_blocks[0]
    return None if conn.autocommit else _MANUAL


def _in_own_transaction(conn: Any) -> bool:
    """A transaction the application opened: ``TestCase`` wraps every test in an
    atomic block of its own, which must not send every read to the primary."""
    if conn.connection is None:
        return False
    if conn.in_atomic_block:
        return not all(getattr(block, "_from_testcase", False) for block in conn.atomic_blocks)
    return not conn.autocommit


def _capture(alias: str) -> None:
    """One round trip: the primary's WAL insert position, at or past every commit
    made so far; the current scope's token advances to it."""
    conn = connections[alias]
    if _in_own_transaction(conn) or conn.needs_rollback:
        return  # the write has not committed: it cannot have a position yet
    try:
        conn.ensure_connection()
        # The driver's own cursor: no execute wrappers (ours would note the query).
        with conn.wrap_database_errors, conn.connection.cursor() as cursor:
            cursor.execute(POSITION_SQL)
            row = cursor.fetchone()
    except DatabaseError as exc:
        log.warning("could not learn the position of a write on %s: %s", alias, exc)
        return
    position = row[0] if row else None
    process = _current()
    if process is not None:
        process.cluster.record_write(position)
    elif position is not None:  # before the cluster opened (a migration): any cluster's
        current_scope().advance(Token(parse_lsn(position)))


def _served(process: _Process, alias: str, conn: Any) -> None:
    """Monotonic reads: a read ran on this (replica) alias; no later read of the scope
    may go back before where its node stands now. One tiny query after the read, on
    the driver's own cursor (no execute wrappers; in ``cluster.using()`` as the
    statements are), only with ``monotonic_reads``; a failed measurement leaves the
    floor as it was."""
    cluster = process.cluster
    hung = nullcontext() if alias in process.mirrors else cluster.using(alias, conn.connection)
    try:
        with hung, conn.wrap_database_errors, conn.connection.cursor() as cursor:
            cursor.execute(NODE_POSITION_SQL)
            row = cursor.fetchone()
    except DatabaseError:
        return
    cluster.record_read(row[0] if row else None)


def _committed(alias: str) -> None:
    """A write on ``alias`` (the primary) committed."""
    request = _REQUEST.get()
    if request is not None:
        request.wrote_on = alias  # captured once, when the response leaves
    else:
        _capture(alias)


# -- the execute wrapper ----------------------------------------------------------------


def _signer() -> signing.Signer:
    """Django's cookie signer (``SECRET_KEY``, with its fallbacks), our salt."""
    return signing.get_cookie_signer(salt=_SIGNING_SALT)


def _writes(classify: Callable[[str], Intent], sql: Any) -> bool:
    """Whether a statement may write: unless the classifier proves it a read
    (``psycopg.sql`` objects and bytes are not looked into)."""
    return not isinstance(sql, str) or classify(sql) is Intent.WRITE


def _refused_as_write(exc: BaseException) -> bool:
    cause = exc.__cause__
    code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return code == _READ_ONLY_SQLSTATE


class _Guard:
    """The execute wrapper on one cluster alias's connection (one per thread's
    ``DatabaseWrapper``): notes writes on the primary, moves them off replicas."""

    __slots__ = ("_hooked", "alias", "open_write")

    def __init__(self, alias: str) -> None:
        self.alias = alias
        # The transaction a write ran in (see _transaction_of), while it may be open.
        self.open_write: object = None
        self._hooked: object = None  # the on_commit list our callback waits in

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: Any,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        # Never opens the cluster: statements run while the test runner makes the
        # test databases, before the aliases point where they will.
        process = _current()
        hung: AbstractContextManager[None] = _NOT_A_NODE
        if process is not None:
            cluster = process.cluster
            primary, classify = process.primary(), cluster.classifier.classify
            if self.alias not in process.mirrors:
                # A node of the cluster: while the statement runs, its connection is one
                # the monitor abandons if the node hangs (SIGSTOP, a stalled host): its
                # socket is shut down and the statement fails within the bound (design
                # rule 10), as the cluster's own connections do, instead of waiting for
                # the node to wake up. A context manager, not a wrapper made per statement.
                hung = cluster.using(self.alias, context["connection"].connection)
        else:
            primary, classify = _settings().primary, default_classify
        with hung:
            if self.alias != primary:
                if _writes(classify, sql):
                    return self._on_primary(primary, sql, params, many, context)
                try:
                    result = execute(sql, params, many, context)
                except DatabaseError as exc:
                    if not _refused_as_write(exc):
                        raise
                    return self._on_primary(primary, sql, params, many, context, refused=exc)
                if process is not None and process.cluster.monotonic_reads:
                    _served(process, self.alias, context["connection"])
                return result
            result = execute(sql, params, many, context)
            if _writes(classify, sql):
                self.wrote(context["connection"])
            return result

    def wrote(self, conn: Any) -> None:
        """A write ran on this (primary) connection: it counts once it commits."""
        if not _in_transaction(conn):
            _committed(self.alias)
            return
        self.open_write = _transaction_of(conn)
        if not _in_own_transaction(conn):
            # A test case's transaction never commits: its test reads the write
            # from here (open_write), and its requests hand a token on as if.
            _committed(self.alias)
            return
        # Once per transaction: Django replaces ``run_on_commit`` with a new
        # list whenever it runs or drops the pending callbacks.
        if conn.in_atomic_block and self._hooked is not conn.run_on_commit:
            alias = self.alias
            conn.on_commit(lambda: _committed(alias))
            self._hooked = conn.run_on_commit

    def _on_primary(
        self,
        primary: str,
        sql: Any,
        params: Any,
        many: bool,
        context: dict[str, Any],
        *,
        refused: BaseException | None = None,
    ) -> Any:
        """Run a write that reached this replica alias on the primary; the caller
        reads its results (``RETURNING``) from the same cursor object."""
        if _in_own_transaction(context["connection"]):
            raise ReplicaWriteError(
                f"a write reached database {self.alias!r} inside a transaction opened on it "
                f"and cannot move to the primary {primary!r}: open the transaction on "
                f"the primary instead"
            ) from refused
        wrapper = context["cursor"]
        primary_conn = connections[primary]
        primary_cursor = primary_conn.cursor()
        if many:
            primary_cursor.executemany(sql, params)
        else:
            primary_cursor.execute(sql, params)
        if refused is not None:  # the server said it writes; the classifier did not
            guard = _install(primary_conn)
            if guard is not None:
                guard.wrote(primary_conn)
        # Django has no seam to re-point a cursor: its wrapper reads rows, rowcount
        # and description from ``.cursor``, so that becomes the primary's.
        wrapper.cursor.close()
        wrapper.cursor = primary_cursor.cursor
        return None


def _install(conn: Any) -> _Guard | None:
    """The alias's guard on this connection, installed if it is missing."""
    config = _settings()
    if conn.alias not in config.aliases:
        return None
    for wrapper in conn.execute_wrappers:
        if isinstance(wrapper, _Guard):
            return wrapper
    guard = _Guard(conn.alias)
    conn.execute_wrappers.insert(0, guard)  # outermost: sees the statement first
    return guard


def _connection_created(*, connection: Any, **kwargs: Any) -> None:
    if getattr(settings, _SETTING, None) is None:
        return
    if connection.alias == NO_DB_ALIAS:
        # Django is about to create or drop a database (the test runner's test
        # databases): the cluster's own connections to it would block DROP
        # DATABASE, and its DSNs name the databases of before. Start afresh.
        _close()
        return
    _install(connection)


connection_created.connect(_connection_created, dispatch_uid="replica_router.django.guard")


def _close_ended_connections(**kwargs: Any) -> None:
    """``request_started``: close an alias's kept connection (``CONN_MAX_AGE``) whose
    server ended it while it sat idle (a restart, a terminated backend: its socket is
    readable), as Django's ``close_old_connections`` closes an unusable one, so that
    the request's first statement connects afresh instead of failing unsent (design
    rule 9). One socket poll per open alias, no round trip (``CONN_HEALTH_CHECKS``
    sends a query); a connection in a transaction block is left to its owner."""
    if getattr(settings, _SETTING, None) is None:
        return
    aliases = _settings().aliases
    for conn in connections.all(initialized_only=True):
        raw = conn.connection
        if raw is None or conn.alias not in aliases or conn.in_atomic_block:
            continue
        if raw.closed or socket_hung_up(raw):
            conn.close()


request_started.connect(_close_ended_connections, dispatch_uid="replica_router.django.ended")


# -- the router -------------------------------------------------------------------------


class ReplicaRouter:
    """Django database router: reads to a replica that has what they must see,
    writes to the measured primary (``DATABASE_ROUTERS`` entry)."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        process = _state()
        primary = process.primary()
        if _USE_PRIMARY.get():
            return primary
        conn = connections[primary]
        guard = _install(conn)
        if _in_own_transaction(conn):
            return primary
        if guard is not None and guard.open_write is not None:
            if _transaction_of(conn) is guard.open_write:
                return primary  # a test case's transaction: its writes are only there
            if guard.open_write is _MANUAL:  # set_autocommit(False) ... commit(): no hook
                _committed(primary)  # says whether it committed: count it as if
            guard.open_write = None
        request = _REQUEST.get()
        if request is not None and request.wrote_on is not None:
            return primary  # its position is learned once, at the end of the request
        target = process.cluster.route_read(prefer=request.replica if request else None)
        if target == primary:
            if process.mirrors:
                return process.mirrors[next(process.turn) % len(process.mirrors)]
            return primary
        if request is not None:
            request.replica = target
        return target

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        process = _state()
        primary = process.cluster.topology.primary
        if primary is not None:
            return primary
        try:  # none measured now: wait up to OPTIONS["write_timeout"] for one
            return process.cluster.route_write()
        except PrimaryUnavailable:
            return process.config.primary  # Django's own connection error tells the rest

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        aliases = _settings().aliases
        if obj1._state.db in aliases and obj2._state.db in aliases:
            return True
        return None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        config = _settings()
        if db not in config.aliases:
            return None
        process = _current()
        return db == (process.primary() if process is not None else config.primary)


# -- the middleware ---------------------------------------------------------------------


class ConsistencyMiddleware:
    """Read-your-writes across requests: the token travels in a cookie and/or a
    header (``MIDDLEWARE`` entry; sync and async).

    Each request is its own unit of work: a fresh consistency scope seeded with
    the token the client sent back, nothing inherited from the worker thread and
    nothing handed back to it. When the request wrote, the response carries the
    new token. ``REPLICA_ROUTER["TOKEN"]`` takes the cookie and header settings
    of the ASGI/WSGI middlewares (``cookie_name``, ``header_name``, ``secure``,
    ``httponly``, ``samesite``, ``max_age``, ``path``, ``use_cookie``,
    ``use_header``) and ``signed=True`` to sign the cookie with Django's signing
    (``SECRET_KEY``).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        options = dict(_settings().token)
        self.signed = bool(options.pop("signed", False))
        try:
            self.transport = TokenTransport(**options)
        except ConfigurationError as exc:
            raise ImproperlyConfigured(f"{_SETTING}['TOKEN']: {exc}") from None
        self._meta_key = "HTTP_" + self.transport.header_name.upper().replace("-", "_")

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        cluster = (_current() or _start()).cluster
        incoming = self._incoming(request)
        state = _Request()
        reset = _REQUEST.set(state)
        try:
            if incoming.token is None:
                # Most requests: the plain independent scope enter_scope would open
                # through cluster.session, without that layer's work (no token to
                # check, no user to look up) nor an ExitStack.
                with consistency.session(inherit=False) as scope:
                    response = self.get_response(request)
                    self._finish(request, response, incoming, scope, state=state, cluster=cluster)
                    return response
            with ExitStack() as stack:
                scope, incoming = enter_scope(stack, cluster, incoming)
                response = self.get_response(request)
                self._finish(request, response, incoming, scope, state=state, cluster=cluster)
                return response
        finally:
            _REQUEST.reset(reset)

    async def __acall__(self, request: HttpRequest) -> Any:
        process = _current()
        if process is not None:
            cluster = process.cluster
        else:  # the first request: opening the cluster waits for a probe round
            cluster = await sync_to_async(get_cluster, thread_sensitive=False)()
        incoming = self._incoming(request)
        state = _Request()
        reset = _REQUEST.set(state)
        try:
            with ExitStack() as stack:
                if incoming.token is None:  # as in __call__
                    scope = stack.enter_context(consistency.session(inherit=False))
                else:
                    scope, incoming = enter_scope(stack, cluster, incoming)
                response = await self.get_response(request)
                if state.wrote_on is not None:  # a query: in a thread
                    await sync_to_async(_capture)(state.wrote_on)
                    state.wrote_on = None
                self._finish(request, response, incoming, scope, state=state, cluster=cluster)
                return response
        finally:
            _REQUEST.reset(reset)

    def _incoming(self, request: HttpRequest) -> Incoming:
        transport = self.transport
        header = request.META.get(self._meta_key)
        if not self.signed:
            return transport.incoming(header, request.META.get("HTTP_COOKIE"))
        incoming = transport.incoming(header, None)
        value = request.COOKIES.get(transport.cookie_name) if transport.use_cookie else None
        if incoming.token is not None or value is None:
            return incoming
        try:
            return Incoming(Token.parse(_signer().unsign(value)), from_cookie=True)
        except (signing.BadSignature, TokenError) as exc:
            log.warning("ignoring a consistency token cookie that fails its check: %s", exc)
            return Incoming(None, clear_cookie=True)

    def _finish(
        self,
        request: HttpRequest,
        response: HttpResponseBase,
        incoming: Incoming,
        scope: Scope,
        *,
        state: _Request,
        cluster: Cluster,
    ) -> None:
        """Learn the position of the request's writes, and hand the token on."""
        if state.wrote_on is not None:
            _capture(state.wrote_on)
            state.wrote_on = None
        transport = self.transport
        token = scope.token_for(cluster.system_identifier)
        if token is None or token == incoming.token:
            if incoming.clear_cookie:
                response.delete_cookie(transport.cookie_name, path=transport.path)
            return
        text = str(token)
        if transport.use_cookie:
            # Secure when the request came over https, as Django's SECURE_PROXY_SSL_HEADER
            # says (asked only when a cookie goes out: most responses carry none).
            incoming = replace(incoming, https=request.is_secure())
            value = _signer().sign(text) if self.signed else text
            response.set_cookie(
                transport.cookie_name,
                value,
                max_age=transport.max_age,
                path=transport.path,
                secure=transport.cookie_is_secure(incoming),
                httponly=transport.httponly,
                samesite=transport.samesite,
            )
        if transport.use_header:
            response[transport.header_name] = text
