"""Read-your-writes across processes that share nothing but the token string.

Each test pauses replay on both replicas (resumed in ``finally``), so a read
honouring the token can only be answered by the primary, and the same read
without the token lands on a replica that lacks the write -- each test also
checks that, which proves it can fail. No timing luck: nothing is waited for
but a server to start.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from helpers import cluster_for, replay_paused
from replica_router import Cluster, Token
from replica_router.sandbox import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
TABLE = "rr_proc_counters"


@pytest.fixture(scope="module")
def lc(replica_cluster: LocalCluster) -> LocalCluster:
    replica_cluster.execute(
        "primary", f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigint PRIMARY KEY, value int)"
    )
    replica_cluster.execute(
        "primary",
        "CREATE TABLE IF NOT EXISTS profiles (user_id bigint PRIMARY KEY, name text NOT NULL,"
        " bio text NOT NULL DEFAULT '', updated_at timestamptz NOT NULL DEFAULT now())",
    )
    replica_cluster.wait_replicated()
    return replica_cluster


def _write_in_child(primary: str, replicas: list[str], row: int, out: mp.Queue[str]) -> None:
    with Cluster(primary=primary, replicas=replicas) as cluster:
        with cluster.write() as conn:
            conn.execute(f"UPDATE {TABLE} SET value = value + 1 WHERE id = %s", (row,))
        out.put(str(cluster.token))


def read_value(cluster: Cluster, row: int) -> tuple[int, int]:
    with cluster.read() as conn:
        found = conn.execute(
            f"SELECT value, inet_server_port() FROM {TABLE} WHERE id = %s", (row,)
        ).fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


def test_token_string_from_another_process(lc: LocalCluster) -> None:
    row = random.getrandbits(48)
    lc.execute("primary", f"INSERT INTO {TABLE} VALUES (%s, 0)", (row,))
    lc.wait_replicated()
    ctx = mp.get_context("spawn")
    tokens: mp.Queue[str] = ctx.Queue()
    with cluster_for(lc) as cluster, replay_paused(lc):
        writer = ctx.Process(
            target=_write_in_child, args=(lc.primary_dsn, lc.replica_dsns, row, tokens)
        )
        writer.start()
        text = tokens.get(timeout=60)
        writer.join(timeout=30)
        assert writer.exitcode == 0

        # Independent units of work: a nested session would hand its token back to
        # the test's scope, and the tokenless read below would then wait for it.
        with cluster.session(token=Token.parse(text), inherit=False):
            assert read_value(cluster, row) == (1, lc.port("primary"))
        with cluster.session(inherit=False):
            value, port = read_value(cluster, row)  # no token
        assert value == 0
        assert port != lc.port("primary")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(script: str, lc: LocalCluster) -> Iterator[str]:
    """Run ``script`` (serving on $PORT) in its own Python process; yield its base URL."""
    port = _free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "PRIMARY": lc.primary_dsn,
        "REPLICAS": ",".join(lc.replica_dsns),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.fail(f"server exited with {proc.returncode}:\n{proc.stderr.read().decode()}")
            try:
                httpx.get(f"{url}/ready", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail("server did not start within 60 s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# The example app (examples/fastapi_app) in its own uvicorn process. Lag bound
# off, so that the paused replicas stay eligible (see the module docstring).
ASGI_SERVER = """
    import os, uvicorn
    from examples.fastapi_app.app import create_app
    from replica_router import AsyncCluster

    cluster = AsyncCluster(primary=os.environ["PRIMARY"],
                           replicas=os.environ["REPLICAS"].split(","), max_lag=None)
    app = create_app(cluster, secure_cookie=False)
    app.get("/ready")(lambda: "ok")
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
"""

# A Flask app under the WSGI middleware, served by werkzeug in its own process.
WSGI_SERVER = f"""
    import os
    from flask import Flask
    from werkzeug.serving import make_server
    from replica_router import Cluster
    from replica_router.wsgi import ConsistencyMiddleware

    cluster = Cluster(primary=os.environ["PRIMARY"],
                      replicas=os.environ["REPLICAS"].split(","), max_lag=None)
    app = Flask("wsgi_server")

    @app.get("/ready")
    def ready():
        return "ok"

    @app.post("/counters/<int:row>")
    def bump(row):
        with cluster.write() as conn:
            conn.execute("UPDATE {TABLE} SET value = value + 1 WHERE id = %s", (row,))
        return "ok"

    @app.get("/counters/<int:row>")
    def show(row):
        with cluster.read() as conn:
            value, port = conn.execute(
                "SELECT value, inet_server_port() FROM {TABLE} WHERE id = %s", (row,)
            ).fetchone()
        return {{"value": value, "port": port}}

    app.wsgi_app = ConsistencyMiddleware(app.wsgi_app, cluster, secure=False)
    with cluster:
        make_server("127.0.0.1", int(os.environ["PORT"]), app).serve_forever()
"""


@pytest.mark.slow
def test_example_app_in_two_server_processes_shares_only_the_cookie(lc: LocalCluster) -> None:
    user = random.getrandbits(48)
    lc.execute("primary", "INSERT INTO profiles (user_id, name) VALUES (%s, 'before')", (user,))
    lc.wait_replicated()
    with server(ASGI_SERVER, lc) as a, server(ASGI_SERVER, lc) as b, replay_paused(lc):
        written = httpx.post(f"{a}/users/{user}/profile", json={"name": "after"})
        assert written.status_code == 200, written.text
        cookie = written.cookies["rr_token"]
        assert Token.parse(cookie).system_id == lc.system_identifier

        seen = httpx.get(f"{b}/users/{user}/profile", cookies={"rr_token": cookie}).json()
        assert (seen["name"], seen["served_by"]) == ("after", "primary")
        stale = httpx.get(f"{b}/users/{user}/profile").json()
        assert stale["name"] == "before"
        assert stale["served_by"].startswith("replica")


@pytest.mark.slow
def test_wsgi_app_in_two_server_processes_shares_only_the_cookie(lc: LocalCluster) -> None:
    row = random.getrandbits(48)
    lc.execute("primary", f"INSERT INTO {TABLE} VALUES (%s, 0)", (row,))
    lc.wait_replicated()
    with server(WSGI_SERVER, lc) as a, server(WSGI_SERVER, lc) as b, replay_paused(lc):
        written = httpx.post(f"{a}/counters/{row}")
        assert written.status_code == 200, written.text
        cookie = written.cookies["rr_token"]
        header = written.headers["X-Replica-Router-Token"]
        assert cookie == header

        by_cookie = httpx.get(f"{b}/counters/{row}", cookies={"rr_token": cookie}).json()
        assert by_cookie == {"value": 1, "port": lc.port("primary")}
        by_header = httpx.get(f"{b}/counters/{row}", headers={"X-Replica-Router-Token": header})
        assert by_header.json() == {"value": 1, "port": lc.port("primary")}
        stale = httpx.get(f"{b}/counters/{row}").json()
        assert stale["value"] == 0
        assert stale["port"] != lc.port("primary")
