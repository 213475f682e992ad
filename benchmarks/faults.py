"""Fault-injection checker: client processes, faults on a schedule, invariants after.

Each fault kind is one *episode* on a sandbox (primary + 2 streaming replicas,
``sync=True``: a commit returns once a standby has it). Several client processes
(``spawn``), each with its own ``Cluster``, run a mixed workload while the
scheduler injects the kind's faults:

* writes with unique ids through six paths (``write()``, ``write()`` with
  ``conn.transaction()`` or ``conn.commit()``, ``connection()`` autocommit and
  in ``transaction()``, a ``connection()`` pinned to the primary by a temp
  table), each acknowledgement recorded with the token it left;
* read-your-write pairs: read back in the writer's scope, or in *another*
  process that receives the token as a string;
* monotonic read sequences (``monotonic_reads=True``): a row count read
  several times in one scope, alternating a held ``connection()`` and
  ``read()``.

Every operation goes into a history (start/end, process, kind, ids, token,
port that served it, result or error type); the faults go into the same
history, and so do the rows each server holds at the end. The invariants are
pure functions over that history (``check``). Loopback only; every episode and
every operation is bounded, and the run stops by itself. See docs/reliability.md.

    .venv/bin/python benchmarks/faults.py --schedule full [--seconds S] [--clients 3] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import queue
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psycopg

from replica_router import Cluster, RoutedConnection, Token
from replica_router.errors import Error
from replica_router.sandbox import LocalCluster

logger = logging.getLogger("faults")

# What each client's Cluster is configured with; the time budgets follow from it.
CLIENT_SETTINGS: dict[str, Any] = {
    "max_lag": None,  # only the token and the monotonic floor keep reads off stale replicas
    "monotonic_reads": True,
    "monitor_interval": 0.2,
    "failure_threshold": 2,
    "connect_timeout": 2.0,  # libpq's minimum
    "probe_timeout": 0.5,
    "write_timeout": 2.0,
    "checkout_timeout": 1.0,
    "consistency_timeout": 1.0,
    "pool_kwargs": {  # small, and kept full: after a restart every pooled connection is dead
        "primary": {"min_size": 4, "max_size": 4},
        "replica": {"min_size": 2, "max_size": 4},
    },
}


def settings_for(client: int) -> dict[str, Any]:
    """Odd clients keep the default ``write_timeout=None``: a write fails at once when
    no primary is usable, which is how a healthy primary wrongly taken out of routing
    shows; even clients wait up to 2 s for one."""
    return {**CLIENT_SETTINGS, "write_timeout": None} if client % 2 else dict(CLIENT_SETTINGS)


HUNG_NODE_BOUND = 3.0  # issue 11, rule 10: an operation on a hung node fails or moves within this
OVERTIME_SLACK = 1.0  # an operation may outlive its budget by this much
PACE = 0.01  # pause between a client's operations (a benchmark's pace, not a sync)
MAX_OPS = 50_000  # per client and episode: the run is bounded in count as well as in time
APP_NAME = "rr-faults-client"
PINNED = "pinned connection()"  # a RoutedConnection with a temp table, kept across writes

READS = frozenset({"read-own", "read-handoff", "read-mono"})
ALL_KINDS = frozenset({"write"} | READS)

DOCUMENTED_ERRORS = ("replica_router.errors.Error", "psycopg.OperationalError")
# replica_router errors that mean a bug in the workload or the router, not a fault:
MISUSE_ERRORS = (
    "replica_router.errors.ConfigurationError",
    "replica_router.errors.TokenError",
    "replica_router.errors.SandboxError",
)


# -- the history ------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One client operation as it happened (wall-clock seconds, shared by all processes)."""

    client: int
    kind: str  # "write" | "read-own" | "read-handoff" | "read-mono"
    path: str  # which API served it: "write()", "connection()+transaction()", ...
    start: float
    end: float
    ids: tuple[int, ...] = ()  # the row written, or looked for
    token: str | None = None  # token left by a write / held by a read
    port: int | None = None  # the server that answered
    value: int | None = None  # reads: 1/0 found, or the row count
    seq: int | None = None  # monotonic sequence number (per client) and step in it
    step: int | None = None
    error: str | None = None  # qualified name of the exception type
    error_mro: tuple[str, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class FaultEvent:
    """One fault step: what was done to which node, from when to when."""

    action: str
    node: str
    role: str  # what the node was at the time: "primary", "replica" or "fenced"
    start: float
    end: float
    client: int | None = None  # a client-side fault (pool exhaustion) affects that client only
    detail: str = ""


@dataclass(frozen=True)
class Epoch:
    """``node`` was the primary writes belong on from ``start`` to ``end``.

    A write acknowledged in an epoch that is not ``durable`` may be lost: the
    documented split-brain window, when an old primary still takes writes until
    the monitor sees the promotion elsewhere.
    """

    node: str
    start: float
    end: float = float("inf")
    durable: bool = True

    def covers(self, node: str, moment: float) -> bool:
        return self.node == node and self.start <= moment <= self.end


@dataclass(frozen=True)
class ServerRow:
    """A row of the writes table as one node holds it at the end of the episode."""

    node: str  # where it was found
    id: int
    port: int  # inet_server_port() of the server that ran the INSERT
    timeline: int
    at: float  # clock_timestamp() of the INSERT


@dataclass
class History:
    """Everything an episode did and saw; the invariants read nothing else."""

    kind: str
    ops: list[Op] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    epochs: list[Epoch] = field(default_factory=list)
    rows: list[ServerRow] = field(default_factory=list)
    final_primary: str = "primary"
    ports: dict[int, str] = field(default_factory=dict)  # port -> node name
    settings: dict[int, dict[str, Any]] = field(default_factory=dict)  # per client
    unfinished: list[int] = field(default_factory=list)  # clients that never reported back
    crashes: list[str] = field(default_factory=list)  # clients whose workload itself raised
    origin: float = 0.0  # when the episode's workload began

    def settings_of(self, client: int) -> Mapping[str, Any]:
        return self.settings.get(client) or settings_for(client)

    def node(self, port: int | None) -> str:
        """The node a port belonged to (for messages)."""
        return "?" if port is None else self.ports.get(port, f"port {port}")

    def t(self, moment: float) -> str:
        """A moment as seconds into the episode (for messages)."""
        return f"t={moment - self.origin:.2f}s"


class Attempt:
    """Times one operation and records it, swallowing the exception it raised."""

    def __init__(self, recorder: Recorder, kind: str, path: str, **fields: Any) -> None:
        self._recorder = recorder
        self.kind, self.path, self.fields = kind, path, fields
        self.port: int | None = None
        self.value: int | None = None
        self.token: str | None = fields.pop("token", None)
        self.ok = False

    def __enter__(self) -> Attempt:
        self.start = time.time()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        end = time.time()
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt and friends stop the client
        self.ok = exc is None
        error = mro = None
        if exc is not None:
            mro = tuple(f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__)
            error = mro[0]
        self._recorder.ops.append(
            Op(
                client=self._recorder.client,
                kind=self.kind,
                path=self.path,
                start=self.start,
                end=end,
                token=self.token,
                port=self.port,
                value=self.value,
                error=error,
                error_mro=mro or (),
                message=_first_line(exc),
                **self.fields,
            )
        )
        return True


def _first_line(exc: BaseException | None) -> str:
    text = "" if exc is None else str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


class Recorder:
    """A client's side of the history."""

    def __init__(self, client: int) -> None:
        self.client = client
        self.ops: list[Op] = []
        self.faults: list[FaultEvent] = []

    def attempt(self, kind: str, path: str, **fields: Any) -> Attempt:
        return Attempt(self, kind, path, **fields)


# -- the invariants (pure: a History in, messages out) ----------------------------


def budgets(settings: Mapping[str, Any]) -> dict[str, float]:
    """The longest each kind of operation may take with these settings.

    A write may wait ``write_timeout`` for a primary, then ``checkout_timeout``
    for a connection, then run on a node that may hang (``HUNG_NODE_BOUND``);
    a read may wait for a connection, and with ``fallback="wait"`` for a replica
    to reach its token.
    """
    hung, checkout = HUNG_NODE_BOUND, float(settings["checkout_timeout"])
    write = float(settings["write_timeout"] or 0.0) + checkout + hung
    wait = settings.get("fallback", "primary") == "wait"
    read = checkout + (float(settings["consistency_timeout"]) if wait else 0.0) + hung
    return {"write": write, **dict.fromkeys(READS, read)}


def detection_time(settings: Mapping[str, Any]) -> float:
    """How long the monitor may take to notice a node's change (plus a probe)."""
    return (
        float(settings["failure_threshold"]) * float(settings["monitor_interval"])
        + float(settings["probe_timeout"])
        + 0.5
    )


@dataclass(frozen=True)
class Excuse:
    """Failures of ``kinds`` overlapping ``[start, end]`` are what the fault causes."""

    start: float
    end: float
    kinds: frozenset[str]
    client: int | None = None

    def covers(self, op: Op) -> bool:
        return (
            op.kind in self.kinds
            and (self.client is None or self.client == op.client)
            and op.start <= self.end
            and op.end >= self.start
        )


def excuses(faults: Iterable[FaultEvent], settings: Mapping[str, Any]) -> list[Excuse]:
    """Which failures each fault step explains: the documented ones, no more.

    A killed, restarted or terminated server fails what was in flight on it
    (a new operation gets another node or a fresh connection), and a restarted
    one what came before the monitor probed it again (its backoff grows with the
    time the node was down: ``recovery_time``); a primary outage
    fails writes, and reads that need the primary, until the monitor has seen
    the new primary, and a session pinned to the old primary fails (it cannot
    move); a hung replica may hold a read for the hung-node bound
    until the monitor notices; an exhausted pool fails its own client's
    operations that wait past ``checkout_timeout``. Pausing or delaying replay,
    starting or thawing a node explain no failure at all.
    """
    detect = detection_time(settings)
    notice = 2 * float(settings["monitor_interval"])  # a node back up is probed again
    rules: dict[tuple[str, str], tuple[frozenset[str], float]] = {
        ("kill9", "replica"): (READS, 0.0),
        ("kill9", "primary"): (ALL_KINDS, 0.0),
        ("restart", "primary"): (ALL_KINDS, notice),
        ("restart", "replica"): (READS, notice),
        ("outage", "primary"): (ALL_KINDS, detect),
        ("promote", "replica"): (ALL_KINDS, detect),  # pinned sessions on the old primary fail
        ("freeze", "replica"): (READS, HUNG_NODE_BOUND + detect),
        ("freeze", "primary"): (ALL_KINDS, HUNG_NODE_BOUND + detect),
        ("terminate", "all"): (ALL_KINDS, 0.1),  # the backends die a moment after the signal
        ("exhaust", "primary"): (ALL_KINDS, 0.2),
    }
    found = []
    for f in faults:
        rule = rules.get((f.action, f.role))
        if rule is not None:
            after = rule[1]
            if f.action == "restart":  # a node down for long is probed again only later
                after = max(after, recovery_time(settings, f.end - f.start))
            found.append(Excuse(f.start, f.end + after, rule[0], f.client))
    return found


MONITOR_MAX_BACKOFF = 4.0  # the monitor retries a node that keeps failing at most this far apart


def recovery_time(settings: Mapping[str, Any], down: float) -> float:
    """How long after a node is back the monitor may take to probe it again: its retry
    interval doubles per failed probe beyond ``failure_threshold``, up to 4 s."""
    interval = float(settings["monitor_interval"])
    beyond = max(0, int(down / interval) - int(settings["failure_threshold"]))
    return min(MONITOR_MAX_BACKOFF, interval * 2.0 ** min(beyond, 16)) + interval


def doomed(h: History, write: Op) -> bool:
    """Acknowledged by an old primary in its documented split-brain window: may be lost."""
    return any(not e.durable and e.covers(h.node(write.port), write.end) for e in h.epochs)


def lost_writes(h: History) -> list[str]:
    """Every acknowledged write is on the final primary, as the server that acknowledged it
    (unless it was ``doomed``)."""
    held = {r.id: r for r in h.rows if r.node == h.final_primary}
    out = []
    for op in h.ops:
        if op.kind != "write" or not op.ok:
            continue
        for i in op.ids:
            row = held.get(i)
            if row is None and doomed(h, op):
                continue
            if row is None:
                out.append(
                    f"client {op.client}: write {i} ({op.path}) acknowledged by "
                    f"{h.node(op.port)} at {h.t(op.end)} is not on {h.final_primary}"
                )
            elif op.port is not None and row.port != op.port:
                out.append(
                    f"client {op.client}: write {i} acknowledged by {h.node(op.port)}, but "
                    f"{h.final_primary} holds it as inserted on {h.node(row.port)}"
                )
    return out


def stale_reads(h: History) -> list[str]:
    """A write leaves a token; a read in its scope, or holding its token, sees it
    (unless the write was ``doomed``: then it is gone)."""
    writes = {op.ids[0]: op for op in h.ops if op.kind == "write" and op.ok}
    out = []
    for op in h.ops:
        if op.kind == "write" and op.ok and op.token is None:
            out.append(
                f"client {op.client}: write {op.ids[0]} ({op.path}) was acknowledged "
                "but left no token"
            )
        elif op.kind in ("read-own", "read-handoff") and op.ok and op.value == 0:
            if op.kind == "read-handoff" and op.token is None:
                continue  # the write already failed to leave a token (reported above)
            if op.ids[0] in writes and doomed(h, writes[op.ids[0]]):
                continue
            out.append(
                f"client {op.client}: {op.kind} via {op.path} on {h.node(op.port)} at "
                f"{h.t(op.start)} with token {op.token} missed write {op.ids[0]}"
            )
    return out


def discarded_rows(h: History) -> Callable[[str, float], int]:
    """How many rows a read on ``node`` by ``moment`` could have seen that the cluster
    then discarded with an old timeline's tail, as the servers report them: rows
    ``node`` holds and the final primary does not, inserted on a timeline older than
    the final primary's newest one, whose write was never acknowledged or was
    acknowledged in the documented split-brain window (``doomed``). A read that saw
    them cannot be followed by any read that does: no surviving node has them."""
    final = {r.id for r in h.rows if r.node == h.final_primary}
    newest = max((r.timeline for r in h.rows if r.node == h.final_primary), default=None)
    writes = {op.ids[0]: op for op in h.ops if op.kind == "write" and op.ids}
    tails: dict[str, list[float]] = collections.defaultdict(list)
    for r in h.rows:
        if r.id in final or newest is None or r.timeline >= newest:
            continue
        op = writes.get(r.id)
        if op is not None and (not op.ok or doomed(h, op)):
            tails[r.node].append(r.at)

    def count(node: str, moment: float) -> int:
        return sum(1 for at in tails.get(node, ()) if at <= moment)

    return count


def unacknowledged_commits(h: History) -> Callable[[float, float], int]:
    """How many writes started before ``seen`` and were not yet acknowledged at
    ``asked``: commits a replica may show before their primary does. PostgreSQL flushes
    a commit record (which its replicas may then replay, making the row visible there)
    before it marks the transaction committed in its own snapshots, and answers the
    client only after that; a primary snapshot taken in between does not see the row."""
    writes = [op for op in h.ops if op.kind == "write"]

    def count(seen: float, asked: float) -> int:
        return sum(1 for w in writes if w.start < seen and w.end > asked)

    return count


def monotonic_regressions(h: History) -> list[str]:
    """In a scope of a ``monotonic_reads=True`` cluster, no read sees less than an earlier
    one, except by rows the earlier read's node held on a discarded timeline tail
    (``discarded_rows``): the data it saw is gone, and nothing can read it again; and,
    for a read on the primary after one on a replica, by commits not yet acknowledged
    when it began (``unacknowledged_commits``: not visible on the primary yet)."""
    sequences: dict[tuple[int, int], list[Op]] = collections.defaultdict(list)
    for op in h.ops:
        if op.kind == "read-mono" and op.ok and op.seq is not None and op.value is not None:
            sequences[(op.client, op.seq)].append(op)
    gone = discarded_rows(h)
    pending = unacknowledged_commits(h)
    out = []
    for (client, seq), ops in sorted(sequences.items()):
        best: Op | None = None
        for op in sorted(ops, key=lambda o: o.step or 0):
            value = op.value or 0
            if best is not None and value < (best.value or 0):
                survived = (best.value or 0) - gone(h.node(best.port), best.end)
                node = h.node(op.port)
                if node != h.node(best.port) and any(e.covers(node, op.start) for e in h.epochs):
                    survived -= pending(best.end, op.start)  # visible on the replica first
                if value < survived:
                    out.append(
                        f"client {client} sequence {seq} at {h.t(op.start)}: step {op.step} "
                        f"({op.path}) read {value} rows on {h.node(op.port)} after step "
                        f"{best.step} ({best.path}) read {best.value} on {h.node(best.port)}"
                    )
            if best is None or value >= (best.value or 0):
                best = op
    return out


def misplaced_writes(h: History) -> list[str]:
    """Every row on every server was inserted by the node that was the primary then.

    A replica cannot commit an INSERT, so this catches writes on a fenced node:
    an old primary that took writes after it was replaced, on its dead timeline.
    """
    out = []
    seen: set[tuple[int, int]] = set()
    for row in sorted(h.rows, key=lambda r: (r.id, r.node)):
        if (row.id, row.port) in seen:
            continue
        seen.add((row.id, row.port))
        writer = h.node(row.port)
        if not any(e.covers(writer, row.at) for e in h.epochs):
            out.append(
                f"row {row.id} was inserted on {writer} (timeline {row.timeline}) at "
                f"{h.t(row.at)}, when {writer} was not the primary; found on {row.node}"
            )
    return out


def overtime(h: History) -> list[str]:
    """No operation outlives its budget (``budgets``) by more than ``OVERTIME_SLACK``."""
    out = [f"client {c} never reported back (an operation hung)" for c in h.unfinished]
    for op in h.ops:
        limit = budgets(h.settings_of(op.client))
        if op.duration > limit[op.kind] + OVERTIME_SLACK:
            out.append(
                f"client {op.client}: {op.kind} via {op.path} took {op.duration:.2f} s "
                f"(budget {limit[op.kind]:.1f} s) from {h.t(op.start)} on {h.node(op.port)}: "
                f"{op.error or 'ok'} {op.message}"
            )
    return out


def undocumented_errors(h: History) -> list[str]:
    """Every failure is a documented error: a replica_router.Error about availability, or
    psycopg's OperationalError (a statement in flight when its server went away)."""
    out = [f"a client stopped: {crash}" for crash in h.crashes]
    for op in h.ops:
        if op.ok:
            continue
        documented = any(name in op.error_mro for name in DOCUMENTED_ERRORS)
        if not documented or op.error in MISUSE_ERRORS:
            out.append(
                f"client {op.client}: {op.kind} via {op.path} raised {op.error}: {op.message}"
            )
    return out


BREAKS_SESSIONS = frozenset({"kill9", "restart", "terminate", "outage", "promote", "freeze"})


def _broken_pins(h: History) -> set[int]:
    """Failed uses of a pinned session whose connection a fault broke since its last use:
    the session cannot move (its temp table lives on that connection), so it fails once.
    Returned as indexes into ``h.ops``."""
    breaks = [f for f in h.faults if f.action in BREAKS_SESSIONS]
    last: dict[int, float] = {}
    found = set()
    for index, op in sorted(enumerate(h.ops), key=lambda p: p[1].start):
        if op.path != PINNED:
            continue
        since = last.get(op.client, float("-inf"))
        if not op.ok and any(f.start <= op.end and f.end >= since for f in breaks):
            found.add(index)
        last[op.client] = op.start
    return found


def unexcused_failures(h: History) -> list[str]:
    """An operation fails only when a fault explains it (``excuses``, ``_broken_pins``)."""
    found = excuses(h.faults, h.settings_of(0))  # the monitor's settings are everyone's
    pins = _broken_pins(h)
    out = []
    for index, op in enumerate(h.ops):
        if not op.ok and index not in pins and not any(x.covers(op) for x in found):
            out.append(
                f"client {op.client}: {op.kind} via {op.path} failed at {h.t(op.start)} "
                f"with no fault to explain it: {op.error}: {op.message}"
            )
    return out


INVARIANTS: dict[str, Callable[[History], list[str]]] = {
    "lost write": lost_writes,
    "stale read": stale_reads,
    "monotonic": monotonic_regressions,
    "misplaced write": misplaced_writes,
    "overtime": overtime,
    "undocumented error": undocumented_errors,
    "unexcused failure": unexcused_failures,
}


def check(h: History) -> dict[str, list[str]]:
    """Every invariant's violations (empty lists when the episode was correct)."""
    return {name: invariant(h) for name, invariant in INVARIANTS.items()}


# -- the workload (runs in each client process) -----------------------------------


def create_table(table: str) -> str:
    """The writes table: who inserted each row, on which timeline, when (server clock)."""
    return (
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, client int NOT NULL,"
        " port int NOT NULL DEFAULT inet_server_port(),"
        " timeline int NOT NULL DEFAULT"
        " ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int,"
        " at double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp()))"
    )


@dataclass(frozen=True)
class Statements:
    """The workload's SQL for one episode's table; each returns the answering port last."""

    table: str

    @property
    def insert(self) -> str:
        return f"INSERT INTO {self.table} (id, client) VALUES (%s, %s) RETURNING inet_server_port()"

    @property
    def find(self) -> str:
        return f"SELECT count(*)::int, inet_server_port() FROM {self.table} WHERE id = %s"

    @property
    def count(self) -> str:
        return f"SELECT count(*)::int, inet_server_port() FROM {self.table}"


def _row(cursor: Any) -> tuple[int, int]:
    row = cursor.fetchone()
    assert row is not None
    return int(row[0]), int(row[-1])


def _write_block(cluster: Cluster, sql: str, row: int, client: int) -> int:
    with cluster.write() as conn:
        return _row(conn.execute(sql, (row, client)))[1]


def _write_transaction(cluster: Cluster, sql: str, row: int, client: int) -> int:
    with cluster.write() as conn, conn.transaction():
        return _row(conn.execute(sql, (row, client)))[1]


def _write_commit(cluster: Cluster, sql: str, row: int, client: int) -> int:
    with cluster.write() as conn:
        port = _row(conn.execute(sql, (row, client)))[1]
        conn.commit()
        return port


def _routed_autocommit(cluster: Cluster, sql: str, row: int, client: int) -> int:
    with cluster.connection() as conn:
        return _row(conn.execute(sql, (row, client)))[1]


def _routed_transaction(cluster: Cluster, sql: str, row: int, client: int) -> int:
    with cluster.connection() as conn, conn.transaction():
        return _row(conn.execute(sql, (row, client)))[1]


WRITE_PATHS: dict[str, Callable[[Cluster, str, int, int], int]] = {
    "write()": _write_block,
    "write()+transaction()": _write_transaction,
    "write()+commit()": _write_commit,
    "connection()": _routed_autocommit,
    "connection()+transaction()": _routed_transaction,
}


def _read(cluster: Cluster, path: str, sql: str, params: Sequence[Any] = ()) -> tuple[int, int]:
    if path == "read()":
        with cluster.read() as conn:
            return _row(conn.execute(sql, params))
    with cluster.connection() as routed:
        return _row(routed.execute(sql, params))


@dataclass(frozen=True)
class EpisodeSpec:
    """What every client needs to know about one episode (pickled to the processes)."""

    name: str
    table: str
    dsns: dict[str, str]  # node name -> DSN
    seed: int
    exhaust: tuple[tuple[int, float, float], ...] = ()  # (client, from, to) offsets in seconds
    settings: tuple[dict[str, Any], ...] = ()  # per client


class Workload:
    """One client's operations until the episode ends."""

    def __init__(
        self,
        client: int,
        cluster: Cluster,
        spec: EpisodeSpec,
        handoffs: Sequence[Any],
        reopen: Any,
    ) -> None:
        self.client, self.cluster, self.spec = client, cluster, spec
        self.reopen = reopen  # an Event: when set, close() and open() the Cluster once
        self.rng = random.Random(spec.seed * 1000 + client)
        self.rec = Recorder(client)
        self.sql = Statements(spec.table)
        self.inbox = handoffs[client]
        self.outbox = handoffs[(client + 1) % len(handoffs)]
        self.ids = itertools.count(client * 10**9 + 1)
        self.seqs = itertools.count(1)
        self.pin: RoutedConnection | None = None

    def run(self, start: float, end: float) -> Recorder:
        threads = [
            threading.Thread(target=self._exhaust, args=(start + a, start + b), daemon=True)
            for c, a, b in self.spec.exhaust
            if c == self.client
        ]
        for t in threads:
            t.start()
        reopened = False
        while time.time() < end and len(self.rec.ops) < MAX_OPS:
            if not reopened and self.reopen.is_set():
                reopened = True
                began = time.time()
                self._unpin()
                self.cluster.close()
                self.cluster.open()
                self.rec.faults.append(
                    FaultEvent("reopen", "all", "all", began, time.time(), self.client)
                )
            self._read_handoff()
            roll = self.rng.random()
            if roll < 0.55:
                self._write_then_read()
            else:
                self._monotonic_sequence()
            time.sleep(PACE)
        for t in threads:
            t.join()
        self._unpin()
        return self.rec

    def _write_then_read(self) -> None:
        row = next(self.ids)
        path = self.rng.choice([*WRITE_PATHS, PINNED])
        with self.cluster.session(inherit=False):
            with self.rec.attempt("write", path, ids=(row,)) as w:
                if path == PINNED:
                    w.port = _row(self._pinned().execute(self.sql.insert, (row, self.client)))[1]
                else:
                    w.port = WRITE_PATHS[path](self.cluster, self.sql.insert, row, self.client)
                token = self.cluster.token
                w.token = None if token is None else str(token)
            if not w.ok:
                if path == PINNED:
                    self._unpin()  # a pinned session cannot move: start a new one
                return
            if self.rng.random() < 0.5:
                self.outbox.put((self.spec.name, row, w.token))
                return
            read_path = self.rng.choice(("read()", "connection()"))
            with self.rec.attempt("read-own", read_path, ids=(row,), token=w.token) as r:
                r.value, r.port = _read(self.cluster, read_path, self.sql.find, (row,))

    def _pinned(self) -> RoutedConnection:
        """A session kept for the whole episode, pinned to the primary by a temp table."""
        if self.pin is None:
            pin = self.cluster.connection()
            try:
                pin.execute("CREATE TEMP TABLE IF NOT EXISTS pinned (x int)")
            except BaseException:
                with contextlib.suppress(Exception):
                    pin.close()
                raise
            self.pin = pin
        return self.pin

    def _unpin(self) -> None:
        pin, self.pin = self.pin, None
        if pin is not None:
            with contextlib.suppress(Exception):
                pin.close()

    def _read_handoff(self) -> None:
        try:
            episode, row, token = self.inbox.get_nowait()
        except queue.Empty:
            return
        if episode != self.spec.name:
            return  # left over from an earlier episode (another sandbox)
        path = self.rng.choice(("read()", "connection()"))
        with (
            self.rec.attempt("read-handoff", path, ids=(row,), token=token) as r,
            self.cluster.session(token=token and Token.parse(token), inherit=False),
        ):
            r.value, r.port = _read(self.cluster, path, self.sql.find, (row,))

    def _monotonic_sequence(self) -> None:
        seq = next(self.seqs)
        held = self.rng.random() < 0.5  # alternate a held connection() with read()
        with self.cluster.session(inherit=False), contextlib.ExitStack() as stack:
            routed = None
            for step in range(4):
                use_held = held and step % 2 == 0
                path = "held connection()" if use_held else "read()"
                with self.rec.attempt("read-mono", path, seq=seq, step=step) as r:
                    if use_held:
                        if routed is None:
                            routed = stack.enter_context(self.cluster.connection())
                        r.value, r.port = _row(routed.execute(self.sql.count))
                    else:
                        r.value, r.port = _read(self.cluster, "read()", self.sql.count)
                if not r.ok and use_held:
                    routed = None
                    stack.close()

    def _exhaust(self, begin: float, end: float) -> None:
        """Hold every connection of the primary's write pool for a while."""
        time.sleep(max(0.0, begin - time.time()))
        size = int(self.spec.settings[self.client]["pool_kwargs"]["primary"]["max_size"])
        leases = []
        started = time.time()
        node = self.cluster.topology.primary or "primary"
        try:
            for _ in range(size):
                with contextlib.suppress(Exception):
                    leases.append(self.cluster.checkout(node, purpose="write", timeout=1.0))
            time.sleep(max(0.0, end - time.time()))
        finally:
            for lease in leases:
                with contextlib.suppress(Exception):
                    self.cluster.checkin(lease)
            self.rec.faults.append(
                FaultEvent(
                    "exhaust",
                    node,
                    "primary",
                    started,
                    time.time(),
                    self.client,
                    f"held {len(leases)} of {size} write connections",
                )
            )


def quiet() -> None:
    """Faults make the router and psycopg's pool log loudly, on purpose."""
    for noisy in ("replica_router", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def client_main(
    client: int, inbox: Any, results: Any, handoffs: Sequence[Any], reopen: Any
) -> None:
    """A client process: one episode after another until told to stop (``None``).

    It answers ``("ready", client, None)`` once its Cluster is open, then
    ``("done", client, (ops, faults, crash))`` after the episode; ``crash`` is
    what stopped the workload early (counted as a violation), else ``None``.
    """
    quiet()
    while True:
        spec = inbox.get()
        if spec is None:
            return
        cluster = Cluster(
            primary=spec.dsns["primary"],
            replicas={n: d for n, d in spec.dsns.items() if n != "primary"},
            connect_kwargs={"application_name": f"{APP_NAME}{client}"},
            **spec.settings[client],
        )
        try:
            cluster.open()
        except Exception as exc:
            results.put(("failed", client, f"{type(exc).__name__}: {exc}"))
            continue
        results.put(("ready", client, None))
        start, end = inbox.get()
        workload = Workload(client, cluster, spec, handoffs, reopen)
        crash = None
        try:
            workload.run(start, end)
        except Exception as exc:
            crash = f"client {client}: {type(exc).__name__}: {_first_line(exc)}"
        finally:
            with contextlib.suppress(Exception):
                cluster.close()
        results.put(("done", client, (workload.rec.ops, workload.rec.faults, crash)))


@dataclass
class Reports:
    """What the clients sent back after an episode."""

    ops: list[Op] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)


class ClientPool:
    """The client processes, kept across episodes (starting Python costs seconds)."""

    def __init__(self, clients: int) -> None:
        self._ctx = ctx = mp.get_context("spawn")
        self.results: Any = ctx.Queue()
        self.handoffs = [ctx.Queue() for _ in range(clients)]
        self.reopen: Any = ctx.Event()  # set by the scheduler: every client reopens once
        self.inboxes = [ctx.Queue() for _ in range(clients)]
        self.processes = [self._start(i) for i in range(clients)]

    def _start(self, client: int) -> Any:
        process = self._ctx.Process(
            target=client_main,
            args=(client, self.inboxes[client], self.results, self.handoffs, self.reopen),
            name=f"faults-client{client}",
            daemon=True,
        )
        process.start()
        return process

    def __len__(self) -> int:
        return len(self.processes)

    def prepare(self, spec: EpisodeSpec, timeout: float = 60.0) -> None:
        self.reopen.clear()
        for inbox in self.inboxes:
            inbox.put(spec)
        ready = 0
        while ready < len(self):
            kind, client, payload = self.results.get(timeout=timeout)
            if kind != "ready":
                raise RuntimeError(f"client {client} could not start: {payload}")
            ready += 1

    def go(self, start: float, end: float) -> None:
        for inbox in self.inboxes:
            inbox.put((start, end))

    def collect(self, deadline: float) -> Reports:
        """Every client's history; clients not back by ``deadline`` are replaced."""
        reports = Reports()
        pending = set(range(len(self)))
        while pending:
            try:
                _, client, payload = self.results.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                break
            pending.discard(client)
            ops, faults, crash = payload
            reports.ops.extend(ops)
            reports.faults.extend(faults)
            if crash is not None:
                reports.crashes.append(crash)
        for client in sorted(pending):
            self._replace(client)
            reports.unfinished.append(client)
        return reports

    def _replace(self, client: int) -> None:
        old = self.processes[client]
        old.kill()
        old.join(5)
        self.inboxes[client] = self._ctx.Queue()
        self.processes[client] = self._start(client)

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.processes:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the faults (run by the scheduler in the main process) ------------------------


def _group_alive(group: int) -> bool:
    """Whether a process of ``group`` still runs (a zombie does not: it holds no socket)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:  # state, ppid, pgrp
            return True
    return False


class Faults:
    """Operates the sandbox and records each step, and who is the primary when."""

    def __init__(self, lc: LocalCluster, rng: random.Random, reopen: Callable[[], None]) -> None:
        self.lc, self.rng = lc, rng
        self.reopen = reopen  # every client closes and opens its Cluster once, soon
        self.events: list[FaultEvent] = []
        self.epochs: list[Epoch] = [Epoch(lc.primary_name, 0.0)]
        self.frozen: set[str] = set()
        self.origin = time.time()

    def at(self, offset: float) -> None:
        """Wait until ``offset`` seconds into the episode."""
        time.sleep(max(0.0, self.origin + offset - time.time()))

    def role(self, node: str) -> str:
        if node == self.lc.primary_name:
            return "primary"
        return "replica" if node in self.lc.replica_names else "fenced"

    @contextlib.contextmanager
    def _step(self, action: str, node: str, detail: str = "") -> Iterator[list[str]]:
        role = self.role(node) if node in self.lc.node_names else "all"
        began = time.time()
        notes = [detail] if detail else []
        yield notes
        self.events.append(
            FaultEvent(action, node, role, began, time.time(), None, "; ".join(notes))
        )

    def _postmaster(self, node: str) -> int:
        text = (self.lc.directory / node / "postmaster.pid").read_text()
        return int(text.split("\n", 1)[0])

    def kill9(self, node: str) -> None:
        """SIGKILL to the node's postmaster and every backend at once (its process group).

        The step ends when no process of the group is left, not when the postmaster
        is: a backend takes its own moment to die, and until it has, a connection to it
        looks alive (its socket has nothing to read) and what is sent on it is in
        flight on a killed server."""
        with self._step("kill9", node):
            group = os.getpgid(self._postmaster(node))
            os.killpg(group, signal.SIGKILL)
            deadline = time.time() + 10
            while (self.lc.is_running(node) or _group_alive(group)) and time.time() < deadline:
                time.sleep(0.01)
        self.frozen.discard(node)

    def start(self, node: str) -> None:
        with self._step("start", node):
            self.lc.start(node)

    def freeze(self, node: str) -> None:
        """SIGSTOP: the node keeps its sockets open and answers nothing."""
        with self._step("freeze", node):
            self.lc.freeze(node)
        self.frozen.add(node)

    def thaw(self, node: str) -> None:
        with self._step("thaw", node):
            self.lc.thaw(node)
        self.frozen.discard(node)

    def pause(self, node: str) -> None:
        with self._step("pause", node):
            self.lc.pause_replay(node)

    def resume(self, node: str) -> None:
        with self._step("resume", node):
            self.lc.resume_replay(node)

    def delay(self, node: str, seconds: float) -> None:
        with self._step("delay", node, f"{seconds:g} s"):
            self.lc.set_apply_delay(node, seconds)

    def restart(self, node: str) -> None:
        """A fast restart (``pg_ctl restart -m fast``): clients' connections all break."""
        with self._step("restart", node):
            self.lc.stop(node, mode="fast")
            self.lc.start(node)

    def terminate(self, share: float = 0.5) -> None:
        """``pg_terminate_backend`` of a random share of the clients' backends, node by
        node; each step spans the one statement that signals them, nothing more."""
        for node in self.lc.node_names:
            if node in self.frozen or not self.lc.is_running(node):
                continue
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(self.lc.dsn(node), autocommit=True, connect_timeout=5) as conn,
            ):
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
                    (APP_NAME + "%",),
                ).fetchall()
                pids = [r[0] for r in rows if self.rng.random() < share]
                began = time.time()
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,)
                )
                detail = f"{len(pids)} of {len(rows)} backends"
                self.events.append(
                    FaultEvent("terminate", node, "all", began, time.time(), None, detail)
                )

    def fail_primary(self, promote: Callable[[], str], detail: str) -> None:
        """Kill the primary; ``promote`` makes (or waits for) a new one. The outage lasts
        from the kill until the new primary takes writes."""
        old = self.lc.primary_name
        began = time.time()
        self.kill9(old)
        dead = time.time()  # nothing commits on the old primary from here on
        new = promote()
        self.epochs = [
            *(
                Epoch(e.node, e.start, dead) if e.node == old and e.end > dead else e
                for e in self.epochs
            ),
            Epoch(new, dead),
        ]
        self.events.append(
            FaultEvent("outage", old, "primary", began, time.time(), None, detail + new)
        )

    def split_brain(self, grace: float) -> None:
        """The primary hangs for a moment, an HA manager promotes a replica meanwhile,
        and the old primary comes back, still a primary, standing alone (no standby to
        wait for). Writes may reach it until the monitor sees the promotion (``grace``
        after it is back); after that, none may."""
        old = self.lc.primary_name
        with self._step("alone", old):
            self.lc.execute(old, "ALTER SYSTEM SET synchronous_standby_names = ''")
            self.lc.execute(old, "SELECT pg_reload_conf()")
        alone = time.time()
        self.freeze(old)  # no more WAL: the replicas settle where the promoted one can lead
        self._wait_received_alike()
        new = self.promote_external(wait=0.0)
        self.thaw(old)
        self.epochs = [
            *(
                Epoch(e.node, e.start, alone) if e.node == old and e.end > alone else e
                for e in self.epochs
            ),
            Epoch(old, alone, time.time() + grace, durable=False),
            Epoch(new, alone),
        ]

    def _wait_received_alike(self, timeout: float = 3.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            received = {
                self.lc.execute(n, "SELECT pg_last_wal_receive_lsn()")[0][0]
                for n in self.lc.replica_names
                if self.lc.is_running(n)
            }
            if len(received) <= 1:
                return
            time.sleep(0.02)

    @contextlib.contextmanager
    def down(self, node: str) -> Iterator[None]:
        """The node stopped (``fast``) for the block, then started: one ``restart`` step."""
        role = self.role(node)
        began = time.time()
        self.lc.stop(node, mode="fast")
        try:
            yield
        finally:
            self.lc.start(node)
            self.events.append(FaultEvent("restart", node, role, began, time.time()))

    def promote_external(self, wait: float = 0.5) -> str:
        """What an HA manager does: wait a little, promote the replica that received most."""
        time.sleep(wait)
        best = max(
            (n for n in self.lc.replica_names if self.lc.is_running(n)),
            key=lambda n: int(
                self.lc.execute(n, "SELECT pg_last_wal_receive_lsn() - '0/0'::pg_lsn")[0][0]
            ),
        )
        with self._step("promote", best, "external"):
            self.lc.promote(best)
        return best

    def await_router_promotion(self, timeout: float = 15.0) -> str:
        """Wait for the router (``failover="promote"``) to promote a replica; the sandbox
        sees it (it asks the servers) and re-points the others as it would after its own."""
        old = self.epochs[-1].node
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = self.lc.primary_name
            if new != old:
                with self._step("promote", new, "by the router"):
                    self.lc.promote(new)
                return new
            time.sleep(0.05)
        name = self.lc.replica_names[0]
        with self._step("promote-by-hand", name, "the router never promoted"):
            self.lc.promote(name)
        return name

    def heal(self) -> None:
        """Leave the sandbox as the episode found it, but for a change of primary:
        every node thawed, running and replaying without delay."""
        for node in sorted(self.frozen):
            self.thaw(node)
        for node in [self.lc.primary_name, *self.lc.replica_names]:
            if not self.lc.is_running(node):
                self.start(node)
        for node in self.lc.replica_names:
            with contextlib.suppress(Error, psycopg.Error):
                self.lc.resume_replay(node)
                self.lc.set_apply_delay(node, 0)


# Each schedule: (the faults, the episode's length) -> runs the steps in order.
Schedule = Callable[[Faults, float], None]


def _baseline(f: Faults, d: float) -> None:
    """No fault: the workload alone (the checker itself must see 0 violations)."""


def _replica_kill(f: Faults, d: float) -> None:
    f.at(0.2 * d)
    f.kill9("replica1")
    f.at(0.45 * d)
    f.start("replica1")
    f.at(0.6 * d)
    f.kill9("replica2")
    f.at(0.8 * d)
    f.start("replica2")


FREEZE_SECONDS = 5.5  # longer than a read's budget + slack: an unbounded hang shows as overtime


def _replica_freeze(f: Faults, d: float) -> None:
    f.at(0.5)
    f.freeze("replica1")
    f.at(0.5 + FREEZE_SECONDS)
    f.thaw("replica1")


def _replay_pause(f: Faults, d: float) -> None:
    f.at(0.15 * d)
    for node in f.lc.replica_names:
        f.pause(node)
    f.at(0.8 * d)
    for node in f.lc.replica_names:
        f.resume(node)


def _apply_delay(f: Faults, d: float) -> None:
    f.at(0.15 * d)
    for node in f.lc.replica_names:
        f.delay(node, 1.5)
    f.at(0.8 * d)
    for node in f.lc.replica_names:
        f.delay(node, 0)


def _router_promote(f: Faults, d: float) -> None:
    f.at(0.25 * d)
    f.fail_primary(f.await_router_promotion, "promoted by the router: ")


def _external_promote(f: Faults, d: float) -> None:
    f.at(0.25 * d)
    f.fail_primary(f.promote_external, "promoted externally: ")


def _old_primary_back(f: Faults, d: float) -> None:
    """The old primary comes back on its old timeline (standing alone, so a write sent
    there commits at once). Then every node of the new timeline stops, the clients
    close() and open() their Cluster meanwhile, and they start again: nothing the
    reopened clusters can see says the old primary is outdated, yet it stays fenced.
    The nodes stay down longer than a write may wait for a primary, so every client
    reaches its reopen while they are down."""
    f.at(0.4)
    f.fail_primary(f.promote_external, "promoted externally: ")
    f.start("primary")
    f.lc.execute("primary", "ALTER SYSTEM SET synchronous_standby_names = ''")
    f.lc.execute("primary", "SELECT pg_reload_conf()")
    with contextlib.ExitStack() as stack:
        for node in [f.lc.primary_name, *f.lc.replica_names]:
            stack.enter_context(f.down(node))
        f.reopen()
        time.sleep(float(CLIENT_SETTINGS["write_timeout"]) + 1.5)  # every client reopens


def _split_brain(f: Faults, d: float) -> None:
    f.at(0.25 * d)
    f.split_brain(grace=detection_time(CLIENT_SETTINGS))


def _primary_restart(f: Faults, d: float) -> None:
    for share in (0.15, 0.5):  # then half the episode for what follows a restart
        f.at(share * d)
        f.restart(f.lc.primary_name)


def _terminate(f: Faults, d: float) -> None:
    moment = 0.2 * d
    while moment < 0.85 * d:
        f.at(moment)
        f.terminate()
        moment += 0.5


def _pool_exhaustion(f: Faults, d: float) -> None:
    """Client 0 holds its whole write pool (see EpisodeSpec.exhaust); nothing to do here."""


@dataclass(frozen=True)
class Kind:
    """A fault kind: its schedule and what its episode needs."""

    schedule: Schedule
    expects: tuple[str, ...]  # fault actions that must appear in the history
    min_seconds: float = 0.0
    changes_primary: bool = False  # needs a sandbox of its own
    router_promotes: bool = False  # client 0 runs failover="promote"
    exhaust: tuple[float, float] | None = None  # share of the episode client 0 holds its pool


KINDS: dict[str, Kind] = {
    "baseline": Kind(_baseline, ()),
    "replica-kill-9": Kind(_replica_kill, ("kill9", "start")),
    "replica-sigstop": Kind(_replica_freeze, ("freeze", "thaw"), FREEZE_SECONDS + 1),
    "replay-paused": Kind(_replay_pause, ("pause", "resume")),
    "apply-delay": Kind(_apply_delay, ("delay",)),
    "primary-kill-router-promote": Kind(
        _router_promote,
        ("kill9", "outage", "promote"),
        4.0,
        changes_primary=True,
        router_promotes=True,
    ),
    "primary-kill-external-promote": Kind(
        _external_promote, ("kill9", "outage", "promote"), 4.0, changes_primary=True
    ),
    "old-primary-restarted": Kind(
        _old_primary_back,
        ("kill9", "promote", "start", "restart", "reopen"),
        7.0,
        changes_primary=True,
    ),
    "split-brain-promote": Kind(
        _split_brain, ("alone", "freeze", "promote", "thaw"), 4.0, changes_primary=True
    ),
    "primary-fast-restart": Kind(_primary_restart, ("restart",), 4.0),
    "pg-terminate-backend": Kind(_terminate, ("terminate",)),
    "pool-exhaustion": Kind(_pool_exhaustion, ("exhaust",), exhaust=(0.3, 0.6)),
}

SCHEDULES = {"short": 2.5, "full": 20.0}  # seconds of workload per fault kind


# -- one episode -------------------------------------------------------------------


def _snapshot(lc: LocalCluster, table: str) -> list[ServerRow]:
    """The writes table as every running node holds it (replicas after catching up)."""
    with contextlib.suppress(Error, psycopg.Error):
        lc.wait_replicated(timeout=10)
    rows = []
    for node in lc.node_names:
        if not lc.is_running(node):
            continue
        try:
            found = lc.execute(node, f"SELECT id, port, timeline, at FROM {table}")
        except psycopg.Error as exc:
            logger.warning("could not read %s: %s", node, exc)
            continue
        rows.extend(ServerRow(node, int(i), int(p), int(t), float(a)) for i, p, t, a in found)
    return rows


def sandbox() -> LocalCluster:
    """The servers an episode runs on: a commit returns once a standby has it."""
    return LocalCluster(replicas=2, sync=True)


def run_episode(
    name: str, pool: ClientPool, seconds: float, seed: int, shared: LocalCluster | None = None
) -> History:
    """One fault kind: workload + schedule, then the servers' rows.

    Kinds that change the primary get a fresh sandbox; the others run on
    ``shared`` if given (each episode writes its own table), else on a fresh one.
    """
    kind = KINDS[name]
    with contextlib.ExitStack() as stack:
        lc = shared if shared is not None and not kind.changes_primary else None
        if lc is None:
            lc = stack.enter_context(sandbox())
        return _episode(name, lc, pool, max(seconds, kind.min_seconds), seed)


def _episode(name: str, lc: LocalCluster, pool: ClientPool, duration: float, seed: int) -> History:
    kind = KINDS[name]
    table = f"acks_{name.replace('-', '_')}_{seed}_{os.getpid()}_{time.time_ns() % 10**9}"
    lc.execute(lc.primary_name, create_table(table))
    lc.wait_replicated()
    spec = EpisodeSpec(
        name=table,
        table=table,
        dsns={n: lc.dsn(n) for n in lc.node_names},
        settings=tuple(
            {
                **settings_for(i),
                "failover": "promote" if kind.router_promotes and i == 0 else "follow",
            }
            for i in range(len(pool))
        ),
        seed=seed,
        exhaust=()
        if kind.exhaust is None
        else ((0, kind.exhaust[0] * duration, kind.exhaust[1] * duration),),
    )
    pool.prepare(spec)
    faults = Faults(lc, random.Random(seed), pool.reopen.set)
    faults.origin = start = time.time() + 0.2
    end = start + duration
    pool.go(start, end)
    try:
        kind.schedule(faults, duration)
    finally:
        faults.at(duration)
        limit = max(max(budgets(c).values()) for c in spec.settings) + OVERTIME_SLACK
        reports = pool.collect(end + limit + 5.0)
        faults.heal()
    return History(
        kind=name,
        ops=sorted(reports.ops, key=lambda o: o.start),
        faults=sorted(faults.events + reports.faults, key=lambda f: f.start),
        epochs=faults.epochs,
        rows=_snapshot(lc, table),
        final_primary=lc.primary_name,
        ports={lc.port(n): n for n in lc.node_names},
        settings=dict(enumerate(spec.settings)),
        unfinished=reports.unfinished,
        crashes=reports.crashes,
        origin=start,
    )


def missing_faults(h: History) -> list[str]:
    """The fault actions the kind expects that never happened (then nothing was tested)."""
    done = {f.action for f in h.faults}
    return [a for a in KINDS[h.kind].expects if a not in done]


# -- the report --------------------------------------------------------------------


@dataclass
class Summary:
    kind: str
    operations: int
    errors: collections.Counter[str]
    max_latency: float
    violations: dict[str, list[str]]
    faults: str

    @classmethod
    def of(cls, h: History) -> Summary:
        return cls(
            kind=h.kind,
            operations=len(h.ops),
            errors=collections.Counter(
                (op.error or "")
                .replace("replica_router.errors.", "")
                .replace("psycopg.errors.", "")
                for op in h.ops
                if not op.ok
            ),
            max_latency=max((op.duration for op in h.ops), default=0.0),
            violations=check(h),
            faults=", ".join(
                f"{a} x{n}" for a, n in collections.Counter(f.action for f in h.faults).items()
            ),
        )

    @property
    def violation_count(self) -> int:
        return sum(len(v) for v in self.violations.values())

    def cells(self) -> list[str]:
        errors = ", ".join(f"{name} {n}" for name, n in self.errors.most_common()) or "-"
        broken = ", ".join(f"{k} {len(v)}" for k, v in self.violations.items() if v) or "0"
        return [
            self.kind,
            self.faults or "-",
            str(self.operations),
            errors,
            f"{self.max_latency:.2f}",
            broken,
        ]


HEADERS = [
    "fault kind",
    "faults injected",
    "operations",
    "errors by type",
    "max latency s",
    "violations",
]


def samples(messages: Sequence[str], limit: int = 5) -> list[tuple[str, int]]:
    """One message of each shape (numbers aside), with how many others share it."""
    shapes: dict[str, list[str]] = {}
    for message in messages:
        shapes.setdefault(re.sub(r"[0-9a-z]*[0-9][0-9a-z.]*", "#", message), []).append(message)
    return [(alike[0], len(alike) - 1) for alike in list(shapes.values())[:limit]]


def print_table(summaries: Sequence[Summary], markdown: bool) -> None:
    rows = [s.cells() for s in summaries]
    if markdown:
        print("| " + " | ".join(HEADERS) + " |")
        print("|" + "---|" * len(HEADERS))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*HEADERS, title="Fault-injection checker")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="short")
    parser.add_argument(
        "--seconds", type=float, help="workload per fault kind (default: schedule's)"
    )
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    names = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown or args.clients < 2:
        parser.error(f"unknown kinds {unknown} (known: {', '.join(KINDS)}); --clients >= 2")
    seconds = args.seconds or SCHEDULES[args.schedule]
    quiet()
    summaries = []
    with ClientPool(args.clients) as pool:
        for i, name in enumerate(names):
            history = run_episode(name, pool, seconds, args.seed + i)
            summary = Summary.of(history)
            summaries.append(summary)
            missing = missing_faults(history)
            print(
                f"# {name}: {summary.operations} operations, {summary.violation_count} "
                f"violations{f', faults missing: {missing}' if missing else ''}",
                flush=True,
            )
            for invariant, found in summary.violations.items():
                for message, alike in samples(found):
                    print(
                        f"#   {invariant}: {message}" + (f" (and {alike} alike)" if alike else "")
                    )
    print()
    print(
        f"schedule {args.schedule}: {seconds:g} s per kind, {args.clients} client processes, "
        f"seed {args.seed}"
    )
    print_table(summaries, args.markdown)
    return 1 if any(s.violation_count for s in summaries) else 0


if __name__ == "__main__":
    raise SystemExit(main())
