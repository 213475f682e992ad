"""``python -m examples.peewee_app``: serve the example, on a sandbox unless DATABASE_URL is set.

Without ``DATABASE_URL`` it starts a LocalCluster (a real primary and two streaming
replicas in a temp dir) whose replicas apply WAL ``--apply-delay`` seconds late, so
that a stale read would show. Ctrl-C stops the server and removes the sandbox.
"""

from __future__ import annotations

import argparse
import os

from examples.peewee_app.app import SCHEMA, create_app

from replica_router import Cluster
from replica_router.sandbox import LocalCluster


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.peewee_app", description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--apply-delay", type=float, default=1.0, help="replicas' lag, seconds")
    args = parser.parse_args()
    if os.environ.get("DATABASE_URL"):
        with Cluster.from_env() as cluster:
            create_app(cluster).run(port=args.port, threaded=True)
        return 0
    with LocalCluster(replicas=2) as lc:
        lc.execute(lc.primary_name, SCHEMA)
        lc.wait_replicated()
        for name in lc.replica_names:
            lc.set_apply_delay(name, args.apply_delay)
        with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:
            print(f"replicas {args.apply_delay:g} s behind; try:")
            print(
                f'  curl -c jar -b jar -d \'{{"name":"Ada","email":"a@x"}}\' '
                f"localhost:{args.port}/users && curl -b jar localhost:{args.port}/users/1"
            )
            create_app(cluster).run(port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
