"""Post, get redirected, see the post: on a real primary and two replicas.

    python examples/django_app/demo.py

Starts a sandbox (LocalCluster), migrates, then with replay paused on both
replicas posts through ``django.test.Client`` and follows the redirect: the
post shows, served by the primary (no replica has it yet). With replay resumed,
the same page is served by a replica.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replica_router.sandbox import LocalCluster


def served_by(html: str) -> str:
    match = re.search(r"served by (\w+)", html)
    assert match, html
    return match.group(1)


def main() -> None:
    with LocalCluster(replicas=2) as lc:
        os.environ["DATABASE_URL"] = lc.primary_dsn
        os.environ["DATABASE_REPLICA_URLS"] = ",".join(lc.replica_dsns)
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
        import django
        from django.core.management import call_command
        from django.db import connections
        from django.test import Client

        from replica_router.integrations.django import get_cluster

        django.setup()
        call_command("migrate", verbosity=0)
        lc.wait_replicated()
        client = Client()
        for name in lc.replica_names:
            lc.pause_replay(name)
        response = client.post("/posts", {"title": "Hello, replicas"}, follow=True)
        html = response.content.decode()
        print(f"replicas paused : {'Hello, replicas' in html=}, served by {served_by(html)}")
        for name in lc.replica_names:
            lc.resume_replay(name)
        lc.wait_replicated()
        cluster = get_cluster()
        with cluster.session(token=client.cookies["rr_token"].value):
            deadline = time.monotonic() + 10
            while cluster.route_read() == "default" and time.monotonic() < deadline:
                time.sleep(0.05)  # the monitor's next probe sees the replay
        html = client.get(response.redirect_chain[-1][0]).content.decode()
        print(f"replicas resumed: {'Hello, replicas' in html=}, served by {served_by(html)}")
        connections.close_all()
        cluster.close()  # before the servers stop (else it closes at exit)


if __name__ == "__main__":
    main()
