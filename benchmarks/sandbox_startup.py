"""How long until a primary + 2 streaming replicas are ready (target: <= 3 s on 2 cores).

    .venv/bin/python benchmarks/sandbox_startup.py [--runs 5] [--replicas 2]

Rows, each timed from nothing on disk to every replica streaming (``pg_stat_replication``
on the primary shows each as ``streaming``), over ``--runs`` runs:

* ``LocalCluster.open()`` - what tests and ``replica-router sandbox up`` use: a copy
  of the cached initdb template given a new system identifier, a cold copy of that
  never-started data directory per replica (a valid base backup), the primary
  started, then the replicas in parallel.
* ``LocalCluster, initdb each time`` - the same without the template (what a
  sandbox with ``password=`` does, and the fallback): shows what the template saves.
* ``baseline: pg_basebackup`` - the textbook recipe measured in the same run, with
  the same binaries and server settings: initdb --no-sync, ``pg_ctl start -w`` the
  primary, one ``pg_basebackup -R -c fast -X stream`` per replica, ``pg_ctl start -w``
  each replica.
* ``LocalCluster.close()`` - immediate shutdown of every node and removal of the files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from replica_router.errors import SandboxError
from replica_router.sandbox import LocalCluster, _template
from replica_router.sandbox._binaries import Binaries, find_binaries
from replica_router.sandbox._processes import RunAs, chown_tree, resolve_run_as, run

TARGET_SECONDS = 3.0
_SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c wal_level=replica -c max_wal_senders=10"
    " -c hot_standby=on -c shared_buffers=32MB -c wal_receiver_status_interval=1s"
)


def _no_template(root: Path, binaries: Binaries, run_as: RunAs | None) -> Path:
    raise SandboxError("template disabled for this measurement")


def time_local_cluster(replicas: int, template: bool = True) -> tuple[float, float]:
    saved = _template.template_dir
    if not template:
        _template.template_dir = _no_template
    try:
        started = time.perf_counter()
        cluster = LocalCluster(replicas=replicas).open()
        ready = time.perf_counter() - started
    finally:
        _template.template_dir = saved
    started = time.perf_counter()
    cluster.close()
    return ready, time.perf_counter() - started


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def time_basebackup_recipe(replicas: int) -> float:
    """The classic setup, same machine and settings, for comparison."""
    binaries = find_binaries()
    run_as = resolve_run_as(None)
    base = Path(tempfile.mkdtemp(prefix="rr-bench-"))
    base.chmod(0o755)
    chown_tree(base, run_as)
    ports = [_free_port() for _ in range(replicas + 1)]
    data = [base / f"node{i}" for i in range(replicas + 1)]

    def pg_ctl(*args: str, port: int | None = None) -> None:
        start = [] if port is None else ["-o", f"{_SERVER_OPTIONS} -k {base} -p {port}", "start"]
        run([binaries.path("pg_ctl"), *args, *start], run_as, cwd=base)

    started = time.perf_counter()
    try:
        run(
            [
                binaries.path("initdb"),
                "-D",
                str(data[0]),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--locale=C",
                "-E",
                "UTF8",
            ],
            run_as,
            cwd=base,
        )
        pg_ctl("-D", str(data[0]), "-w", "-l", str(base / "node0.log"), port=ports[0])
        for i in range(1, replicas + 1):
            run(
                [
                    binaries.path("pg_basebackup"),
                    "-D",
                    str(data[i]),
                    "-R",
                    "-c",
                    "fast",
                    "-X",
                    "stream",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(ports[0]),
                    "-U",
                    "postgres",
                ],
                run_as,
                cwd=base,
            )
            pg_ctl("-D", str(data[i]), "-w", "-l", str(base / f"node{i}.log"), port=ports[i])
        dsn = f"postgresql://postgres@127.0.0.1:{ports[0]}/postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                streaming = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchone()
                if streaming and streaming[0] == replicas:
                    break
                time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        for directory in data:
            if (directory / "postmaster.pid").exists():
                pg_ctl("-D", str(directory), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _row(label: str, samples: list[float]) -> str:
    return (
        f"{label:<30} {statistics.median(samples):>8.2f} {min(samples):>8.2f} {max(samples):>8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()

    ready: list[float] = []
    close: list[float] = []
    baseline: list[float] = []
    no_template: list[float] = []
    steps: list[Callable[[], None]] = []

    def ours() -> None:
        up, down = time_local_cluster(args.replicas)
        ready.append(up)
        close.append(down)

    def ours_with_initdb() -> None:
        no_template.append(time_local_cluster(args.replicas, template=False)[0])

    def theirs() -> None:
        baseline.append(time_basebackup_recipe(args.replicas))

    time_local_cluster(args.replicas)  # makes the template if this machine has none yet
    for _ in range(args.runs):  # interleaved, so all see the same machine state
        steps.extend((ours, ours_with_initdb, theirs))
    for step in steps:
        step()

    print(
        f"primary + {args.replicas} streaming replicas, {args.runs} runs, "
        f"{os.cpu_count()} CPUs, PostgreSQL {find_binaries().major}, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"{'seconds':<30} {'median':>8} {'min':>8} {'max':>8}")
    print(_row("LocalCluster.open()", ready))
    print(_row("LocalCluster, initdb each time", no_template))
    print(_row("baseline: pg_basebackup", baseline))
    print(_row("LocalCluster.close()", close))
    verdict = "meets" if statistics.median(ready) <= TARGET_SECONDS else "MISSES"
    print(
        f"median ready {statistics.median(ready):.2f} s {verdict} the <= {TARGET_SECONDS:g} s "
        f"target; {statistics.median(baseline) / statistics.median(ready):.1f}x faster than "
        "the baseline"
    )


if __name__ == "__main__":
    main()
