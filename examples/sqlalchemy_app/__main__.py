"""``python -m examples.sqlalchemy_app``: serve the example; a sandbox unless DATABASE_URL is set.

Without ``DATABASE_URL`` it starts a LocalCluster (a real primary and two
streaming replicas in a temp dir), makes the replicas apply WAL ``--apply-delay``
seconds late so that stale reads would be visible, and serves the app with
``--workers`` processes that share nothing but the client's cookie. Ctrl-C
stops the server and removes the sandbox.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from replica_router.sandbox import LocalCluster

APP = "examples.sqlalchemy_app.app:app_from_env"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.sqlalchemy_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--apply-delay", type=float, default=1.0, help="sandbox replicas' lag, seconds"
    )
    args = parser.parse_args()
    if os.environ.get("DATABASE_URL"):
        uvicorn.run(APP, factory=True, host=args.host, port=args.port, workers=args.workers)
        return 0
    with LocalCluster(replicas=2) as lc:
        for name in lc.replica_names:
            lc.set_apply_delay(name, args.apply_delay)
        os.environ["DATABASE_URL"] = lc.primary_dsn
        os.environ["DATABASE_REPLICA_URLS"] = ",".join(lc.replica_dsns)
        print(f"sandbox: primary {lc.primary_dsn}", file=sys.stderr)
        uvicorn.run(APP, factory=True, host=args.host, port=args.port, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
