"""What a point lookup costs the server, with and without what a checkout puts before it.

libpq alone (and psycopg's held connection, the issues' baseline), the sides of
``floors.lookup_sides``, each on an autocommit connection of its own to a sandbox
primary; the server's CPU time per operation is each side's backend's own
(``/proc/<pid>/schedstat``), so the client's speed and the machine's other work do not
enter it:

* ``psycopg, held``: the lookup as a held psycopg connection runs it (prepared after
  its fifth run);
* ``prepared``: the lookup prepared, on libpq;
* ``unprepared``: the same lookup parsed and planned each time (a session just reset
  with ``DISCARD ALL`` has no prepared statements left);
* ``empty query, Sync, unprepared``: one more statement and Sync ahead of it (the
  protocol's share);
* ``DISCARD ALL, Sync, unprepared``: what ``cluster.read()`` sends after a checkout.

    .venv/bin/python benchmarks/server_cost.py [--rounds 7] [--ops 2000]
"""

from __future__ import annotations

import argparse
import statistics

from floors import ROWS, lookup_sides

from replica_router.sandbox import LocalCluster


def backend_cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()

    with LocalCluster(replicas=0) as lc:
        lc.execute("primary", "CREATE TABLE t (id int PRIMARY KEY, v text)")
        lc.execute("primary", f"INSERT INTO t SELECT g, 'x' FROM generate_series(1, {ROWS}) g")
        ops = lookup_sides(lc.primary_dsn)
        keys = [i % ROWS + 1 for i in range(args.ops)]
        per_op: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(args.rounds):  # interleaved: each side once per round
            for name, (pid, run) in ops.items():
                before = backend_cpu_ns(pid)
                for key in keys:
                    run(key)
                per_op[name].append((backend_cpu_ns(pid) - before) / args.ops / 1e3)
        version = lc.server_version
    print(f"server CPU per point lookup (its backend), PostgreSQL {version}, "
          f"median of {args.rounds} rounds x {args.ops}")  # fmt: skip
    base = statistics.median(per_op["prepared"])
    for name, values in per_op.items():
        median = statistics.median(values)
        print(f"  {name:<32} {median:6.1f} us   x{median / base:.2f}")


if __name__ == "__main__":
    main()
