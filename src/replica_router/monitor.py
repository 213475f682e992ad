"""The node monitor: one cheap probe per node per interval -> immutable ``Topology``.

Each round probes every due node with one query on its own dedicated connection
(autocommit, short connect and statement timeouts), each node in its own worker
thread, so that a hung node costs the others nothing: the round waits at most
the probe timeout, and a node still busy after that simply misses the round
(and counts a failure once its probe is overdue). The current primary is probed
first, so replica lag in bytes compares against a fresh primary position. Then
the round elects the primary from what the nodes *say* (roles are measured, not
configured), derives lag, builds a new ``Topology`` and swaps it in as a whole:
readers take ``monitor.topology`` without a lock.

Failures are counted per node: unhealthy after ``failure_threshold`` consecutive
failures, healthy again after one successful probe (a probe is a real query on
the node, so one answer is proof enough). A node that keeps failing is retried
with a doubling backoff (up to ``_MAX_BACKOFF``), not every interval.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from .dsn import password_of, scrub
from .errors import ConfigurationError
from .events import Event, EventBus, FailoverDetected, NodeFenced, NodeStateChanged
from .sources import hung_peer_kwargs, shut_down_socket
from .topology import NodeSpec, NodeState, Role, Topology

__all__ = [
    "APPLICATION_NAME",
    "PROBE_SQL",
    "AfterRound",
    "Monitor",
    "ProbeStats",
    "Timelines",
    "elect_primary",
    "on_history",
]

log = logging.getLogger("replica_router.monitor")

APPLICATION_NAME = "replica-router-monitor"

# One round trip per node per interval. Every volatile input is read once in the
# inner SELECT so the row is one consistent moment; functions that only work in
# (or out of) recovery are guarded by CASE. Lag in seconds is 0 when the replica
# has replayed everything it received (the naive ``now() - last replay time``
# grows forever on an idle, fully caught-up replica); ``replay_age`` is kept for
# the monitor, which also knows whether the primary has more than was received.
# The primary's timeline comes from its current WAL file name, which changes at
# promotion (the checkpoint's timeline only changes at the next checkpoint). A
# replica's is the timeline of the WAL its walreceiver last received (the last
# column, NULL while no walreceiver runs; the checkpoint's timeline stands in for the
# timeline column only). pg_stat_wal_receiver.received_tli exists in PostgreSQL 9.6-18.
PROBE_SQL = """\
SELECT s.r,
       CASE WHEN s.r THEN NULL ELSE (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END,
       (s.received - '0/0'::pg_lsn)::bigint,
       (s.replayed - '0/0'::pg_lsn)::bigint,
       CASE WHEN s.r THEN pg_is_wal_replay_paused() ELSE false END,
       CASE WHEN NOT s.r THEN 0.0
            WHEN s.received IS NULL OR s.received <= s.replayed THEN 0.0
            ELSE extract(epoch FROM now() - s.replayed_at)::float8 END,
       extract(epoch FROM now() - s.replayed_at)::float8,
       CASE WHEN s.r
            THEN coalesce(s.received_tli, (pg_control_checkpoint()).timeline_id)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END,
       s.received_tli
FROM (SELECT pg_is_in_recovery() AS r,
             pg_last_wal_receive_lsn() AS received,
             pg_last_wal_replay_lsn() AS replayed,
             pg_last_xact_replay_timestamp() AS replayed_at,
             (SELECT received_tli FROM pg_stat_wal_receiver) AS received_tli) AS s"""

# A primary's timeline history (its ancestors and where it left each), read once per
# new timeline. Needs superuser or pg_read_server_files; without it the history is
# unknown and a replica on another timeline is taken as diverged (no reads).
_HISTORY_SQL = (
    "SELECT convert_from(pg_read_binary_file("
    "'pg_wal/' || lpad(upper(to_hex(%s::int)), 8, '0') || '.history'), 'UTF8')"
)

_SYSTEM_ID_SQL = "SELECT system_identifier FROM pg_control_system()"

_LATENCY_WEIGHT = 0.3  # EWMA: the newest probe counts 30%, history 70%
_MAX_BACKOFF = 4.0  # seconds between retries of a node that keeps failing
_MIN_ROUND_GAP = 0.05  # mark_suspect can pull a round forward, but not into a busy loop
_WORKER_IDLE = 10.0  # seconds a node's worker thread waits for its next probe


@dataclass(frozen=True, slots=True)
class ProbeStats:
    """Per-node counters since the monitor was made (for benchmarks and status)."""

    probes: int = 0  # probe attempts, successful or not
    failures: int = 0
    connect_attempts: int = 0


@dataclass(frozen=True, slots=True)
class _Sample:
    """One probe's row, as the node reported it."""

    in_recovery: bool
    current_lsn: int | None
    receive_lsn: int | None
    replay_lsn: int | None
    replay_paused: bool
    lag_seconds: float | None  # server side: 0 when everything received is replayed
    replay_age: float | None  # now() - pg_last_xact_replay_timestamp()
    timeline: int | None
    received_timeline: int | None  # replica: its walreceiver's received_tli, if one runs
    system_identifier: int | None
    round_trip_ms: float
    started_at: float  # time.monotonic() when the query was sent


@dataclass(frozen=True, slots=True)
class _Failure:
    error: str  # redacted
    unanswered: bool = False  # the node took the query and never answered (hung?)


def elect_primary(
    states: Iterable[NodeState],
    previous: str | None = None,
    *,
    newest_timeline: int | None = None,
) -> tuple[str | None, frozenset[str]]:
    """Which node takes writes, and which nodes to fence.

    Candidates are healthy nodes that report themselves primary (not in
    recovery). The highest timeline wins; a tie keeps ``previous`` if it is among
    them, else the furthest WAL position, else the first name. Every other
    claimant is fenced, as is any claimant below ``newest_timeline`` (the newest
    timeline a primary ever had: an old primary coming back while the new one is
    down must not take writes) and any node of another cluster (a different
    system identifier from the winner's).
    """
    states = tuple(states)
    claimants = [s for s in states if s.healthy and s.role is Role.PRIMARY]
    if not claimants:
        return None, frozenset()
    top = max(_timeline(s) for s in claimants)
    if newest_timeline is not None and top < newest_timeline:
        return None, frozenset(s.name for s in claimants)
    best = [s for s in claimants if _timeline(s) == top]
    winner = next((s for s in best if s.name == previous), None)
    if winner is None:
        winner = max(best, key=lambda s: (s.current_lsn or 0, _reverse_name(s.name)))
    fenced = {s.name for s in claimants if s is not winner}
    sysid = winner.system_identifier
    if sysid is not None:
        fenced.update(
            s.name
            for s in states
            if s.system_identifier is not None and s.system_identifier != sysid
        )
    return winner.name, frozenset(fenced)


def _timeline(state: NodeState) -> int:
    return -1 if state.timeline is None else state.timeline


def _reverse_name(name: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in name)  # max() then prefers the first name in order


History = Mapping[int, int]
"""A timeline's ancestors: ancestor timeline -> the WAL position where it was left."""


class Timelines:
    """What a cluster has learned about its timelines: the newest one any elected
    primary had, and that timeline's history (None: not readable).

    It outlives a monitor: ``Cluster`` keeps one for its whole life and hands it to
    each monitor it opens, so an old primary that comes back after ``close()`` /
    ``open()`` is fenced again (issue 11, design rule 3). Changed only on the
    monitor thread, under the monitor's lock.
    """

    __slots__ = ("history", "newest")

    def __init__(self) -> None:
        self.newest: int | None = None
        self.history: History | None = None

    def learn(self, timeline: int, history: History | None) -> None:
        """An elected primary is on ``timeline`` (with ``history``, when known)."""
        if self.newest is None or timeline > self.newest:
            self.newest, self.history = timeline, history
        elif timeline == self.newest and history is not None:
            self.history = history

    def __repr__(self) -> str:
        return f"<Timelines newest={self.newest} history={dict(self.history or {})}>"


def on_history(
    timeline: int | None,
    position: int | None,
    current: int | None,
    history: History | None,
) -> bool:
    """Whether a replica whose WAL is on ``timeline`` up to ``position`` holds a prefix
    of the current primary's timeline ``current`` (pure; issue 11, design rule 4).

    True on the same timeline, or on an ancestor the primary's history left at or
    after ``position`` (the replica is behind, and can follow). False on any other
    timeline: it has WAL the primary never had, so its positions mean nothing
    against the primary's, however large. Unknown inputs count as on it, except an
    older timeline without a readable history, which cannot be shown to be a prefix.
    """
    if timeline is None or current is None or timeline == current:
        return True
    if history is None or timeline not in history:
        return False
    return position is None or position <= history[timeline]


def parse_history(text: str) -> dict[int, int]:
    """A ``.history`` file (``parent-tli<TAB>switch-LSN<TAB>reason`` per line)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            high, _, low = fields[1].partition("/")
            with contextlib.suppress(ValueError):
                out[int(fields[0])] = (int(high, 16) << 32) | int(low, 16)
    return out


class _Node:
    """Mutable per-node bookkeeping; owned by the monitor, changed under its lock
    (the connection only by the node's worker thread while ``in_flight``).

    Each node has its own worker thread, started on the first probe and gone
    after ``idle`` seconds without one (so a ``refresh()`` without ``start()``
    leaves nothing behind). A worker is reused round after round: handing it a
    probe costs a fraction of starting a thread.
    """

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.conn: psycopg.Connection[TupleRow] | None = None
        self.system_identifier: int | None = None
        self.latency_ms: float | None = None
        self.failures = 0
        self.successes = 0
        self.last_error: str | None = None
        self.next_attempt = 0.0  # time.monotonic() before which we do not probe
        self.worker: threading.Thread | None = None
        self._signal = threading.Condition(threading.Lock())
        self._requested = False
        self._busy = False  # a probe is requested or running
        self._done = threading.Event()
        self._retired = False
        self.started_at = 0.0
        self.connecting = False
        self.aborted = False  # the monitor closed this probe's socket: it never answered
        self.outcome: _Sample | _Failure | None = None  # finished, not yet applied
        self.last_sample: _Sample | None = None
        self.received_timeline: int | None = None  # last seen; kept while no walreceiver runs
        self.history: tuple[int, History | None] | None = None  # (its timeline, history)
        self.fresh_as_of: float | None = None  # had every primary WAL byte as of then
        self.removed = False
        self.stats = ProbeStats()
        self._secret = password_of(spec.dsn)

    @property
    def in_flight(self) -> bool:
        return self._busy

    def submit(self, probe: Callable[[_Node], None], thread_name: str, idle: float) -> None:
        """Have the worker run ``probe(self)`` (starting the worker if needed)."""
        with self._signal:
            self._busy, self._requested, self._retired = True, True, False
            self._done.clear()
            if self.worker is None:
                self.worker = threading.Thread(
                    target=self._work, args=(probe, idle), name=thread_name, daemon=True
                )
                self.worker.start()
            else:
                self._signal.notify()

    def wait_done(self, timeout: float) -> bool:
        return self._done.wait(max(0.0, timeout))

    def retire(self) -> None:
        """Let the worker end once its current probe (if any) returns."""
        with self._signal:
            self._retired = True
            self._signal.notify()

    def _work(self, probe: Callable[[_Node], None], idle: float) -> None:
        while True:
            with self._signal:
                while not self._requested:
                    if self._retired or not self._signal.wait(idle):
                        if self._requested:
                            break
                        self.worker = None
                        return
                self._requested = False
            try:
                probe(self)
            finally:
                with self._signal:
                    self._busy = False
                    self._done.set()

    def scrub(self, text: str) -> str:
        return scrub(text, self._secret)


AfterRound = Callable[["Monitor", Topology], None]
"""Called on the monitor thread after each of its rounds with the new snapshot
(``failover="promote"``: :class:`replica_router.failover.Promoter`)."""


class Monitor:
    """Background prober that publishes ``Topology`` snapshots.

    Nothing runs until ``start()`` (or a ``refresh()``); ``stop()`` ends the
    thread and closes the probe connections. ``failovers`` and
    ``fenced_events`` count what the events report. ``on_unanswered(name)`` runs on
    the monitor thread when a node is taken out of routing because it took a query
    and never answered (the cluster abandons its connections there).
    """

    def __init__(
        self,
        specs: Sequence[NodeSpec],
        *,
        interval: float = 0.5,
        failure_threshold: int = 2,
        connect_timeout: float = 2.0,
        probe_timeout: float = 1.0,
        events: EventBus,
        name: str = "replica-router-monitor",
        after_round: AfterRound | None = None,
        on_unanswered: Callable[[str], None] | None = None,
        timelines: Timelines | None = None,
    ) -> None:
        _check_positive("monitor_interval", interval)
        _check_positive("connect_timeout", connect_timeout)
        _check_positive("probe_timeout", probe_timeout)
        if (
            isinstance(failure_threshold, bool)
            or not isinstance(failure_threshold, int)
            or failure_threshold < 1
        ):
            raise ConfigurationError(
                f"failure_threshold: expected a whole number >= 1, got {failure_threshold!r}"
            )
        self.interval = float(interval)
        self.failure_threshold = failure_threshold
        self.connect_timeout = float(connect_timeout)
        self.probe_timeout = float(probe_timeout)
        self.events = events
        self.name = name
        self.after_round = after_round
        # Called with a node's name when it is taken out of routing for not answering.
        self.on_unanswered = on_unanswered
        self._unanswered: list[str] = []
        self.failovers = 0
        self.fenced_events = 0
        self._nodes: dict[str, _Node] = {}
        for spec in specs:
            self._add(spec)
        self._cond = threading.Condition()  # guards _nodes, bookkeeping and publishing
        self._emit_lock = threading.RLock()  # events leave in publishing order
        self._round_lock = threading.Lock()  # one round at a time (loop or refresh)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._timelines = timelines if timelines is not None else Timelines()
        self._last_primary: str | None = None  # last elected, survives "no primary"
        self._promoted_by_router: str | None = None
        self._topology = Topology(
            nodes=tuple(NodeState(name=s.name) for s in specs), primary=None, generation=0
        )

    # -- public surface -----------------------------------------------------------

    @property
    def topology(self) -> Topology:
        """The current snapshot (replaced whole by every round; never mutated)."""
        return self._topology

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def specs(self) -> tuple[NodeSpec, ...]:
        """The nodes being monitored (configuration, in the order they were added)."""
        with self._cond:
            return tuple(node.spec for node in self._nodes.values())

    @property
    def last_primary(self) -> str | None:
        """The last elected primary; unlike ``topology.primary`` it survives the
        primary going down (it is whom a failover moves writes away from)."""
        return self._last_primary

    @property
    def newest_timeline(self) -> int | None:
        """The newest timeline any elected primary has had (fencing's yardstick)."""
        return self._timelines.newest

    def note_promoted(self, name: str) -> None:
        """The router itself promoted ``name``: the failover to it is reported with
        ``promoted_by_router=True``."""
        with self._cond:
            self._promoted_by_router = name
        self._wake.set()  # probe it now: writers are waiting

    def start(self) -> None:
        """Probe every node once, publish, then keep probing in a daemon thread."""
        if self.running:
            return
        self._stopping.clear()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (joined up to ``timeout``) and close probe connections."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("monitor thread %s did not stop within %.1f s", self.name, timeout)
        with self._cond:
            nodes = list(self._nodes.values())
        for node in nodes:
            self._close_node(node, deadline)

    def refresh(self) -> Topology:
        """Probe every node now (ignoring backoff), publish and return the snapshot.

        Waits for connection attempts too (up to connect + probe timeout), so it
        also serves as the first look at a cluster before ``start()``.
        """
        return self._round(everyone=True)

    def wait_for(self, predicate: Callable[[Topology], bool], timeout: float) -> Topology | None:
        """The first snapshot (the current one included) satisfying ``predicate``;
        None when none did within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        topology = self._topology
        while True:
            if predicate(topology):
                return topology
            with self._cond:
                while self._topology is topology:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
                topology = self._topology

    def mark_suspect(self, name: str, error: str) -> None:
        """A user-path connection to ``name`` failed: count a failure now (unhealthy
        at once when that reaches the threshold) and probe the node soon."""
        with self._locked() as pending:
            node = self._nodes.get(name)
            if node is None or node.failures >= self.failure_threshold:
                return  # unknown, or already known to be down (keep its backoff)
            node.failures += 1
            node.successes = 0
            node.last_error = node.scrub(error)
            node.next_attempt = 0.0
            log.warning("%s suspected by a user connection: %s", name, node.last_error)
            if node.failures >= self.failure_threshold:
                states = [
                    self._state_after_failure(node, self._topology.by_name.get(n))
                    if n == name
                    else self._topology.by_name.get(n) or NodeState(name=n)
                    for n in self._nodes
                ]
                self._publish(states, pending)
        self._wake.set()

    def probe_soon(self, name: str) -> None:
        """A user-path connection to ``name`` ended under its user (the server went
        away, restarted or ended the session): probe the node now instead of at the
        next interval, counting nothing against it. Only a fresh connection that fails
        too says the node is down (design rule 9)."""
        with self._locked():
            node = self._nodes.get(name)
            if node is None:
                return
            node.next_attempt = 0.0
        self._wake.set()

    def add_node(self, spec: NodeSpec) -> None:
        """Start probing another node (from the next round on)."""
        with self._locked() as pending:
            self._add(spec)
            self._publish([*self._topology.nodes, NodeState(name=spec.name)], pending)
        self._wake.set()

    def remove_node(self, name: str) -> None:
        """Stop probing ``name`` and drop it from the topology."""
        with self._locked() as pending:
            node = self._nodes.pop(name, None)
            if node is None:
                raise ConfigurationError(f"no node named {name!r}")
            node.removed = True
            self._publish([s for s in self._topology.nodes if s.name != name], pending)
        self._close_node(node, time.monotonic())

    def probe_stats(self) -> dict[str, ProbeStats]:
        with self._cond:
            return {name: node.stats for name, node in self._nodes.items()}

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Monitor {self.name} {state} nodes={list(self._nodes)} every {self.interval}s>"

    # -- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        log.debug("%s started", self.name)
        last_start = time.monotonic()
        while not self._stopping.is_set():
            delay = last_start + self.interval - time.monotonic()
            if self._wake.wait(max(0.0, delay)):
                self._wake.clear()
                gap = last_start + _MIN_ROUND_GAP - time.monotonic()
                if gap > 0 and self._stopping.wait(gap):
                    break
            if self._stopping.is_set():
                break
            last_start = time.monotonic()
            try:
                topology = self._round(everyone=False)
                if self.after_round is not None:
                    self.after_round(self, topology)
            except Exception:  # a bug must not end monitoring: log it, go on
                log.exception("%s: probe round failed", self.name)
        log.debug("%s stopped", self.name)

    def _round(self, *, everyone: bool) -> Topology:
        with self._round_lock:
            now = time.monotonic()
            with self._cond:
                nodes = list(self._nodes.values())
            due = [n for n in nodes if not n.in_flight and (everyone or n.next_attempt <= now)]
            # The primary first (when it is alive), so replicas compare with its LSN.
            first = [n for n in due if self._probably_primary(n) and n.conn is not None]
            self._dispatch(first)
            self._wait(first, everyone)
            rest = [n for n in due if n not in first]
            self._dispatch(rest)
            self._wait(rest, everyone)
            with self._locked() as pending:
                topology = self._apply(pending)
            self._abandon_unanswered()
            return topology

    def _probably_primary(self, node: _Node) -> bool:
        if node.last_sample is not None:
            return not node.last_sample.in_recovery
        return node.spec.role is Role.PRIMARY

    def _dispatch(self, nodes: list[_Node]) -> None:
        idle = max(_WORKER_IDLE, 3 * self.interval)
        for node in nodes:
            node.started_at = time.monotonic()
            node.connecting = node.conn is None or node.conn.closed
            node.aborted = False
            node.submit(self._probe_node, f"{self.name}:{node.spec.name}", idle)

    def _wait(self, nodes: list[_Node], everyone: bool) -> None:
        """Wait for probes to finish, up to the probe timeout (or, when asked for
        everyone, until a connection attempt could have timed out too); a query
        still unanswered then is abandoned (see :meth:`_abort`)."""
        for node in nodes:
            limit = self.probe_timeout
            if node.connecting and everyone:
                limit += self.connect_timeout
            if not node.wait_done(node.started_at + limit - time.monotonic()):
                self._abort(node)

    @staticmethod
    def _abort(node: _Node) -> None:
        """A query got no answer within the probe timeout: shut its socket down, so
        the worker is free and the next round reconnects, bounded by connect_timeout
        (see :func:`shut_down_socket`). A connection attempt is left to libpq's
        connect_timeout."""
        conn = node.conn
        if node.connecting or conn is None or not node.in_flight:
            return
        node.aborted = True
        shut_down_socket(conn)

    # -- probing (runs in the node's worker thread; never under the monitor's lock) --

    def _probe_node(self, node: _Node) -> None:
        outcome: _Sample | _Failure
        connects = 0
        try:
            if node.conn is None or node.conn.closed:
                connects = 1
                self._connect(node)
            outcome = self._probe(node)
        except Exception as exc:
            outcome = _Failure(node.scrub(f"{type(exc).__name__}: {exc}".strip()))
            if node.aborted:
                outcome = _Failure(
                    f"no answer within {self.probe_timeout:g} s (hung?)", unanswered=True
                )
            if not isinstance(exc, psycopg.Error):
                log.error(
                    "%s: unexpected error probing %s", self.name, node.spec.name, exc_info=True
                )
            conn, node.conn = node.conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        with self._cond:
            stats = node.stats
            node.stats = ProbeStats(
                probes=stats.probes + 1,
                failures=stats.failures + isinstance(outcome, _Failure),
                connect_attempts=stats.connect_attempts + connects,
            )
            node.outcome = outcome
            if node.removed or (self._stopping.is_set() and not self.running):
                self._discard_connection(node)

    def _connect(self, node: _Node) -> None:
        conn = psycopg.connect(
            node.spec.dsn,
            autocommit=True,
            connect_timeout=max(2, math.ceil(self.connect_timeout)),  # libpq's minimum is 2
            application_name=APPLICATION_NAME,
            prepare_threshold=None,  # never server-side: a pooler may switch server connections
            **hung_peer_kwargs(self.probe_timeout),
        )
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (f"{max(1, round(self.probe_timeout * 1000))}ms",),
            )
            try:
                row = conn.execute(_SYSTEM_ID_SQL).fetchone()
                node.system_identifier = int(row[0]) if row and row[0] is not None else None
            except psycopg.errors.InsufficientPrivilege:
                node.system_identifier = None  # managed services may hide it; fine
        except BaseException:
            conn.close()
            raise
        node.conn = conn

    def _probe(self, node: _Node) -> _Sample:
        conn = node.conn
        assert conn is not None
        started = time.monotonic()
        clock = time.perf_counter()
        row = conn.execute(PROBE_SQL).fetchone()
        round_trip_ms = (time.perf_counter() - clock) * 1000.0
        if row is None:
            raise RuntimeError("probe query returned no row")
        (in_recovery, current, received, replayed, paused, lag, age, timeline, rtli) = row
        if not in_recovery and timeline is not None:
            self._learn_history(node, int(timeline))
        return _Sample(
            in_recovery=bool(in_recovery),
            current_lsn=_int_or_none(current),
            receive_lsn=_int_or_none(received),
            replay_lsn=_int_or_none(replayed),
            replay_paused=bool(paused),
            lag_seconds=None if lag is None else max(0.0, float(lag)),
            replay_age=None if age is None else float(age),
            timeline=_int_or_none(timeline),
            received_timeline=_int_or_none(rtli),
            system_identifier=node.system_identifier,
            round_trip_ms=round_trip_ms,
            started_at=started,
        )

    @staticmethod
    def _learn_history(node: _Node, timeline: int) -> None:
        """Read a primary's timeline history once per timeline it is seen on."""
        if node.history is not None and node.history[0] == timeline:
            return
        history: History | None = {}
        if timeline > 1:
            conn = node.conn
            assert conn is not None
            try:
                row = conn.execute(_HISTORY_SQL, (timeline,)).fetchone()
                history = parse_history(str(row[0])) if row and row[0] else None
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFile):
                history = None  # not readable here: replicas on other timelines get no reads
        node.history = (timeline, history)

    def _close_node(self, node: _Node, deadline: float) -> None:
        node.retire()
        if node.in_flight and not node.wait_done(deadline - time.monotonic()):
            return  # still stuck in I/O; it closes its connection when it returns
        with self._cond:
            self._discard_connection(node)

    @staticmethod
    def _discard_connection(node: _Node) -> None:
        conn, node.conn = node.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- turning outcomes into a snapshot (under self._cond) --------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[Event]]:
        """Hold the state lock; events gathered meanwhile are emitted after it is
        released (subscribers never run under it), still in publishing order."""
        pending: list[Event] = []
        with self._emit_lock:
            with self._cond:
                yield pending
            if self.events.active:
                for event in pending:
                    self.events.emit(event)

    def _apply(self, pending: list[Event]) -> Topology:
        now = time.monotonic()
        previous = self._topology
        states: list[NodeState] = []
        for node in self._nodes.values():  # not just this round's: add_node may have run
            old = previous.by_name.get(node.spec.name)
            try:
                states.append(self._settle(node, old, now))
            except Exception as exc:  # a bug in derivation becomes node state, not a dead loop
                log.exception("%s: could not update %s", self.name, node.spec.name)
                node.last_error = node.scrub(f"internal error: {exc}")
                base = old or NodeState(name=node.spec.name)
                states.append(replace(base, last_error=node.last_error))
        # Lag needs to know which node is the primary, so it comes after the election;
        # so does whether a replica is on the primary's timeline.
        primary, _ = elect_primary(
            states, self._last_primary, newest_timeline=self._timelines.newest
        )
        states = [self._with_timeline(s, primary) for s in states]
        reference = self._reference_position(primary, now, states)
        final = [self._with_lag(self._nodes[s.name], s, reference, now) for s in states]
        return self._publish(final, pending)

    def _with_timeline(self, state: NodeState, primary: str | None) -> NodeState:
        """Mark a replica ``diverged`` when its WAL is not a prefix of the current
        primary's timeline (with no primary, of the newest timeline known)."""
        node = self._nodes[state.name]
        sample = node.last_sample
        if state.role is not Role.REPLICA or sample is None or not sample.in_recovery:
            return replace(state, diverged=False) if state.diverged else state
        if sample.received_timeline is not None:
            node.received_timeline = sample.received_timeline
        # Only a measured received timeline counts: the checkpoint's lags for minutes
        # after a failover, and received_tli is NULL without pg_read_all_stats.
        timeline = node.received_timeline
        current, history = self._timelines.newest, self._timelines.history
        if primary is not None:
            primary_sample = self._nodes[primary].last_sample
            known = self._nodes[primary].history
            if primary_sample is not None and primary_sample.timeline is not None:
                current = primary_sample.timeline
                history = known[1] if known and known[0] == current else None
        reached = max(sample.receive_lsn or 0, sample.replay_lsn or 0) or None
        diverged = not on_history(timeline, reached, current, history)
        return replace(state, diverged=diverged) if state.diverged != diverged else state

    def _reference_position(
        self, primary: str | None, now: float, states: Sequence[NodeState]
    ) -> tuple[int, float] | None:
        """The newest WAL position that exists, and when it was measured: the
        primary's; with no primary, the furthest any replica on the newest timeline
        got (whatever the dead primary wrote and nobody received is not there to be
        read; a diverged replica's positions belong to another history)."""
        if primary is not None:
            sample = self._nodes[primary].last_sample
            if sample is not None and sample.current_lsn is not None:
                return sample.current_lsn, sample.started_at
            return None
        furthest = max(
            (
                max(n.last_sample.receive_lsn or 0, n.last_sample.replay_lsn or 0)
                for n, state in ((self._nodes[s.name], s) for s in states)
                if n.last_sample is not None
                and n.failures == 0
                and n.last_sample.in_recovery
                and not state.diverged
            ),
            default=None,
        )
        return None if furthest is None else (furthest, now)

    def _settle(self, node: _Node, old: NodeState | None, now: float) -> NodeState:
        """Fold the node's finished probe (if any) into its counters and state."""
        outcome, node.outcome = node.outcome, None
        if isinstance(outcome, _Sample):
            return self._state_after_success(node, outcome)
        if isinstance(outcome, _Failure):
            self._count_failure(node, outcome.error, now)
            if outcome.unanswered:
                self._note_unanswered(node)
            return self._state_after_failure(node, old)
        # A node that just failed gets no connect_timeout of grace: reconnecting to a
        # hung server hangs too, and counting it keeps detection within a few seconds.
        grace = self.connect_timeout if node.connecting and node.failures == 0 else 0.0
        limit = self.probe_timeout + grace
        if node.in_flight and now - node.started_at > limit:
            waited = now - node.started_at
            self._count_failure(node, f"no answer for {waited:.1f} s", now)
            self._note_unanswered(node)
            return self._state_after_failure(node, old)
        return old or NodeState(name=node.spec.name)  # not probed this round

    def _state_after_success(self, node: _Node, sample: _Sample) -> NodeState:
        if node.failures >= self.failure_threshold:
            log.info("%s is reachable again", node.spec.name)
        node.failures = 0
        node.successes += 1
        node.last_error = None
        node.next_attempt = 0.0
        node.last_sample = sample
        rtt = sample.round_trip_ms
        previous = node.latency_ms
        node.latency_ms = rtt if previous is None else previous + _LATENCY_WEIGHT * (rtt - previous)
        primary = not sample.in_recovery
        return NodeState(
            name=node.spec.name,
            role=Role.PRIMARY if primary else Role.REPLICA,
            healthy=True,
            timeline=sample.timeline,
            system_identifier=sample.system_identifier,
            current_lsn=sample.current_lsn,
            receive_lsn=sample.receive_lsn,
            replay_lsn=sample.current_lsn if primary else sample.replay_lsn,
            replay_paused=sample.replay_paused,
            latency_ms=round(node.latency_ms, 3),
            consecutive_successes=node.successes,
            probed_at=sample.started_at,
        )

    def _count_failure(self, node: _Node, error: str, now: float) -> None:
        node.failures += 1
        node.successes = 0
        node.last_error = error
        beyond = node.failures - self.failure_threshold
        if beyond >= 0:
            backoff = min(max(_MAX_BACKOFF, self.interval), self.interval * 2**beyond)
            node.next_attempt = now + backoff
        level = logging.WARNING if node.failures in (1, self.failure_threshold) else logging.DEBUG
        log.log(
            level,
            "%s: probe failed (%d in a row%s): %s",
            node.spec.name,
            node.failures,
            ", unhealthy" if beyond >= 0 else "",
            error,
        )

    def _note_unanswered(self, node: _Node) -> None:
        """The node is out of routing because it stopped answering: what others still
        wait for there will not come back either (design rule 10)."""
        if node.failures >= self.failure_threshold:
            self._unanswered.append(node.spec.name)

    def _abandon_unanswered(self) -> None:
        """Run ``on_unanswered`` for this round's hung nodes (outside the lock)."""
        names, self._unanswered = self._unanswered, []
        if self.on_unanswered is None:
            return
        for name in names:
            try:
                self.on_unanswered(name)
            except Exception:  # monitoring must go on
                log.exception("%s: on_unanswered(%r) failed", self.name, name)

    def _state_after_failure(self, node: _Node, old: NodeState | None) -> NodeState:
        base = old or NodeState(name=node.spec.name)
        return replace(
            base,
            healthy=base.role is not Role.UNKNOWN and node.failures < self.failure_threshold,
            consecutive_failures=node.failures,
            consecutive_successes=0,
            last_error=node.last_error,
            probed_at=time.monotonic(),
        )

    def _with_lag(
        self, node: _Node, state: NodeState, reference: tuple[int, float] | None, now: float
    ) -> NodeState:
        """Lag from the node's latest sample: bytes behind the reference position;
        seconds 0 when nothing is missing, else bounded both by the last replayed
        commit's age and by how long ago the node last had everything. A sample
        from an earlier round (probe failed or still running) is aged, not trusted."""
        sample = node.last_sample
        if state.role is Role.PRIMARY:
            return replace(state, lag_bytes=0, lag_seconds=0.0)
        if state.role is not Role.REPLICA or sample is None or not sample.in_recovery:
            return state
        if state.diverged:  # its positions cannot be compared with the primary's
            return replace(state, lag_bytes=None, lag_seconds=None)
        since_sample = max(0.0, now - sample.started_at)
        lag_bytes: int | None = None
        if reference is not None and sample.replay_lsn is not None:
            position, measured_at = reference
            lag_bytes = max(0, position - sample.replay_lsn)
            if lag_bytes == 0:
                node.fresh_as_of = measured_at
        lag_seconds: float | None
        if lag_bytes == 0:
            lag_seconds = 0.0
        elif lag_bytes is None:  # nothing to compare with: the node's own view
            lag_seconds = sample.lag_seconds
            if lag_seconds:
                lag_seconds += since_sample
        else:
            bounds = [_age(node.fresh_as_of, now)]
            if sample.replay_age is not None:
                bounds.append(sample.replay_age + since_sample)
            known = [b for b in bounds if b is not None]
            lag_seconds = max(0.0, min(known)) if known else None
        return replace(state, lag_bytes=lag_bytes, lag_seconds=lag_seconds)

    def _publish(self, states: list[NodeState], pending: list[Event]) -> Topology:
        """Elect, fence, swap the snapshot in, wake waiters, queue events."""
        primary, fenced = elect_primary(
            states, self._last_primary, newest_timeline=self._timelines.newest
        )
        states = [
            replace(s, fenced=s.name in fenced) if s.fenced != (s.name in fenced) else s
            for s in states
        ]
        previous = self._topology
        topology = Topology(
            nodes=tuple(states),
            primary=primary,
            generation=previous.generation + 1,
            taken_at=time.monotonic(),
        )
        self._topology = topology
        self._cond.notify_all()
        self._report(previous, topology, pending)
        return topology

    def _report(self, previous: Topology, topology: Topology, pending: list[Event]) -> None:
        primary = topology.primary
        primary_state = topology.primary_state
        primary_tl = primary_state.timeline if primary_state else self._timelines.newest
        for state in topology.nodes:
            old = previous.by_name.get(state.name)
            if state.fenced and not (old is not None and old.fenced):
                self.fenced_events += 1
                log.error(
                    "%s fenced (no reads, no writes): %s",
                    state.name,
                    _why_fenced(state, primary_state, primary_tl),
                )
                pending.append(NodeFenced(state.name, state.timeline, primary_tl))
            if old is None or (old.role, old.healthy, old.fenced) != (
                state.role,
                state.healthy,
                state.fenced,
            ):
                pending.append(NodeStateChanged(state.name, old, state))
        if primary_state is not None and primary_state.timeline is not None:
            history = self._nodes[primary_state.name].history
            known = history[1] if history and history[0] == primary_state.timeline else None
            self._timelines.learn(primary_state.timeline, known)
        if primary is not None and primary != self._last_primary:
            if self._last_primary is not None:
                self.failovers += 1
                log.warning(
                    "failover: writes move from %s to %s (timeline %s)",
                    self._last_primary,
                    primary,
                    primary_tl,
                )
                ours = primary == self._promoted_by_router
                pending.append(FailoverDetected(self._last_primary, primary, primary_tl, ours))
            self._promoted_by_router = None
            self._last_primary = primary

    def _add(self, spec: NodeSpec) -> None:
        if spec.name in self._nodes:
            raise ConfigurationError(f"a node named {spec.name!r} is already monitored")
        self._nodes[spec.name] = _Node(spec)


def _why_fenced(state: NodeState, primary: NodeState | None, primary_timeline: int | None) -> str:
    theirs = primary.system_identifier if primary is not None else None
    if theirs is not None and state.system_identifier not in (None, theirs):
        return (
            f"its system identifier {state.system_identifier} is not the primary's "
            f"{theirs}: it belongs to another cluster"
        )
    return (
        f"it claims primary on timeline {state.timeline}, "
        f"but a primary has been on timeline {primary_timeline}"
    )


def _age(since: float | None, now: float) -> float | None:
    return None if since is None else now - since


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _check_positive(field: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{field}: expected a number of seconds > 0, got {value!r}")
