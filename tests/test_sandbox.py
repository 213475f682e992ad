"""LocalCluster against real PostgreSQL servers (no mocks)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psycopg
import pytest

from helpers import wait_until
from replica_router.errors import ConfigurationError, SandboxError
from replica_router.sandbox import LocalCluster, _binaries, _cluster, _template
from replica_router.sandbox._binaries import find_binaries
from replica_router.sandbox._processes import pid_alive, postmaster_pid
from replica_router.sandbox._state import STATE_FILE, reap_orphans, temp_root

MakeCluster = Callable[..., LocalCluster]


def _server_pids(lc: LocalCluster) -> dict[str, int]:
    pids = {name: postmaster_pid(lc.directory / name) for name in lc.node_names}
    assert all(pids.values()), pids
    return {name: pid for name, pid in pids.items() if pid is not None}


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """Like ``tmp_path``, but the OS user running the servers may enter it (root runs)."""
    path = Path(tempfile.mkdtemp(prefix="rr-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def table(replica_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh table on the shared cluster, replicated everywhere, dropped afterwards."""
    lc = replica_cluster
    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "")[:40]
    lc.execute(lc.primary_name, f"CREATE TABLE {name} (v int)")
    lc.wait_replicated()
    yield name
    for replica in lc.replica_names:  # leave the shared cluster as we found it
        lc.resume_replay(replica)
        lc.set_apply_delay(replica, 0)
    lc.execute(lc.primary_name, f"DROP TABLE {name}")


# -- shape and lifecycle ----------------------------------------------------------


def test_shape_names_and_dsns(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    assert lc.node_names == ["primary", "replica1", "replica2"]
    assert lc.primary_name == "primary"
    assert lc.replica_names == ["replica1", "replica2"]
    assert lc.primary_dsn == lc.dsn("primary")
    assert lc.replica_dsns == [lc.dsn("replica1"), lc.dsn("replica2")]
    ports = {lc.port(n) for n in lc.node_names}
    assert len(ports) == 3
    for name in lc.node_names:
        assert lc.dsn(name) == f"postgresql://postgres@127.0.0.1:{lc.port(name)}/postgres"
        assert lc.execute(name, "SELECT inet_server_port()") == [(lc.port(name),)]
    assert lc.execute("primary", "SELECT pg_is_in_recovery()") == [(False,)]
    assert isinstance(lc.system_identifier, int)
    for name in lc.replica_names:
        assert lc.execute(name, "SELECT pg_is_in_recovery()") == [(True,)]
        assert lc.execute(name, "SELECT system_identifier FROM pg_control_system()") == [
            (lc.system_identifier,)
        ]
    assert "replica1" in repr(lc)


def test_every_replica_streams_with_its_name(replica_cluster: LocalCluster) -> None:
    rows = replica_cluster.execute(
        "primary", "SELECT application_name, state FROM pg_stat_replication ORDER BY 1"
    )
    assert rows == [("replica1", "streaming"), ("replica2", "streaming")]
    for name in replica_cluster.replica_names:
        settings = dict(
            replica_cluster.execute(
                name,
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('recovery_target_timeline', 'hot_standby_feedback', 'wal_log_hints')",
            )
        )
        assert settings == {
            "recovery_target_timeline": "latest",
            "hot_standby_feedback": "on",
            "wal_log_hints": "on",
        }


def test_execute_returns_rows_or_nothing(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    assert lc.execute("primary", "SELECT %s::int + 1, 'x'", (41,)) == [(42, "x")]
    assert lc.execute("primary", "SET application_name = 'x'") == []
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        lc.execute("replica1", "CREATE TABLE nope (v int)")


def test_write_on_primary_reaches_every_replica(replica_cluster: LocalCluster, table: str) -> None:
    lc = replica_cluster
    lc.execute("primary", f"INSERT INTO {table} VALUES (1), (2)")
    lsn = lc.wait_replicated()
    assert "/" in lsn
    for name in lc.replica_names:
        assert lc.execute(name, f"SELECT sum(v) FROM {table}") == [(3,)]


def test_pause_and_resume_replay_change_what_a_replica_returns(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    lc.pause_replay("replica1")
    lc.execute("primary", f"INSERT INTO {table} VALUES (7)")
    lc.wait_replicated()  # waits for replica2 only: replica1 is paused
    assert lc.execute("replica2", f"SELECT v FROM {table}") == [(7,)]
    assert lc.execute("replica1", f"SELECT v FROM {table}") == []
    assert lc.execute("replica1", "SELECT pg_get_wal_replay_pause_state()") == [("paused",)]
    lc.resume_replay("replica1")
    lc.wait_replicated()
    assert lc.execute("replica1", f"SELECT v FROM {table}") == [(7,)]


def test_apply_delay_holds_back_commits_until_lifted(
    replica_cluster: LocalCluster, table: str
) -> None:
    lc = replica_cluster
    lc.set_apply_delay("replica2", 30.0)
    assert lc.execute("replica2", "SHOW recovery_min_apply_delay") == [("30s",)]
    lc.execute("primary", f"INSERT INTO {table} VALUES (9)")
    lc.pause_replay("replica2")  # so wait_replicated skips it
    lc.wait_replicated()
    lc.resume_replay("replica2")
    assert lc.execute("replica1", f"SELECT v FROM {table}") == [(9,)]
    assert lc.execute("replica2", f"SELECT v FROM {table}") == []  # received, not applied
    lc.set_apply_delay("replica2", 0)
    assert lc.execute("replica2", "SHOW recovery_min_apply_delay") == [("0",)]
    lc.wait_replicated()
    assert lc.execute("replica2", f"SELECT v FROM {table}") == [(9,)]


def test_operations_reject_bad_names_and_roles(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    with pytest.raises(ConfigurationError, match=r"unknown node 'replica9'.*primary, replica1"):
        lc.pause_replay("replica9")
    with pytest.raises(SandboxError, match="primary is not a replica"):
        lc.pause_replay("primary")
    with pytest.raises(SandboxError, match="not a replica"):
        lc.promote("primary")
    with pytest.raises(ConfigurationError, match="mode"):
        lc.stop("replica1", mode="gently")
    with pytest.raises(ConfigurationError, match="seconds"):
        lc.set_apply_delay("replica1", -1)
    assert lc.is_running("replica1")


def test_context_manager_removes_processes_and_directory() -> None:
    with LocalCluster(replicas=1) as lc:
        directory = lc.directory
        pids = _server_pids(lc)
        assert directory.is_dir()
        assert all(pid_alive(p) for p in pids.values())
    assert not directory.exists()
    assert not any(pid_alive(p) for p in pids.values())
    with pytest.raises(SandboxError, match="not open"):
        _ = lc.primary_dsn
    lc.close()  # idempotent


def test_cleanup_also_on_exception_and_ctrl_c() -> None:
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), LocalCluster(replicas=0) as lc:
            directory, pids = lc.directory, _server_pids(lc)
            raise exc
        assert not directory.exists()
        assert not any(pid_alive(p) for p in pids.values())


def test_ctrl_c_during_startup_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, reachable_tmp: Path
) -> None:
    seen: list[Path] = []

    def interrupted(self: LocalCluster, upstream: str, names: list[str], deadline: float) -> None:
        seen.append(self.directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalCluster, "_wait_streaming", interrupted)
    lc = LocalCluster(replicas=1, base_dir=reachable_tmp / "sb")
    with pytest.raises(KeyboardInterrupt):
        lc.open()
    assert seen == [reachable_tmp / "sb"]
    assert not (reachable_tmp / "sb").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(reachable_tmp / "sb") not in ps.stdout


def test_base_dir_is_used_and_removed(reachable_tmp: Path) -> None:
    target = reachable_tmp / "nested" / "sandbox"
    with LocalCluster(replicas=0, base_dir=target) as lc:
        assert lc.directory == target
        assert (target / "primary" / "PG_VERSION").exists()
        assert (target / "sandbox.json").exists()
    assert not target.exists()
    assert (reachable_tmp / "nested").is_dir()  # only what the sandbox made is removed

    existing = reachable_tmp / "empty"
    existing.mkdir()
    with LocalCluster(replicas=0, base_dir=existing):
        pass
    assert existing.is_dir()
    assert list(existing.iterdir()) == []

    (existing / "keep.txt").write_text("mine")
    with pytest.raises(SandboxError, match="not empty"):
        LocalCluster(replicas=0, base_dir=existing).open()
    assert (existing / "keep.txt").read_text() == "mine"


def test_startup_failure_reports_the_server_log(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = LocalCluster._settings

    def broken(self: LocalCluster, node: _cluster.NodeRecord) -> dict[str, str]:
        return {**settings(self, node), "shared_buffers": "plenty"}

    monkeypatch.setattr(LocalCluster, "_settings", broken)
    with pytest.raises(SandboxError, match=r"(?s)primary failed to start.*shared_buffers"):
        LocalCluster(replicas=0).open()


@pytest.mark.destructive
def test_password_uses_scram_and_is_in_the_dsn_only() -> None:
    password = "s3cr:t/p@ss'word"
    quoted = "s3cr%3At%2Fp%40ss%27word"
    with LocalCluster(replicas=2, password=password) as lc:
        dsn = lc.dsn("replica1")
        assert dsn.startswith(f"postgresql://postgres:{quoted}@127.0.0.1:")
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        no_password = dsn.replace(f"postgres:{quoted}@", "postgres@")
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(no_password, connect_timeout=5).close()
        hba = lc.execute("primary", "SELECT DISTINCT auth_method FROM pg_hba_file_rules")
        assert ("scram-sha-256",) in hba
        lc.promote("replica1")  # re-points replica2: its new primary_conninfo gets logged
        lc.execute("replica1", "CREATE TABLE pw (v int)")
        lc.wait_replicated()
        assert password not in repr(lc)
        assert "s3cr" not in repr(lc)
        assert "s3cr" not in str(lc.execute("replica2", "SHOW primary_conninfo"))
        holders = {
            str(path.relative_to(lc.directory))
            for path in lc.directory.rglob("*")
            if path.is_file() and b"s3cr" in path.read_bytes()
        }
        # only the state file and the passfile (both 0600) hold it; no log, no config
        assert holders <= {"sandbox.json", ".pgpass", "primary/global/pg_authid"}, holders
        assert {"sandbox.json", ".pgpass"} <= holders
        assert lc.log_path("replica2").read_text().count("primary_conninfo") >= 1


# -- stop, start, promote (destructive: each gets its own cluster) ----------------


@pytest.mark.destructive
def test_stop_and_start_nodes(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    lc.stop("replica2")
    assert not lc.is_running("replica2")
    with pytest.raises(psycopg.OperationalError):
        lc.execute("replica2", "SELECT 1")
    lc.stop("replica2")  # already stopped: nothing happens
    lc.execute("primary", "CREATE TABLE while_down (v int)")
    lc.execute("primary", "INSERT INTO while_down VALUES (1)")
    lc.start("replica2")  # returns once streaming again
    assert ("replica2", "streaming") in lc.execute(
        "primary", "SELECT application_name, state FROM pg_stat_replication"
    )
    lc.wait_replicated()
    assert lc.execute("replica2", "SELECT v FROM while_down") == [(1,)]

    lc.stop("primary", mode="immediate")
    assert not lc.is_running("primary")
    assert lc.execute("replica1", "SELECT v FROM while_down") == [(1,)]  # reads go on
    lc.start("primary")  # crash recovery, then both replicas stream again
    lc.execute("primary", "INSERT INTO while_down VALUES (2)")
    lc.wait_replicated()
    for name in lc.replica_names:
        assert lc.execute(name, "SELECT sum(v) FROM while_down") == [(3,)]


@pytest.mark.destructive
def test_promote_repoints_the_other_replica(fresh_replica_cluster: LocalCluster) -> None:
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE before_failover (v int)")
    lc.execute("primary", "INSERT INTO before_failover VALUES (1)")
    lc.wait_replicated()
    lc.stop("primary", mode="immediate")
    lc.promote("replica1")
    assert lc.primary_name == "replica1"
    assert lc.primary_dsn == lc.dsn("replica1")
    assert lc.dsn("primary").endswith(f":{lc.port('primary')}/postgres")  # stays the node's own
    assert lc.replica_names == ["replica2"]
    assert lc.execute("replica1", "SELECT pg_is_in_recovery()") == [(False,)]
    assert lc.execute("replica1", "SELECT application_name, state FROM pg_stat_replication") == [
        ("replica2", "streaming")
    ]
    lc.execute("replica1", "INSERT INTO before_failover VALUES (42)")
    lc.wait_replicated()
    assert lc.execute("replica2", "SELECT sum(v) FROM before_failover") == [(43,)]
    timeline = lc.execute("replica2", "SELECT received_tli FROM pg_stat_wal_receiver")
    assert timeline == [(2,)]

    # The old primary comes back as a primary on the old timeline (split brain to fence).
    lc.start("primary")
    assert lc.execute("primary", "SELECT pg_is_in_recovery()") == [(False,)]
    assert lc.execute("primary", "SELECT sum(v) FROM before_failover") == [(1,)]


@pytest.mark.destructive
def test_promote_rewinds_a_replica_that_got_wal_the_new_primary_never_had(
    fresh_replica_cluster: LocalCluster,
) -> None:
    """Asynchronous replication: at the kill, replica2 had replayed old-primary WAL that
    replica1 never received. It says the new timeline forked off before its recovery
    point and cannot follow as it is; promote() rewinds it onto the new timeline."""
    lc = fresh_replica_cluster
    lc.execute("primary", "CREATE TABLE diverge (v int)")
    lc.wait_replicated()
    lc.stop("replica1", mode="fast")
    lc.execute("primary", "INSERT INTO diverge SELECT generate_series(1, 1000)")
    lc.wait_replicated()  # replica2 only: replica1 is stopped
    lc.stop("primary", mode="immediate")
    lc.start("replica1")  # without the thousand rows: nowhere to get them now
    lc.promote("replica1")
    assert lc.execute("replica1", "SELECT application_name, state FROM pg_stat_replication") == [
        ("replica2", "streaming")
    ]
    lc.execute("replica1", "INSERT INTO diverge VALUES (-1)")
    lc.wait_replicated()
    assert lc.execute("replica2", "SELECT count(*), sum(v) FROM diverge") == [(1, -1)]


@pytest.mark.destructive
def test_promote_while_old_primary_runs_and_a_replica_is_paused(
    fresh_replica_cluster: LocalCluster,
) -> None:
    lc = fresh_replica_cluster
    lc.pause_replay("replica2")
    lc.promote("replica1")  # does not wait for the paused replica
    lc.execute("replica1", "CREATE TABLE on_new_primary (v int)")
    lc.execute("replica1", "INSERT INTO on_new_primary VALUES (5)")
    lc.resume_replay("replica2")  # now it switches to the new timeline
    wait_until(
        lambda: bool(
            lc.execute("replica2", "SELECT count(*) FROM pg_class WHERE relname = 'on_new_primary'")
            == [(1,)]
        ),
        timeout=10.0,
    )
    lc.wait_replicated()
    assert lc.execute("replica2", "SELECT v FROM on_new_primary") == [(5,)]
    assert lc.is_running("primary")
    assert lc.execute("primary", "SELECT pg_is_in_recovery()") == [(False,)]


@pytest.mark.destructive
def test_sync_mode_commit_waits_for_the_standby(make_replica_cluster: MakeCluster) -> None:
    lc = make_replica_cluster(replicas=1, sync=True, synchronous_commit="remote_apply")
    assert lc.execute("primary", "SHOW synchronous_standby_names") == [
        ('ANY 1 ("primary", "replica1")',)
    ]
    assert lc.execute(
        "primary", "SELECT application_name, sync_state FROM pg_stat_replication"
    ) == [("replica1", "quorum")]
    assert lc.execute("primary", "SHOW synchronous_commit") == [("remote_apply",)]
    lc.execute("primary", "CREATE TABLE synced (v int)")
    lc.execute("primary", "INSERT INTO synced VALUES (1)")
    # remote_apply: visible on the standby the moment the commit returns
    assert lc.execute("replica1", "SELECT v FROM synced") == [(1,)]

    lc.stop("replica1")
    notices: list[str] = []
    with psycopg.connect(lc.primary_dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        backend = conn.info.backend_pid
        writer = threading.Thread(target=conn.execute, args=("INSERT INTO synced VALUES (2)",))
        writer.start()
        # The commit is written locally but waits for the (stopped) standby.
        wait_until(
            lambda: (
                lc.execute(
                    "primary", "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (backend,)
                )
                == [("SyncRep",)]
            ),
            timeout=10.0,
        )
        assert writer.is_alive()
        lc.execute("primary", "SELECT pg_cancel_backend(%s)", (backend,))
        writer.join(10)
        assert not writer.is_alive()
    assert any("canceling wait for synchronous replication" in n for n in notices), notices
    lc.start("replica1")
    notices.clear()
    lc.execute("primary", "INSERT INTO synced VALUES (3)")
    assert lc.execute("replica1", "SELECT sum(v) FROM synced") == [(6,)]


@pytest.mark.destructive
def test_sync_promotion_with_no_standby_left_does_not_hang(
    make_replica_cluster: MakeCluster,
) -> None:
    lc = make_replica_cluster(replicas=1, sync=True)
    lc.stop("primary", mode="immediate")
    lc.promote("replica1")
    assert lc.execute("replica1", "SHOW synchronous_standby_names") == [("",)]
    lc.execute("replica1", "CREATE TABLE no_hang (v int)")  # would wait forever otherwise


def test_async_cluster_has_no_synchronous_standby(replica_cluster: LocalCluster) -> None:
    rows = replica_cluster.execute("primary", "SELECT DISTINCT sync_state FROM pg_stat_replication")
    assert rows == [("async",)]


# -- bad inputs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replicas": -1}, "replicas: expected a whole number >= 0, got -1"),
        ({"replicas": "2"}, "replicas"),
        ({"replicas": True}, "replicas"),
        ({"replicas": 0, "sync": True}, "sync=True needs at least one replica"),
        ({"synchronous_commit": "always"}, "synchronous_commit: expected one of"),
        ({"password": ""}, "password"),
        ({"startup_timeout": 0}, "startup_timeout"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        LocalCluster(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigurationError)


def test_missing_binaries_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, reachable_tmp: Path
) -> None:
    monkeypatch.setattr(_binaries, "wheel_bindir", lambda: None)
    empty = reachable_tmp / "bin"
    empty.mkdir()
    monkeypatch.setenv("PG_BINDIR", str(empty))
    monkeypatch.setenv("PATH", str(empty))
    lc = LocalCluster(replicas=0, base_dir=reachable_tmp / "sb")
    with pytest.raises(SandboxError, match=r"PG_BINDIR=.*apt-get install postgresql"):
        lc.open()
    assert not (reachable_tmp / "sb").exists()

    with pytest.raises(SandboxError, match=r"not found.*apt-get install postgresql.*brew install"):
        find_binaries(environ={"PATH": str(empty)}, globs=())
    with pytest.raises(SandboxError, match=r"bindir=.*does not contain.*apt-get install"):
        LocalCluster(replicas=0, bindir=empty).open()


def test_binaries_found_without_pg_bindir_or_path() -> None:
    found = find_binaries(environ={"PATH": ""})  # only the versioned directories remain
    assert (found.bindir / "initdb").exists()
    assert found.major >= 13
    via_env = find_binaries(environ={"PG_BINDIR": str(found.bindir), "PATH": ""})
    assert via_env.bindir == found.bindir and via_env.version == found.version
    assert via_env.origin.endswith("PG_BINDIR")


@pytest.mark.parametrize("victim", ["primary", "replica1"])
def test_busy_port_is_skipped(monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    """A port taken between picking it and the server binding it: another one is used."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        real_pick = _cluster._pick_port
        handed_out: list[int] = []
        victim_index = ["primary", "replica1"].index(victim)

        def pick(exclude: Iterable[int] = ()) -> int:
            port = busy if len(handed_out) == victim_index else real_pick(exclude)
            handed_out.append(port)
            return port

        monkeypatch.setattr(_cluster, "_pick_port", pick)
        with LocalCluster(replicas=1) as lc:
            assert handed_out[victim_index] == busy
            assert busy not in {lc.port(n) for n in lc.node_names}
            assert lc.execute("primary", "SELECT application_name FROM pg_stat_replication") == [
                ("replica1",)
            ]
            assert "could not bind" in lc.log_path(victim).read_text()
            lc.execute("primary", "CREATE TABLE moved (v int)")
            lc.wait_replicated()
            assert lc.execute("replica1", "SELECT count(*) FROM moved") == [(0,)]


# -- running as root ---------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path needs root")  # CI runs as root
def test_root_runs_servers_as_unprivileged_user(replica_cluster: LocalCluster) -> None:
    postgres_uid = pwd.getpwnam("postgres").pw_uid
    for name, pid in _server_pids(replica_cluster).items():
        assert os.stat(f"/proc/{pid}").st_uid == postgres_uid, name
    assert replica_cluster.directory.stat().st_uid == postgres_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path needs root")
def test_root_with_unknown_os_user_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, reachable_tmp: Path
) -> None:
    with pytest.raises(SandboxError, match=r"user 'no-such-user-xyz' does not exist.*os_user="):
        LocalCluster(replicas=0, os_user="no-such-user-xyz", base_dir=reachable_tmp / "a").open()
    monkeypatch.setenv("REPLICA_ROUTER_SANDBOX_USER", "no-such-user-xyz")
    with pytest.raises(SandboxError, match="no-such-user-xyz"):
        LocalCluster(replicas=0, base_dir=reachable_tmp / "b").open()
    with pytest.raises(SandboxError, match="refuses to run as root"):
        LocalCluster(replicas=0, os_user="root", base_dir=reachable_tmp / "c").open()
    assert not any((reachable_tmp / d).exists() for d in "abc")


def _python_for(user: str) -> tuple[str, dict[str, str]]:
    """An interpreter ``user`` may run, and the environment that finds our packages."""
    import sysconfig

    import replica_router

    path = os.pathsep.join(
        [str(Path(replica_router.__file__).parents[1]), sysconfig.get_paths()["purelib"]]
    )
    env = {**os.environ, "HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONPATH": path}
    for python in (sys.executable, "/usr/bin/python3"):
        probe = ["runuser", "-u", user, "--", python, "-c", "import psycopg"]
        if subprocess.run(probe, env=env, cwd="/tmp", capture_output=True, check=False).returncode:
            continue
        return python, env
    raise AssertionError(f"no Python interpreter that {user} may run")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="switches to the postgres user")
def test_non_root_user_needs_nothing_special() -> None:
    script = textwrap.dedent(
        """
        import os
        from replica_router.sandbox import LocalCluster
        with LocalCluster(replicas=1) as lc:
            print(os.geteuid(), lc.execute("replica1", "SELECT pg_is_in_recovery()")[0][0])
            directory = lc.directory
        print(directory.exists())
        """
    )
    python, env = _python_for("postgres")
    done = subprocess.run(
        ["runuser", "-u", "postgres", "--", python, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/tmp",
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(pwd.getpwnam("postgres").pw_uid), "True", "False"]


# -- orphans -----------------------------------------------------------------------


@pytest.mark.slow
def test_sandbox_of_a_killed_process_is_reaped_by_the_next_one(
    replica_cluster: LocalCluster,
) -> None:
    script = textwrap.dedent(
        """
        import time
        from replica_router.sandbox import LocalCluster
        lc = LocalCluster(replicas=1).open()
        print(lc.directory, flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert child.stdout is not None
        directory = Path(child.stdout.readline().strip())
        assert directory.parent == temp_root()
        pids = [postmaster_pid(directory / name) for name in ("primary", "replica1")]
        assert all(pids)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no chance to clean up
        child.wait()
    assert directory.exists()
    assert all(pid_alive(p) for p in pids if p)

    with LocalCluster(replicas=0):
        assert not directory.exists()
        assert not any(pid_alive(p) for p in pids if p)
    # a live owner's sandbox is never touched
    assert replica_cluster.directory.exists()
    assert replica_cluster.execute("primary", "SELECT 1") == [(1,)]


# -- the initdb template -----------------------------------------------------------


def test_crc32c_is_postgres_pg_crc32c() -> None:
    assert _template._crc32c_steps(b"123456789", 9)[9] == 0xE3069283  # the standard check value


def test_every_sandbox_has_its_own_system_identifier(
    replica_cluster: LocalCluster, make_replica_cluster: MakeCluster
) -> None:
    other = make_replica_cluster(replicas=1)
    assert other.system_identifier != replica_cluster.system_identifier
    major = other.server_version.split(".")[0]
    template = next(temp_root().glob(f"template-pg{major}-*/data"))
    controldata = subprocess.run(
        [str(other.bindir / "pg_controldata"), str(template)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"identifier:           {other.system_identifier}\n" not in controldata
    assert other.execute("replica1", "SELECT system_identifier FROM pg_control_system()") == [
        (other.system_identifier,)
    ]


def test_unusable_template_falls_back_to_initdb(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> Path:
        raise SandboxError("template broken")

    monkeypatch.setattr(_template, "template_dir", broken)
    with LocalCluster(replicas=1) as lc:
        lc.execute("primary", "CREATE TABLE fallback (v int)")
        lc.wait_replicated()
        assert lc.execute("replica1", "SELECT count(*) FROM fallback") == [(0,)]
    assert "running initdb" in caplog.text


# -- freeze / thaw: a hung node ---------------------------------------------------


def _process_states(pid: int) -> set[str]:
    """The /proc state letter of a postmaster and each of its children."""
    states = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(entry.name) == pid or fields[1] == str(pid):
            states.add(fields[0])
    return states


@pytest.mark.destructive
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_freeze_hangs_a_node_without_closing_its_sockets(
    make_replica_cluster: MakeCluster,
) -> None:
    lc = make_replica_cluster(replicas=1)
    lc.execute("primary", "CREATE TABLE frozen (v int)")
    with psycopg.connect(lc.dsn("replica1"), autocommit=True) as held:
        pid = _server_pids(lc)["replica1"]
        lc.freeze("replica1")
        assert _process_states(pid) == {"T"}  # the postmaster and every child stopped
        assert lc.is_running("replica1")
        # The kernel still accepts the TCP handshake: no RST, no FIN, just silence.
        with socket.create_connection(("127.0.0.1", lc.port("replica1")), timeout=2):
            pass
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(lc.dsn("replica1"), connect_timeout=1)
        lc.execute("primary", "INSERT INTO frozen VALUES (1)")  # the primary goes on

        lc.thaw("replica1")
        assert "T" not in _process_states(pid)
        assert held.execute("SELECT 1").fetchone() == (1,)  # the held connection survived
        lc.wait_replicated()
        assert lc.execute("replica1", "SELECT v FROM frozen") == [(1,)]

    lc.freeze("primary")
    lc.stop("primary", mode="fast", timeout=10)  # a frozen node still stops
    assert not lc.is_running("primary")
    lc.freeze("replica1")  # and close() stops a frozen node too (the fixture closes it)
    with pytest.raises(SandboxError, match="not running"):
        lc.freeze("primary")


def test_a_state_file_of_another_release_is_passed_over_by_the_reaper(tmp_path: Path) -> None:
    """Orphan reaping scans every sandbox of this OS user; one written by a newer
    release (a field this one does not know) must not break every new sandbox."""
    other = tmp_path / "other-release"
    other.mkdir()
    state = {"format": 1, "owner_pid": 1, "owner_marker": "", "persistent": False,
             "created_dir": True, "nodes": [{"name": "primary", "port": 1, "standby": False,
                                             "field_of_a_newer_release": 1}]}  # fmt: skip
    (other / STATE_FILE).write_text(json.dumps(state))
    assert reap_orphans(tmp_path) == []
    assert other.exists()
