"""``LocalCluster``: a real primary and N streaming replicas on this machine."""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import psycopg
from psycopg import conninfo

from ..errors import ConfigurationError, SandboxError
from . import _pgbouncer, _template
from ._binaries import Binaries, find_binaries, runnable_by
from ._processes import (
    STOP_SIGNALS,
    RunAs,
    check_traversable,
    is_suspended,
    postmaster_pid,
    postmaster_status,
    process_start_marker,
    resolve_run_as,
    run,
    signal_tree,
    spawn,
    terminate_postmaster,
)
from ._state import (
    BOUNCER_PID_SUFFIX,
    STATE_FILE,
    NodeRecord,
    SandboxState,
    reap_directory,
    reap_orphans,
    remove_sandbox,
    stop_bouncers,
    temp_root,
)

__all__ = ["LocalCluster"]

logger = logging.getLogger("replica_router.sandbox")

PRIMARY = "primary"
SYNCHRONOUS_COMMIT_LEVELS = ("on", "remote_apply", "remote_write", "local", "off")
_CONF_FILE = "replica_router_sandbox.conf"
_PASSFILE = ".pgpass"
_PORT_ATTEMPTS = 5
_MAX_SOCKET_PATH = 100  # sun_path is 104-108 bytes; leave room for /.s.PGSQL.NNNNN
_LOG_TAIL_LINES = 25
_POLL = 0.01
_OBSERVE_TIMEOUT = 2  # seconds to ask a node what it is; a hung one stays as last seen
_TIMELINE_SQL = "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
_OBSERVE_SQL = (
    "SELECT pg_is_in_recovery(), current_setting('primary_conninfo'),"
    " CASE WHEN NOT pg_is_in_recovery() THEN"
    " ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
)
_AUTO_CONNINFO = re.compile(r"\s*primary_conninfo\s*=\s*'((?:[^']|'')*)'")

_open_clusters: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    """An interpreter that exits normally never leaves servers behind."""
    for cluster in list(_open_clusters):
        try:
            cluster.close()
        except Exception:
            logger.exception("closing sandbox %r at exit failed", cluster)


class _PortInUse(SandboxError):
    """The port picked for a node was taken before the server could bind it."""


def _pick_port(exclude: Iterable[int] = ()) -> int:
    """A loopback port nobody listens on right now (the OS chooses it)."""
    taken = set(exclude)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def _quote_setting(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class _Seen:
    """What one node is, as its server (or, stopped, its data directory) says."""

    standby: bool
    upstream_port: int | None  # where its primary_conninfo points
    timeline: int | None  # a running primary's current timeline


def _conninfo_port(text: str | None) -> int | None:
    if not text:
        return None
    try:
        port = conninfo.conninfo_to_dict(text).get("port")
    except psycopg.ProgrammingError:
        return None
    return int(port) if port is not None and str(port).isdigit() else None


def _auto_conf_conninfo(data_dir: Path) -> str | None:
    """``primary_conninfo`` as ``ALTER SYSTEM`` left it (it overrides our file)."""
    try:
        text = (data_dir / "postgresql.auto.conf").read_text()
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        match = _AUTO_CONNINFO.match(line)
        if match:
            found = match.group(1).replace("''", "'")
    return found


def _tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


class LocalCluster:
    """A PostgreSQL primary plus ``replicas`` streaming replicas in a temporary directory.

    Nothing happens in the constructor: ``open()`` (or ``with``) runs initdb, starts
    the servers on free loopback ports and returns once every replica streams;
    ``close()`` stops them and deletes the directory. Node names are ``"primary"``,
    ``"replica1"``, ``"replica2"``, ... and keep naming the same server for the
    cluster's life; :attr:`primary_name` tells which one takes writes now.
    """

    def __init__(
        self,
        replicas: int = 2,
        *,
        sync: bool = False,
        synchronous_commit: str = "on",
        base_dir: str | os.PathLike[str] | None = None,
        os_user: str | None = None,
        password: str | None = None,
        startup_timeout: float = 30.0,
        bindir: str | os.PathLike[str] | None = None,
        pgbouncer: str | None = None,
    ) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ConfigurationError(f"replicas: expected a whole number >= 0, got {replicas!r}")
        if sync and replicas == 0:
            raise ConfigurationError("sync=True needs at least one replica to wait for")
        if synchronous_commit not in SYNCHRONOUS_COMMIT_LEVELS:
            raise ConfigurationError(
                f"synchronous_commit: expected one of {', '.join(SYNCHRONOUS_COMMIT_LEVELS)}, "
                f"got {synchronous_commit!r}"
            )
        if password is not None and (not isinstance(password, str) or not password):
            raise ConfigurationError("password: expected a non-empty string or None")
        _pgbouncer.check_pool_mode(pgbouncer)
        if startup_timeout <= 0:
            raise ConfigurationError(f"startup_timeout: expected > 0, got {startup_timeout!r}")
        self._replica_count = replicas
        self._sync = sync
        self._synchronous_commit = synchronous_commit
        self._base_dir = None if base_dir is None else Path(base_dir).absolute()
        self._os_user = os_user
        self._password = password
        self._startup_timeout = startup_timeout
        self._bindir = bindir
        self._pool_mode = pgbouncer
        self._bouncer: _pgbouncer.PgBouncer | None = None
        self._lock = threading.RLock()
        self._directory: Path | None = None
        self._created_dir = False
        self._state: SandboxState | None = None
        self._binaries: Binaries | None = None
        self._run_as: RunAs | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._bouncers: dict[str, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[str, int] = {}  # where the current run's log lines begin

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> LocalCluster:
        """Create the directory, initdb, start every node, wait until replicas stream."""
        with self._lock:
            if self._directory is not None:
                raise SandboxError("this LocalCluster is already open")
            started = time.monotonic()
            try:
                run_as = resolve_run_as(self._os_user)
                binaries = runnable_by(find_binaries(self._bindir), run_as, temp_root())
                if self._pool_mode is not None:
                    self._bouncer = _pgbouncer.find_pgbouncer()
                self._create(binaries, run_as)
            except BaseException:
                self.close()
                raise
            _open_clusters.add(self)
            logger.info(
                "sandbox %s ready in %.2f s: %s", self._directory, time.monotonic() - started, self
            )
        return self

    def close(self) -> None:
        """Stop every server and delete everything this sandbox created. Idempotent."""
        with self._lock:
            _open_clusters.discard(self)
            directory, state = self._directory, self._state
            processes = dict(self._processes)
            self._directory, self._state = None, None
            self._processes.clear()
            if directory is None:
                return
            try:
                if state is not None:
                    self._stop_all(directory, state, processes)
            finally:
                if state is not None:
                    remove_sandbox(directory, state)
                elif self._created_dir:
                    shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def detach(self) -> Path:
        """Leave the servers running after this process exits (``sandbox up``).

        The sandbox is marked persistent (never reaped as an orphan); operate it
        later with :meth:`attach` and remove it with ``close()`` on that object.
        """
        with self._lock:
            state, directory = self._require_open()
            state.persistent = True
            state.save(directory)
            _open_clusters.discard(self)
            self._directory, self._state = None, None
            self._processes.clear()
            return directory

    @classmethod
    def attach(cls, directory: str | os.PathLike[str]) -> LocalCluster:
        """Operate a sandbox another process made (the state file in ``directory``)."""
        path = Path(directory).absolute()
        state = SandboxState.load(path)
        cluster = cls(
            replicas=sum(1 for n in state.nodes if n.name != PRIMARY),
            sync=state.sync,
            synchronous_commit=state.synchronous_commit,
            base_dir=path,
            os_user=state.os_user,
            password=state.password,
            pgbouncer=state.pgbouncer,
        )
        binaries = Binaries(
            bindir=Path(state.bindir), major=state.major, version=state.version, origin=state.origin
        )
        if not (binaries.bindir / "postgres").exists():
            raise SandboxError(f"the server binaries this sandbox used are gone: {binaries.bindir}")
        cluster._binaries = binaries
        cluster._run_as = resolve_run_as(state.os_user)
        cluster._directory, cluster._state = path, state
        cluster._created_dir = state.created_dir
        return cluster

    # -- what the nodes are ------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._require_open()[1]

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self._require_open()[0].nodes]

    @property
    def primary_name(self) -> str:
        """The node that takes writes now, as the servers say: after :meth:`promote`,
        or a promotion by someone else (the router's ``failover="promote"``), the new
        one. Of two primaries (a split brain), the one on the newer timeline."""
        with self._lock:
            return self._refresh().primary_name

    @property
    def replica_names(self) -> list[str]:
        """Nodes that are standbys now (in recovery; stopped: with ``standby.signal``),
        in node order, running or not."""
        with self._lock:
            return [n.name for n in self._refresh().nodes if n.standby]

    @property
    def primary_dsn(self) -> str:
        """DSN of the current primary; ``dsn("primary")`` stays the original node's."""
        return self.dsn(self.primary_name)

    @property
    def replica_dsns(self) -> list[str]:
        return [self.dsn(name) for name in self.replica_names]

    @property
    def system_identifier(self) -> int:
        ident = self._require_open()[0].system_identifier
        if ident is None:
            raise SandboxError("system identifier not known yet")
        return ident

    @property
    def bindir(self) -> Path:
        """The directory of the PostgreSQL server programs this sandbox runs."""
        self._require_open()
        return self._require_binaries()[0].bindir

    @property
    def server_version(self) -> str:
        """The PostgreSQL version the servers run, as ``postgres --version`` says (``"18.6"``)."""
        self._require_open()
        binaries = self._require_binaries()[0]
        return binaries.version or str(binaries.major)

    @property
    def postgres_description(self) -> str:
        """Which PostgreSQL, found how, and where: ``PostgreSQL 15.14 (system) in /usr/lib/...``."""
        self._require_open()
        return self._require_binaries()[0].describe()

    def port(self, name: str) -> int:
        return self._node(name).port

    def dsn(self, name: str) -> str:
        """A libpq URL for one node: user ``postgres``, database ``postgres``; with
        ``pgbouncer=``, the node's PgBouncer (:meth:`server_dsn` is the server's own)."""
        node = self._node(name)
        return self._url(node.bouncer_port if node.bouncer_port is not None else node.port)

    def server_dsn(self, name: str) -> str:
        """The node's server itself, never through PgBouncer."""
        return self._url(self._node(name).port)

    def _url(self, port: int) -> str:
        auth = (
            "postgres" if self._password is None else f"postgres:{quote(self._password, safe='')}"
        )
        return f"postgresql://{auth}@127.0.0.1:{port}/postgres"

    @property
    def pgbouncer(self) -> str | None:
        """The pool mode of the PgBouncer in front of every node, or None."""
        return self._require_open()[0].pgbouncer

    @property
    def pgbouncer_version(self) -> str:
        """``"1.18.0"``, or ``""`` without PgBouncer."""
        return self._require_open()[0].pgbouncer_version

    @property
    def connect_kwargs(self) -> dict[str, Any]:
        """psycopg ``connect()`` arguments the DSNs need: ``prepare_threshold=None``
        behind a PgBouncer older than 1.21 in transaction mode (psycopg prepares a
        statement server-side after 5 executions; the next transaction may get a
        server connection without it). Pass as ``Cluster(connect_kwargs=...)``."""
        state = self._require_open()[0]
        if state.pgbouncer != "transaction":
            return {}
        version = tuple(int(p) for p in state.pgbouncer_version.split(".") if p.isdigit())
        return {} if version >= (1, 21) else {"prepare_threshold": None}

    def log_path(self, name: str) -> Path:
        self._node(name)
        return self._require_open()[1] / f"{name}.log"

    def is_running(self, name: str) -> bool:
        self._node(name)
        return self._pid(name) is not None

    def __repr__(self) -> str:
        if self._state is None:
            return f"<LocalCluster replicas={self._replica_count} closed>"
        nodes = ", ".join(f"{n.name}:{n.port}" for n in self._state.nodes)
        return f"<LocalCluster {nodes} primary={self._state.primary_name} dir={self._directory}>"

    # -- operating it ------------------------------------------------------------

    def execute(
        self, name: str, sql: str, params: Sequence[Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a node's server (autocommit; never through PgBouncer);
        rows if it returns any."""
        with psycopg.connect(self.server_dsn(name), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def pause_replay(self, name: str, timeout: float = 10.0) -> None:
        """Stop applying WAL on a replica (it keeps receiving); returns once paused."""
        self._require_standby(name)
        self.execute(name, "SELECT pg_wal_replay_pause()")
        self._poll(
            lambda: self._replay_paused(name),
            timeout,
            f"replay on {name} did not pause",
            name,
        )

    def resume_replay(self, name: str, timeout: float = 10.0) -> None:
        self._require_standby(name)
        self.execute(name, "SELECT pg_wal_replay_resume()")
        self._poll(
            lambda: not self._replay_paused(name),
            timeout,
            f"replay on {name} did not resume",
            name,
        )

    def set_apply_delay(self, name: str, seconds: float, timeout: float = 10.0) -> None:
        """Make a replica apply each commit ``seconds`` late (recovery_min_apply_delay)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ConfigurationError(f"seconds: expected a number >= 0, got {seconds!r}")
        with self._lock:
            node = self._require_standby(name)
            millis = round(seconds * 1000)
            if millis:
                node.settings["recovery_min_apply_delay"] = f"{millis}ms"
            else:
                node.settings.pop("recovery_min_apply_delay", None)
            self._apply_settings(node)
        if self.is_running(name):
            self._poll(
                lambda: self._setting_in_ms(name, "recovery_min_apply_delay") == millis,
                timeout,
                f"{name} did not take recovery_min_apply_delay={millis}ms",
                name,
            )

    def stop(self, name: str, mode: str = "fast", timeout: float = 30.0) -> None:
        """Shut a node down like ``pg_ctl stop -m MODE``; a stopped node is left alone."""
        if mode not in ("fast", "immediate", "smart"):
            raise ConfigurationError(f"mode: expected 'fast' or 'immediate', got {mode!r}")
        with self._lock:
            self._node(name)
            pid = self._pid(name)
            if pid is None:
                return
            terminate_postmaster(pid, mode, timeout, self._processes.pop(name, None))
            logger.info("stopped %s (%s)", name, mode)

    def freeze(self, name: str) -> None:
        """Suspend a running node (SIGSTOP to its postmaster and every child): a hung
        server. Its sockets stay open, so clients get no FIN or RST: connects are
        accepted by the kernel and then hang, queries never answer. :meth:`thaw`
        resumes it; ``stop()`` and ``close()`` work on a frozen node too."""
        with self._lock:
            self._node(name)
            pid = self._pid(name)
            if pid is None:
                raise SandboxError(f"cannot freeze {name}: it is not running")
            signal_tree(pid, signal.SIGSTOP)
            logger.info("froze %s (pid %d)", name, pid)

    def thaw(self, name: str) -> None:
        """Resume a node :meth:`freeze` suspended (SIGCONT); a running node is left alone."""
        with self._lock:
            self._node(name)
            pid = self._pid(name)
            if pid is not None:
                signal_tree(pid, signal.SIGCONT)
                logger.info("thawed %s (pid %d)", name, pid)

    def start(self, name: str, timeout: float | None = None) -> None:
        """Start a stopped node; returns when it accepts connections and, for a
        replica whose primary runs, when it streams (likewise a primary's replicas)."""
        deadline = time.monotonic() + (timeout or self._startup_timeout)
        with self._lock:
            self._node(name)
            if self.is_running(name):
                return
            self._start_node(self._node(name), deadline)
            state = self._refresh()  # the roles and upstreams the servers have now
            node = self._node(name)
            if node.standby:
                waiting = [name] if node.upstream and self.is_running(node.upstream) else []
                upstream = node.upstream
            else:
                waiting = [
                    n.name
                    for n in state.nodes
                    if n.standby and n.upstream == name and self.is_running(n.name)
                ]
                upstream = name
            if upstream and waiting:
                self._wait_streaming(upstream, waiting, deadline)

    def promote(self, name: str, timeout: float = 30.0) -> None:
        """Promote a replica, re-point every other replica to it, wait until they stream.

        A replica whose replay is paused follows once resumed (not waited for).
        The old primary is left as it is (running or not, still a primary on the
        old timeline): that is the split-brain a router must fence. A replica
        someone else already promoted (the router's ``failover="promote"``) is
        taken as the primary as it is, and the others re-pointed.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            state, directory = self._require_open()
            self._refresh()
            node = self._node(name)
            if not node.standby and not (
                self.is_running(name) and self.execute(name, _TIMELINE_SQL)[0][0] > 1
            ):
                raise SandboxError(f"{name} is not a replica (it is a primary now)")
            if not self.is_running(name):
                raise SandboxError(f"cannot promote {name}: it is not running")
            rows = self.execute(
                name,
                "SELECT CASE WHEN pg_is_in_recovery()"
                " THEN pg_promote(wait => true, wait_seconds => %s) ELSE true END",
                (max(1, int(timeout)),),
            )
            if not rows or rows[0][0] is not True:
                raise SandboxError(
                    f"{name} did not finish promotion in {timeout:g} s; last log lines:\n"
                    + self._log_tail(directory / f"{name}.log")
                )
            node.standby, node.upstream = False, None
            state.primary_name = name
            followers = [n for n in state.nodes if n.standby]
            if self._sync and not followers:
                # Nobody left to wait for: commits would hang forever.
                node.settings["synchronous_standby_names"] = ""
            self._apply_settings(node)
            for follower in followers:
                follower.upstream = name
                self._apply_settings(follower)
            state.save(directory)
            logger.info("promoted %s; re-pointed %s", name, [f.name for f in followers])
            # A paused replica cannot switch timelines until it is resumed.
            ready = [
                f.name
                for f in followers
                if self.is_running(f.name) and not self._replay_paused(f.name)
            ]
            if ready:
                self._wait_streaming(name, ready, deadline, rewind_diverged=True)

    def rejoin(self, name: str, timeout: float = 60.0) -> None:
        """Bring ``name`` back as a replica of the current primary: stop it, ``pg_rewind``
        it onto the primary's timeline (what it wrote after the split is discarded),
        start it as a standby, and return once it streams from the primary.

        The usual case is an old primary after a failover; a replica that follows
        another node (or nothing) is re-pointed the same way.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            state, directory = self._require_open()
            binaries, run_as = self._require_binaries()
            self._node(name)
            primary = self._refresh().primary_name
            if primary == name:
                raise SandboxError(
                    f"cannot rejoin {name}: it is the primary; promote another node first"
                )
            if not self.is_running(primary):
                raise SandboxError(f"cannot rejoin {name}: the primary {primary} is not running")
            self.stop(name, mode="fast", timeout=max(1.0, deadline - time.monotonic()))
            # pg_rewind reads the source's timeline from its control file, which a fresh
            # promotion updates only at the next checkpoint ("no rewind required" else).
            self.execute(primary, "CHECKPOINT")
            extra = {} if self._password is None else {"passfile": str(directory / _PASSFILE)}
            source = conninfo.make_conninfo(
                "",
                host="127.0.0.1",
                port=str(self.port(primary)),
                user="postgres",
                dbname="postgres",
                **extra,
            )
            rewind = [binaries.path("pg_rewind"), "--target-pgdata", str(directory / name)]
            done = run(
                [*rewind, "--source-server", source],
                run_as,
                cwd=directory,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            logger.info("pg_rewind %s from %s: %s", name, primary, done.stdout.strip())
            node = self._node(name)
            node.standby, node.upstream = True, primary
            node.settings.pop("synchronous_standby_names", None)
            self._apply_settings(node, reload=False)  # pg_rewind copied the primary's file
            self._write(directory / name / "standby.signal", "")
            leader = self._node(primary)
            if self._sync and leader.settings.pop("synchronous_standby_names", None) is not None:
                self._apply_settings(leader)  # a standby to wait for again
            state.save(directory)
            self._start_node(node, deadline)
            self._wait_streaming(primary, [name], deadline)
            logger.info("%s rejoined as a replica of %s", name, primary)

    def wait_replicated(self, timeout: float = 10.0) -> str:
        """Wait until every running, un-paused replica has replayed the primary's
        current WAL position; returns that position (``'0/3000148'``)."""
        deadline = time.monotonic() + timeout
        primary = self.primary_name
        target = str(self.execute(primary, "SELECT pg_current_wal_lsn()::text")[0][0])
        for name in self.replica_names:
            if not self.is_running(name) or self._replay_paused(name):
                continue
            self._poll(
                lambda name=name: bool(
                    self.execute(name, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[
                        0
                    ][0]
                ),
                max(0.0, deadline - time.monotonic()),
                f"{name} did not replay up to {target} within {timeout:g} s",
                name,
            )
        return target

    # -- internals: creation -----------------------------------------------------

    def _create(self, binaries: Binaries, run_as: RunAs | None) -> None:
        self._binaries, self._run_as = binaries, run_as
        directory = self._make_directory(run_as)
        names = [PRIMARY, *(f"replica{i}" for i in range(1, self._replica_count + 1))]
        ports: list[int] = []
        for _ in names:
            ports.append(_pick_port(exclude=ports))
        nodes = [
            NodeRecord(name=name, port=port, standby=name != PRIMARY, upstream=None)
            for name, port in zip(names, ports, strict=True)
        ]
        for node in nodes[1:]:
            node.upstream = PRIMARY
        state = SandboxState(
            owner_pid=os.getpid(),
            owner_marker=process_start_marker(os.getpid()),
            persistent=False,
            created_dir=self._created_dir,
            bindir=str(binaries.bindir),
            major=binaries.major,
            os_user=run_as.name if run_as else None,
            password=self._password,
            sync=self._sync,
            synchronous_commit=self._synchronous_commit,
            primary_name=PRIMARY,
            system_identifier=None,
            nodes=nodes,
            version=binaries.version,
            origin=binaries.origin,
            pgbouncer=self._pool_mode,
            pgbouncer_version=self._bouncer.version_text if self._bouncer else "",
        )
        state.save(directory)  # from here on a crash is reaped by the next sandbox
        self._state = state
        if self._password is not None:
            escaped = self._password.replace("\\", "\\\\").replace(":", "\\:")
            self._write(directory / _PASSFILE, f"127.0.0.1:*:*:postgres:{escaped}\n")
        self._make_primary_data(directory / PRIMARY)  # initdb has its own time limit
        self._clone_cold(directory / PRIMARY, [directory / n.name for n in nodes[1:]])
        deadline = time.monotonic() + self._startup_timeout
        for node in nodes:
            self._apply_settings(node, reload=False)
            if node.standby:
                self._write(directory / node.name / "standby.signal", "")
        self._start_node(nodes[0], deadline)
        for node in nodes[1:]:  # all at once: they start in parallel
            self._spawn(node)
        for node in nodes[1:]:
            try:
                self._await_ready(node, deadline)
            except _PortInUse:
                self._start_node(node, deadline, port_is_taken=True)
        if len(nodes) > 1:
            self._wait_streaming(PRIMARY, [n.name for n in nodes[1:]], deadline)
        state.system_identifier = int(
            self.execute(PRIMARY, "SELECT system_identifier FROM pg_control_system()")[0][0]
        )
        state.save(directory)
        if self._bouncer is not None:
            self._start_bouncers(self._bouncer, deadline)

    def _make_directory(self, run_as: RunAs | None) -> Path:
        if self._base_dir is None:
            root = temp_root()
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o755)  # the server user must be able to walk through it
            reap_orphans()
            directory = Path(tempfile.mkdtemp(prefix="rr-", dir=root))
            self._created_dir = True
        else:
            directory = self._base_dir
            if (directory / STATE_FILE).exists():
                reap_directory(directory)
            if directory.exists():
                if (directory / STATE_FILE).exists():
                    raise SandboxError(
                        f"{directory} already holds a running sandbox; stop it first "
                        "(`replica-router sandbox down`)"
                    )
                if any(directory.iterdir()):
                    raise SandboxError(f"{directory} is not empty; give an empty or new directory")
                self._created_dir = False
            else:
                directory.mkdir(parents=True)
                self._created_dir = True
        self._directory = directory
        check_traversable(directory.parent, run_as)
        if run_as is not None:
            os.chown(directory, run_as.uid, run_as.gid)
        return directory

    def _make_primary_data(self, data_dir: Path) -> None:
        """A new data directory: a copy of the cached template, or initdb."""
        binaries, run_as = self._require_binaries()
        made = False
        if self._password is None:  # the template has no password; initdb sets one
            try:
                template = _template.template_dir(temp_root(), binaries, run_as)
                _template.copy_template(template, data_dir, binaries, run_as)
                made = True
            except (SandboxError, OSError) as exc:
                logger.warning("initdb template unusable (%s); running initdb", exc)
                shutil.rmtree(data_dir, ignore_errors=True)
        if not made:
            pwfile = data_dir.parent / ".pwfile"
            if self._password is not None:
                self._write(pwfile, self._password + "\n", mode=0o600)
            try:
                _template.initdb(binaries, run_as, data_dir, pwfile if self._password else None)
            finally:
                pwfile.unlink(missing_ok=True)
        method = "trust" if self._password is None else "scram-sha-256"
        self._write(
            data_dir / "pg_hba.conf",
            "# written by replica-router's sandbox\n"
            "local all all trust\n"
            "local replication all trust\n"
            f"host all all 127.0.0.1/32 {method}\n"
            f"host replication all 127.0.0.1/32 {method}\n",
        )
        with (data_dir / "postgresql.conf").open("a") as fh:
            fh.write(f"\ninclude '{_CONF_FILE}'\n")

    def _clone_cold(self, source: Path, targets: list[Path]) -> None:
        """Copy the freshly initialised, cleanly shut down primary for each replica.

        A cold copy is a valid base backup and much faster than pg_basebackup
        against a running server; the replicas then stream from the copy's end.
        """
        _, run_as = self._require_binaries()
        if not targets:
            return
        with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="rr-clone") as pool:
            for future in [
                pool.submit(_template.clone_data_dir, source, t, run_as) for t in targets
            ]:
                future.result()

    # -- internals: configuration ------------------------------------------------

    def _settings(self, node: NodeRecord) -> dict[str, str]:
        state, directory = self._require_open()
        socket_dir = str(directory) if len(str(directory)) <= _MAX_SOCKET_PATH else ""
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(node.port),
            "unix_socket_directories": socket_dir,
            "fsync": "off",  # a sandbox need not survive a power cut; startup is faster
            "synchronous_commit": self._synchronous_commit,
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "wal_keep_size": "256MB",  # a stopped replica can catch up without a slot
            "max_wal_size": "256MB",  # bounded disk (or memory, on /dev/shm) per node
            "min_wal_size": "32MB",
            "wal_log_hints": "on",  # so pg_rewind can be used after a failover
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "wal_receiver_status_interval": "1s",  # fresh lag figures on the primary
            "wal_retrieve_retry_interval": "200ms",  # reconnect quickly after a restart
            "wal_receiver_timeout": "10s",
            "wal_sender_timeout": "10s",
            "recovery_target_timeline": "latest",  # follow a promotion
            "shared_buffers": "32MB",
            "max_connections": "100",
            "jit": "off",
            "log_line_prefix": "%m [%p] %q%a ",
        }
        if self._sync:
            # Quorum of one: a commit waits for whichever standby confirms first.
            # Every node is listed so the setting stays right after a promotion.
            names = ", ".join(f'"{n.name}"' for n in state.nodes)
            settings["synchronous_standby_names"] = f"ANY 1 ({names})"
        if node.standby and node.upstream is not None:
            upstream = self._node(node.upstream)
            # The password goes in a passfile: a primary_conninfo change is logged verbatim.
            extra = {} if self._password is None else {"passfile": str(directory / _PASSFILE)}
            settings["primary_conninfo"] = conninfo.make_conninfo(
                "",
                host="127.0.0.1",
                port=str(upstream.port),
                user="postgres",
                application_name=node.name,
                **extra,
            )
        settings.update(node.settings)
        return settings

    def _apply_settings(self, node: NodeRecord, reload: bool = True) -> None:
        """Rewrite the node's settings file and, if it runs, make it reload."""
        state, directory = self._require_open()
        settings = self._settings(node)
        if "primary_conninfo" in settings:
            self._drop_auto_conninfo(directory / node.name)
        body = "".join(f"{key} = {_quote_setting(value)}\n" for key, value in settings.items())
        self._write(
            directory / node.name / _CONF_FILE,
            "# Managed by replica-router's sandbox: rewritten on every change.\n" + body,
        )
        if reload:
            pid = self._pid(node.name)
            if pid is not None:
                os.kill(pid, signal.SIGHUP)
        state.save(directory)

    def _drop_auto_conninfo(self, data_dir: Path) -> None:
        """Remove a ``primary_conninfo`` that ``ALTER SYSTEM`` set (the router re-points
        replicas that way): it would override the one the sandbox sets now."""
        path = data_dir / "postgresql.auto.conf"
        try:
            lines = path.read_text().splitlines(keepends=True)
        except OSError:
            return
        kept = [line for line in lines if not _AUTO_CONNINFO.match(line)]
        if kept != lines:
            self._write(path, "".join(kept))

    # -- internals: what the servers say -----------------------------------------

    def _observe(self, node: NodeRecord) -> _Seen | None:
        """Ask the node what it is; ``None`` if it cannot answer now (hung, starting)."""
        _, directory = self._require_open()
        data_dir = directory / node.name
        pid = self._pid(node.name)
        if pid is None:
            if not (data_dir / "standby.signal").exists():
                return _Seen(standby=False, upstream_port=None, timeline=None)
            text = _auto_conf_conninfo(data_dir)
            port = _conninfo_port(text) if text else None
            return _Seen(standby=True, upstream_port=port, timeline=None)
        if is_suspended(pid):
            return None
        try:
            with psycopg.connect(
                self.server_dsn(node.name), autocommit=True, connect_timeout=_OBSERVE_TIMEOUT
            ) as conn:
                row = conn.execute(_OBSERVE_SQL).fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        in_recovery, text, timeline = row
        if not in_recovery:
            return _Seen(standby=False, upstream_port=None, timeline=int(timeline))
        return _Seen(standby=True, upstream_port=_conninfo_port(text), timeline=None)

    def _refresh(self) -> SandboxState:
        """Make the state say what the servers say now: each node's role and upstream
        (``pg_is_in_recovery()``, ``primary_conninfo``), and which node is the primary.
        A node that cannot answer keeps its last known role."""
        state, directory = self._require_open()
        by_port = {n.port: n.name for n in state.nodes}
        seen = {n.name: self._observe(n) for n in state.nodes}
        before = [(n.standby, n.upstream) for n in state.nodes], state.primary_name
        for node in state.nodes:
            observed = seen[node.name]
            if observed is None:
                continue
            node.standby = observed.standby
            if not observed.standby:
                node.upstream = None
            elif observed.upstream_port in by_port:
                node.upstream = by_port[observed.upstream_port]
        primaries = [n.name for n in state.nodes if not n.standby]
        timelines = {}
        for name in primaries:
            observed = seen[name]
            if observed is not None and observed.timeline is not None:
                timelines[name] = observed.timeline
        if timelines:
            newest = max(timelines.values())
            primaries = [name for name, t in timelines.items() if t == newest]
        if primaries and state.primary_name not in primaries:
            state.primary_name = primaries[0]
        if ([(n.standby, n.upstream) for n in state.nodes], state.primary_name) != before:
            state.save(directory)
        return state

    def _write(self, path: Path, text: str, mode: int = 0o600) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    # -- internals: processes ----------------------------------------------------

    def _start_node(self, node: NodeRecord, deadline: float, port_is_taken: bool = False) -> None:
        """Start a node and wait until it is ready; a port someone took meanwhile is
        replaced by another free one (and its replicas re-pointed)."""
        state, _ = self._require_open()
        for _ in range(_PORT_ATTEMPTS):
            if port_is_taken:
                old = node.port
                node.port = _pick_port(exclude=[n.port for n in state.nodes])
                logger.warning(
                    "port %d for %s was taken; retrying on %d", old, node.name, node.port
                )
                self._apply_settings(node, reload=False)
                for follower in state.nodes:
                    if follower.standby and follower.upstream == node.name:
                        self._apply_settings(follower)
            self._spawn(node)
            try:
                self._await_ready(node, deadline)
                return
            except _PortInUse:
                port_is_taken = True
        raise SandboxError(f"could not find a free port for {node.name}")

    def _open_log(self, log_path: Path) -> IO[bytes]:
        """A server's log, appended to, owned by the user that runs the server."""
        _, run_as = self._require_binaries()
        log = log_path.open("ab")
        if run_as is not None:
            os.chown(log_path, run_as.uid, run_as.gid)
        return log

    def _spawn(self, node: NodeRecord) -> None:
        binaries, run_as = self._require_binaries()
        _, directory = self._require_open()
        with self._open_log(directory / f"{node.name}.log") as log:
            self._log_offsets[node.name] = log.tell()
            self._processes[node.name] = spawn(
                [binaries.path("postgres"), "-D", str(directory / node.name)],
                run_as,
                cwd=directory,
                log=log,
            )

    def _await_ready(self, node: NodeRecord, deadline: float) -> None:
        """Wait until the postmaster reports ``ready`` (a hot standby does too)."""
        _, directory = self._require_open()
        process = self._processes[node.name]
        data_dir = directory / node.name
        log_path = directory / f"{node.name}.log"
        while True:
            code = process.poll()
            if code is not None:
                self._processes.pop(node.name, None)
                tail = self._log_tail(log_path, self._log_offsets.get(node.name, 0))
                if "could not bind" in tail or "Address already in use" in tail:
                    raise _PortInUse(f"port {node.port} is taken")
                raise SandboxError(
                    f"{node.name} failed to start (exit code {code}); last log lines:\n{tail}"
                )
            if postmaster_status(data_dir) == "ready" and postmaster_pid(data_dir) == process.pid:
                return
            if time.monotonic() > deadline:
                terminate_postmaster(process.pid, "immediate", 10.0, process)
                self._processes.pop(node.name, None)
                raise SandboxError(
                    f"{node.name} was not ready in time; last log lines:\n"
                    + self._log_tail(log_path, self._log_offsets.get(node.name, 0))
                )
            time.sleep(_POLL)

    def _wait_streaming(
        self, upstream: str, names: list[str], deadline: float, *, rewind_diverged: bool = False
    ) -> None:
        """Wait until each replica in ``names`` streams from ``upstream`` on its timeline.

        The upstream must list the replica as ``streaming`` *and* the replica must
        receive on the upstream's current timeline: after a promotion a replica
        first streams the old timeline's tail from the new primary, then reconnects.
        ``rewind_diverged``: a replica that says the new timeline forked off before its
        own recovery point (it replayed old-primary WAL the promoted node never got)
        can never follow as it is: it is rewound onto the new timeline (:meth:`rejoin`).
        """
        _, directory = self._require_open()
        pending = set(names)
        last_error: Exception | None = None
        while True:
            try:
                port = self._node(upstream).port
                timeline = self.execute(upstream, _TIMELINE_SQL)[0][0]
                # The replica's side first: once it receives on the new timeline, the
                # upstream's walsender for it is the one serving that timeline.
                on_timeline = {
                    name
                    for name in pending
                    if self.execute(
                        name,
                        "SELECT received_tli FROM pg_stat_wal_receiver WHERE sender_port = %s",
                        (port,),
                    )
                    == [(timeline,)]
                }
                streaming = self.execute(
                    upstream,
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                )
                pending -= on_timeline & {r[0] for r in streaming}
                if rewind_diverged:
                    for name in sorted(pending):
                        if self._diverged(directory / f"{name}.log", timeline):
                            logger.warning(
                                "%s diverged from %s's timeline: rewinding", name, upstream
                            )
                            self.rejoin(name, timeout=max(1.0, deadline - time.monotonic()))
                            pending.discard(name)
                if not pending:
                    return
                last_error = None
            except psycopg.Error as exc:
                last_error = exc
            if time.monotonic() > deadline:
                missing = sorted(pending)
                logs = "\n".join(
                    f"--- {name}.log ---\n" + self._log_tail(directory / f"{name}.log", lines=10)
                    for name in missing
                )
                raise SandboxError(
                    f"{', '.join(missing)} not streaming from {upstream} in time"
                    + (f" ({last_error})" if last_error else "")
                    + f":\n{logs}"
                )
            time.sleep(_POLL)

    def _diverged(self, log: Path, timeline: int) -> bool:
        """The replica's log says ``timeline`` forked off before its recovery point."""
        text = self._log_tail(log, lines=40)
        return f"new timeline {timeline} forked off current database system timeline" in text

    def _start_bouncers(self, bouncer: _pgbouncer.PgBouncer, deadline: float) -> None:
        """A PgBouncer per node, each on a free port; returns once all listen."""
        state, directory = self._require_open()
        mode = state.pgbouncer or "transaction"
        auth_file = directory / "pgbouncer.users"
        self._write(auth_file, _pgbouncer.auth_file_text(self._password))
        for node in state.nodes:
            for _ in range(_PORT_ATTEMPTS):
                node.bouncer_port = _pick_port(
                    exclude=[n.port for n in state.nodes]
                    + [n.bouncer_port for n in state.nodes if n.bouncer_port and n is not node]
                )
                ini = directory / f"{node.name}.pgbouncer.ini"
                self._write(
                    ini,
                    _pgbouncer.config_text(
                        bouncer,
                        pool_mode=mode,
                        listen_port=node.bouncer_port,
                        server_port=node.port,
                        auth_file=auth_file,
                        password=self._password,
                    ),
                )
                if self._spawn_bouncer(bouncer, node, ini, deadline):
                    break
            else:
                raise SandboxError(f"could not find a free port for {node.name}'s PgBouncer")
        state.save(directory)
        logger.info("PgBouncer %s (%s pooling) in front of every node", bouncer.version_text, mode)

    def _spawn_bouncer(
        self, bouncer: _pgbouncer.PgBouncer, node: NodeRecord, ini: Path, deadline: float
    ) -> bool:
        """Start one PgBouncer; False if its port was taken meanwhile."""
        _, directory = self._require_open()
        _, run_as = self._require_binaries()
        log_path = directory / f"{node.name}.pgbouncer.log"
        with self._open_log(log_path) as log:
            offset = log.tell()
            process = spawn([bouncer.path, str(ini)], run_as, cwd=directory, log=log)
        self._bouncers[node.name] = process
        (directory / f"{node.name}{BOUNCER_PID_SUFFIX}").write_text(
            f"{process.pid} {process_start_marker(process.pid)}\n"
        )
        listening = f"listening on 127.0.0.1:{node.bouncer_port}"
        while True:
            tail = _tail(log_path, offset)
            code = process.poll()
            if code is not None:
                self._bouncers.pop(node.name, None)
                if "Address already in use" in tail:
                    return False
                raise SandboxError(
                    f"PgBouncer for {node.name} failed to start (exit code {code}):\n{tail}"
                )
            if listening in tail:
                return True
            if time.monotonic() > deadline:
                raise SandboxError(f"PgBouncer for {node.name} did not listen in time:\n{tail}")
            time.sleep(_POLL)

    def _stop_all(
        self, directory: Path, state: SandboxState, processes: dict[str, subprocess.Popen[bytes]]
    ) -> None:
        """Immediate shutdown of every node at once: the data is about to be deleted."""
        stop_bouncers(directory)
        for bouncer in self._bouncers.values():
            bouncer.poll()  # reap it
        self._bouncers.clear()
        pids: dict[str, int] = {}
        for node in state.nodes:
            pid = postmaster_pid(directory / node.name)
            process = processes.get(node.name)
            if pid is None and process is not None and process.poll() is None:
                pid = process.pid
            if pid is not None:
                pids[node.name] = pid
                try:
                    os.kill(pid, STOP_SIGNALS["immediate"])
                except ProcessLookupError:
                    pids.pop(node.name)
        for name, pid in pids.items():
            terminate_postmaster(pid, "immediate", 10.0, processes.get(name))

    def _pid(self, name: str) -> int | None:
        with self._lock:
            _, directory = self._require_open()
            process = self._processes.get(name)
            if process is not None:
                if process.poll() is None:
                    return process.pid
                self._processes.pop(name, None)
            return postmaster_pid(directory / name)

    # -- internals: small helpers ------------------------------------------------

    def _require_open(self) -> tuple[SandboxState, Path]:
        if self._state is None or self._directory is None:
            raise SandboxError("this LocalCluster is not open; use `with LocalCluster() as lc:`")
        return self._state, self._directory

    def _require_binaries(self) -> tuple[Binaries, RunAs | None]:
        if self._binaries is None:
            raise SandboxError("this LocalCluster is not open")
        return self._binaries, self._run_as

    def _node(self, name: str) -> NodeRecord:
        state, _ = self._require_open()
        for node in state.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in state.nodes)
        raise ConfigurationError(f"unknown node {name!r}; nodes are: {known}")

    def _require_standby(self, name: str) -> NodeRecord:
        self._node(name)
        self._refresh()
        node = self._node(name)
        if not node.standby:
            raise SandboxError(f"{name} is not a replica (it is a primary now)")
        return node

    def _replay_paused(self, name: str) -> bool:
        binaries, _ = self._require_binaries()
        if binaries.major >= 14:
            sql = "SELECT pg_get_wal_replay_pause_state() <> 'not paused'"
        else:
            sql = "SELECT pg_is_wal_replay_paused()"
        return bool(self.execute(name, sql)[0][0])

    def _log_tail(self, path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
        """The end of a server log for an error message, never with the password."""
        text = _tail(path, offset, lines)
        if self._password is not None:
            for secret in {self._password, quote(self._password, safe="")}:
                text = text.replace(secret, "***")
        return text

    def _setting_in_ms(self, name: str, setting: str) -> int:
        sql = "SELECT setting FROM pg_settings WHERE name = %s AND unit = 'ms'"
        return int(self.execute(name, sql, (setting,))[0][0])

    def _poll(self, condition: Any, timeout: float, message: str, name: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except psycopg.Error:
                pass
            if time.monotonic() > deadline:
                _, directory = self._require_open()
                raise SandboxError(
                    f"{message} within {timeout:g} s; last log lines of {name}:\n"
                    + self._log_tail(directory / f"{name}.log", lines=10)
                )
            time.sleep(_POLL)
