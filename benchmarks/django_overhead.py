"""What the Django router and middleware add to a view that reads ten rows.

The example app (examples/django_app), its ``index`` view (the ten latest posts
through the ORM) requested through ``django.test.Client``, on a LocalCluster
(primary + 2 replicas), persistent connections, in the same run and interleaved
rounds (A B C C B A) so that drift on a busy machine hits every side:

* ``plain``: no ``DATABASE_ROUTERS``, no ``ConsistencyMiddleware``: every query on
  ``default``, the one alias in use (Django as it is without us).
* ``routed``: ``ReplicaRouter`` + ``ConsistencyMiddleware``: the read goes to a
  replica the cluster picks (lag bound, token; kept for the request).
* ``static``: a one-line router sending reads to ``replica1`` (seed 004's, minus the
  random choice), no middleware: the same kind of server as ``routed`` reads from,
  so this ratio is the router's own work, not the difference between two servers.
* ``static+mw``: ``static`` with ``ConsistencyMiddleware`` (the middleware's half);
* ``router``: ``ReplicaRouter`` without the middleware (the router's half);
* ``alternate`` (two replicas): a one-line router alternating over the two replicas,
  no middleware: what reading from either replica by turns costs by itself.

The method is vs_proxies.py's (its helpers, not a copy): this process (client,
Django, the router's monitor) pinned to CPU 0, the servers' postmasters and their
backends to CPU 1; rounds interleaved; each figure is the median of the per-round
ratios with its interquartile range, for wall time and for this thread's CPU time
(``thread_time``: the client's own work, which the machine's load moves less).

Last, the integration's own client work per request with the server taken out
(``own_work``, best of 9: the middleware, ``db_for_read``, the execute wrapper),
which a busy machine moves far less than the per-round ratios.

``--replicas 1`` runs the same with one replica: with two, ``routed`` reads from
either replica from one request to the next, while ``static`` always reads from
``replica1`` (warmer caches, one backend).

    .venv/bin/python benchmarks/django_overhead.py [--rounds 30] [--ops 100] [--replicas 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "django_app"))

from vs_proxies import pin_client, pin_servers, ratio

from replica_router.sandbox import LocalCluster

OURS = "replica_router.integrations.django.ConsistencyMiddleware"


class StaticRouter:
    """Seed 004's router without the random choice: reads on one replica."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica1"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


class AlternatingRouter(StaticRouter):
    """Seed 004's router with a turn instead of the random choice: reads alternate
    over two replicas, as the cluster's round robin does."""

    turn = itertools.cycle(("replica1", "replica2"))

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return next(self.turn)


def own_work(model: Any) -> dict[str, float]:
    """Best-of-9 client seconds of the integration's own parts of one request, the
    server taken out (statements are not run): the middleware around a view that
    does nothing, Django's ``router.db_for_read`` in that request's state, and the
    execute wrapper around a statement on a replica alias (the ``plain`` side has
    that wrapper too, on ``default``). Interleaved, so a busy moment hits each."""
    from django.db import connections, router
    from django.http import HttpResponse
    from django.test import RequestFactory

    from replica_router.integrations import django as ours

    request, response = RequestFactory().get("/"), HttpResponse()

    def view(request: Any) -> HttpResponse:
        return response

    def read(request: Any) -> HttpResponse:
        router.db_for_read(model)
        return response

    middleware, reading = ours.ConsistencyMiddleware(view), ours.ConsistencyMiddleware(read)
    conn = connections["replica1"]
    conn.ensure_connection()
    guard, context = ours._Guard("replica1"), {"connection": conn, "cursor": None}
    sql = str(model.objects.order_by("-id")[:10].query)

    def execute(sql: Any, params: Any, many: bool, context: Any) -> None:
        return None

    parts: dict[str, Any] = {
        "view alone": lambda: view(request),
        "middleware": lambda: middleware(request),
        "+ db_for_read": lambda: reading(request),
        "wrapper": lambda: guard(execute, sql, (), False, context),
    }
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(9):
        for name, call in parts.items():
            best[name] = min(best[name], timeit.timeit(call, number=2000) / 2000)
    return {
        "middleware": best["middleware"] - best["view alone"],
        "db_for_read": best["+ db_for_read"] - best["middleware"],
        "execute wrapper": best["wrapper"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--replicas", type=int, choices=(1, 2), default=2)
    args = parser.parse_args()

    pinned = pin_client()
    with LocalCluster(replicas=args.replicas) as lc:
        os.environ["DATABASE_URL"] = lc.primary_dsn
        os.environ["DATABASE_REPLICA_URLS"] = ",".join(lc.replica_dsns)
        os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
        import django
        from django.conf import settings
        from django.core.management import call_command
        from django.db import connections
        from django.test import Client, override_settings

        from replica_router.integrations.django import get_cluster

        django.setup()
        call_command("migrate", verbosity=0)
        from blog.models import Post

        Post.objects.bulk_create(Post(title=f"post {i}") for i in range(20))
        lc.wait_replicated()
        cluster = get_cluster()
        while cluster.route_read() == "default":  # the monitor sees the replicas caught up
            time.sleep(0.05)

        plain_middleware = [m for m in settings.MIDDLEWARE if m != OURS]
        sides: dict[str, dict[str, Any]] = {
            "plain": {"DATABASE_ROUTERS": [], "MIDDLEWARE": plain_middleware},
            "routed": {},
            "static": {"DATABASE_ROUTERS": [f"{__name__}.StaticRouter"],
                       "MIDDLEWARE": plain_middleware},
            # The two halves of ``routed``, each on its own:
            "static+mw": {"DATABASE_ROUTERS": [f"{__name__}.StaticRouter"]},
            "router": {"MIDDLEWARE": plain_middleware},
        }  # fmt: skip
        if args.replicas == 2:
            sides["alternate"] = {"DATABASE_ROUTERS": [f"{__name__}.AlternatingRouter"],
                                  "MIDDLEWARE": plain_middleware}  # fmt: skip
        clients = {}
        for name, overrides in sides.items():
            with override_settings(**overrides):
                clients[name] = Client()
                for _ in range(50):  # warm: connections, caches, the middleware chain
                    assert clients[name].get("/").status_code == 200
        servers = pin_servers([lc.directory]) if pinned else 0

        def run(name: str) -> tuple[float, float]:
            client = clients[name]
            with override_settings(**sides[name]):
                wall, cpu = time.perf_counter(), time.thread_time()
                for _ in range(args.ops):
                    client.get("/")
                return ((time.perf_counter() - wall) / args.ops,
                        (time.thread_time() - cpu) / args.ops)  # fmt: skip

        order = list(sides)
        walls: dict[str, list[float]] = {name: [] for name in order}
        cpus: dict[str, list[float]] = {name: [] for name in order}
        for i in range(args.rounds):
            for name in order if i % 2 == 0 else reversed(order):
                wall, cpu = run(name)
                walls[name].append(wall)
                cpus[name].append(cpu)
        work = own_work(Post)
        connections.close_all()
        cluster.close()

    print(f"Django view reading 10 rows via the ORM, {args.replicas} replica(s), "
          f"{args.rounds} rounds x {args.ops} requests; "
          + (f"client on CPU 0, {servers} server processes on CPU 1"
             if pinned else "not pinned"))  # fmt: skip
    print("median of per-round ratios [IQR]")
    print(f"{'side':<9} {'wall/request':>13} {'wall vs plain':>22} {'wall vs static':>22}"
          f" {'client CPU':>11} {'CPU vs plain':>22}")  # fmt: skip

    def cell(side: list[float], base: list[float]) -> str:
        median, q1, q3 = ratio(side, base)
        return f"{median:.3f}x [{q1:.3f}-{q3:.3f}]"

    for name in order:
        print(f"{name:<9} {statistics.median(walls[name]) * 1e6:>10.1f} us "
              f"{cell(walls[name], walls['plain']):>22} {cell(walls[name], walls['static']):>22} "
              f"{statistics.median(cpus[name]) * 1e6:>8.1f} us "
              f"{cell(cpus[name], cpus['plain']):>22}")  # fmt: skip
    print(
        "the integration's own client work per request, server taken out (best of 9): "
        + ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in work.items())
    )


if __name__ == "__main__":
    main()
