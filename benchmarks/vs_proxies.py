"""replica-router against raw psycopg, Pgpool-II and PgBouncer: one table, one run.

On a LocalCluster (primary + 1 streaming replica, a PgBouncer in transaction mode in
front of each node: seed 004's advice) this starts Pgpool-II in streaming-replication
mode with load balancing on (a temp dir, a free loopback port, run as the sandbox's OS
user when we are root; the config is ``pgpool_conf`` below: ``backend_weight0 = 0`` so
that, like the router, it reads from the replica only), waits until ``SHOW POOL_NODES``
shows every node up, and then measures, sides interleaved round by round (the order
reversed every round, so drift hits every side).

Pinning: the client (this process and every thread it starts) runs on CPU 0, every
server process (each postmaster with the backends it forks, each PgBouncer, Pgpool-II
and its children) on CPU 1 (``os.sched_setaffinity``; found by working directory).
Without pinning, two connections' backends land on different cores next to the
client and differ by 2-3x; with it, every side's server work runs in the same place.

Workloads: ``SELECT 1`` and a point lookup on a 1000-row indexed table (on the
replica), a single-row autocommit ``INSERT`` and a small transaction (``INSERT ...
RETURNING``, a point lookup, ``COMMIT``) on the primary. Sides:

* ``raw psycopg``: a psycopg connection held for the run, straight to the node (the
  baseline of every ratio); ``raw transaction()`` is ``with conn.transaction():``;
* ``cluster.read()`` / ``cluster.write()``: a block per operation (``write()`` is a
  transaction whose COMMIT captures the WAL position for read-your-writes);
* ``cluster.connection()``: a ``RoutedConnection`` held for the run (autocommit;
  ``transaction()`` for the small transaction);
* ``pgpool``: a psycopg connection to Pgpool-II held for the run;
* ``pgbouncer``: a psycopg connection to the node's PgBouncer held for the run;
* ``read()/write() via pgbouncer``: the router with each node's DSN on its PgBouncer.

Latency: each operation is timed on its own; per round each side's median; the
ratio is the median over rounds of (side's median / raw's median in that round).
Throughput: 8 client threads per side (each with its own connection; the router's
blocks share one Cluster), operations per second over a few seconds per round,
again as the median of per-round ratios to raw.

Then the four paths of the hot-path issue (today -> target), the concurrency
comparisons (16 threads doing ``cluster.read()`` against 16 threads on a raw
``psycopg_pool.ConnectionPool`` of the same size, no checkout check; ``AsyncCluster``
with 100 tasks against a raw ``AsyncConnectionPool``), and last correctness: where
tricky statements ran through pgpool and the router, and read-your-own-write.

    .venv/bin/python benchmarks/vs_proxies.py [--rounds 30] [--ops 40] [--tp-rounds 5]
        [--seconds 0.5] [--clients 8] [--pairs 300] [--skip SECTION ...]

Needs Pgpool-II (``apt-get install -y pgpool2``) and PgBouncer (``apt-get install -y
pgbouncer``) on Debian/Ubuntu; exits 2 without them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from replica_router import AsyncCluster, Cluster
from replica_router.sandbox import LocalCluster
from replica_router.sandbox._processes import RunAs, resolve_run_as

READ_ONLY = "-c default_transaction_read_only=on"  # as the router's read connections are
ROWS = 1000
START_TIMEOUT = 30.0
PROBE_APP = "rr-probe"
SCHEMA_SQL = f"""
CREATE TABLE t (id int PRIMARY KEY, a int, b text);
INSERT INTO t SELECT i, i, md5(i::text) FROM generate_series(0, {ROWS - 1}) i;
CREATE TABLE u (id int, b int);
CREATE TABLE queue (id int, payload text);
CREATE TABLE w (id bigserial PRIMARY KEY, v int);
CREATE SEQUENCE s;
CREATE FUNCTION my_fn() RETURNS int LANGUAGE sql VOLATILE
    AS 'INSERT INTO u (id) VALUES (1) RETURNING id';
CREATE FUNCTION late_fn() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';
"""
# Raised by a replica for a write, in a read-only transaction or during recovery.
REFUSED = re.compile(r"read-only transaction|during recovery")
# pgpool's log_per_node_statement line; extended-protocol messages carry a prefix.
NODE_LINE = re.compile(
    r"LOG:\s+DB node id: (\d+) backend pid: \d+ statement: (?:Parse: |Bind: |Execute: )?(.*)$"
)


@dataclass(frozen=True)
class Probe:
    """A statement whose destination is checked through both routers."""

    label: str
    sql: str
    params: tuple[Any, ...] | None = None
    before: tuple[str, ...] = ()  # run first through the same connection
    cleanup: str = ""  # run on the primary afterwards


LATE_STABLE = "CREATE OR REPLACE FUNCTION late_fn() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1'"
LATE_VOLATILE = (
    "CREATE OR REPLACE FUNCTION late_fn() RETURNS int LANGUAGE sql VOLATILE "
    "AS 'INSERT INTO u (id) VALUES (3) RETURNING id'"
)

# Writes from tests/classify_corpus.py, two reads, and two statements pgpool is known
# to judge differently (a leading comment; a function once STABLE, then VOLATILE).
PROBES = (
    Probe("read", "SELECT * FROM t WHERE id = 1"),
    Probe("read, leading comment", "/* app:web */ SELECT * FROM t WHERE id = 1"),
    Probe("nextval()", "SELECT nextval('s')"),
    Probe("nextval(), bound parameter", "SELECT nextval(%s)", ("s",)),
    Probe(
        "writable CTE",
        "WITH d AS (DELETE FROM queue WHERE id = -1 RETURNING *) SELECT count(*) FROM d",
    ),
    Probe(
        "writable CTE in a subquery",
        "SELECT * FROM t WHERE a IN (SELECT b FROM "
        "(WITH d AS (DELETE FROM u WHERE id = -1 RETURNING b) SELECT b FROM d) AS s)",
    ),
    Probe("SELECT ... FOR NO KEY UPDATE", "SELECT * FROM t WHERE id = 1 FOR NO KEY UPDATE"),
    Probe("VOLATILE function that inserts", "SELECT my_fn()"),
    Probe("SELECT INTO", "SELECT * INTO t_copy FROM t", cleanup="DROP TABLE IF EXISTS t_copy"),
    Probe("EXPLAIN ANALYZE DELETE", "EXPLAIN ANALYZE DELETE FROM t WHERE id = -1"),
    Probe("read; write in one string", "SELECT 1; DELETE FROM t WHERE id = -1"),
    Probe(
        "STABLE function re-made VOLATILE",
        "SELECT late_fn()",
        before=(LATE_STABLE, "SELECT late_fn()", LATE_VOLATILE),
    ),
)


# -- Pgpool-II ------------------------------------------------------------------------


def find_pgpool() -> str | None:
    """The pgpool binary; Debian puts it in /usr/sbin, often not on a user's PATH."""
    found = shutil.which("pgpool")
    if found:
        return found
    for candidate in ("/usr/sbin/pgpool", "/usr/local/sbin/pgpool"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pgpool_conf(directory: Path, port: int, backends: Sequence[int]) -> str:
    """A minimal streaming-replication config: reads balanced over the replicas only."""
    lines = [
        "backend_clustering_mode = 'streaming_replication'",
        "listen_addresses = '127.0.0.1'",
        f"port = {port}",
        f"socket_dir = '{directory}'",
        "pcp_listen_addresses = ''",  # PCP on its Unix socket only
        f"pcp_port = {free_port()}",
        f"pcp_socket_dir = '{directory}'",
        f"wd_ipc_socket_dir = '{directory}'",
        f"pid_file_name = '{directory}/pgpool.pid'",
        f"logdir = '{directory}'",
        "log_destination = 'stderr'",
        "log_line_prefix = '%a pid %p: '",
        "enable_pool_hba = off",
        "pool_passwd = ''",
        "num_init_children = 32",  # the throughput clients and the held sides
        "max_pool = 1",
        "load_balance_mode = on",
        "sr_check_period = 1",
        "sr_check_user = 'postgres'",
        "sr_check_database = 'postgres'",
        "health_check_period = 0",
        "health_check_user = 'postgres'",
        "failover_on_backend_error = off",
        "use_watchdog = off",
    ]
    for i, backend_port in enumerate(backends):
        lines += [
            f"backend_hostname{i} = '127.0.0.1'",
            f"backend_port{i} = {backend_port}",
            f"backend_weight{i} = {0 if i == 0 else 1}",
            f"backend_flag{i} = 'DISALLOW_TO_FAILOVER'",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Pgpool:
    dsn: str
    log_path: Path
    node_names: tuple[str, ...]  # by pgpool node id

    def pool_nodes(self) -> list[dict[str, str]]:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute("SHOW POOL_NODES")
            names = [column.name for column in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_nodes_up(pgpool: Pgpool, process: subprocess.Popen[bytes]) -> None:
    """Poll ``SHOW POOL_NODES`` until the primary and every replica are up."""
    deadline = time.monotonic() + START_TIMEOUT
    seen: object = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"pgpool exited with {process.returncode}:\n{_log_tail(pgpool.log_path)}"
            )
        try:
            nodes = pgpool.pool_nodes()
        except psycopg.OperationalError as exc:
            seen = exc
        else:
            seen = [(n["node_id"], n["status"], n["role"]) for n in nodes]
            roles = sorted(n["role"] for n in nodes if n["status"] == "up")
            if roles == ["primary"] + ["standby"] * (len(pgpool.node_names) - 1):
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"pgpool nodes not all up after {START_TIMEOUT:.0f}s (last: {seen}):\n"
        f"{_log_tail(pgpool.log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT); its whole process group killed if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: only pgpool's processes
        process.wait(5)


@contextmanager
def running_pgpool(binary: str, lc: LocalCluster, run_as: RunAs | None) -> Iterator[Pgpool]:
    directory = Path(tempfile.mkdtemp(prefix="rr-pgpool-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        names = (lc.primary_name, *lc.replica_names)
        port = free_port()
        (directory / "pgpool.conf").write_text(
            pgpool_conf(directory, port, [lc.port(n) for n in names])
        )
        (directory / "pcp.conf").write_text("")
        (directory / "pool_hba.conf").write_text("")
        if run_as is not None:
            for path in (directory, *directory.iterdir()):
                os.chown(path, run_as.uid, run_as.gid)
        pgpool = Pgpool(
            dsn=f"postgresql://postgres@127.0.0.1:{port}/postgres",
            log_path=directory / "pgpool.log",
            node_names=names,
        )
        with pgpool.log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    binary,
                    "-n",  # stay in the foreground: we own the process and stop it
                    "-D",  # no pgpool_status from an earlier run
                    "-f",
                    str(directory / "pgpool.conf"),
                    "-F",
                    str(directory / "pcp.conf"),
                    "-a",
                    str(directory / "pool_hba.conf"),
                ],
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches us, and we stop it in order
                env={**os.environ, "HOME": str(directory)},
                **(run_as.popen_kwargs() if run_as else {}),
            )
        _wait_nodes_up(pgpool, process)
        yield pgpool
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def pgpool_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip()


# -- correctness ----------------------------------------------------------------------


def outcome(error: psycopg.Error | None) -> str:
    if error is None:
        return "ok"
    message = str(error).splitlines()[0]
    if REFUSED.search(message):
        return "REFUSED (read-only)"
    return f"error: {message[:24]}..." if len(message) > 24 else f"error: {message}"


def sent_text(probe: Probe) -> str:
    """The statement as psycopg sends it (placeholders become $n)."""
    if probe.params is None:
        return probe.sql
    counter = iter(range(1, len(probe.params) + 1))
    return re.sub(r"%s", lambda _: f"${next(counter)}", probe.sql)


def via_pgpool(pgpool: Pgpool, probe: Probe, lc: LocalCluster) -> str:
    with psycopg.connect(pgpool.dsn, autocommit=True, application_name=PROBE_APP) as conn:
        result = conn.pgconn.exec_(b"PGPOOL SET log_per_node_statement = on")  # simple query
        if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
            raise RuntimeError(f"PGPOOL SET failed: {result.get_error_message()}")
        for statement in probe.before:
            conn.execute(statement)
            lc.wait_replicated()
        offset = pgpool.log_path.stat().st_size
        error: psycopg.Error | None = None
        try:
            conn.execute(probe.sql, probe.params)
        except psycopg.Error as exc:
            error = exc
    text = sent_text(probe)
    nodes: set[str] = set()
    deadline = time.monotonic() + 2.0
    while not nodes and time.monotonic() < deadline:  # the child logs before it answers
        with pgpool.log_path.open("rb") as log:
            log.seek(offset)
            for raw in log.read().decode(errors="replace").splitlines():
                found = NODE_LINE.search(raw)
                if raw.startswith(PROBE_APP) and found and found.group(2) == text:
                    nodes.add(pgpool.node_names[int(found.group(1))])
        if not nodes:
            time.sleep(0.02)
    return f"{'+'.join(sorted(nodes)) or '?'}: {outcome(error)}"


def via_router(cluster: Cluster, probe: Probe, lc: LocalCluster) -> str:
    def run() -> str:
        if probe.before:
            with cluster.connection() as conn:
                for statement in probe.before:
                    conn.execute(statement)
                    lc.wait_replicated()
        with cluster.connection() as conn:  # fresh: the node it holds is the one the probe used
            error: psycopg.Error | None = None
            try:
                conn.execute(probe.sql, probe.params)
            except psycopg.Error as exc:
                error = exc
            return f"{'+'.join(sorted(set(conn.nodes.values()))) or '?'}: {outcome(error)}"

    return contextvars.Context().run(run)  # no token from an earlier probe steers it


def stale_reads(conn: Any, pairs: int) -> int:
    """INSERT a row, read it back at once on the same connection; count misses."""
    stale = 0
    for i in range(pairs):
        (row_id,) = conn.execute("INSERT INTO w (v) VALUES (%s) RETURNING id", (i,)).fetchone()
        if conn.execute("SELECT v FROM w WHERE id = %s", (row_id,)).fetchone() is None:
            stale += 1
    return stale


def correctness(pgpool: Pgpool, cluster: Cluster, lc: LocalCluster, pairs: int) -> list[str]:
    lines = [
        "Where each statement ran, and what the node did",
        f"  {'statement':<36} {'pgpool':<46} {'replica-router (RoutedConnection)'}",
    ]
    for probe in PROBES:
        pooled = via_pgpool(pgpool, probe, lc)
        if probe.cleanup:
            lc.execute(lc.primary_name, probe.cleanup)
        routed = via_router(cluster, probe, lc)
        if probe.cleanup:
            lc.execute(lc.primary_name, probe.cleanup)
        lines.append(f"  {probe.label:<36} {pooled:<46} {routed}")
    lc.wait_replicated()

    def routed_pairs() -> tuple[int, dict[str, int]]:
        before = cluster.counters().reads
        with cluster.connection() as conn:
            stale = stale_reads(conn, pairs)
        after = cluster.counters().reads
        return stale, {n: after[n] - before.get(n, 0) for n in after if after[n] != before.get(n)}

    with psycopg.connect(pgpool.dsn, autocommit=True) as conn:
        pgpool_stale = stale_reads(conn, pairs)
    router_stale, read_nodes = contextvars.Context().run(routed_pairs)
    served = ", ".join(f"{n} {c}" for n, c in sorted(read_nodes.items()))
    lines += [
        "",
        f"Read your own write: autocommit INSERT, then SELECT that row at once ({pairs} pairs)",
        f"  {'pgpool':<36} stale {pgpool_stale}/{pairs}",
        f"  {'replica-router':<36} stale {router_stale}/{pairs} (reads served by {served})",
    ]
    return lines


# -- pinning --------------------------------------------------------------------------

CLIENT_CPU, SERVER_CPU = 0, 1


def pin_client() -> bool:
    """This thread (and every thread started after it) on CPU 0, if there are two."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        return False
    os.sched_setaffinity(0, {CLIENT_CPU})
    return True


def pin_servers(directories: Sequence[Path]) -> int:
    """Every process working under one of ``directories`` on CPU 1; how many.

    Postmasters, their backends, PgBouncer and Pgpool-II's children all run with their
    data or config directory as working directory; a backend forked later inherits its
    postmaster's affinity. Called again after each side has opened its connections.
    """
    roots = [str(d.resolve()) for d in directories]
    pinned = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if any(cwd == root or cwd.startswith(root + os.sep) for root in roots):
            try:
                os.sched_setaffinity(int(entry.name), {SERVER_CPU})
            except OSError:
                continue
            pinned += 1
    return pinned


# -- timing ---------------------------------------------------------------------------

Op = Callable[[int], object]


def latency(sides: dict[str, Op], rounds: int, ops: int) -> dict[str, list[float]]:
    """Per side, the median latency (ns) of each round; sides interleaved."""
    for op in sides.values():
        for i in range(ops):  # warm up: connections, prepared statements, caches
            op(i)
    medians: dict[str, list[float]] = {name: [] for name in sides}
    items = list(sides.items())
    clock = time.perf_counter_ns
    for r in range(rounds):
        for name, op in items if r % 2 == 0 else reversed(items):
            got = []
            for i in range(ops):
                start = clock()
                op(i)
                got.append(clock() - start)
            medians[name].append(statistics.median(got))
    return medians


Ticks = dict[int, tuple[int, int]]  # per CPU, (busy, total) ticks


def cpu_ticks() -> Ticks:
    """Per CPU, (busy, total) ticks since boot (``/proc/stat``; busy = not idle or iowait)."""
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                values = [int(v) for v in fields[:8]]
                ticks[int(name[3:])] = (sum(values) - values[3] - values[4], sum(values))
    return ticks


def busy_between(before: Ticks, after: Ticks, cpu: int) -> float:
    """The fraction of the time ``cpu`` was busy between two :func:`cpu_ticks`."""
    busy, total = (a - b for a, b in zip(after[cpu], before[cpu], strict=True))
    return busy / total if total else 0.0


def throughput(
    sides: dict[str, list[Op]],
    rounds: int,
    seconds: float,
    busy: dict[str, list[tuple[float, float]]] | None = None,
) -> dict[str, list[float]]:
    """Per side, operations per second of each round, one thread per client op; with
    ``busy``, also per round how busy the client's and the servers' CPUs were."""

    def run(clients: list[Op], seconds: float, name: str | None = None) -> float:
        stop = threading.Event()
        counts = [0] * len(clients)
        start = threading.Barrier(len(clients) + 1)

        def work(k: int) -> None:
            op, i = clients[k], 0
            start.wait()
            while not stop.is_set():
                op(i)
                i += 1
            counts[k] = i

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(clients))]
        for thread in threads:
            thread.start()
        start.wait()
        began, ticks = time.perf_counter(), cpu_ticks()
        time.sleep(seconds)  # the measured interval itself, not a wait for a condition
        stop.set()
        for thread in threads:
            thread.join()
        if busy is not None and name is not None:
            after = cpu_ticks()
            busy.setdefault(name, []).append(
                (busy_between(ticks, after, CLIENT_CPU), busy_between(ticks, after, SERVER_CPU))
            )
        return sum(counts) / (time.perf_counter() - began)

    for clients in sides.values():
        run(clients, seconds / 4)  # warm up: pools grown, statements prepared
    rates: dict[str, list[float]] = {name: [] for name in sides}
    items = list(sides.items())
    for r in range(rounds):
        for name, clients in items if r % 2 == 0 else reversed(items):
            rates[name].append(run(clients, seconds, name))
    return rates


async def athroughput(
    sides: dict[str, Callable[[int], Awaitable[object]]], tasks: int, rounds: int, seconds: float
) -> dict[str, list[float]]:
    """:func:`throughput` for asyncio: ``tasks`` tasks per side, one event loop."""

    async def run(op: Callable[[int], Awaitable[object]], seconds: float) -> float:
        stop = False
        counts = [0] * tasks

        async def work(k: int) -> None:
            i = 0
            while not stop:
                await op(i)
                i += 1
            counts[k] = i

        began = time.perf_counter()
        running = [asyncio.create_task(work(k)) for k in range(tasks)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*running)
        return sum(counts) / (time.perf_counter() - began)

    for op in sides.values():
        await run(op, seconds / 4)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    items = list(sides.items())
    for r in range(rounds):
        for name, op in items if r % 2 == 0 else reversed(items):
            rates[name].append(await run(op, seconds))
    return rates


def ratio(side: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of the per-round ratios side / base."""
    per_round = [s / b for s, b in zip(side, base, strict=True)]
    if len(per_round) < 2:
        return per_round[0], per_round[0], per_round[0]
    q1, median, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
    return median, q1, q3


# -- the sides ------------------------------------------------------------------------

INSERT = "INSERT INTO w (v) VALUES (%s)"
INSERT_RETURNING = "INSERT INTO w (v) VALUES (%s) RETURNING id"
LOOKUP = "SELECT * FROM t WHERE id = %s"


@dataclass(frozen=True)
class Workload:
    label: str
    node: str  # "replica" or "primary": where the raw baseline connects
    plain: Callable[[Any, int], object]  # on a psycopg (or routed) connection
    transaction: bool = False  # plain() runs inside conn.transaction()


def select_one(conn: Any, i: int) -> object:
    return conn.execute("SELECT 1").fetchone()


def point_lookup(conn: Any, i: int) -> object:
    return conn.execute(LOOKUP, (i % ROWS,)).fetchone()


def insert(conn: Any, i: int) -> object:
    return conn.execute(INSERT, (i,))


def small_transaction(conn: Any, i: int) -> object:
    conn.execute(INSERT_RETURNING, (i,)).fetchone()
    return conn.execute(LOOKUP, (i % ROWS,)).fetchone()


WORKLOADS = (
    Workload("SELECT 1", "replica", select_one),
    Workload("point lookup", "replica", point_lookup),
    Workload("autocommit INSERT", "primary", insert),
    Workload("small transaction", "primary", small_transaction, transaction=True),
)


class Setup:
    """Everything the sides connect to, opened once for the run."""

    def __init__(self, lc: LocalCluster, pgpool: Pgpool) -> None:
        self.lc = lc
        self.pgpool = pgpool
        replica = lc.replica_names[0]
        self.direct = {"primary": lc.server_dsn(lc.primary_name), "replica": lc.server_dsn(replica)}
        self.bounced = {"primary": lc.dsn(lc.primary_name), "replica": lc.dsn(replica)}
        self.bouncer_kwargs = lc.connect_kwargs  # prepare_threshold=None before 1.21
        pools = {"primary": {"min_size": 4, "max_size": 16}, "replica": {"min_size": 4}}
        replicas = [lc.server_dsn(n) for n in lc.replica_names]
        self.cluster = Cluster(self.direct["primary"], replicas, pool_kwargs=pools).open()
        self.bounced_cluster = Cluster(
            self.bounced["primary"],
            [lc.dsn(n) for n in lc.replica_names],
            pool_kwargs=pools,
            connect_kwargs=self.bouncer_kwargs,
        ).open()
        self._opened: list[Any] = []
        self.directories = (lc.directory, pgpool.log_path.parent)  # where to pin servers

    def connect(self, dsn: str, read_only: bool, **kwargs: Any) -> psycopg.Connection[Any]:
        if read_only:  # as the router's read connections are
            kwargs["options"] = READ_ONLY
        conn: psycopg.Connection[Any] = psycopg.connect(dsn, autocommit=True, **kwargs)
        self._opened.append(conn)
        return conn

    def routed(self) -> Any:
        conn = self.cluster.connection()
        self._opened.append(conn)
        return conn

    def release(self) -> None:
        """Close the connections a workload's sides opened (pgpool has 32 slots)."""
        for conn in self._opened:
            conn.close()
        self._opened.clear()

    def close(self) -> None:
        self.release()
        self.cluster.close()
        self.bounced_cluster.close()

    def sides(self, work: Workload) -> dict[str, Callable[[], Op]]:
        """Side name -> a factory of one client's operation (its own connection)."""
        run = work.plain
        reading = work.node == "replica"

        def held(make: Callable[[], Any], txn: bool = work.transaction) -> Callable[[], Op]:
            def factory() -> Op:
                conn = make()

                def op(i: int) -> object:
                    if txn:
                        with conn.transaction():
                            return run(conn, i)
                    return run(conn, i)

                return op

            return factory

        def block(cluster: Cluster) -> Callable[[], Op]:
            def factory() -> Op:
                def op(i: int) -> object:
                    with cluster.read() if reading else cluster.write() as conn:
                        return run(conn, i)

                return op

            return factory

        direct, bounced = self.direct[work.node], self.bounced[work.node]
        sides: dict[str, Callable[[], Op]] = {
            "raw psycopg": held(lambda: self.connect(direct, reading))
        }
        if work.label == "autocommit INSERT":  # the baseline of write()'s path target
            sides["raw transaction()"] = held(lambda: self.connect(direct, reading), txn=True)
        sides["cluster.read()" if reading else "cluster.write()"] = block(self.cluster)
        sides["cluster.connection()"] = held(self.routed)
        sides["pgpool"] = held(lambda: self.connect(self.pgpool.dsn, False))
        sides["pgbouncer"] = held(lambda: self.connect(bounced, reading, **self.bouncer_kwargs))
        via = "read() via pgbouncer" if reading else "write() via pgbouncer"
        sides[via] = block(self.bounced_cluster)
        return sides


def in_context(action: Callable[[], Any]) -> Any:
    """Each workload in a context of its own: writes' tokens never steer the reads."""
    return contextvars.Context().run(action)


Results = dict[str, dict[str, list[float]]]  # workload -> side -> one figure per round


def per_workload(
    setup: Setup,
    clients: Callable[[Callable[[], Op]], Any],
    run: Callable[[dict[str, Any]], dict[str, list[float]]],
) -> Results:
    """Each workload's sides made (``clients`` per side factory), measured, closed."""
    results: Results = {}
    for work in WORKLOADS:

        def measure(work: Workload = work) -> dict[str, list[float]]:
            sides = {name: clients(factory) for name, factory in setup.sides(work).items()}
            pin_servers(setup.directories)
            try:
                return run(sides)
            finally:
                setup.release()

        results[work.label] = in_context(measure)
    return results


def workload_table(results: Results, cell: Callable[[list[float], list[float]], str]) -> list[str]:
    """One row per side, one column per workload; ``cell(side, raw)`` per entry."""
    lines = [
        "| side | " + " | ".join(w.label for w in WORKLOADS) + " |",
        "|---|" + "---|" * len(WORKLOADS),
    ]
    for name in dict.fromkeys(n for r in results.values() for n in r):
        cells = [
            cell(got[name], got["raw psycopg"]) if name in got else ""
            for got in (results[w.label] for w in WORKLOADS)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def latency_section(setup: Setup, args: argparse.Namespace) -> tuple[list[str], Results]:
    results = per_workload(
        setup, lambda factory: factory(), lambda ops: latency(ops, args.rounds, args.ops)
    )

    def cell(side: list[float], raw: list[float]) -> str:
        median, q1, q3 = ratio(side, raw)
        return f"{statistics.median(side) / 1e3:.1f} ({median:.2f}x; {q1:.2f}-{q3:.2f})"

    title = (
        f"Latency: median us per operation, x = median of per-round ratios to raw psycopg "
        f"(IQR); {args.rounds} rounds x {args.ops} ops"
    )
    return [title, "", *workload_table(results, cell)], results


def throughput_section(setup: Setup, args: argparse.Namespace) -> list[str]:
    results = per_workload(
        setup,
        lambda factory: [factory() for _ in range(args.clients)],
        lambda sides: throughput(sides, args.tp_rounds, args.seconds),
    )

    def cell(side: list[float], raw: list[float]) -> str:
        return f"{statistics.median(side):,.0f} ({ratio(side, raw)[0]:.2f}x)"

    title = (
        f"Throughput, {args.clients} clients: operations/s, x = median of per-round ratios "
        f"to raw psycopg; {args.tp_rounds} rounds x {args.seconds:g} s"
    )
    return [title, "", *workload_table(results, cell)]


ISSUE_PATHS = (  # (path, workload, side, baseline side, target)
    ("`with cluster.read() as c: c.execute(point lookup)`", "point lookup", "cluster.read()",
     "raw psycopg", 1.10),
    ("held `cluster.connection()`, point lookup", "point lookup", "cluster.connection()",
     "raw psycopg", 1.03),
    ("held `cluster.connection()`, autocommit INSERT (token captured)", "autocommit INSERT",
     "cluster.connection()", "raw psycopg", 1.15),
    ("`with cluster.write() as c: c.execute(INSERT)` vs raw `with conn.transaction()`",
     "autocommit INSERT", "cluster.write()", "raw transaction()", 1.10),
)  # fmt: skip


def paths_section(results: Results) -> list[str]:
    lines = ["The hot paths (from the latency rounds above)", "",
             "| path | measured (IQR) | target |", "|---|---|---|"]  # fmt: skip
    for path, work, side, base, target in ISSUE_PATHS:
        median, q1, q3 = ratio(results[work][side], results[work][base])
        lines.append(f"| {path} | {median:.2f}x ({q1:.2f}-{q3:.2f}) | {target:.2f}x or less |")
    return lines


def concurrency_section(setup: Setup, args: argparse.Namespace) -> list[str]:
    """16 threads on cluster.read() vs a raw pool of 16; 100 asyncio tasks likewise."""
    size = args.pool_size
    replica, primary = setup.direct["replica"], setup.direct["primary"]
    pool_kwargs = {"replica": {"min_size": size, "max_size": size}}
    raw_kwargs = {"autocommit": True, "options": READ_ONLY}
    lines = [
        f"Concurrency: point lookups, pools of {size} on the replica, raw pools without a "
        f"checkout check; {args.tp_rounds} rounds x {args.seconds:g} s",
        "",
        "| side | operations/s | x raw pool | client CPU busy, us/op | server CPU busy, us/op |",
        "|---|---|---|---|---|",
    ]
    with (
        ConnectionPool(replica, kwargs=raw_kwargs, min_size=size, max_size=size) as pool,
        Cluster(primary, [replica], pool_kwargs=pool_kwargs) as cluster,
    ):
        pool.wait()

        def raw(i: int) -> object:
            with pool.connection() as conn:
                return point_lookup(conn, i)

        def routed(i: int) -> object:
            with cluster.read() as conn:
                return point_lookup(conn, i)

        pin_servers(setup.directories)
        busy: dict[str, list[tuple[float, float]]] = {}
        got = throughput(
            {"raw ConnectionPool": [raw] * args.threads, "cluster.read()": [routed] * args.threads},
            args.tp_rounds,
            args.seconds,
            busy,
        )
    base = got["raw ConnectionPool"]
    for name, rates in got.items():
        rate = statistics.median(rates)
        client, server = (statistics.median(b[i] for b in busy[name]) for i in (0, 1))
        lines.append(
            f"| {args.threads} threads, {name} | {rate:,.0f} | {ratio(rates, base)[0]:.2f} | "
            f"{client:.2f}, {client / rate * 1e6:.0f} | {server:.2f}, {server / rate * 1e6:.0f} |"
        )

    async def async_side() -> dict[str, list[float]]:
        apool = AsyncConnectionPool(
            replica, kwargs=raw_kwargs, min_size=size, max_size=size, open=False
        )
        await apool.open(wait=True)
        try:
            async with AsyncCluster(primary, [replica], pool_kwargs=pool_kwargs) as acluster:

                async def raw(i: int) -> object:
                    async with apool.connection() as conn:
                        cur = await conn.execute(LOOKUP, (i % ROWS,))
                        return await cur.fetchone()

                async def routed(i: int) -> object:
                    async with acluster.read() as conn:
                        cur = await conn.execute(LOOKUP, (i % ROWS,))
                        return await cur.fetchone()

                pin_servers(setup.directories)
                return await athroughput(
                    {"raw AsyncConnectionPool": raw, "AsyncCluster.read()": routed},
                    args.tasks,
                    args.tp_rounds,
                    args.seconds,
                )
        finally:
            await apool.close()

    got = asyncio.run(async_side())
    base = got["raw AsyncConnectionPool"]
    for name, rates in got.items():
        lines.append(
            f"| {args.tasks} tasks, {name} | {statistics.median(rates):,.0f} | "
            f"{ratio(rates, base)[0]:.2f} |"
        )
    return lines


# -- main -----------------------------------------------------------------------------

SECTIONS = ("latency", "throughput", "concurrency", "correctness")


def benchmark(lc: LocalCluster, pgpool: Pgpool, args: argparse.Namespace) -> Iterator[str]:
    setup = Setup(lc, pgpool)
    try:
        yield f"server processes pinned to CPU {SERVER_CPU}: {pin_servers(setup.directories)}"
        if "latency" not in args.skip:
            lines, results = latency_section(setup, args)
            yield from ("", *lines, "", *paths_section(results))
        if "throughput" not in args.skip:
            yield from ("", *throughput_section(setup, args))
        if "concurrency" not in args.skip:
            yield from ("", *concurrency_section(setup, args))
        if "correctness" not in args.skip:
            yield from ("", *correctness(pgpool, setup.cluster, lc, args.pairs))
    finally:
        setup.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds")
    parser.add_argument("--ops", type=int, default=40, help="operations per side per round")
    parser.add_argument("--tp-rounds", type=int, default=5, help="throughput rounds")
    parser.add_argument("--seconds", type=float, default=0.5, help="per throughput round")
    parser.add_argument("--clients", type=int, default=8, help="throughput client threads")
    parser.add_argument("--threads", type=int, default=16, help="concurrency: threads")
    parser.add_argument("--tasks", type=int, default=100, help="concurrency: asyncio tasks")
    parser.add_argument("--pool-size", type=int, default=16, help="concurrency: pool size")
    parser.add_argument("--pairs", type=int, default=300, help="read-your-writes pairs")
    parser.add_argument("--skip", nargs="*", default=(), choices=SECTIONS)
    args = parser.parse_args()
    binary = find_pgpool()
    if binary is None:
        print(
            "pgpool (Pgpool-II) not found; install it first, e.g. on Debian/Ubuntu: "
            "apt-get install -y pgpool2",
            file=sys.stderr,
        )
        return 2

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: servers stopped

    signal.signal(signal.SIGTERM, on_sigterm)
    pinned = pin_client()  # first: every thread started later inherits it
    started = time.monotonic()
    try:
        with LocalCluster(replicas=1, pgbouncer="transaction") as lc:
            lc.execute(lc.primary_name, SCHEMA_SQL)
            lc.wait_replicated()
            (server,) = lc.execute(lc.primary_name, "SHOW server_version")[0]
            with running_pgpool(binary, lc, resolve_run_as(None)) as pgpool:
                print(
                    f"{pgpool_version(binary)}; PgBouncer {lc.pgbouncer_version} (transaction); "
                    f"PostgreSQL {server}; {os.cpu_count()} CPUs; client pinned to CPU "
                    f"{CLIENT_CPU if pinned else '(not pinned: one CPU)'}; "
                    f"load average {os.getloadavg()[0]:.1f}"
                )
                for line in benchmark(lc, pgpool, args):
                    print(line, flush=True)
    except KeyboardInterrupt:
        print("interrupted; pgpool and the sandbox stopped", file=sys.stderr)
        return 130
    print(f"\n(run took {time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
