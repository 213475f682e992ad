"""What both clusters share: settings, scopes, counters, and the rules they apply.

Decides nothing about where a read goes (that is :mod:`routing`) and does no
database I/O: :class:`ClusterBase` validates the settings once, builds the
cluster's :class:`~replica_router.routing.ReadRules`, keeps the counters and the
per-user marks, turns a commit into a scope update (:meth:`ClusterBase._note_write`)
and builds the errors a failed read or write raises. The shells,
:mod:`cluster_async` (``AsyncCluster``) and its generated sync twin :mod:`cluster`
(``Cluster``), own the pools and the monitor and carry out the I/O.

Seams the shells and the routed connections use (stable within the package):

* ``_plan_read(topology, max_lag, max_lag_bytes, max_staleness) -> ReadPlan``: what
  a read needs now (settings + the scope's mark); ``_rules.decide(...)`` where it goes.
* ``_note_write(position)`` / ``_raise_floor(position)``: advance the current scope
  (a commit at ``position``; data read as of ``position`` with monotonic reads).
* ``_count_route(intent, node)`` / ``_count_fallback(reason, node)``: count a route
  served without a checkout of ours (the routed connection's held links).
* ``_node_failed(attempt, exc)``: a node failed a read's checkout; suspect it if its
  connection broke, and leave it out of the read's next steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar, cast

from psycopg.conninfo import make_conninfo

from . import consistency
from .classify import Classifier
from .consistency import _EMPTY as _EMPTY_MARK
from .consistency import Mark, Scope, Token, current_scope
from .dsn import check_distinct, parse_dsn, password_of, scrub, split_hosts
from .errors import (
    ConfigurationError,
    Error,
    NodeUnavailable,
    NoReplicaAvailable,
    PrimaryUnavailable,
    TokenError,
)
from .events import ConsistencyFallback, EventBus, RouteDecision
from .failover import Promoter
from .lsn import format_lsn, parse_lsn
from .monitor import Monitor, Timelines
from .policy import Policy, make_policy
from .routing import ReadAttempt, ReadPlan, ReadRules, ReadStep, check_seconds, route_write
from .sources import Purpose, connection_kwargs, shut_down_socket, validate_pool_kwargs
from .topology import NodeSpec, NodeState, NodeStatus, Role, Topology

__all__ = ["ClusterBase", "Counters", "Lease", "NodeUnavailableError", "node_status"]

log = logging.getLogger("replica_router.cluster")

_FALLBACKS = ("primary", "wait", "error")
_READ_YOUR_WRITES = ("lsn", "window", None)
CHECKOUT_SLICE = 0.1  # waiting on a pool, re-check this often whether the node is still up
# A checkout goes through at most this many pooled connections found dead (a restart
# kills them all at once) before it counts the node as failing.
DEAD_POOLED_RETRIES = 32
_USER_MARKS = 10_000  # users remembered for session(user_id=...)
REPLAY_SQL = "SELECT pg_last_wal_replay_lsn()"
_NAME_RE = re.compile(r"[^\s\x00-\x1f]{1,100}")
_URL_START = re.compile(r",\s*(?=postgres(?:ql)?://)", re.IGNORECASE)

C = TypeVar("C")
_Self = TypeVar("_Self", bound="ClusterBase")


def died_while_pooled(conn: Any, fresh_after: float) -> bool:
    """A connection that failed its checkout check was lost while it sat in the pool
    (design rule 9): the check found it closed (the server went away or ended the
    backend: nothing the user sent ever reached it), and it was connected before
    ``fresh_after`` (the checkout's start, then the last such loss it found), so the
    failure says nothing about the node now. Try the next one; only a connection made
    since that fails too counts against the node. A source
    whose connections carry no connect time (``psycopg_pool`` sets ``_created_at``)
    counts every one as old: its retries are bounded by ``DEAD_POOLED_RETRIES``. Our
    pools' connections say when their connect began (``connect_started``), which is
    what counts: one begun before the loss may have been hit by it, whenever the pool
    saw its handshake end."""
    if not getattr(conn, "broken", False):
        return False  # an error from a live server: the node answered
    created = getattr(conn, "connect_started", None)
    if not isinstance(created, float):
        created = getattr(conn, "_created_at", None)
    return not isinstance(created, float) or created < fresh_after


class NodeUnavailableError(Exception):
    """A connection to ``node`` could not be checked out (internal; callers retry)."""

    def __init__(self, node: str, message: str, *, broken: bool) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node
        self.message = message
        self.broken = broken  # a pooled connection failed its check: the node looks down


@dataclass(frozen=True, slots=True)
class Counters:
    """Plain-int counters since the cluster was made (a frozen snapshot)."""

    reads: Mapping[str, int]
    writes: Mapping[str, int]
    failovers: int
    fenced_events: int
    fallbacks: Mapping[str, int]


class Lease(Generic[C]):
    """A checked-out connection and where it came from (see the module's seams)."""

    __slots__ = ("conn", "node", "position", "purpose", "source")

    def __init__(self, conn: C, node: str, purpose: Purpose, source: Any) -> None:
        self.conn = conn
        self.node = node
        self.purpose = purpose
        self.source = source
        self.position: int | None = None  # replay position measured at checkout, if any

    def __repr__(self) -> str:
        return f"<Lease {self.purpose} {self.node}>"


class _UserMarks:
    """Each user's last write (``session(user_id=...)``), the most recent users only."""

    def __init__(self, capacity: int = _USER_MARKS) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._marks: OrderedDict[str, Mark] = OrderedDict()

    def get(self, user_id: str) -> Mark | None:
        with self._lock:
            return self._marks.get(user_id)

    def record(self, user_id: str, mark: Mark) -> None:
        with self._lock:
            old = self._marks.pop(user_id, None)
            self._marks[user_id] = mark if old is None else old.merged(mark)
            while len(self._marks) > self._capacity:
                self._marks.popitem(last=False)


def _check_seconds(field: str, value: object, *, allow_none: bool = False) -> float | None:
    return None if value is None and allow_none else check_seconds(field, value)


def _check_name(field: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"{field}: a node name is 1-100 characters without spaces, got {name!r}"
        )
    return name


def _has_primary(topology: Topology) -> bool:
    return route_write(topology) is not None


def _build_specs(
    primary: str | None,
    replicas: Sequence[str] | Mapping[str, str],
    nodes: Mapping[str, str] | None,
    primary_name: str,
) -> list[NodeSpec]:
    specs: list[NodeSpec] = []
    fields: list[str] = []  # where each spec was given, for errors
    if nodes is not None:
        if primary is not None or replicas:
            raise ConfigurationError("nodes: give either nodes= or primary=/replicas=, not both")
        if not isinstance(nodes, Mapping) or not nodes:
            raise ConfigurationError("nodes: expected a non-empty mapping of name -> DSN")
        for name, dsn in nodes.items():
            field = f"nodes[{name!r}]"
            specs.append(NodeSpec(_check_name(field, name), dsn, parse_dsn(dsn, field=field)))
            fields.append(field)
    else:
        if primary is None:
            raise ConfigurationError(
                "primary: a DSN is required (or use nodes=, Cluster.from_url, Cluster.from_env)"
            )
        name = _check_name("primary_name", primary_name)
        specs.append(NodeSpec(name, primary, parse_dsn(primary, field="primary"), Role.PRIMARY))
        fields.append("primary")
        if isinstance(replicas, str):
            raise ConfigurationError("replicas: expected a list of DSNs, got one string")
        if isinstance(replicas, Mapping):
            named = [(f"replicas[{n!r}]", _check_name(f"replicas[{n!r}]", n), d)
                     for n, d in replicas.items()]  # fmt: skip
        else:
            named = [(f"replicas[{i}]", f"replica{i + 1}", d) for i, d in enumerate(replicas)]
        for field, name, dsn in named:
            specs.append(NodeSpec(name, dsn, parse_dsn(dsn, field=field), Role.REPLICA))
            fields.append(field)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigurationError(f"node name {spec.name!r} is used twice")
        seen.add(spec.name)
    check_distinct([(field, s.dsn, s.info) for field, s in zip(fields, specs, strict=True)])
    return specs


def node_status(
    spec: NodeSpec,
    state: NodeState | None,
    *,
    error: str | None,
    in_use: int = 0,
    reads: int = 0,
    writes: int = 0,
) -> NodeStatus:
    """The display-safe status row of one node (``error`` must already be redacted)."""
    state = state or NodeState(name=spec.name)
    return NodeStatus(
        name=spec.name,
        host=spec.info.host,
        port=spec.info.port,
        role=str(state.role),
        healthy=state.healthy,
        lag_seconds=state.lag_seconds,
        lag_bytes=state.lag_bytes,
        replay_lsn=None if state.position is None else format_lsn(state.position),
        latency_ms=state.latency_ms,
        last_error=error,
        timeline=state.timeline,
        fenced=state.fenced,
        configured_role=str(spec.role),
        in_use=in_use,
        reads=reads,
        writes=writes,
    )


class _InUse:
    """``cluster.using(node, conn)``: ``conn`` is among ``node``'s connections out of
    their pools (the ones :meth:`ClusterBase._abandon` shuts down) for the block."""

    __slots__ = ("_added", "_cluster", "_conn", "_node")

    def __init__(self, cluster: ClusterBase, node: str, conn: Any) -> None:
        self._cluster = cluster
        self._node = node
        self._conn = conn
        self._added: set[Any] | None = None  # the set it was added to (per statement: lean)

    def __enter__(self) -> None:
        out = self._cluster._out.get(self._node)
        if out is None:
            out = self._first_use()
        conn = self._conn
        if conn not in out:  # nested: the outermost block takes it out again
            out.add(conn)
            self._added = out

    def __exit__(self, *exc_info: object) -> None:
        out = self._added
        if out is not None:
            self._added = None
            out.discard(self._conn)

    def _first_use(self) -> set[Any]:
        cluster, node = self._cluster, self._node
        if node not in cluster.node_names:
            raise ConfigurationError(
                f"using: no node named {node!r} (nodes: {', '.join(cluster.node_names)})"
            )
        return cluster._out.setdefault(node, set())


class ClusterBase:
    """Settings, scope bookkeeping and counters shared by both clusters (no I/O)."""

    _monitor: Monitor | None
    _lock_type: Callable[[], Any]  # the shell's lock: threading.Lock or asyncio.Lock

    def __init__(
        self,
        primary: str | None = None,
        replicas: Sequence[str] | Mapping[str, str] = (),
        *,
        nodes: Mapping[str, str] | None = None,
        primary_name: str = "primary",
        policy: str | Policy = "round_robin",
        weights: Mapping[str, float] | None = None,
        max_lag: float | None = 2.0,
        max_lag_bytes: int | None = None,
        read_your_writes: Literal["lsn", "window"] | None = "lsn",
        window: float = 5.0,
        monotonic_reads: bool = False,
        fallback: Literal["primary", "wait", "error"] = "primary",
        consistency_timeout: float = 1.0,
        failover: Literal["follow", "promote"] = "follow",
        repoint_replicas: bool = True,
        replication_addresses: Mapping[str, str] | None = None,
        failure_threshold: int = 2,
        monitor_interval: float = 0.5,
        connect_timeout: float = 2.0,
        probe_timeout: float = 1.0,
        write_timeout: float | None = None,
        checkout_timeout: float = 10.0,
        pool_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        connect_kwargs: Mapping[str, Any] | None = None,
        sources: Any = None,
        events: EventBus | None = None,
        read_only_functions: Iterable[str] = (),
        write_functions: Iterable[str] = (),
    ) -> None:
        self._specs: tuple[NodeSpec, ...] = tuple(
            _build_specs(primary, replicas, nodes, primary_name)
        )
        self._policy = make_policy(policy, weights=weights)
        self._max_lag = _check_seconds("max_lag", max_lag, allow_none=True)
        if max_lag_bytes is not None and (
            isinstance(max_lag_bytes, bool)
            or not isinstance(max_lag_bytes, int)
            or max_lag_bytes < 0
        ):
            raise ConfigurationError(f"max_lag_bytes: expected bytes >= 0, got {max_lag_bytes!r}")
        self._max_lag_bytes = max_lag_bytes
        if read_your_writes not in _READ_YOUR_WRITES:
            raise ConfigurationError(
                f"read_your_writes: expected 'lsn', 'window' or None, got {read_your_writes!r}"
            )
        self._ryw = read_your_writes
        self._window = cast(float, _check_seconds("window", window))
        self._monotonic = bool(monotonic_reads)
        if fallback not in _FALLBACKS:
            raise ConfigurationError(
                f"fallback: expected 'primary', 'wait' or 'error', got {fallback!r}"
            )
        self._fallback = fallback
        self._consistency_timeout = cast(
            float, _check_seconds("consistency_timeout", consistency_timeout)
        )
        if failover not in ("follow", "promote"):
            raise ConfigurationError(f"failover: expected 'follow' or 'promote', got {failover!r}")
        self._failover = failover
        unknown = set(replication_addresses or ()) - {s.name for s in self._specs}
        if unknown:
            raise ConfigurationError(
                f"replication_addresses: no node named {', '.join(map(repr, sorted(unknown)))}"
            )
        self._promoter_options: dict[str, Any] = {
            "repoint_replicas": bool(repoint_replicas),
            "replication_addresses": dict(replication_addresses or {}),
        }
        Promoter(**self._promoter_options)  # validates the addresses; starts nothing
        self._failure_threshold = failure_threshold
        self._interval = monitor_interval
        self._connect_timeout = cast(float, _check_seconds("connect_timeout", connect_timeout))
        self._probe_timeout = probe_timeout
        self._write_timeout = _check_seconds("write_timeout", write_timeout, allow_none=True)
        self._checkout_timeout = cast(float, _check_seconds("checkout_timeout", checkout_timeout))
        if self._checkout_timeout <= 0:
            raise ConfigurationError("checkout_timeout: expected seconds > 0")
        self._pool_kwargs = validate_pool_kwargs(pool_kwargs)
        self._connect_kwargs = dict(connect_kwargs or {})
        self._source_factory = sources
        self.events = events if events is not None else EventBus()
        # Monitor settings are validated by the Monitor itself; build one now
        # (it starts nothing) so a bad interval fails here, not at open().
        Monitor(
            (),
            interval=monitor_interval,
            failure_threshold=failure_threshold,
            connect_timeout=connect_timeout,
            probe_timeout=probe_timeout,
            events=self.events,
        )

        self._monitor = None
        self._forked = False  # forgotten in a forked child (see _fork)
        # Failovers and fencings seen by monitors of earlier open() periods, so the
        # counters stay monotonic across close()/open() (Prometheus needs that).
        self._past_failovers = 0
        self._past_fenced_events = 0
        self._timelines = Timelines()  # outlives each open(): an old primary stays fenced
        self._system_id: int | None = None
        self._secrets = {s.name: p for s in self._specs if (p := password_of(s.dsn))}
        self._config_lock = self._lock_type()  # threading.Lock or asyncio.Lock
        self._count_lock = threading.Lock()
        self._in_use: dict[str, int] = {}
        self._out: dict[str, set[Any]] = {}  # node -> our connections out of its pool
        self._abandoned: weakref.WeakSet[Any] = weakref.WeakSet()  # by _abandon
        self._reads: dict[str, int] = {}
        self._writes: dict[str, int] = {}
        self._fallback_counts: dict[str, int] = {}
        self._route_seq = 0
        self._user_marks = _UserMarks()
        self._rules = ReadRules(
            self._policy,
            self.in_use,
            max_lag=self._max_lag,
            max_lag_bytes=self._max_lag_bytes,
            read_your_writes=read_your_writes,
            window=self._window,
            monotonic=self._monotonic,
            fallback=fallback,
            consistency_timeout=self._consistency_timeout,
        )
        self._tracks_scope = self._rules.tracks_scope
        # Classifies the RoutedConnection's statements; learns volatility once per open.
        self.classifier = Classifier(
            read_only_functions=read_only_functions, write_functions=write_functions
        )
        self._functions_learned = False

    # -- construction from URLs and the environment ----------------------------------

    @classmethod
    def from_url(cls: type[_Self], url: str, **kwargs: Any) -> _Self:
        """A cluster from a libpq multi-host URL; each host's role is measured, not assumed.

        ``postgresql://user@h1:5432,h2:5432,h3:5432/app``: nodes are named
        ``host:port`` (``"h1:5432"``), stable across restarts and readable in
        status tables and metrics. Whichever host reports itself primary takes
        the writes, wherever it sits in the list.
        """
        dsns = split_hosts(url, field="url")
        nodes: dict[str, str] = {}
        for i, dsn in enumerate(dsns):
            info = parse_dsn(dsn, field=f"url host {i + 1}")
            if info.address in nodes:
                raise ConfigurationError(f"url: host {info.address} is listed twice")
            nodes[info.address] = dsn
        return cls(nodes=nodes, **kwargs)

    @classmethod
    def from_env(
        cls: type[_Self], environ: Mapping[str, str] | None = None, **kwargs: Any
    ) -> _Self:
        """``DATABASE_URL`` (the primary) plus ``DATABASE_REPLICA_URLS`` (comma-separated).

        Without ``DATABASE_REPLICA_URLS``, a multi-host ``DATABASE_URL`` is read
        as by :meth:`from_url`; set it to an empty string for no replicas.
        """
        env = os.environ if environ is None else environ
        url = (env.get("DATABASE_URL") or "").strip()
        if not url:
            raise ConfigurationError(
                "DATABASE_URL is not set: set it to the primary's URL "
                "(postgresql://user:password@host:5432/dbname)"
            )
        text = env.get("DATABASE_REPLICA_URLS")
        if text is None:
            if len(split_hosts(url, field="DATABASE_URL")) > 1:
                return cls.from_url(url, **kwargs)
            raise ConfigurationError(
                "DATABASE_REPLICA_URLS is not set: set it to the replicas' URLs separated by "
                "commas (an empty value means no replicas), or make DATABASE_URL a multi-host URL"
            )
        parse_dsn(url, field="DATABASE_URL")
        replicas = [u.strip() for u in _URL_START.split(text) if u.strip()]
        for i, dsn in enumerate(replicas):
            parse_dsn(dsn, field=f"DATABASE_REPLICA_URLS[{i}]")
        return cls(url, replicas, **kwargs)

    # -- observability ---------------------------------------------------------------

    @property
    def monitor(self) -> Monitor | None:
        return self._monitor

    @property
    def topology(self) -> Topology:
        """The monitor's current snapshot (every node unknown before ``open()``)."""
        monitor = self._monitor
        if monitor is not None:
            return monitor.topology
        return Topology(nodes=tuple(NodeState(name=s.name) for s in self._specs), primary=None)

    @property
    def system_identifier(self) -> int | None:
        """The cluster's ``system_identifier`` once a node has been probed."""
        if self._system_id is None:
            self._system_id = self._find_system_id(self.topology)
        return self._system_id

    @staticmethod
    def _find_system_id(topology: Topology) -> int | None:
        primary = topology.primary_state
        if primary is not None and primary.system_identifier is not None:
            return primary.system_identifier
        for node in topology.nodes:
            if node.system_identifier is not None and not node.fenced:
                return node.system_identifier
        return None

    @property
    def node_names(self) -> list[str]:
        return [s.name for s in self._specs]

    def in_use(self, name: str) -> int:
        """Connections to ``name`` checked out right now (the ``least_busy`` policy's input)."""
        return self._in_use.get(name, 0)

    @property
    def read_your_writes(self) -> Literal["lsn", "window"] | None:
        """The read-your-writes mode: ``"lsn"`` (commits' WAL positions are the token),
        ``"window"`` (a time after each write) or None (off: no position is read)."""
        return self._ryw

    @property
    def monotonic_reads(self) -> bool:
        """Whether reads of a scope never go back in time (see :meth:`record_read`)."""
        return self._monotonic

    def using(self, node: str, conn: Any) -> AbstractContextManager[None]:
        """While the block runs, ``conn`` (a connection of yours to ``node``: psycopg 3,
        sync or asyncio, psycopg2, or its socket descriptor) is one the monitor
        abandons with the cluster's own if ``node`` stops answering (design rule 10):
        its socket is shut down, so the statement in flight there fails with a
        connectivity error within the monitor's bound instead of waiting for the
        node to wake up. Wrap each statement (or a held lease) you run on a node.
        No I/O; nestable; a plain ``with`` on ``AsyncCluster`` too. Connections from
        :meth:`checkout` are covered until :meth:`checkin` without it.
        """
        return _InUse(self, node, conn)

    def note_in_use(self, node: str, change: int) -> None:
        """Count connections to ``node`` an integration holds outside the cluster's pools
        (``+1`` when it takes one, ``-1`` when it gives it back), so that ``in_use()``,
        the ``least_busy`` policy and ``status()`` see them."""
        with self._count_lock:
            self._in_use[node] = self._in_use.get(node, 0) + change

    def conninfo(self, node: str, purpose: Purpose = "read") -> str:
        """The libpq connection string for an integration's own connection to ``node``.

        The node's DSN plus what the cluster's own connections get: the cluster's
        ``connect_timeout`` and, for ``"read"``, a read-only session (a write fails on
        every node, the primary included). It holds the password: never log it.
        Raises :class:`NodeUnavailable` for a node the cluster does not have.
        """
        try:
            spec = self._spec(node)
        except NodeUnavailableError as exc:
            raise NodeUnavailable(node, exc.message) from None
        params = connection_kwargs(spec, purpose, {}, self._connect_timeout)
        params.pop("autocommit", None)
        return make_conninfo(spec.dsn, **params)

    def _retire(self, monitor: Monitor) -> None:
        """Keep a stopped monitor's failover and fencing counts."""
        with self._count_lock:
            self._past_failovers += monitor.failovers
            self._past_fenced_events += monitor.fenced_events

    def counters(self) -> Counters:
        monitor = self._monitor
        with self._count_lock:
            return Counters(
                reads=MappingProxyType(dict(self._reads)),
                writes=MappingProxyType(dict(self._writes)),
                failovers=self._past_failovers + (monitor.failovers if monitor else 0),
                fenced_events=self._past_fenced_events + (monitor.fenced_events if monitor else 0),
                fallbacks=MappingProxyType(dict(self._fallback_counts)),
            )

    def status(self) -> list[NodeStatus]:
        """One display-safe row per configured node: role, health, lag, traffic."""
        topology = self.topology
        with self._count_lock:
            reads, writes, in_use = dict(self._reads), dict(self._writes), dict(self._in_use)
        rows = []
        for spec in self._specs:
            state = topology.by_name.get(spec.name)
            rows.append(
                node_status(
                    spec,
                    state,
                    error=self._scrub(spec.name, state.last_error if state else None),
                    in_use=in_use.get(spec.name, 0),
                    reads=reads.get(spec.name, 0),
                    writes=writes.get(spec.name, 0),
                )
            )
        return rows

    def _scrub(self, node: str, text: str | None) -> str | None:
        if text is None:
            return None
        return scrub(text, self._secrets.get(node))

    # -- consistency scopes ------------------------------------------------------------

    @property
    def token(self) -> Token | None:
        """The current scope's token for this cluster (hand it to the next request)."""
        return current_scope().token_for(self.system_identifier)

    @contextlib.contextmanager
    def session(
        self, token: Token | str | None = None, *, user_id: str | None = None, inherit: bool = True
    ) -> Iterator[Scope]:
        """A consistency scope for the block (nestable; see :func:`consistency.session`).

        A token of another cluster raises :class:`TokenError`: silently reading
        without it could show the user stale data, and using its LSN here would
        be meaningless. (The web middlewares catch that, log it and go on
        without a token.) ``user_id`` also remembers each user's last write
        across scopes, in this process, for the most recent 10,000 users
        (seed 004's sticky window, by user). ``inherit=False`` makes the block an
        independent unit of work (a request, a queued job): it starts empty and
        hands nothing back to the enclosing scope.
        """
        if isinstance(token, str):
            token = Token.parse(token)
        sysid = self.system_identifier
        if token is not None:
            if not token.belongs_to(sysid):
                raise TokenError(
                    f"the token belongs to another cluster (system identifier "
                    f"{token.system_id}, this cluster is {sysid})"
                )
            if token.system_id is None and sysid is not None:
                token = Token(token.lsn, sysid)
        with consistency.session(token, user_id=user_id, inherit=inherit) as scope:
            if scope.user_id is not None:
                mark = self._user_marks.get(scope.user_id)
                if mark is not None:
                    scope.merge_mark(sysid, mark)
            yield scope

    def _note_write(self, position: int | str | None) -> None:
        """A write transaction committed (at ``position`` if known): advance the scope.

        The one place the token and the window-mode clock advance; ``position`` is
        what the primary said (the commit's own round trip), never a guess.
        """
        if self._ryw is None:
            return
        if isinstance(position, str):
            position = parse_lsn(position)
        scope = current_scope()
        mark = Mark(position=position if self._ryw == "lsn" else None,
                    last_write_at=time.monotonic())  # fmt: skip
        sysid = self.system_identifier
        scope.merge_mark(sysid, mark)
        if scope.user_id is not None:
            self._user_marks.record(scope.user_id, mark)

    def record_write(self, position: int | str | None) -> None:
        """Tell the cluster the current scope committed a write on the primary.

        ``position`` is the commit's WAL position (an LSN as ``int`` or
        ``"16/B374D848"``) or None when unknown: window mode still works, and
        LSN mode keeps the token it had. Capture it in the commit's own round
        trip (``consistency.commit_and_capture``) so it is at or past the
        commit record. No I/O: a plain call on ``AsyncCluster`` too.
        """
        self._note_write(position)

    def record_read(self, position: int | str | None) -> None:
        """Tell the cluster the current scope read data as of ``position`` (its node's
        replay position, or the primary's insert position): with ``monotonic_reads``,
        no later read of the scope goes back before it. For integrations with their
        own connections; a no-op without ``monotonic_reads`` or with None. No I/O."""
        if self._monotonic and position is not None:
            self._raise_floor(parse_lsn(position) if isinstance(position, str) else position)

    def _raise_floor(self, position: int | None) -> None:
        if position is not None:
            current_scope().raise_floor(self.system_identifier, position)

    # -- read decisions (the rules are routing's; this supplies settings and scope) ---

    def _plan_read(
        self,
        topology: Topology,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> ReadPlan:
        mark = current_scope().mark(self.system_identifier) if self._tracks_scope else None
        if mark is _EMPTY_MARK:  # a scope that knows nothing yet (a fresh request's)
            mark = None
        if mark is None and max_lag is None and max_lag_bytes is None and max_staleness is None:
            return self._rules.plan(None, 0.0)  # the shared default: nothing to compute
        now = time.monotonic()
        return self._rules.plan(
            mark,
            now,
            max_lag=max_lag,
            max_lag_bytes=max_lag_bytes,
            max_staleness=max_staleness,
            snapshot_age=now - topology.taken_at,
        )

    def _replica_at_once(
        self, topology: Topology, plan: ReadPlan, prefer: str | None = None
    ) -> str | None:
        """The replica a read takes in the common case, in one decision: one within
        bounds (what the first step would say); None when the steps must decide (a
        fallback, a wait, an error)."""
        first = self._rules.decide(topology, plan, prefer=prefer)
        return first.target if first.fallback is None else None

    def _read_key(self) -> tuple[Topology, Mark | None]:
        """The snapshot and this cluster's mark in the current scope (identity-compared
        by routed connections to skip a decision when neither changed)."""
        topology = (self._monitor or self._require_monitor()).topology
        return topology, current_scope().mark(self.system_identifier)

    def _node_failed(self, attempt: ReadAttempt, exc: NodeUnavailableError) -> Topology:
        """``exc.node`` failed this read: suspect it if its connection broke, leave it
        out of the next steps; returns the snapshot to go on with."""
        monitor = self._require_monitor()
        if exc.broken:
            monitor.mark_suspect(exc.node, exc.message)
        attempt.failed(exc.node, str(exc))
        return monitor.topology

    def _served(self, node: str, reason: str | None) -> None:
        """A read found its node (its checkout counted the route): count the fallback,
        sample the event."""
        if reason is not None:
            self._count_fallback(reason, node)
        if self.events.active:
            self._route_event("read", node, reason or "replica")

    def _read_error(self, step: ReadStep) -> NoReplicaAvailable:
        """A read's last step failed: count the fallback that could not be served; with
        no healthy replica, the error says why each node is not."""
        self._count_fallback(step.reason or "none_healthy", None)
        error = cast(NoReplicaAvailable, step.error)
        causes = self._causes(self.topology) if step.reason in (None, "none_healthy") else ""
        return type(error)(f"{error}{causes}") if causes else error

    def _no_primary(self, topology: Topology, error: Exception | None) -> PrimaryUnavailable:
        detail = str(error) if error is not None else self._why_no_primary(topology)
        waited = f" within write_timeout={self._write_timeout:g} s" if self._write_timeout else ""
        return PrimaryUnavailable(f"no primary can take writes{waited}: {detail}")

    def _not_ready(self, topology: Topology, timeout: float) -> PrimaryUnavailable:
        """``open(wait=True)`` saw no primary measured within ``timeout`` seconds."""
        return PrimaryUnavailable(
            f"open(wait=True): no primary measured within {timeout:g} s: "
            + self._why_no_primary(topology)
        )

    def _why_no_primary(self, topology: Topology) -> str:
        state = topology.primary_state
        if state is not None and state.fenced:
            return f"{state.name} is fenced"
        if state is not None:
            return f"{state.name} is unhealthy ({self._scrub(state.name, state.last_error)})"
        claimants = [n.name for n in topology.nodes if n.role is Role.PRIMARY]
        if claimants:
            return f"{', '.join(claimants)} claim primary but none is usable"
        return "no node reports itself primary" + self._causes(topology)

    def _causes(self, topology: Topology) -> str:
        """Each node's last error, redacted: the exception says why, not only ``status()``."""
        causes = [f"{n.name}: {self._scrub(n.name, n.last_error)}"
                  for n in topology.nodes if n.last_error]  # fmt: skip
        return f"; last errors: {'; '.join(causes)}" if causes else ""

    # -- counting --------------------------------------------------------------------------

    def _track(self, node: str, conn: Any) -> None:
        """``conn`` left ``node``'s pool (checked, then leased) until :meth:`_untrack`.

        No lock: set.add/discard and tuple() of a set are atomic under the GIL, and
        the monitor thread only needs a snapshot (:meth:`_abandon`)."""
        out = self._out.get(node)
        if out is None:
            out = self._out.setdefault(node, set())
        out.add(conn)

    def _untrack(self, node: str, conn: Any) -> None:
        out = self._out.get(node)
        if out is not None:
            out.discard(conn)

    def _abandon(self, node: str) -> None:
        """``node`` took queries and never answered (design rule 10): every connection
        of ours there that is out of its pool gets an error now instead of waiting
        until the server wakes up; a read then moves on, a write fails."""
        abandoned = tuple(self._out.get(node, ()))
        for conn in abandoned:
            with contextlib.suppress(TypeError):  # an integration's descriptor (using())
                self._abandoned.add(conn)  # its error is the node's, not a stale pooled link
            shut_down_socket(conn)
        if abandoned:
            log.warning("%s does not answer: %d connection(s) in use there abandoned",
                        node, len(abandoned))  # fmt: skip

    def _count_out(self, node: str, routes: dict[str, int] | None) -> None:
        """A connection to ``node`` left its pool (and, with ``routes``, served a route)."""
        with self._count_lock:
            self._in_use[node] = self._in_use.get(node, 0) + 1
            if routes is not None:
                routes[node] = routes.get(node, 0) + 1

    def _count_in(self, node: str) -> None:
        with self._count_lock:
            self._in_use[node] = self._in_use.get(node, 0) - 1

    def _count_route(self, intent: Literal["read", "write"], node: str, reason: str = "") -> None:
        """Count a read or write served on ``node`` without a checkout of ours."""
        counts = self._reads if intent == "read" else self._writes
        with self._count_lock:
            counts[node] = counts.get(node, 0) + 1
        if self.events.active:
            self._route_event(intent, node, reason)

    def _route_event(self, intent: Literal["read", "write"], node: str, reason: str) -> None:
        """One ``RouteDecision`` per ``events.route_sample`` routes (callers check ``active``)."""
        self._route_seq += 1
        if self._route_seq % self.events.route_sample == 0:
            self.events.emit(RouteDecision(intent, node, reason or intent))

    def _count_fallback(self, reason: str, target: str | None) -> None:
        with self._count_lock:
            self._fallback_counts[reason] = self._fallback_counts.get(reason, 0) + 1
        if self.events.active and reason in ("lag", "token", "none_healthy"):
            self.events.emit(ConsistencyFallback(reason, target))  # type: ignore[arg-type]

    # -- configuration changes -------------------------------------------------------------

    def _new_replica_spec(self, dsn: str, name: str | None) -> NodeSpec:
        taken = {s.name for s in self._specs}
        if name is None:
            n = 1
            while f"replica{n}" in taken:
                n += 1
            name = f"replica{n}"
        name = _check_name("name", name)
        if name in taken:
            raise ConfigurationError(f"name: a node named {name!r} already exists")
        spec = NodeSpec(name, dsn, parse_dsn(dsn, field=f"add_replica({name!r})"), Role.REPLICA)
        check_distinct([*((repr(s.name), s.dsn, s.info) for s in self._specs),
                        (f"add_replica({name!r})", dsn, spec.info)])  # fmt: skip
        secret = password_of(dsn)
        if secret:
            self._secrets[name] = secret
        return spec

    def _spec_to_remove(self, name: str) -> NodeSpec:
        spec = next((s for s in self._specs if s.name == name), None)
        if spec is None:
            raise ConfigurationError(
                f"remove_replica: no node named {name!r} (nodes: {', '.join(self.node_names)})"
            )
        if self.topology.primary == name or (self._monitor is None and spec.role is Role.PRIMARY):
            raise ConfigurationError(f"remove_replica: {name!r} is the primary")
        return spec

    def _role_of(self, spec: NodeSpec) -> Role:
        state = self.topology.by_name.get(spec.name)
        return state.role if state is not None and state.role is not Role.UNKNOWN else spec.role

    def _spec(self, name: str) -> NodeSpec:
        for spec in self._specs:
            if spec.name == name:
                return spec
        raise NodeUnavailableError(name, "not configured (removed?)", broken=False)

    def _unavailable(self, node: str, exc: Exception, broken: bool = False) -> NodeUnavailableError:
        return NodeUnavailableError(node, self._scrub(node, str(exc).strip()) or "", broken=broken)

    def _routable(self, node: str, purpose: Purpose) -> bool:
        topology = self.topology
        if purpose == "write":
            return route_write(topology) == node
        state = topology.by_name.get(node)
        return state is not None and state.healthy and not state.fenced

    def _checkout_slice(
        self, node: str, purpose: Purpose, wait: float, deadline: float, give_up_when_down: bool
    ) -> float:
        """How long the next wait on the pool may be; raises when waiting is over."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NodeUnavailableError(node, f"no connection within {wait:g} s", broken=False)
        if give_up_when_down and not self._routable(node, purpose):
            raise NodeUnavailableError(
                node, "became unavailable while waiting for a connection", broken=False
            )
        return min(CHECKOUT_SLICE, remaining)

    def _known_position(self, lease: Lease[Any]) -> int | None:
        """The furthest position known for the lease's node without asking it."""
        state = self.topology.by_name.get(lease.node)
        known = state.position if state is not None else None
        return lease.position if known is None or (lease.position or 0) > known else known

    def _monitor_for(self, specs: Sequence[NodeSpec]) -> Monitor:
        promote = self._failover == "promote"
        return Monitor(
            specs,
            interval=self._interval,
            failure_threshold=self._failure_threshold,
            connect_timeout=self._connect_timeout,
            probe_timeout=self._probe_timeout,
            events=self.events,
            after_round=Promoter(**self._promoter_options) if promote else None,
            on_unanswered=self._abandon,
            timelines=self._timelines,
        )

    def _require_monitor(self) -> Monitor:
        monitor = self._monitor
        if monitor is None:
            forked = " (it was open before os.fork(): open it again in this process)"
            raise Error(
                f"{type(self).__name__} is not open: call open() or use it in a with block"
                + (forked if self._forked else "")
            )
        return monitor

    def _forget_after_fork(self) -> None:
        """In a child after ``os.fork()`` (see ``_fork``): drop the parent's monitor,
        pools and locks without closing anything (that would end the parent's
        sessions); the caller opens afresh."""
        self._config_lock = self._lock_type()
        self._count_lock = threading.Lock()
        self._in_use = {}
        self._out = {}
        self._monitor = None
        self._sources: dict[tuple[str, Purpose], Any] = {}
        self._forked = True

    def __repr__(self) -> str:
        state = "open" if self._monitor is not None else "closed"
        nodes = ", ".join(f"{s.name}={s.info.address}" for s in self._specs)
        return f"<{type(self).__name__} {state} {nodes}>"


def position_of(value: object) -> int | None:
    return None if value is None else parse_lsn(str(value))
