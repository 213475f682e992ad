"""replica-router against Pgpool-II, the best-known read/write-splitting proxy, in one run.

On a LocalCluster (primary + 2 streaming replicas) this starts Pgpool-II in
streaming-replication mode with load balancing on (a temp dir, a free loopback port,
run as the sandbox's OS user when we are root; the config is ``pgpool_conf`` below:
``backend_weight0 = 0`` so that, like the router, it reads from replicas only), waits
until ``SHOW POOL_NODES`` shows all three nodes up, then measures, interleaved
(the order of the sides reversed every round, so drift hits every side):

reads, ``SELECT 1`` and a point lookup on a 1000-row indexed table
* ``raw psycopg``: a connection straight to replica1 (the baseline);
* ``cluster.read() each``: ``with cluster.read() as c: c.execute(...)`` per query;
* ``cluster.connection()``: a ``RoutedConnection`` (autocommit) held for the run;
* ``pgpool``: a psycopg connection to Pgpool-II (autocommit) held for the run.

writes, a single-row autocommit ``INSERT``
* ``raw psycopg``: straight to the primary;
* ``cluster.write() each``: ``with cluster.write() as c: c.execute(...)`` per insert
  (a transaction, committed on exit, its WAL position captured for read-your-writes);
* ``cluster.connection()``: the ``RoutedConnection``, autocommit;
* ``pgpool``: the held pgpool connection.

Every query is timed on its own; the tables show the median and 90th percentile per
query and the ratio of medians to the raw side.

Then correctness. Each statement below is sent through pgpool and through a
``RoutedConnection``. Where it ran: for pgpool, its own per-node statement log
(``PGPOOL SET log_per_node_statement = on`` in the probing session only); for the
router, the node its connection used. The outcome shows what the node did: a replica
refuses a write with "cannot execute ... in a read-only transaction". Last, read your
own write: an autocommit ``INSERT`` and, at once, a ``SELECT`` of that row on the same
connection, counted stale when the row is not there.

    .venv/bin/python benchmarks/vs_pgpool.py [--rounds 100] [--ops 50] [--pairs 300]

Needs Pgpool-II (``apt-get install -y pgpool2`` on Debian/Ubuntu); exits 2 without it.
"""

from __future__ import annotations

import argparse
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
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from replica_router import Cluster
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
        "num_init_children = 8",
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


# -- timing ---------------------------------------------------------------------------


def measure(sides: dict[str, Callable[[int], object]], rounds: int, ops: int) -> dict[str, Any]:
    """Per-query latencies (ns) per side, sides interleaved, order reversed every round."""
    for op in sides.values():
        for i in range(ops):  # warm up: connections, prepared statements, caches
            op(i)
    samples: dict[str, list[int]] = {name: [] for name in sides}
    items = list(sides.items())
    clock = time.perf_counter_ns
    for r in range(rounds):
        for name, op in items if r % 2 == 0 else reversed(items):
            out = samples[name]
            for i in range(ops):
                start = clock()
                op(i)
                out.append(clock() - start)
    return samples


def latency_table(title: str, samples: dict[str, list[int]]) -> list[str]:
    base = statistics.median(next(iter(samples.values())))
    lines = [title, f"  {'side':<26} {'median us':>10} {'p90 us':>8} {'x raw':>6}"]
    for name, got in samples.items():
        median = statistics.median(got)
        p90 = statistics.quantiles(got, n=10)[-1]
        lines.append(f"  {name:<26} {median / 1e3:>10.1f} {p90 / 1e3:>8.1f} {median / base:>6.2f}")
    return lines


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


# -- main -----------------------------------------------------------------------------


def benchmark(lc: LocalCluster, pgpool: Pgpool, args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    replica = lc.replica_dsns[0]
    raw_read = psycopg.connect(replica, autocommit=True, options=READ_ONLY)
    raw_write = psycopg.connect(lc.primary_dsn, autocommit=True)
    pooled = psycopg.connect(pgpool.dsn, autocommit=True)
    cluster = Cluster(lc.primary_dsn, lc.replica_dsns).open()
    routed = cluster.connection()
    try:
        (pgpool_port,) = pooled.execute("SELECT inet_server_port()").fetchone() or (0,)
        routed.execute("SELECT 1")
        by_port = {lc.port(n): n for n in pgpool.node_names}
        out.append(
            f"held read nodes: raw replica1, cluster.connection() {routed.nodes['read']}, "
            f"pgpool {by_port.get(pgpool_port, '?')}; cluster.read() round-robins both replicas"
        )
        for label, query, lookup in (
            ("SELECT 1", "SELECT 1", False),
            ("point lookup", "SELECT * FROM t WHERE id = %s", True),
        ):

            def params(i: int, lookup: bool = lookup) -> tuple[int] | None:
                return (i % ROWS,) if lookup else None

            def raw(i: int, q: str = query) -> object:
                return raw_read.execute(q, params(i)).fetchone()

            def read_each(i: int, q: str = query) -> object:
                with cluster.read() as conn:
                    return conn.execute(q, params(i)).fetchone()

            def held(i: int, q: str = query) -> object:
                return routed.execute(q, params(i)).fetchone()

            def pgpool_held(i: int, q: str = query) -> object:
                return pooled.execute(q, params(i)).fetchone()

            samples = measure(
                {
                    "raw psycopg -> replica1": raw,
                    "cluster.read() each": read_each,
                    "cluster.connection()": held,
                    "pgpool": pgpool_held,
                },
                args.rounds,
                args.ops,
            )
            out += ["", *latency_table(f"{label}, {args.rounds} rounds x {args.ops}", samples)]
        assert set(cluster.counters().reads) <= set(lc.replica_names), cluster.counters()

        def writes() -> dict[str, list[int]]:
            insert = "INSERT INTO w (v) VALUES (%s)"

            def write_each(i: int) -> object:
                with cluster.write() as conn:
                    return conn.execute(insert, (i,))

            return measure(
                {
                    "raw psycopg -> primary": lambda i: raw_write.execute(insert, (i,)),
                    "cluster.write() each": write_each,
                    "cluster.connection()": lambda i: routed.execute(insert, (i,)),
                    "pgpool": lambda i: pooled.execute(insert, (i,)),
                },
                args.rounds,
                args.ops,
            )

        # in a context of its own: the writes' token must not steer the reads after them
        samples = contextvars.Context().run(writes)
        title = f"autocommit INSERT, {args.rounds} rounds x {args.ops}"
        out += ["", *latency_table(title, samples)]
        counts = {n["node_id"]: n["select_cnt"] for n in pgpool.pool_nodes()}
        out.append(
            "pgpool select_cnt: "
            + ", ".join(
                f"{name} {counts.get(str(i), '?')}" for i, name in enumerate(pgpool.node_names)
            )
        )
        out += ["", *correctness(pgpool, cluster, lc, args.pairs)]
    finally:
        routed.close()
        cluster.close()
        for conn in (raw_read, raw_write, pooled):
            conn.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds per table")
    parser.add_argument("--ops", type=int, default=50, help="queries per side per round")
    parser.add_argument("--pairs", type=int, default=300, help="read-your-writes pairs")
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
    started = time.monotonic()
    try:
        with LocalCluster(replicas=2) as lc:
            lc.execute(lc.primary_name, SCHEMA_SQL)
            lc.wait_replicated()
            (server,) = lc.execute(lc.primary_name, "SHOW server_version")[0]
            with running_pgpool(binary, lc, resolve_run_as(None)) as pgpool:
                print(f"{pgpool_version(binary)}; PostgreSQL {server}; {os.cpu_count()} CPUs")
                print("\n".join(benchmark(lc, pgpool, args)))
    except KeyboardInterrupt:
        print("interrupted; pgpool and the sandbox stopped", file=sys.stderr)
        return 130
    print(f"\n(run took {time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
