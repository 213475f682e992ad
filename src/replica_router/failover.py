"""Promotion by the router (``failover="promote"``).

Seed 004's ``FailoverManager`` promotes ``replicas.pop(0)`` and trusts it. Here,
once the elected primary has failed ``failure_threshold`` probes and no node
claims primary, the monitor thread (right after its round) hands over to
:class:`Promoter`, which:

1. looks at every node afresh (its own connections, in parallel), and gives the
   replicas a moment to replay what they already received (the dead primary
   sends nothing more, so their positions settle; settled positions are what
   makes every router process pick the same node);
2. promotes nothing while any node reports itself primary on the newest
   timeline (the old primary came back, or someone else promoted), else picks
   the replica with the highest replay LSN (ties: the received LSN, then the
   name) and runs ``pg_promote(wait => true)`` on it;
3. after the monitor has published the new primary (writes resume first),
   re-points the other replicas at it: ``ALTER SYSTEM SET primary_conninfo`` +
   ``pg_reload_conf()``, keeping every keyword of their current conninfo
   (user, password file, ``application_name`` - which synchronous standby
   matching needs) and changing only host and port.

The decisions (:func:`primary_lost`, :func:`settled`, :func:`choose_candidate`)
are pure functions over immutable inputs; ``Promoter`` does the I/O. Several
application processes each running ``promote`` can still race (see
docs/failover.md): with more than one process, let an HA manager promote and use
``failover="follow"``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import conninfo, sql

from .dsn import password_of, scrub
from .errors import ConfigurationError
from .lsn import format_lsn
from .topology import NodeSpec, Role, Topology

if TYPE_CHECKING:
    from .monitor import Monitor

__all__ = [
    "Decision",
    "Probe",
    "Promoter",
    "choose_candidate",
    "parse_address",
    "primary_lost",
    "settled",
]

log = logging.getLogger("replica_router.failover")

APPLICATION_NAME = "replica-router-failover"

# One row per node: role, positions, paused, and (for a primary) its timeline,
# read from the current WAL file name as the monitor does (it changes at promotion).
_LOOK_SQL = """\
SELECT s.r,
       (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint,
       (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint,
       CASE WHEN s.r THEN pg_is_wal_replay_paused() ELSE false END,
       CASE WHEN s.r THEN NULL
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END
FROM (SELECT pg_is_in_recovery() AS r) AS s"""

_SETTLE_POLL = 0.05  # re-look this often while replicas replay what they received
_RETRY_AFTER = 2.0  # at least this long between two attempts that did not promote


@dataclass(frozen=True, slots=True)
class Probe:
    """One node as seen just before deciding (not the monitor's snapshot: fresh)."""

    name: str
    reachable: bool
    in_recovery: bool = False
    timeline: int | None = None  # a primary's; None for a replica
    receive_lsn: int | None = None
    replay_lsn: int | None = None
    replay_paused: bool = False
    error: str | None = None  # redacted


@dataclass(frozen=True, slots=True)
class Decision:
    """Which node to promote (None: promote nothing) and why, in words for the log."""

    promote: str | None
    reason: str


def primary_lost(topology: Topology, last_primary: str | None, failure_threshold: int) -> bool:
    """Whether to consider promoting: the primary we last elected has failed
    ``failure_threshold`` probes in a row, no usable node claims primary, and a
    healthy replica exists. Never before a primary was seen at all: a router
    starting during an outage does not promote on its first impressions."""
    if topology.primary is not None or last_primary is None:
        return False
    old = topology.by_name.get(last_primary)
    if old is None or old.healthy or old.consecutive_failures < failure_threshold:
        return False
    nodes = topology.nodes
    if any(n.role is Role.PRIMARY and n.healthy and not n.fenced for n in nodes):
        return False
    return any(n.role is Role.REPLICA and n.healthy and not n.fenced for n in nodes)


def _failing(topology: Topology, last_primary: str | None) -> bool:
    state = topology.by_name.get(last_primary) if last_primary is not None else None
    return state is not None and state.consecutive_failures > 0


def settled(probes: Iterable[Probe]) -> bool:
    """True when no reachable replica has received WAL it has not replayed yet
    (a paused replica is not waited for: it does not replay until resumed)."""
    return all(
        p.replay_paused
        or p.receive_lsn is None
        or p.replay_lsn is None
        or p.replay_lsn >= p.receive_lsn
        for p in probes
        if p.reachable and p.in_recovery
    )


def choose_candidate(probes: Iterable[Probe], *, newest_timeline: int | None) -> Decision:
    """The replica to promote, from fresh probes of every node of the cluster.

    Nothing while a reachable node reports itself primary on the newest timeline
    known (``newest_timeline``; any timeline when unknown): it takes the writes,
    and a second primary would split the cluster. A claimant on an older
    timeline is a fenced zombie and does not stop a promotion. Otherwise the
    replica with the highest replay LSN: the most data already applied, and the
    others, being behind it, can follow its new timeline. Ties go to the higher
    received LSN (promotion replays what was received), then to the first name,
    so every router process looking at the same cluster picks the same node.
    """
    probes = tuple(probes)
    for p in probes:
        if (
            p.reachable
            and not p.in_recovery
            and (newest_timeline is None or p.timeline is None or p.timeline >= newest_timeline)
        ):
            return Decision(None, f"{p.name} reports itself primary (timeline {p.timeline})")
    candidates = [p for p in probes if p.reachable and p.in_recovery and p.replay_lsn is not None]
    if not candidates:
        return Decision(None, "no reachable replica to promote")
    best = min(candidates, key=lambda p: (-(p.replay_lsn or 0), -(p.receive_lsn or 0), p.name))
    others = ", ".join(
        f"{p.name} {format_lsn(p.replay_lsn or 0)}" for p in candidates if p is not best
    )
    reason = f"highest replay LSN {format_lsn(best.replay_lsn or 0)}"
    return Decision(best.name, f"{reason} (others: {others})" if others else reason)


def parse_address(text: object, *, field: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:5432"`` for IPv6) -> (host, port).

    Bad input: a ``ConfigurationError`` naming ``field``."""
    if isinstance(text, str):
        host, sep, port = text.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return host, int(port)
    raise ConfigurationError(f"{field}: expected 'host:port', got {text!r}")


@dataclass(frozen=True, slots=True)
class _Repoint:
    """Replicas still to re-point at ``primary`` (who was promoted, reached at ``address``)."""

    primary: str
    address: tuple[str, int]
    replicas: frozenset[str]


class Promoter:
    """The monitor's after-round hook for ``failover="promote"``.

    Called on the monitor thread after every round, so promotions never overlap
    and always start from a just-published snapshot. Cheap when there is nothing
    to do: one pure check of the snapshot.
    """

    def __init__(
        self,
        *,
        repoint_replicas: bool = True,
        replication_addresses: Mapping[str, str] | None = None,
        promote_timeout: float = 30.0,
        settle_timeout: float = 1.0,
    ) -> None:
        self.repoint_replicas = repoint_replicas
        self.replication_addresses = {
            name: parse_address(address, field=f"replication_addresses[{name!r}]")
            for name, address in (replication_addresses or {}).items()
        }
        self.promote_timeout = promote_timeout
        self.settle_timeout = settle_timeout
        self._retry_at = 0.0
        self._failing_since: float | None = None  # first round that saw the primary fail
        self._repoint: _Repoint | None = None

    def __call__(self, monitor: Monitor, topology: Topology) -> None:
        now = time.monotonic()
        if self._repoint is not None and topology.primary == self._repoint.primary:
            self._repoint_replicas(monitor, topology, self._repoint)
        failing = _failing(topology, monitor.last_primary)
        if not failing:
            self._failing_since = None
            return
        if self._failing_since is None:
            self._failing_since = now
        # failure_threshold probes' worth of time, even when failed user connections
        # (mark_suspect) reached the count sooner: a restart is not an outage.
        needed = (monitor.failure_threshold - 1) * monitor.interval
        if (
            now < self._retry_at
            or now - self._failing_since < needed
            or not monitor.running
            or not primary_lost(topology, monitor.last_primary, monitor.failure_threshold)
        ):
            return
        if not self._fail_over(monitor, topology):
            self._retry_at = time.monotonic() + max(_RETRY_AFTER, 4 * monitor.interval)

    # -- the failover -----------------------------------------------------------------

    def _fail_over(self, monitor: Monitor, topology: Topology) -> bool:
        old = monitor.last_primary
        specs = _same_cluster(monitor.specs, topology, old)
        probes = self._look(monitor, specs)
        deadline = time.monotonic() + self.settle_timeout
        while not settled(probes) and time.monotonic() < deadline:
            time.sleep(_SETTLE_POLL)  # WAL already received is being replayed; look again
            replaying = {p.name for p in probes if not settled([p])}
            again = self._look(monitor, [s for s in specs if s.name in replaying])
            fresh = {p.name: p for p in again}
            probes = [fresh.get(p.name, p) for p in probes]
        decision = choose_candidate(probes, newest_timeline=monitor.newest_timeline)
        if decision.promote is None:
            log.warning("failover: primary %s is down, but not promoting: %s", old, decision.reason)
            return False
        state = topology.by_name.get(old) if old is not None else None
        log.warning(
            "failover: primary %s failed %s probes in a row (%s); promoting %s: %s",
            old,
            state.consecutive_failures if state is not None else "?",
            state.last_error if state is not None else "unknown error",
            decision.promote,
            decision.reason,
        )
        spec = next(s for s in specs if s.name == decision.promote)
        if not self._promote(monitor, spec):
            return False
        monitor.note_promoted(spec.name)
        promoted_at = next(p.replay_lsn or 0 for p in probes if p.name == spec.name)
        followers = {p.name for p in probes if p.reachable and p.in_recovery} - {spec.name}
        behind = sorted(
            p.name for p in probes if p.name in followers and (p.receive_lsn or 0) > promoted_at
        )
        if behind:
            log.warning(
                "failover: %s received WAL past %s's promotion point and cannot follow it "
                "without pg_rewind or a new base backup",
                ", ".join(behind),
                spec.name,
            )
        unreached = sorted(p.name for p in probes if not p.reachable and p.name != old)
        if unreached and self.repoint_replicas:
            log.warning(
                "failover: %s unreachable now; re-pointed at %s once it answers",
                ", ".join(unreached),
                spec.name,
            )
        if self.repoint_replicas:
            targets = frozenset(followers.union(unreached).difference(behind))
            self._repoint = _Repoint(spec.name, self._address(spec), targets)
        return True

    def _look(self, monitor: Monitor, specs: Sequence[NodeSpec]) -> list[Probe]:
        """Probe every node at once (one thread each; a hung node costs its timeout only)."""
        if not specs:
            return []
        with ThreadPoolExecutor(
            max_workers=len(specs), thread_name_prefix=f"{monitor.name}:failover"
        ) as pool:
            return list(pool.map(lambda spec: self._look_at(monitor, spec), specs))

    @staticmethod
    def _look_at(monitor: Monitor, spec: NodeSpec) -> Probe:
        try:
            with _connect(monitor, spec, statement_timeout=monitor.probe_timeout) as conn:
                row = conn.execute(_LOOK_SQL).fetchone()
        except psycopg.Error as exc:
            return Probe(spec.name, reachable=False, error=_scrub(spec, exc))
        if row is None:
            return Probe(spec.name, reachable=False, error="no row")
        in_recovery, received, replayed, paused, timeline = row
        return Probe(
            spec.name,
            reachable=True,
            in_recovery=bool(in_recovery),
            timeline=None if timeline is None else int(timeline),
            receive_lsn=None if received is None else int(received),
            replay_lsn=None if replayed is None else int(replayed),
            replay_paused=bool(paused),
        )

    def _promote(self, monitor: Monitor, spec: NodeSpec) -> bool:
        """``pg_promote(wait => true)``; True when ``spec`` is a primary afterwards."""
        wait = max(1, math.ceil(self.promote_timeout))
        try:
            with _connect(monitor, spec, statement_timeout=None) as conn:
                row = conn.execute(
                    "SELECT pg_promote(wait => true, wait_seconds => %s)", (wait,)
                ).fetchone()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            log.warning("failover: %s was already promoted (by someone else)", spec.name)
            return False  # the monitor will elect it; it is not the router's promotion
        except psycopg.errors.InsufficientPrivilege as exc:
            log.error(
                "failover: cannot promote %s: %s (the router's user needs superuser or "
                "GRANT EXECUTE ON FUNCTION pg_promote)",
                spec.name,
                _scrub(spec, exc),
            )
            return False
        except psycopg.Error as exc:
            log.error("failover: promoting %s failed: %s", spec.name, _scrub(spec, exc))
            return False
        if not row or row[0] is not True:
            log.error("failover: %s did not finish promotion within %d s", spec.name, wait)
            return False
        log.warning("failover: promoted %s", spec.name)
        return True

    # -- after the promotion ----------------------------------------------------------

    def _address(self, spec: NodeSpec) -> tuple[str, int]:
        """Where the replicas should connect to reach ``spec``: as configured in
        ``replication_addresses``, else the host and port the router uses."""
        return self.replication_addresses.get(spec.name) or (spec.info.host, spec.info.port)

    def _repoint_replicas(self, monitor: Monitor, topology: Topology, job: _Repoint) -> None:
        """Re-point the followers that answer now; keep the rest for a later round."""
        specs = {s.name: s for s in monitor.specs}
        left = set()
        for name in sorted(job.replicas):
            spec = specs.get(name)
            state = topology.by_name.get(name)
            if spec is None:
                continue  # removed meanwhile
            if state is None or not state.healthy or state.role is not Role.REPLICA:
                left.add(name)
                continue
            _repoint(monitor, spec, job.address, job.primary)
        self._repoint = _Repoint(job.primary, job.address, frozenset(left)) if left else None


def _repoint(monitor: Monitor, spec: NodeSpec, address: tuple[str, int], primary: str) -> None:
    """Change host and port in ``spec``'s primary_conninfo, keep the rest, reload."""
    host, port = address
    try:
        with _connect(monitor, spec, statement_timeout=monitor.probe_timeout) as conn:
            row = conn.execute("SELECT current_setting('primary_conninfo')").fetchone()
            current = str(row[0]) if row and row[0] else ""
            if not current:
                log.warning(
                    "failover: %s has no primary_conninfo (archive recovery only?); "
                    "not re-pointed at %s",
                    spec.name,
                    primary,
                )
                return
            params: dict[str, Any] = dict(conninfo.conninfo_to_dict(current))
            if params.get("host") == host and str(params.get("port")) == str(port):
                return
            params.pop("hostaddr", None)
            params.update(host=host, port=str(port))
            target = conninfo.make_conninfo("", **params)
            conn.execute(
                sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(target))
            )
            conn.execute("SELECT pg_reload_conf()")
    except psycopg.Error as exc:
        log.error(
            "failover: could not re-point %s at %s (%s:%s): %s; it keeps following the old "
            "primary until someone changes its primary_conninfo",
            spec.name,
            primary,
            host,
            port,
            _scrub(spec, exc),
        )
        return
    log.warning("failover: re-pointed %s at %s (%s:%s)", spec.name, primary, host, port)


def _same_cluster(
    specs: Sequence[NodeSpec], topology: Topology, old_primary: str | None
) -> list[NodeSpec]:
    """The nodes of the old primary's cluster: one known to carry another system
    identifier is never looked at, let alone promoted."""
    old = topology.by_name.get(old_primary) if old_primary is not None else None
    sysid = old.system_identifier if old is not None else None
    if sysid is None:
        return list(specs)
    return [
        spec
        for spec in specs
        if (state := topology.by_name.get(spec.name)) is None
        or state.system_identifier in (None, sysid)
    ]


def _connect(
    monitor: Monitor, spec: NodeSpec, *, statement_timeout: float | None
) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        spec.dsn,
        autocommit=True,
        connect_timeout=max(2, math.ceil(monitor.connect_timeout)),
        application_name=APPLICATION_NAME,
        prepare_threshold=None,  # never server-side: a pooler may switch server connections
    )
    try:
        millis = 0 if statement_timeout is None else max(1, round(statement_timeout * 1000))
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{millis}ms",))
    except BaseException:
        conn.close()
        raise
    return conn


def _scrub(spec: NodeSpec, exc: BaseException) -> str:
    return scrub(f"{type(exc).__name__}: {exc}".strip(), password_of(spec.dsn))
