"""``Cluster`` and ``AsyncCluster``: the object an application holds.

A cluster owns a :class:`~replica_router.monitor.Monitor` (which measures every
node's role and lag and publishes immutable ``Topology`` snapshots) and one
connection source per node and purpose (``psycopg_pool`` pools by default, see
:mod:`replica_router.sources`). ``read()`` asks :func:`routing.route_read` for a
node that satisfies the read's needs (lag bounds, the scope's token, the
monotonic floor) and checks a connection out of that node's read pool;
``write()`` checks one out of the current primary's write pool and commits on
exit, capturing the commit's WAL position into the current consistency scope.

Nothing starts in the constructor: ``open()`` (or ``with``) starts the monitor
(its first probe round finishes before ``open()`` returns, so the first read is
routed on measurements, not guesses) and opens the pools without waiting on
them, so a node that is down at start costs nothing but its probe.

Internal seams (stable within the package; the RoutedConnection, integrations
and metrics use them — keep them documented here):

* ``_acquire_read(max_lag=None, max_lag_bytes=None, max_staleness=None) -> Lease``
  and ``_release_read(lease)``: a routed, checked connection for reads (every
  rule of ``read()``: fallbacks, waiting, retry on another node), and its return
  (monotonic-reads bookkeeping, pool return). ``read()`` is exactly these two.
* ``_acquire_write() -> Lease`` and ``_release_write(lease, error)``: the same
  for writes; ``_release_write`` commits (capturing the position) when
  ``error`` is None, else rolls back.
* ``_checkout(node, purpose) -> Lease`` / ``_checkin(lease)``: a connection to
  one named node (``"read"`` = autocommit, read-only session; ``"write"`` =
  transactional), counted in ``in_use(node)``, checked before it is handed out;
  a failure raises ``NodeUnavailableError`` (``.broken`` = the connection check
  failed, so the node was marked suspect).
* ``_capture_commit(conn) -> int | None``: COMMIT a primary connection's
  transaction and advance the current scope (one round trip; see
  :func:`consistency.commit_and_capture`). ``_note_write(position)``: advance the
  scope for a write committed some other way (``position`` None when unknown:
  window mode still works, LSN mode keeps what it had).
* ``_count_route(intent, node)``: count a statement routed by another path
  (RoutedConnection) in ``counters()`` without a checkout.
* ``_decide(topology, plan, exclude, prefer=node)``: the routing decision,
  keeping ``prefer`` while it is a candidate (a RoutedConnection's held node).
* ``_learn_functions()``: teach ``classifier`` the user functions' volatility
  from the primary, once per open (the RoutedConnection calls it).
* ``_read_target(exclude) -> (node, fallback)`` / ``_write_target() -> node``:
  where a read or a write goes, for integrations that hold their own
  connections (psycopg2); the rules of ``read()``/``write()`` without a
  checkout (no on-demand catch-up check, which needs a connection).
* ``topology``, ``events``, ``system_identifier``, ``counters()``, ``status()``,
  ``in_use(name)``, ``monitor`` (None until opened) for observability.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

import psycopg
from psycopg.pq import TransactionStatus

from . import _fork, consistency
from .classify import Classifier
from .consistency import (
    Mark,
    Scope,
    Token,
    acommit_and_capture,
    commit_and_capture,
    current_scope,
    peek_scope,
)
from .dsn import parse_dsn, password_of, scrub, split_hosts
from .errors import (
    ConfigurationError,
    ConsistencyTimeout,
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
from .routing import ReadDecision, ReadRequirements, route_read, route_write
from .sources import (
    AsyncConnectionSource,
    AsyncSourceFactory,
    ConnectionSource,
    PoolTimeout,
    Purpose,
    SourceFactory,
    async_pool_sources,
    pool_sources,
    validate_pool_kwargs,
)
from .topology import NodeSpec, NodeState, NodeStatus, Role, Topology

if TYPE_CHECKING:
    from psycopg.rows import RowFactory

    from .connection import AsyncRoutedConnection, RoutedConnection

__all__ = ["AsyncCluster", "Cluster", "Counters", "Lease", "NodeUnavailableError", "node_status"]

log = logging.getLogger("replica_router.cluster")

_FALLBACKS = ("primary", "wait", "error")
_READ_YOUR_WRITES = ("lsn", "window", None)
_CHECKOUT_SLICE = 0.1  # waiting on a pool, re-check this often whether the node is still up
_WAIT_SLICE = 0.05  # fallback="wait" with a token: re-check the replica this often
_USER_MARKS = 10_000  # users remembered for session(user_id=...)
_REPLAY_SQL = "SELECT pg_last_wal_replay_lsn()"
_NAME_RE = re.compile(r"[^\s\x00-\x1f]{1,100}")
_URL_START = re.compile(r",\s*(?=postgres(?:ql)?://)", re.IGNORECASE)

C = TypeVar("C")
_Self = TypeVar("_Self", bound="_ClusterCore")


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


class _Plan:
    """What one read needs, decided once per read from settings and scope."""

    __slots__ = ("force_primary", "req")

    def __init__(self, req: ReadRequirements, force_primary: bool) -> None:
        self.req = req
        self.force_primary = force_primary


class _First:
    """A side-effect-free policy for predicates: is *any* candidate eligible?"""

    def choose(self, candidates: Sequence[NodeState], in_use: Callable[[str], int]) -> NodeState:
        return candidates[0]


class _MostCaughtUp:
    """Picks the replica most likely to have reached a token: the furthest replayed
    (ties in turn, so reads right after writes still spread)."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[NodeState], in_use: Callable[[str], int]) -> NodeState:
        best = max(-1 if n.replay_lsn is None else n.replay_lsn for n in candidates)
        ties = [n for n in candidates if (-1 if n.replay_lsn is None else n.replay_lsn) == best]
        return ties[next(self._turn) % len(ties)]


class _Prefer:
    """The cluster's policy, except that ``node`` is kept while it is a candidate."""

    __slots__ = ("_node", "_policy")

    def __init__(self, node: str, policy: Policy) -> None:
        self._node = node
        self._policy = policy

    def choose(self, candidates: Sequence[NodeState], in_use: Callable[[str], int]) -> NodeState:
        for candidate in candidates:
            if candidate.name == self._node:
                return candidate
        return self._policy.choose(candidates, in_use)


_FIRST = _First()
_MOST_CAUGHT_UP = _MostCaughtUp()


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
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < 0
    ):
        raise ConfigurationError(f"{field}: expected a number of seconds >= 0, got {value!r}")
    return float(value)


def _check_name(field: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"{field}: a node name is 1-100 characters without spaces, got {name!r}"
        )
    return name


def _build_specs(
    primary: str | None,
    replicas: Sequence[str] | Mapping[str, str],
    nodes: Mapping[str, str] | None,
    primary_name: str,
) -> list[NodeSpec]:
    specs: list[NodeSpec] = []
    if nodes is not None:
        if primary is not None or replicas:
            raise ConfigurationError("nodes: give either nodes= or primary=/replicas=, not both")
        if not isinstance(nodes, Mapping) or not nodes:
            raise ConfigurationError("nodes: expected a non-empty mapping of name -> DSN")
        for name, dsn in nodes.items():
            field = f"nodes[{name!r}]"
            specs.append(NodeSpec(_check_name(field, name), dsn, parse_dsn(dsn, field=field)))
    else:
        if primary is None:
            raise ConfigurationError(
                "primary: a DSN is required (or use nodes=, Cluster.from_url, Cluster.from_env)"
            )
        name = _check_name("primary_name", primary_name)
        specs.append(NodeSpec(name, primary, parse_dsn(primary, field="primary"), Role.PRIMARY))
        if isinstance(replicas, str):
            raise ConfigurationError("replicas: expected a list of DSNs, got one string")
        if isinstance(replicas, Mapping):
            named = [(f"replicas[{n!r}]", _check_name(f"replicas[{n!r}]", n), d)
                     for n, d in replicas.items()]  # fmt: skip
        else:
            named = [(f"replicas[{i}]", f"replica{i + 1}", d) for i, d in enumerate(replicas)]
        for field, name, dsn in named:
            specs.append(NodeSpec(name, dsn, parse_dsn(dsn, field=field), Role.REPLICA))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigurationError(f"node name {spec.name!r} is used twice")
        seen.add(spec.name)
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


class _ClusterCore:
    """Settings, routing decisions and bookkeeping shared by both clusters (no I/O)."""

    _monitor: Monitor | None

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
        self._fallback_to_primary = fallback == "primary"
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
        self._config_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_use: dict[str, int] = {}
        self._reads: dict[str, int] = {}
        self._writes: dict[str, int] = {}
        self._fallback_counts: dict[str, int] = {}
        self._route_seq = 0
        self._user_marks = _UserMarks()
        self._in_use_fn = self.in_use  # bound once: the policy calls it per read
        self._plain = _Plan(ReadRequirements(self._max_lag, self._max_lag_bytes), False)
        self._tracks_scope = read_your_writes is not None or self._monotonic
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
        scope = peek_scope()
        return None if scope is None else scope.token_for(self.system_identifier)

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

    def _note_write(self, position: int | None) -> None:
        """A write transaction committed (at ``position`` if known): advance the scope."""
        if self._ryw is None:
            return
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
        commit record.
        """
        if isinstance(position, str):
            position = parse_lsn(position)
        self._note_write(position)

    def _raise_floor(self, position: int | None) -> None:
        if position is not None:
            current_scope().raise_floor(self.system_identifier, position)

    # -- read decisions (pure: topology + settings + scope) -----------------------------

    def _plan_read(
        self,
        topology: Topology,
        max_lag: float | None,
        max_lag_bytes: int | None,
        max_staleness: float | None,
    ) -> _Plan:
        min_position: int | None = None
        force_primary = False
        if self._tracks_scope:
            scope = peek_scope()
            if scope is not None:
                mark = scope.mark(self.system_identifier)
                if self._ryw == "lsn":
                    min_position = mark.position
                elif (
                    self._ryw == "window"
                    and mark.last_write_at is not None
                    and time.monotonic() - mark.last_write_at < self._window
                ):
                    force_primary = True
                floor = mark.floor if self._monotonic else None
                if floor is not None and (min_position is None or floor > min_position):
                    min_position = floor
        if max_lag is None and max_lag_bytes is None and max_staleness is None:
            if min_position is None:
                return _Plan(self._plain.req, True) if force_primary else self._plain
            return _Plan(ReadRequirements(self._max_lag, self._max_lag_bytes, min_position),
                         force_primary)  # fmt: skip
        lag = self._max_lag if max_lag is None else _check_seconds("max_lag", max_lag)
        if max_lag_bytes is not None and (isinstance(max_lag_bytes, bool) or max_lag_bytes < 0):
            raise ConfigurationError(f"max_lag_bytes: expected bytes >= 0, got {max_lag_bytes!r}")
        lag_bytes = self._max_lag_bytes if max_lag_bytes is None else max_lag_bytes
        if max_staleness is not None:
            # The snapshot is already this old: the replica may have fallen
            # behind since, by at most that much.
            bound = cast(float, _check_seconds("max_staleness", max_staleness))
            bound -= time.monotonic() - topology.taken_at
            lag = bound if lag is None else min(lag, bound)
        return _Plan(ReadRequirements(lag, lag_bytes, min_position), force_primary)

    def _decide(
        self,
        topology: Topology,
        plan: _Plan,
        exclude: frozenset[str],
        prefer: str | None = None,
    ) -> ReadDecision:
        req = plan.req
        if exclude:
            req = ReadRequirements(
                req.max_lag_seconds, req.max_lag_bytes, req.min_position, exclude
            )
        if plan.force_primary:
            primary = route_write(topology)
            if primary is not None and primary not in exclude:
                return ReadDecision(primary, "token", False)
        return route_read(
            topology,
            req,
            self._policy if prefer is None else _Prefer(prefer, self._policy),
            self._in_use_fn,
            fallback_to_primary=self._fallback_to_primary,
        )

    def _ready(self, plan: _Plan, exclude: frozenset[str]) -> Callable[[Topology], bool]:
        """A predicate for ``monitor.wait_for``: some replica now qualifies."""
        req = ReadRequirements(
            plan.req.max_lag_seconds, plan.req.max_lag_bytes, plan.req.min_position, exclude
        )
        in_use = self._in_use_fn

        def ready(topology: Topology) -> bool:
            decision = route_read(topology, req, _FIRST, in_use, fallback_to_primary=False)
            return decision.fallback is None

        return ready

    def _catch_up_candidate(
        self, topology: Topology, plan: _Plan, exclude: frozenset[str]
    ) -> str | None:
        """The replica within lag bounds that is furthest along (for an on-demand check)."""
        req = ReadRequirements(plan.req.max_lag_seconds, plan.req.max_lag_bytes, None, exclude)
        return route_read(
            topology, req, _MOST_CAUGHT_UP, self._in_use_fn, fallback_to_primary=False
        ).target

    def _read_failed(
        self, decision: ReadDecision, failures: Sequence[str], *, timed_out: bool = False
    ) -> NoReplicaAvailable:
        reason = {
            "lag": "every healthy replica lags more than allowed",
            "token": "no replica has replayed this scope's last write yet",
            "none_healthy": "no healthy replica",
        }[decision.fallback or "none_healthy"]
        tail = f"; failed: {'; '.join(failures)}" if failures else ""
        self._count_fallback(decision.fallback or "none_healthy", None)
        if timed_out:
            return ConsistencyTimeout(
                f"no replica could serve the read within {self._consistency_timeout:g} s "
                f"(consistency_timeout) and the primary is unavailable: {reason}{tail}"
            )
        if self._fallback == "error" and decision.fallback in ("token", "lag"):
            return ConsistencyTimeout(f"no replica can serve the read: {reason} "
                                      f"and fallback='error'{tail}")  # fmt: skip
        if self._fallback_to_primary:
            why = "and the primary is unavailable"
        elif self._fallback == "error":
            why = "and fallback='error'"
        else:
            why = "and waiting cannot help (fallback='wait')"
        return NoReplicaAvailable(f"no node can serve the read: {reason} {why}{tail}")

    def _after_wait(
        self,
        topology: Topology,
        decision: ReadDecision,
        exclude: frozenset[str],
        failures: Sequence[str],
    ) -> str:
        """``fallback="wait"`` waited ``consistency_timeout`` in vain: the primary, which
        has every commit, serves the read; ``ConsistencyTimeout`` only when it cannot."""
        primary = route_write(topology)
        if primary is None or primary in exclude:
            raise self._read_failed(decision, failures, timed_out=True)
        return primary

    def _no_primary(self, topology: Topology, error: Exception | None) -> PrimaryUnavailable:
        state = topology.primary_state
        if error is not None:
            detail = str(error)
        elif state is not None and state.fenced:
            detail = f"{state.name} is fenced"
        elif state is not None:
            detail = f"{state.name} is unhealthy ({self._scrub(state.name, state.last_error)})"
        else:
            claimants = [n.name for n in topology.nodes if n.role is Role.PRIMARY]
            detail = (
                "no node reports itself primary"
                if not claimants
                else f"{', '.join(claimants)} claim primary but none is usable"
            )
        waited = f" within write_timeout={self._write_timeout:g} s" if self._write_timeout else ""
        return PrimaryUnavailable(f"no primary can take writes{waited}: {detail}")

    # -- counting --------------------------------------------------------------------------

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
        return min(_CHECKOUT_SLICE, remaining)

    def _known_position(self, lease: Lease[Any]) -> int | None:
        """The furthest position known for the lease's node without asking it."""
        state = self.topology.by_name.get(lease.node)
        known = state.position if state is not None else None
        return lease.position if known is None or (lease.position or 0) > known else known

    def _failed(
        self,
        monitor: Monitor,
        exc: NodeUnavailableError,
        exclude: frozenset[str],
        failures: list[str],
    ) -> frozenset[str]:
        """Note a node that failed this request; suspect it if its connection broke."""
        if exc.broken:
            monitor.mark_suspect(exc.node, exc.message)
        failures.append(str(exc))
        return exclude | {exc.node}

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
        self._config_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_use = {}
        self._monitor = None
        self._sources: dict[tuple[str, Purpose], Any] = {}
        self._forked = True

    def __repr__(self) -> str:
        state = "open" if self._monitor is not None else "closed"
        nodes = ", ".join(f"{s.name}={s.info.address}" for s in self._specs)
        return f"<{type(self).__name__} {state} {nodes}>"


def _new_primary_after(generation: int) -> Callable[[Topology], bool]:
    """A ``wait_for`` predicate: a newer snapshot with a usable primary."""

    def ready(topology: Topology) -> bool:
        return topology.generation > generation and route_write(topology) is not None

    return ready


def _position(value: object) -> int | None:
    return None if value is None else parse_lsn(str(value))


class Cluster(_ClusterCore):
    """A primary and its replicas, for threads (see the module docstring and README).

    ``with cluster.read() as conn`` gives an autocommit, read-only psycopg
    connection on a replica that satisfies the read (or the primary, per
    ``fallback``); ``with cluster.write() as conn`` a connection on the
    primary inside a transaction, committed on exit (rolled back on error).
    """

    _sources: dict[tuple[str, Purpose], ConnectionSource]
    _factory: SourceFactory

    def open(self) -> Cluster:
        """Start the monitor (first probe round included) and the pools; idempotent."""
        with self._config_lock:
            if self._monitor is not None:
                return self
            factory = cast("SourceFactory | None", self._source_factory) or pool_sources(
                self._pool_kwargs, self._connect_kwargs, connect_timeout=self._connect_timeout
            )
            self._factory = factory
            self._sources = {}
            monitor = self._monitor_for(self._specs)
            monitor.start()
            self._monitor = monitor
            try:
                for spec in self._specs:
                    self._open_source(spec, "read")
                primary = route_write(monitor.topology)
                if primary is not None:
                    self._open_source(self._spec(primary), "write")
            except BaseException:
                self._shutdown(5.0)
                raise
            _fork.opened(self)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the monitor and close every pool (connections in use close on return)."""
        with self._config_lock:
            self._shutdown(timeout)

    def _shutdown(self, timeout: float) -> None:
        _fork.closed(self)
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop(timeout)
            self._retire(monitor)
        sources, self._sources = getattr(self, "_sources", {}), {}
        for source in sources.values():
            try:
                source.close(timeout)
            except Exception:
                log.exception("closing %r failed", source)

    def _after_fork(self) -> None:
        self._forget_after_fork()
        self.open()

    def __enter__(self) -> Cluster:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the user surface --------------------------------------------------------------

    def read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection for reads on a node that satisfies them (see ``Cluster``).

        ``max_lag`` / ``max_lag_bytes`` override the cluster's bounds for this
        read (``math.inf`` lifts one); ``max_staleness`` bounds how old the data
        may be, counting the age of the monitor's snapshot too.

        A failure while *getting* the connection is retried on another node.
        A failure of your own query inside the block is not: something was
        sent, and only you know whether running it again is safe.
        """
        return _ReadBlock(self, max_lag, max_lag_bytes, max_staleness)

    def write(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A primary connection in a transaction: commit on exit, rollback on error.

        Raises :class:`PrimaryUnavailable` when no primary is usable (after
        waiting up to ``write_timeout`` for one, if set).
        """
        return _WriteBlock(self)

    def add_replica(self, dsn: str, name: str | None = None) -> str:
        """Add a replica at runtime (probed from the next round on); returns its name."""
        with self._config_lock:
            spec = self._new_replica_spec(dsn, name)
            self._specs = (*self._specs, spec)
            monitor = self._monitor
            if monitor is not None:
                self._open_source(spec, "read")
                monitor.add_node(spec)
        return spec.name

    def remove_replica(self, name: str, timeout: float = 5.0) -> None:
        """Stop routing to ``name`` and close its pools (not the primary)."""
        with self._config_lock:
            self._spec_to_remove(name)
            self._specs = tuple(s for s in self._specs if s.name != name)
            monitor = self._monitor
            if monitor is not None:
                monitor.remove_node(name)
            sources = getattr(self, "_sources", {})
            gone = [sources[k] for k in ((name, "read"), (name, "write")) if k in sources]
            self._sources = {k: v for k, v in sources.items() if k[0] != name}
        for source in gone:
            source.close(timeout)

    def connection(
        self,
        *,
        autocommit: bool = True,
        read_only: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> RoutedConnection:
        """A :class:`~replica_router.connection.RoutedConnection`: one psycopg-like
        connection that sends each statement where it may run.

        Autocommit by default, so statements are routed one by one; use
        ``conn.transaction()`` for a transaction (pinned to the primary, or a
        replica with ``read_only=True``). Node connections are taken from the
        pools when first needed: nothing happens before the first statement.
        """
        from .connection import RoutedConnection

        self._require_monitor()
        return RoutedConnection(
            self, autocommit=autocommit, read_only=read_only, row_factory=row_factory
        )

    def check_connections(self, timeout: float | None = None) -> dict[str, bool]:
        """``{name: True}`` for each node a checked connection could be had from now."""
        self._require_monitor()
        wait = self._connect_timeout if timeout is None else timeout
        result = {}
        for spec in self._specs:
            try:
                lease = self._checkout(spec.name, "read", timeout=wait, give_up_when_down=False)
            except NodeUnavailableError:
                result[spec.name] = False
            else:
                self._checkin(lease)
                result[spec.name] = True
        return result

    # -- seams (see the module docstring) -------------------------------------------------

    def _open_source(self, spec: NodeSpec, purpose: Purpose) -> ConnectionSource:
        source = self._factory(spec, purpose, self._role_of(spec))
        source.open()
        self._sources = {**self._sources, (spec.name, purpose): source}
        return source

    def _source(self, node: str, purpose: Purpose) -> ConnectionSource:
        source = self._sources.get((node, purpose))
        if source is None:  # a write pool for a promoted replica, made on first use
            with self._config_lock:
                if self._monitor is None:
                    raise Error("Cluster is closed")
                source = self._sources.get((node, purpose))
                if source is None:
                    source = self._open_source(self._spec(node), purpose)
        return source

    def _checkout(
        self,
        node: str,
        purpose: Purpose,
        *,
        timeout: float | None = None,
        give_up_when_down: bool = True,
        routes: dict[str, int] | None = None,
    ) -> Lease[psycopg.Connection[Any]]:
        source = self._sources.get((node, purpose)) or self._source(node, purpose)
        wait = self._checkout_timeout if timeout is None else timeout
        try:
            conn = source.getconn(min(_CHECKOUT_SLICE, wait))
        except PoolTimeout:
            conn = self._wait_for_connection(source, node, purpose, wait, give_up_when_down)
        except psycopg.Error as exc:  # e.g. the pool was closed by remove_replica
            raise self._unavailable(node, exc) from None
        try:
            source.check(conn)
        except Exception as exc:
            with contextlib.suppress(Exception):
                source.putconn(conn)
            message = f"connection check failed: {self._scrub(node, str(exc).strip())}"
            raise NodeUnavailableError(node, message, broken=True) from None
        self._count_out(node, routes)
        return Lease(conn, node, purpose, source)

    def _wait_for_connection(
        self,
        source: ConnectionSource,
        node: str,
        purpose: Purpose,
        wait: float,
        give_up_when_down: bool,
    ) -> psycopg.Connection[Any]:
        """The pool had nothing idle: wait in slices, giving up early if the node goes down."""
        deadline = time.monotonic() + wait - _CHECKOUT_SLICE
        while True:
            timeout = self._checkout_slice(node, purpose, wait, deadline, give_up_when_down)
            try:
                return source.getconn(timeout)
            except PoolTimeout:
                continue
            except psycopg.Error as exc:
                raise self._unavailable(node, exc) from None

    def _checkin(self, lease: Lease[psycopg.Connection[Any]]) -> None:
        try:
            lease.source.putconn(lease.conn)
        finally:
            self._count_in(lease.node)

    def checkout(
        self, node: str, purpose: Purpose = "read", *, timeout: float | None = None
    ) -> Lease[psycopg.Connection[Any]]:
        """A checked connection to the named node from its pool for ``purpose``.

        For integrations that hold a node's connection across statements
        (``route_read()`` names the node): ``"read"`` connections are autocommit
        and read-only, ``"write"`` ones transactional. Give it back with
        :meth:`checkin`. Raises :class:`NodeUnavailable` when none can be had.
        """
        try:
            return self._checkout(node, purpose, timeout=timeout)
        except NodeUnavailableError as exc:
            raise NodeUnavailable(node, exc.message) from None

    def checkin(self, lease: Lease[psycopg.Connection[Any]]) -> None:
        """Give back a connection from :meth:`checkout` to its pool."""
        self._checkin(lease)

    def _acquire_read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> Lease[psycopg.Connection[Any]]:
        monitor = self._monitor or self._require_monitor()
        topology = monitor.topology
        plan = self._plan_read(topology, max_lag, max_lag_bytes, max_staleness)
        exclude: frozenset[str] = frozenset()
        failures: list[str] = []
        wait_until: float | None = None
        while True:
            decision = self._decide(topology, plan, exclude)
            target = decision.target
            reason = decision.fallback
            if reason is not None and not plan.force_primary:
                if reason == "token":
                    try:
                        lease = self._caught_up(topology, plan, exclude)
                    except NodeUnavailableError as exc:
                        exclude = self._failed(monitor, exc, exclude, failures)
                        topology = monitor.topology
                        continue
                    if lease is not None:
                        return lease
                if self._fallback == "wait" and decision.waitable:
                    now = time.monotonic()
                    if wait_until is None:
                        wait_until = now + self._consistency_timeout
                    if now < wait_until:
                        ready = self._ready(plan, exclude)
                        waited = monitor.wait_for(ready, min(wait_until - now, _WAIT_SLICE))
                        topology = waited or monitor.topology
                        continue
                    target = self._after_wait(topology, decision, exclude, failures)
            if target is None:
                raise self._read_failed(decision, failures)
            try:
                lease = self._checkout(target, "read", routes=self._reads)
            except NodeUnavailableError as exc:
                exclude = self._failed(monitor, exc, exclude, failures)
                topology = monitor.topology
                continue
            if reason is not None:
                self._count_fallback(reason, target)
            if self.events.active:
                self._route_event("read", target, reason or "replica")
            return lease

    def _caught_up(
        self, topology: Topology, plan: _Plan, exclude: frozenset[str]
    ) -> Lease[psycopg.Connection[Any]] | None:
        """The snapshot says every replica is behind the token; ask the furthest one now."""
        target = self._catch_up_candidate(topology, plan, exclude)
        if target is None:
            return None
        lease = self._checkout(target, "read")
        try:
            row = lease.conn.execute(_REPLAY_SQL).fetchone()
        except psycopg.Error as exc:
            broken = lease.conn.broken
            self._checkin(lease)
            raise self._unavailable(target, exc, broken) from None
        position = _position(row[0] if row else None)
        if position is None or plan.req.min_position is None or position < plan.req.min_position:
            self._checkin(lease)
            return None
        lease.position = position
        self._count_route("read", target, "caught_up")
        return lease

    def _release_read(self, lease: Lease[psycopg.Connection[Any]]) -> None:
        conn = lease.conn
        try:
            if not conn.autocommit or conn.pgconn.transaction_status != TransactionStatus.IDLE:
                _reset_read(conn)
            if self._monotonic:
                self._raise_floor(self._read_position(lease))
        finally:
            self._checkin(lease)

    def _read_position(self, lease: Lease[psycopg.Connection[Any]]) -> int | None:
        """Where the data just read stands: measured now (an upper bound of what the
        reads saw), else the best we knew before."""
        with contextlib.suppress(psycopg.Error):
            if lease.conn.pgconn.transaction_status == TransactionStatus.IDLE:
                row = lease.conn.execute(consistency.NODE_POSITION_SQL).fetchone()
                position = _position(row[0] if row else None)
                if position is not None:
                    return position
        return self._known_position(lease)

    def _acquire_write(self) -> Lease[psycopg.Connection[Any]]:
        monitor = self._require_monitor()
        deadline = time.monotonic() + (self._write_timeout or 0.0)
        error: NodeUnavailableError | None = None
        while True:
            topology = monitor.topology
            target = route_write(topology)
            if target is not None:
                try:
                    lease = self._checkout(target, "write", routes=self._writes)
                except NodeUnavailableError as exc:
                    error = exc
                    if exc.broken:
                        monitor.mark_suspect(target, exc.message)
                else:
                    if self.events.active:
                        self._route_event("write", target, "primary")
                    return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_primary(monitor.topology, error) from error
            monitor.wait_for(_new_primary_after(topology.generation), remaining)

    def _release_write(
        self, lease: Lease[psycopg.Connection[Any]], error: BaseException | None
    ) -> None:
        conn = lease.conn
        try:
            status = conn.pgconn.transaction_status
            if error is not None or status == TransactionStatus.INERROR:
                if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                    with contextlib.suppress(psycopg.Error):
                        conn.rollback()
            elif status == TransactionStatus.INTRANS:
                self._capture_commit(conn)
            elif conn.autocommit and status == TransactionStatus.IDLE:
                # The block switched to autocommit: its statements committed one by
                # one; the current position covers them all.
                row = conn.execute(consistency.POSITION_SQL).fetchone()
                self._note_write(_position(row[0] if row else None))
                conn.autocommit = False
        finally:
            self._checkin(lease)

    def _relearn_functions(self, node: str) -> None:
        """``node`` refused a statement judged a read: what we learned may be stale."""
        log.warning("%s refused a statement classified as a read; running it on the "
                    "primary and re-learning function volatility", node)  # fmt: skip
        self._functions_learned = False
        self._learn_functions()

    def _learn_functions(self) -> None:
        """Learn user functions' volatility from the primary (once per open; retried
        by the next caller if the primary could not be asked)."""
        if self._functions_learned:
            return
        primary = route_write(self.topology)
        if primary is None:
            return
        try:
            lease = self._checkout(primary, "read", timeout=self._connect_timeout)
        except NodeUnavailableError:
            return
        try:
            self.classifier.learn_functions(lease.conn)
            self._functions_learned = True
        except psycopg.Error as exc:
            log.warning("could not learn function volatility from %s: %s", primary,
                        self._scrub(primary, str(exc)))  # fmt: skip
        finally:
            self._checkin(lease)

    # -- the public routing seam (integrations with their own connections) -------------

    def route_read(
        self,
        max_lag: float | None = None,
        prefer: str | None = None,
        *,
        exclude: Iterable[str] = (),
    ) -> str:
        """The node name a read in the current scope should use now.

        For integrations that hold their own connections (SQLAlchemy, Django,
        Peewee, yours): every rule of ``read()`` applies (lag bounds, this
        scope's token and monotonic floor, ``fallback``), counted as routed.
        The name may be the primary's. ``prefer`` keeps a node (the one this
        unit of work read from before) while it still qualifies, so its reads
        do not go back in time by hopping to a replica that is further behind
        (and a held connection is not swapped per read); ``exclude`` skips
        nodes that just failed you.
        Raises ``NoReplicaAvailable`` (or ``ConsistencyTimeout``) like ``read()``.
        """
        return self._read_target(frozenset(exclude), max_lag=max_lag, prefer=prefer)[0]

    def route_write(self) -> str:
        """The node name a write should use now: the primary (waiting up to
        ``write_timeout`` for one). Raises ``PrimaryUnavailable`` like ``write()``."""
        return self._write_target()

    def _read_target(
        self,
        exclude: frozenset[str] = frozenset(),
        max_lag: float | None = None,
        prefer: str | None = None,
    ) -> tuple[str, str | None]:
        """Where a read goes now: ``(node, fallback reason or None)``, counted as routed.

        The rules of ``read()`` for callers with their own connections: lag
        bounds, the scope's token, ``fallback`` (waiting up to
        ``consistency_timeout`` with ``"wait"``). Raises ``NoReplicaAvailable``
        (or ``ConsistencyTimeout``) like ``read()``.
        """
        monitor = self._require_monitor()
        topology = monitor.topology
        plan = self._plan_read(topology, max_lag, None, None)
        wait_until: float | None = None
        while True:
            decision = self._decide(topology, plan, exclude, prefer)
            reason = decision.fallback
            target = decision.target
            if (reason is not None and not plan.force_primary and self._fallback == "wait"
                    and decision.waitable):  # fmt: skip
                now = time.monotonic()
                if wait_until is None:
                    wait_until = now + self._consistency_timeout
                if now < wait_until:
                    waited = monitor.wait_for(
                        self._ready(plan, exclude), min(wait_until - now, _WAIT_SLICE)
                    )
                    topology = waited or monitor.topology
                    continue
                target = self._after_wait(topology, decision, exclude, ())
            if target is None:
                raise self._read_failed(decision, ())
            if reason is not None:
                self._count_fallback(reason, target)
            self._count_route("read", target, reason or "replica")
            return target, reason

    def _write_target(self) -> str:
        """The primary to write to now (waiting up to ``write_timeout``), counted as routed."""
        monitor = self._require_monitor()
        deadline = time.monotonic() + (self._write_timeout or 0.0)
        while True:
            topology = monitor.topology
            target = route_write(topology)
            if target is not None:
                self._count_route("write", target)
                return target
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_primary(monitor.topology, None)
            monitor.wait_for(_new_primary_after(topology.generation), remaining)

    def _capture_commit(self, conn: psycopg.Connection[Any]) -> int | None:
        """COMMIT ``conn`` (on the primary) and advance the current scope past it."""
        if self._ryw != "lsn":
            conn.commit()
            self._note_write(None)
            return None
        position = commit_and_capture(conn)
        if position is not None:
            self._note_write(position)
        return position


def _reset_read(conn: psycopg.Connection[Any]) -> None:
    """Put back what the block changed: no open transaction, autocommit on."""
    with contextlib.suppress(psycopg.Error):
        if conn.pgconn.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            conn.rollback()
        if not conn.autocommit:
            conn.autocommit = True


class _ReadBlock:
    """``with cluster.read()``: a class, not a generator, to keep the read path lean."""

    __slots__ = ("_args", "_cluster", "_lease")

    def __init__(
        self,
        cluster: Cluster,
        max_lag: float | None,
        max_lag_bytes: int | None,
        max_staleness: float | None,
    ) -> None:
        self._cluster = cluster
        self._args = (max_lag, max_lag_bytes, max_staleness)
        self._lease: Lease[psycopg.Connection[Any]] | None = None

    def __enter__(self) -> psycopg.Connection[Any]:
        self._lease = lease = self._cluster._acquire_read(*self._args)
        return lease.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._cluster._release_read(lease)


class _WriteBlock:
    __slots__ = ("_cluster", "_lease")

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._lease: Lease[psycopg.Connection[Any]] | None = None

    def __enter__(self) -> psycopg.Connection[Any]:
        self._lease = lease = self._cluster._acquire_write()
        return lease.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._cluster._release_write(lease, exc)


class AsyncCluster(_ClusterCore):
    """:class:`Cluster` for asyncio: ``async with``, ``await open()``, async blocks.

    The monitor is the same background thread (probes are tiny and must not
    depend on the event loop being responsive); pools are
    ``AsyncConnectionPool``. ``session()``, ``token``, ``status()`` and
    ``counters()`` do no I/O and stay synchronous.
    """

    _sources: dict[tuple[str, Purpose], AsyncConnectionSource]
    _factory: AsyncSourceFactory
    _source_lock: asyncio.Lock

    async def open(self) -> AsyncCluster:
        if self._monitor is not None:
            return self
        factory = cast("AsyncSourceFactory | None", self._source_factory) or async_pool_sources(
            self._pool_kwargs, self._connect_kwargs, connect_timeout=self._connect_timeout
        )
        self._factory = factory
        self._sources = {}
        self._source_lock = asyncio.Lock()
        monitor = self._monitor_for(self._specs)
        await asyncio.to_thread(monitor.start)
        self._monitor = monitor
        try:
            for spec in self._specs:
                await self._open_source(spec, "read")
            primary = route_write(monitor.topology)
            if primary is not None:
                await self._open_source(self._spec(primary), "write")
        except BaseException:
            await self.close()
            raise
        _fork.opened(self)
        return self

    async def close(self, timeout: float = 5.0) -> None:
        _fork.closed(self)
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            await asyncio.to_thread(monitor.stop, timeout)
            self._retire(monitor)
        sources, self._sources = getattr(self, "_sources", {}), {}
        for source in sources.values():
            try:
                await source.close(timeout)
            except Exception:
                log.exception("closing %r failed", source)

    def _after_fork(self) -> None:
        self._forget_after_fork()  # opening needs its event loop: left to the caller

    async def __aenter__(self) -> AsyncCluster:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """``async with cluster.read() as conn``: see :meth:`Cluster.read`."""
        return _AsyncReadBlock(self, max_lag, max_lag_bytes, max_staleness)

    def write(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """``async with cluster.write() as conn``: see :meth:`Cluster.write`."""
        return _AsyncWriteBlock(self)

    async def add_replica(self, dsn: str, name: str | None = None) -> str:
        spec = self._new_replica_spec(dsn, name)
        self._specs = (*self._specs, spec)
        monitor = self._monitor
        if monitor is not None:
            await self._open_source(spec, "read")
            monitor.add_node(spec)
        return spec.name

    async def remove_replica(self, name: str, timeout: float = 5.0) -> None:
        self._spec_to_remove(name)
        self._specs = tuple(s for s in self._specs if s.name != name)
        monitor = self._monitor
        if monitor is not None:
            await asyncio.to_thread(monitor.remove_node, name)
        sources = getattr(self, "_sources", {})
        gone = [sources[k] for k in ((name, "read"), (name, "write")) if k in sources]
        self._sources = {k: v for k, v in sources.items() if k[0] != name}
        for source in gone:
            await source.close(timeout)

    def connection(
        self,
        *,
        autocommit: bool = True,
        read_only: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> AsyncRoutedConnection:
        """``async with cluster.connection() as conn``: see :meth:`Cluster.connection`."""
        from .connection import AsyncRoutedConnection

        self._require_monitor()
        return AsyncRoutedConnection(
            self, autocommit=autocommit, read_only=read_only, row_factory=row_factory
        )

    async def check_connections(self, timeout: float | None = None) -> dict[str, bool]:
        self._require_monitor()
        wait = self._connect_timeout if timeout is None else timeout
        result = {}
        for spec in self._specs:
            try:
                lease = await self._checkout(
                    spec.name, "read", timeout=wait, give_up_when_down=False
                )
            except NodeUnavailableError:
                result[spec.name] = False
            else:
                await self._checkin(lease)
                result[spec.name] = True
        return result

    # -- seams (async twins of Cluster's) ---------------------------------------------------

    async def _open_source(self, spec: NodeSpec, purpose: Purpose) -> AsyncConnectionSource:
        source = self._factory(spec, purpose, self._role_of(spec))
        await source.open()
        self._sources = {**self._sources, (spec.name, purpose): source}
        return source

    async def _source(self, node: str, purpose: Purpose) -> AsyncConnectionSource:
        source = self._sources.get((node, purpose))
        if source is None:
            async with self._source_lock:
                if self._monitor is None:
                    raise Error("AsyncCluster is closed")
                source = self._sources.get((node, purpose))
                if source is None:
                    source = await self._open_source(self._spec(node), purpose)
        return source

    async def _checkout(
        self,
        node: str,
        purpose: Purpose,
        *,
        timeout: float | None = None,
        give_up_when_down: bool = True,
        routes: dict[str, int] | None = None,
    ) -> Lease[psycopg.AsyncConnection[Any]]:
        source = self._sources.get((node, purpose)) or await self._source(node, purpose)
        wait = self._checkout_timeout if timeout is None else timeout
        try:
            conn = await source.getconn(min(_CHECKOUT_SLICE, wait))
        except PoolTimeout:
            conn = await self._wait_for_connection(source, node, purpose, wait, give_up_when_down)
        except psycopg.Error as exc:
            raise self._unavailable(node, exc) from None
        try:
            await source.check(conn)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await source.putconn(conn)
            message = f"connection check failed: {self._scrub(node, str(exc).strip())}"
            raise NodeUnavailableError(node, message, broken=True) from None
        self._count_out(node, routes)
        return Lease(conn, node, purpose, source)

    async def _wait_for_connection(
        self,
        source: AsyncConnectionSource,
        node: str,
        purpose: Purpose,
        wait: float,
        give_up_when_down: bool,
    ) -> psycopg.AsyncConnection[Any]:
        deadline = time.monotonic() + wait - _CHECKOUT_SLICE
        while True:
            timeout = self._checkout_slice(node, purpose, wait, deadline, give_up_when_down)
            try:
                return await source.getconn(timeout)
            except PoolTimeout:
                continue
            except psycopg.Error as exc:
                raise self._unavailable(node, exc) from None

    async def _checkin(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None:
        try:
            await lease.source.putconn(lease.conn)
        finally:
            self._count_in(lease.node)

    async def checkout(
        self, node: str, purpose: Purpose = "read", *, timeout: float | None = None
    ) -> Lease[psycopg.AsyncConnection[Any]]:
        """A checked connection to the named node (see :meth:`Cluster.checkout`)."""
        try:
            return await self._checkout(node, purpose, timeout=timeout)
        except NodeUnavailableError as exc:
            raise NodeUnavailable(node, exc.message) from None

    async def checkin(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None:
        """Give back a connection from :meth:`checkout` to its pool."""
        await self._checkin(lease)

    async def _acquire_read(
        self,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        max_staleness: float | None = None,
    ) -> Lease[psycopg.AsyncConnection[Any]]:
        monitor = self._monitor or self._require_monitor()
        topology = monitor.topology
        plan = self._plan_read(topology, max_lag, max_lag_bytes, max_staleness)
        exclude: frozenset[str] = frozenset()
        failures: list[str] = []
        wait_until: float | None = None
        while True:
            decision = self._decide(topology, plan, exclude)
            target = decision.target
            reason = decision.fallback
            if reason is not None and not plan.force_primary:
                if reason == "token":
                    try:
                        lease = await self._caught_up(topology, plan, exclude)
                    except NodeUnavailableError as exc:
                        exclude = self._failed(monitor, exc, exclude, failures)
                        topology = monitor.topology
                        continue
                    if lease is not None:
                        return lease
                if self._fallback == "wait" and decision.waitable:
                    now = time.monotonic()
                    if wait_until is None:
                        wait_until = now + self._consistency_timeout
                    if now < wait_until:
                        ready = self._ready(plan, exclude)
                        waited = await asyncio.to_thread(
                            monitor.wait_for, ready, min(wait_until - now, _WAIT_SLICE)
                        )
                        topology = waited or monitor.topology
                        continue
                    target = self._after_wait(topology, decision, exclude, failures)
            if target is None:
                raise self._read_failed(decision, failures)
            try:
                lease = await self._checkout(target, "read", routes=self._reads)
            except NodeUnavailableError as exc:
                exclude = self._failed(monitor, exc, exclude, failures)
                topology = monitor.topology
                continue
            if reason is not None:
                self._count_fallback(reason, target)
            if self.events.active:
                self._route_event("read", target, reason or "replica")
            return lease

    async def _caught_up(
        self, topology: Topology, plan: _Plan, exclude: frozenset[str]
    ) -> Lease[psycopg.AsyncConnection[Any]] | None:
        target = self._catch_up_candidate(topology, plan, exclude)
        if target is None:
            return None
        lease = await self._checkout(target, "read")
        try:
            cursor = await lease.conn.execute(_REPLAY_SQL)
            row = await cursor.fetchone()
        except psycopg.Error as exc:
            broken = lease.conn.broken
            await self._checkin(lease)
            raise self._unavailable(target, exc, broken) from None
        position = _position(row[0] if row else None)
        if position is None or plan.req.min_position is None or position < plan.req.min_position:
            await self._checkin(lease)
            return None
        lease.position = position
        self._count_route("read", target, "caught_up")
        return lease

    async def _release_read(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> None:
        conn = lease.conn
        try:
            if not conn.autocommit or conn.pgconn.transaction_status != TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    if conn.pgconn.transaction_status in (
                        TransactionStatus.INTRANS,
                        TransactionStatus.INERROR,
                    ):
                        await conn.rollback()
                    if not conn.autocommit:
                        await conn.set_autocommit(True)
            if self._monotonic:
                self._raise_floor(await self._read_position(lease))
        finally:
            await self._checkin(lease)

    async def _read_position(self, lease: Lease[psycopg.AsyncConnection[Any]]) -> int | None:
        with contextlib.suppress(psycopg.Error):
            if lease.conn.pgconn.transaction_status == TransactionStatus.IDLE:
                cursor = await lease.conn.execute(consistency.NODE_POSITION_SQL)
                row = await cursor.fetchone()
                position = _position(row[0] if row else None)
                if position is not None:
                    return position
        return self._known_position(lease)

    async def _acquire_write(self) -> Lease[psycopg.AsyncConnection[Any]]:
        monitor = self._require_monitor()
        deadline = time.monotonic() + (self._write_timeout or 0.0)
        error: NodeUnavailableError | None = None
        while True:
            topology = monitor.topology
            target = route_write(topology)
            if target is not None:
                try:
                    lease = await self._checkout(target, "write", routes=self._writes)
                except NodeUnavailableError as exc:
                    error = exc
                    if exc.broken:
                        monitor.mark_suspect(target, exc.message)
                else:
                    if self.events.active:
                        self._route_event("write", target, "primary")
                    return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_primary(monitor.topology, error) from error
            await asyncio.to_thread(
                monitor.wait_for, _new_primary_after(topology.generation), remaining
            )

    async def _release_write(
        self, lease: Lease[psycopg.AsyncConnection[Any]], error: BaseException | None
    ) -> None:
        conn = lease.conn
        try:
            status = conn.pgconn.transaction_status
            if error is not None or status == TransactionStatus.INERROR:
                if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                    with contextlib.suppress(psycopg.Error):
                        await conn.rollback()
            elif status == TransactionStatus.INTRANS:
                await self._capture_commit(conn)
            elif conn.autocommit and status == TransactionStatus.IDLE:
                cursor = await conn.execute(consistency.POSITION_SQL)
                row = await cursor.fetchone()
                self._note_write(_position(row[0] if row else None))
                await conn.set_autocommit(False)
        finally:
            await self._checkin(lease)

    async def _relearn_functions(self, node: str) -> None:
        """``node`` refused a statement judged a read: what we learned may be stale."""
        log.warning("%s refused a statement classified as a read; running it on the "
                    "primary and re-learning function volatility", node)  # fmt: skip
        self._functions_learned = False
        await self._learn_functions()

    async def _learn_functions(self) -> None:
        """See :meth:`Cluster._learn_functions`."""
        if self._functions_learned:
            return
        primary = route_write(self.topology)
        if primary is None:
            return
        try:
            lease = await self._checkout(primary, "read", timeout=self._connect_timeout)
        except NodeUnavailableError:
            return
        try:
            await self.classifier.alearn_functions(lease.conn)
            self._functions_learned = True
        except psycopg.Error as exc:
            log.warning("could not learn function volatility from %s: %s", primary,
                        self._scrub(primary, str(exc)))  # fmt: skip
        finally:
            await self._checkin(lease)

    async def route_read(self, max_lag: float | None = None, prefer: str | None = None) -> str:
        """The node name a read in the current scope should use now (see
        :meth:`Cluster.route_read`; ``fallback="wait"`` waits without blocking the loop)."""
        monitor = self._require_monitor()
        topology = monitor.topology
        plan = self._plan_read(topology, max_lag, None, None)
        wait_until: float | None = None
        while True:
            decision = self._decide(topology, plan, frozenset(), prefer)
            reason = decision.fallback
            target = decision.target
            if (reason is not None and not plan.force_primary and self._fallback == "wait"
                    and decision.waitable):  # fmt: skip
                now = time.monotonic()
                if wait_until is None:
                    wait_until = now + self._consistency_timeout
                if now < wait_until:
                    ready = self._ready(plan, frozenset())
                    waited = await asyncio.to_thread(
                        monitor.wait_for, ready, min(wait_until - now, _WAIT_SLICE)
                    )
                    topology = waited or monitor.topology
                    continue
                target = self._after_wait(topology, decision, frozenset(), ())
            if target is None:
                raise self._read_failed(decision, ())
            if reason is not None:
                self._count_fallback(reason, target)
            self._count_route("read", target, reason or "replica")
            return target

    async def route_write(self) -> str:
        """The node name a write should use now (see :meth:`Cluster.route_write`)."""
        monitor = self._require_monitor()
        deadline = time.monotonic() + (self._write_timeout or 0.0)
        while True:
            topology = monitor.topology
            target = route_write(topology)
            if target is not None:
                self._count_route("write", target)
                return target
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_primary(monitor.topology, None)
            await asyncio.to_thread(
                monitor.wait_for, _new_primary_after(topology.generation), remaining
            )

    async def _capture_commit(self, conn: psycopg.AsyncConnection[Any]) -> int | None:
        if self._ryw != "lsn":
            await conn.commit()
            self._note_write(None)
            return None
        position = await acommit_and_capture(conn)
        if position is not None:
            self._note_write(position)
        return position


class _AsyncReadBlock:
    __slots__ = ("_args", "_cluster", "_lease")

    def __init__(
        self,
        cluster: AsyncCluster,
        max_lag: float | None,
        max_lag_bytes: int | None,
        max_staleness: float | None,
    ) -> None:
        self._cluster = cluster
        self._args = (max_lag, max_lag_bytes, max_staleness)
        self._lease: Lease[psycopg.AsyncConnection[Any]] | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self._lease = lease = await self._cluster._acquire_read(*self._args)
        return lease.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await self._cluster._release_read(lease)


class _AsyncWriteBlock:
    __slots__ = ("_cluster", "_lease")

    def __init__(self, cluster: AsyncCluster) -> None:
        self._cluster = cluster
        self._lease: Lease[psycopg.AsyncConnection[Any]] | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self._lease = lease = await self._cluster._acquire_write()
        return lease.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await self._cluster._release_write(lease, exc)
