"""Failures never crash, hang or mislead the application (issue 11, design rules 7, 9, 10):
a restarted primary, a forked process, a hung (SIGSTOPped) node."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from helpers import FAST, HUNG_BOUND, awithin, port_of, run, wait_until, within
from replica_router import AsyncCluster, Cluster, ConfigurationError, Error
from replica_router._cluster_base import died_while_pooled
from replica_router.sandbox import LocalCluster
from replica_router.sources import AsyncPooledConnection, PooledConnection, server_hung_up

# -- defect 12: a restarted primary -----------------------------------------------------------


@pytest.mark.destructive
def test_writes_after_a_primary_restart_succeed_and_keep_the_primary_in_routing(
    fresh_replica_cluster: LocalCluster,
) -> None:
    """Defect 12: a statement that failed before it reached the server (a pooled
    connection the restart killed) is retried on a fresh connection; the healthy
    primary is not taken out of routing for it."""
    lc = fresh_replica_cluster
    pools = {"primary": {"min_size": 3, "max_size": 3}}
    with Cluster(lc.primary_dsn, lc.replica_dsns, pool_kwargs=pools, **FAST) as cluster:  # type: ignore[arg-type]
        with cluster.write() as conn:
            conn.execute("CREATE TABLE guar_restart (id int)")
        wait_until(lambda: len(set(backend_pids(cluster, 3))) == 3, what="three pooled writers")
        lc.stop("primary", mode="fast")
        lc.start("primary")
        wait_until(
            lambda: (
                cluster.topology.by_name["primary"].consecutive_successes > 0
                and cluster.topology.primary == "primary"
            ),
            what="the monitor to see the primary back",
        )
        for i in range(4):
            with cluster.write() as conn:
                conn.execute("INSERT INTO guar_restart VALUES (%s)", (i,))
        assert cluster.topology.primary == "primary"
        assert lc.execute("primary", "SELECT count(*) FROM guar_restart") == [(4,)]


@pytest.mark.destructive
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_routed_connections_held_links_outlive_a_restart_of_their_nodes(
    fresh_replica_cluster: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 9 for held links: a routed connection whose primary and read replica were
    restarted while it sat idle writes and reads on. The write never reaches the ended
    session (its socket already says the server left, so a fresh connection takes it),
    the read runs again elsewhere, and neither node is suspected for it: only a fresh
    connection failing counts against a node."""
    from replica_router.integrations import psycopg2 as routed2

    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE held_restart (id int)")
    settings: dict[str, Any] = {"max_lag": None, "read_your_writes": None, **FAST}
    with Cluster(lc.primary_dsn, lc.replica_dsns, **settings) as cluster:
        conn: Any = (
            cluster.connection()
            if driver == "psycopg"
            else routed2.connect(cluster, autocommit=True)
        )
        try:
            cursor = conn.cursor()
            cursor.execute("INSERT INTO held_restart VALUES (1)")
            cursor.execute("SELECT 1")
            held = conn.nodes
            assert set(held) == {"read", "write"}, held
            for node in (held["write"], held["read"]):
                lc.stop(node, mode="fast")
                lc.start(node)

            def back() -> bool:
                topology = cluster.topology
                return topology.primary == "primary" and all(
                    n.consecutive_successes > 0 for n in topology.nodes
                )

            wait_until(back, what="the monitor to see both nodes back")
            with caplog.at_level("WARNING", logger="replica_router.monitor"):
                cursor.execute("INSERT INTO held_restart VALUES (2)")
                cursor.execute("SELECT 1")
                assert cursor.fetchone() == (1,)
            assert "suspected" not in caplog.text, caplog.text
        finally:
            conn.close()
            if driver == "psycopg2":
                routed2.close_pools(cluster)
    assert lc.execute("primary", "SELECT array_agg(id ORDER BY id) FROM held_restart") == [
        ([1, 2],)
    ]


@pytest.mark.destructive
def test_an_async_routed_connections_held_primary_link_outlives_a_restart(
    fresh_replica_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for ``AsyncCluster.connection()``: the write after the restart goes on a
    fresh connection, and the primary is not suspected for the ended link."""
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE held_restart (id int)")

    async def main() -> None:
        settings: dict[str, Any] = {"max_lag": None, "read_your_writes": None, **FAST}
        cluster = AsyncCluster(lc.primary_dsn, lc.replica_dsns, **settings)
        async with cluster, cluster.connection() as conn:
            await conn.execute("INSERT INTO held_restart VALUES (1)")
            lc.stop("primary", mode="fast")
            lc.start("primary")
            wait_until(  # the monitor runs on a thread of its own
                lambda: (
                    cluster.topology.primary == "primary"
                    and cluster.topology.by_name["primary"].consecutive_successes > 0
                ),
                what="the monitor to see the primary back",
            )
            with caplog.at_level("WARNING", logger="replica_router.monitor"):
                await conn.execute("INSERT INTO held_restart VALUES (2)")
            assert "suspected" not in caplog.text, caplog.text

    run(main())
    assert lc.execute("primary", "SELECT array_agg(id ORDER BY id) FROM held_restart") == [
        ([1, 2],)
    ]


def test_reads_and_writes_after_their_pooled_backends_are_terminated(
    replica_cluster: LocalCluster,
) -> None:
    """Defect 12, rule 9: ``pg_terminate_backend`` of every pooled backend (sync and
    async) fails no read or write: each dead connection is replaced by a fresh one,
    and no node is suspected for it (a suspicion counts a failure against it)."""
    lc = replica_cluster
    nodes = {"primary": lc.primary_dsn, "replica1": lc.dsn("replica1")}
    kill = (
        "SELECT array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)) "
        "FROM pg_stat_activity WHERE application_name = 'guar_terminate'"
    )

    def terminate(node: str) -> None:
        """End every pooled backend on ``node`` and wait until they are gone: a backend
        sends its termination message before it leaves pg_stat_activity, so from then
        on the client can tell (a kill racing a checkout is a kill racing the query)."""
        [(pids,)] = lc.execute(node, kill)
        assert pids, "no pooled backend to terminate"
        listed = ",".join(map(str, pids))
        gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({listed})"
        wait_until(lambda: lc.execute(node, gone)[0][0] == 0, what=f"{node}'s backends gone")

    settings: dict[str, Any] = {
        "max_lag": None,
        # no token from the write blocks: a read may then wait for replica1 to be seen
        # replaying the write's position, and fall back to the primary meanwhile
        "read_your_writes": None,
        "connect_kwargs": {"application_name": "guar_terminate"},
    }
    with Cluster(nodes=nodes, **settings, **FAST) as cluster:  # type: ignore[arg-type]
        for _ in range(3):
            with cluster.write() as conn:
                conn.execute("SELECT 1")
            with cluster.read() as conn:
                assert port_of(conn) == lc.port("replica1")
            terminate("primary")
            terminate("replica1")
        with cluster.write() as conn:
            conn.execute("SELECT 1")
        with cluster.read() as conn:
            assert port_of(conn) == lc.port("replica1")
        assert all(n.consecutive_failures == 0 for n in cluster.topology.nodes)

    async def main() -> None:
        async with AsyncCluster(nodes=nodes, **settings, **FAST) as acluster:  # type: ignore[arg-type]
            async with acluster.read() as conn:
                await conn.execute("SELECT 1")
            terminate("replica1")
            async with acluster.read() as conn:
                cursor = await conn.execute("SELECT inet_server_port()")
                assert await cursor.fetchone() == (lc.port("replica1"),)
            assert acluster.topology.by_name["replica1"].consecutive_failures == 0

    run(main())


class _Lost:
    """A connection the checkout check found closed."""

    broken = True

    def __init__(self, connect_started: float | None, created_at: float) -> None:
        self.connect_started = connect_started
        self._created_at = created_at


def test_a_connection_begun_before_the_loss_is_not_fresh_whenever_the_pool_stamped_it() -> None:
    """Rule 9: an asyncio pool stamps a connection when its task next runs, after the
    handshake; a backend killed before then (the event loop was busy) looked fresh and
    its loss was counted against a healthy node (the terminated-backends test above
    failed so about 1 run in 3). What counts is when its connect began."""
    loss = 100.0
    assert died_while_pooled(_Lost(connect_started=99.9, created_at=100.2), loss)
    assert not died_while_pooled(_Lost(connect_started=100.1, created_at=100.2), loss)
    assert died_while_pooled(_Lost(connect_started=None, created_at=99.0), loss)  # another class
    assert not died_while_pooled(_Lost(connect_started=None, created_at=101.0), loss)


def test_pooled_connections_say_when_their_connect_began(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    before = time.monotonic()
    with PooledConnection.connect(lc.primary_dsn) as conn:
        assert conn.connect_started is not None
        assert before <= conn.connect_started <= time.monotonic()

    async def main() -> float | None:
        async with await AsyncPooledConnection.connect(lc.primary_dsn) as aconn:
            return aconn.connect_started

    began = run(main())
    assert began is not None and before <= began <= time.monotonic()


def test_an_idle_connection_the_server_ended_is_told_by_one_poll(
    replica_cluster: LocalCluster,
) -> None:
    """What the checkout and the held primary links ask before they use an idle
    connection: quiet while the backend lives; once it is terminated, its socket is
    readable; a closed connection counts as hung up too. The pools' connections keep
    the poll they were asked with (made once, not at every checkout)."""
    lc = replica_cluster
    conn = PooledConnection.connect(lc.primary_dsn, autocommit=True)
    try:
        assert not server_hung_up(conn)
        watch = conn.hangup_watch
        assert watch is not None and watch.fd == conn.pgconn.socket
        assert not server_hung_up(conn) and conn.hangup_watch is watch
        pid = conn.info.backend_pid
        lc.execute("primary", "SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: server_hung_up(conn), what="the terminated backend's socket readable")
    finally:
        conn.close()
    assert server_hung_up(conn)


def backend_pids(cluster: Cluster, n: int) -> list[int]:
    """Check out ``n`` write connections at once (so the pool holds that many)."""
    blocks = [cluster.write() for _ in range(n)]
    pids = []
    try:
        for block in blocks:
            pids.append(block.__enter__().info.backend_pid)
    finally:
        for block in blocks[: len(pids)]:
            block.__exit__(None, None, None)
    return pids


# -- defect 13: fork -----------------------------------------------------------------------


def in_child(action: Callable[[], dict[str, Any]], timeout: float = 20.0) -> dict[str, Any]:
    """Fork; run ``action`` in the child; its JSON result (or what went wrong)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        try:
            result = action()
        except BaseException as exc:
            result = {"error": type(exc).__name__, "is_router_error": isinstance(exc, Error),
                      "message": str(exc)}  # fmt: skip
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return {"error": "hang", "is_router_error": False, "message": "the child hung"}
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    return json.loads(data) if data else {"error": "crash", "is_router_error": False}


def test_a_forked_child_never_uses_the_parents_connections(replica_cluster: LocalCluster) -> None:
    """Defect 13: after ``os.fork()`` the child gets connections of its own and a
    running monitor, or one clear replica-router error that says what to do; the
    parent's pooled connections (the same server sessions) keep working either way."""
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:  # type: ignore[arg-type]
        with cluster.write() as conn:
            conn.execute("SELECT 1")
            parent_pids = {conn.info.backend_pid}
        with cluster.read() as conn:
            parent_pids.add(conn.info.backend_pid)

        def child() -> dict[str, Any]:
            with cluster.write() as conn:
                pid = conn.info.backend_pid
                conn.execute("PREPARE guar_fork AS SELECT 2")  # once per session
            with cluster.read() as conn:
                read_pid = conn.info.backend_pid
            monitor = cluster.monitor
            return {"pids": [pid, read_pid], "monitor": monitor is not None and monitor.running}

        result = in_child(child)
        if "error" in result:
            assert result["is_router_error"], result
            assert "fork" in result["message"], result
        else:
            assert not set(result["pids"]) & parent_pids, result
            assert result["monitor"], result
        with cluster.write() as conn:
            assert conn.execute("PREPARE guar_fork AS SELECT 1") is not None
            assert conn.execute("EXECUTE guar_fork").fetchone() == (1,)
        with cluster.read() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_an_async_cluster_forked_open_says_to_open_it_again(replica_cluster: LocalCluster) -> None:
    """Defect 13, ``AsyncCluster``: it cannot be opened outside its event loop, so in
    the child it is closed and says what to do."""
    lc = replica_cluster

    async def main() -> dict[str, Any]:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, **FAST) as cluster:  # type: ignore[arg-type]
            async with cluster.read() as conn:
                await conn.execute("SELECT 1")

            def child() -> dict[str, Any]:
                cluster.connection()  # raises at once: the cluster is not open
                return {}

            return in_child(child)

    result = run(main())
    assert result.get("is_router_error"), result
    assert "os.fork()" in result["message"] and "open it again" in result["message"], result


# -- design rule 10: a hung node -------------------------------------------------------------


@pytest.mark.destructive
def test_the_monitor_notices_a_hung_replica_and_its_return(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10: a SIGSTOPped replica (no FIN, no RST) is unhealthy within the
    bound with the default settings, and healthy again once it resumes."""
    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns) as cluster:
        monitor = cluster.monitor
        assert monitor is not None
        frozen("replica1")
        wait_until(
            lambda: not cluster.topology.by_name["replica1"].healthy,
            what="the monitor to see replica1 hung",  # about 2.5 s; no timed assertion
        )
        # The unanswered probe was abandoned, not waited for: the monitor keeps
        # trying to reconnect while the node is hung.
        connects = monitor.probe_stats()["replica1"].connect_attempts
        wait_until(
            lambda: monitor.probe_stats()["replica1"].connect_attempts > connects,
            what="the monitor to try replica1 again",
        )
        lc.thaw("replica1")
        wait_until(
            lambda: cluster.topology.by_name["replica1"].healthy,
            what="the monitor to see replica1 back",
        )


@pytest.mark.destructive
def test_new_reads_move_off_a_hung_replica(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10: with replica1 hung, every new read ends within the bound: served
    by replica2 or the primary, or, when it went to replica1 in the moment before the
    monitor noticed (a checkout costs no round trip, so only the query can find a
    stopped server out), failed with a connectivity error; none waits for replica1 to
    wake up. Once the monitor has noticed, every read is served elsewhere."""
    lc = fresh_replica_cluster
    elsewhere = (lc.port("replica2"), lc.port("primary"))
    with Cluster(lc.primary_dsn, lc.replica_dsns) as cluster:
        for _ in range(4):  # every replica's pool holds an idle connection
            with cluster.read() as conn:
                conn.execute("SELECT 1")
        frozen("replica1")
        for _ in range(4):
            done, port = within(HUNG_BOUND, lambda: read_port_now(cluster))
            assert done, "a read hung on the frozen replica"
            assert port in elsewhere or isinstance(port, psycopg.OperationalError), port
        wait_until(lambda: not cluster.topology.by_name["replica1"].healthy, what="noticed")
        for _ in range(4):
            done, port = within(HUNG_BOUND, lambda: read_port_now(cluster))
            assert done and port in elsewhere, port


def read_port_now(cluster: Cluster) -> int:
    with cluster.read() as conn:
        return port_of(conn)


@pytest.mark.destructive
def test_a_read_in_flight_on_a_hung_replica_fails_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10: a query already sent to a node that then hangs fails (a
    connectivity error the application can handle) instead of blocking forever."""
    lc = fresh_replica_cluster
    nodes = {"primary": lc.primary_dsn, "replica1": lc.dsn("replica1")}
    with Cluster(nodes=nodes, max_lag=None) as cluster, cluster.read() as conn:  # type: ignore[arg-type]
        assert port_of(conn) == lc.port("replica1")
        frozen("replica1")
        done, outcome = within(HUNG_BOUND + 1.0, lambda: conn.execute("SELECT 1").fetchone())
        assert done, "the query on the hung replica never returned"
        assert isinstance(outcome, psycopg.OperationalError), outcome


@pytest.mark.destructive
def test_a_write_on_a_hung_primary_fails_within_the_bound_and_says_the_outcome_is_unknown(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10 for writes: a ``write()`` block whose primary hangs (SIGSTOP) before
    its COMMIT is answered fails within the bound, saying that whether it committed is
    unknown (so nothing is sent again), instead of waiting for the server to wake up; a
    write begun while the primary is still hung fails within the bound too."""
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE hung_writes (id int)")
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:

        def write(hang_before_commit: bool) -> None:
            with cluster.write() as conn:
                conn.execute("INSERT INTO hung_writes VALUES (1)")
                if hang_before_commit:
                    frozen("primary")

        write(False)  # the write pool holds a connection: only the COMMIT meets the hang
        done, outcome = within(HUNG_BOUND + 1.0, lambda: write(True))
        assert done, "the COMMIT on the hung primary never returned"
        assert isinstance(outcome, psycopg.OperationalError), outcome
        assert "outcome unknown" in str(outcome)
        done, outcome = within(HUNG_BOUND + 1.0, lambda: write(False))
        assert done, "a write to the hung primary never returned"
        assert isinstance(outcome, psycopg.OperationalError), outcome


@pytest.mark.destructive
def test_an_async_write_on_a_hung_primary_fails_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10, asyncio: an ``AsyncCluster.write()`` block whose primary hangs
    before its COMMIT is answered fails within the bound instead of waiting."""
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE hung_writes (id int)")

    async def main() -> tuple[bool, Any]:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:

            async def write(hang_before_commit: bool) -> None:
                async with cluster.write() as conn:
                    await conn.execute("INSERT INTO hung_writes VALUES (1)")
                    if hang_before_commit:
                        frozen("primary")

            await write(False)
            return await awithin(HUNG_BOUND + 1.0, write(True))

    done, outcome = run(main())
    assert done, "the COMMIT on the hung primary never returned"
    assert isinstance(outcome, psycopg.OperationalError), outcome


@pytest.mark.destructive
def test_a_routed_connections_write_on_a_hung_primary_fails_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10: an autocommit write on a held ``cluster.connection()`` whose
    primary then hangs fails within the bound with a connectivity error, and the
    connection is still usable for reads, which the replicas serve."""
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE hung_writes (id int)")
    cluster = Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None)
    with cluster, cluster.connection() as conn:
        conn.execute("INSERT INTO hung_writes VALUES (1)")  # holds the primary link
        frozen("primary")
        done, outcome = within(
            HUNG_BOUND + 1.0, lambda: conn.execute("INSERT INTO hung_writes VALUES (2)")
        )
        assert done, "the write on the hung primary never returned"
        assert isinstance(outcome, psycopg.OperationalError), outcome
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.nodes.get("read") in ("replica1", "replica2"), conn.nodes


@pytest.mark.destructive
def test_an_async_read_in_flight_on_a_hung_replica_fails_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10, asyncio: the monitor abandons the hung node's connections that
    are out of their pools, whichever event loop waits on them."""
    lc = fresh_replica_cluster
    nodes = {"primary": lc.primary_dsn, "replica1": lc.dsn("replica1")}

    async def main() -> tuple[bool, Any]:
        cluster = AsyncCluster(nodes=nodes, max_lag=None)  # type: ignore[arg-type]
        async with cluster, cluster.read() as conn:
            cur = await conn.execute("SELECT inet_server_port()")
            assert await cur.fetchone() == (lc.port("replica1"),)
            frozen("replica1")
            return await awithin(HUNG_BOUND + 1.0, conn.execute("SELECT 1"))

    done, outcome = run(main())
    assert done, "the query on the hung replica never returned"
    assert isinstance(outcome, psycopg.OperationalError), outcome


@pytest.mark.destructive
def test_an_integrations_own_connections_in_flight_on_a_hung_replica_fail_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10 for connections the cluster did not make (an integration's own,
    ``cluster.using``): a psycopg 3 and a psycopg2 connection, and one given by its
    socket descriptor, each with a query in flight on a replica that hangs, fail
    within the bound; a new read then goes elsewhere."""
    import psycopg2

    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:
        dsn = cluster.conninfo("replica1")
        pg3 = psycopg.connect(dsn, autocommit=True)
        pg2 = psycopg2.connect(dsn)
        pg2.autocommit = True
        by_fd = psycopg.connect(dsn, autocommit=True)

        def query(conn: Any, registered: Any) -> Callable[[], Any]:
            def action() -> Any:
                with cluster.using("replica1", registered):
                    cur = conn.cursor()
                    cur.execute("SELECT inet_server_port()")
                    return cur.fetchone()

            return action

        assert query(pg3, pg3)() == (lc.port("replica1"),)
        frozen("replica1")
        outcomes: dict[str, Any] = {}
        threads = [
            threading.Thread(target=lambda n=name, a=action: outcomes.update({n: a()}))
            for name, action in (
                ("psycopg", lambda: within(HUNG_BOUND + 1.0, query(pg3, pg3))),
                ("psycopg2", lambda: within(HUNG_BOUND + 1.0, query(pg2, pg2))),
                ("fd", lambda: within(HUNG_BOUND + 1.0, query(by_fd, by_fd.fileno()))),
            )
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, (done, outcome) in outcomes.items():
            assert done, f"the {name} query on the hung replica never returned"
            expected = psycopg2.OperationalError if name == "psycopg2" else psycopg.OperationalError
            assert isinstance(outcome, expected), (name, outcome)
        assert cluster.route_read() != "replica1"
        for conn in (pg3, pg2, by_fd):
            conn.close()


@pytest.mark.destructive
def test_an_integrations_own_async_connection_in_flight_on_a_hung_replica_fails(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """``AsyncCluster.using``: a plain ``with`` around an awaited query."""
    lc = fresh_replica_cluster

    async def main() -> tuple[bool, Any]:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:
            conn = await psycopg.AsyncConnection.connect(
                cluster.conninfo("replica1"), autocommit=True
            )
            async with conn:
                frozen("replica1")
                with cluster.using("replica1", conn):
                    return await awithin(HUNG_BOUND + 1.0, conn.execute("SELECT 1"))

    done, outcome = run(main())
    assert done, "the query on the hung replica never returned"
    assert isinstance(outcome, psycopg.OperationalError), outcome


def test_using_names_a_node_of_the_cluster(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns) as cluster:
        with (
            pytest.raises(ConfigurationError, match="no node named 'replica9'"),
            cluster.using("replica9", 0),
        ):
            pass
        with cluster.using("replica1", 0), cluster.using("replica1", 0):
            pass  # nested: fine


def test_pooled_connections_drop_a_peer_that_stops_acknowledging(
    replica_cluster: LocalCluster,
) -> None:
    """Design rule 10, connection level: without a TCP user timeout and keepalives, a
    connection to a host that vanished (no FIN, no RST) waits for the kernel's
    retransmissions, about 15 minutes. Settings given by the user win."""
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, connect_kwargs={"keepalives_idle": 60}) as c:
        for block in (c.read, c.write):
            with block() as conn:
                params = conn.info.get_parameters()
                assert params.get("tcp_user_timeout") == "3000", params
                assert (params.get("keepalives"), params.get("keepalives_idle")) == ("1", "60")
