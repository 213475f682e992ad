"""``replica-router sandbox ...`` end to end: real servers that outlive the command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from replica_router.cli import main
from replica_router.sandbox._processes import pid_alive, postmaster_pid

CLI = [sys.executable, "-c", "import sys; from replica_router.cli import main; sys.exit(main())"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["sandbox", *args])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    """A directory for ``sandbox up``; whatever runs there is taken down afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="rr-cli-test-"))
    parent.chmod(0o755)  # the server user must be able to enter it when we are root
    directory = parent / "sb"
    try:
        yield directory
    finally:
        main(["sandbox", "down", "--dir", str(directory)])
        shutil.rmtree(parent, ignore_errors=True)


def _node(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in report["nodes"] if n["name"] == name)


@pytest.mark.destructive
def test_up_operate_and_down_from_the_command_line(
    sandbox_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(sandbox_dir)
    up = run_json(capsys, "up", "--replicas", "2", "--dir", d)
    assert up["directory"] == d
    assert [n["name"] for n in up["nodes"]] == ["primary", "replica1", "replica2"]
    assert up["startup_seconds"] > 0
    assert all(n["running"] for n in up["nodes"])
    assert _node(up, "replica1")["streaming_from"] == "primary"
    pids = {n["name"]: postmaster_pid(sandbox_dir / n["name"]) for n in up["nodes"]}

    # The servers outlive `up`: another process sees and operates them.
    status = subprocess.run(
        [*CLI, "sandbox", "status", "--dir", d, "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(status.stdout)["primary_dsn"] == up["primary_dsn"]
    with psycopg.connect(up["primary_dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE cli_t (v int)")

    paused = run_json(capsys, "lag", "replica1", "--pause", "--dir", d)
    assert paused["message"] == "replay paused on replica1"
    assert _node(paused, "replica1")["replay_paused"] is True
    assert _node(paused, "replica2")["replay_paused"] is False
    with psycopg.connect(up["primary_dsn"], autocommit=True) as conn:
        conn.execute("INSERT INTO cli_t SELECT generate_series(1, 1000)")
        conn.execute("SELECT pg_switch_wal()")
    resumed = run_json(capsys, "lag", "replica1", "--resume", "--dir", d)
    assert _node(resumed, "replica1")["replay_paused"] is False

    delayed = run_json(capsys, "lag", "replica2", "--delay", "1.5", "--dir", d)
    assert _node(delayed, "replica2")["apply_delay"] == "1500ms"
    run_json(capsys, "lag", "replica2", "--delay", "0", "--dir", d)

    killed = run_json(capsys, "kill", "primary", "--dir", d)
    assert _node(killed, "primary")["running"] is False
    assert not pid_alive(pids["primary"] or 0)
    code, out, _ = run_cli(capsys, "kill", "primary", "--dir", d)
    assert (code, out.strip()) == (0, "primary was not running")

    promoted = run_json(capsys, "promote", "replica1", "--dir", d)
    assert promoted["primary"] == "replica1"
    assert _node(promoted, "replica1")["role"] == "primary"
    assert _node(promoted, "replica2")["streaming_from"] == "replica1"

    started = run_json(capsys, "start", "primary", "--dir", d)
    assert _node(started, "primary")["running"] is True
    assert _node(started, "primary")["role"] == "primary"  # old timeline: split brain
    rejoined = run_json(capsys, "rejoin", "primary", "--dir", d)
    assert rejoined["message"] == "primary rejoined as a replica of replica1"
    assert _node(rejoined, "primary")["role"] == "replica"
    assert _node(rejoined, "primary")["streaming_from"] == "replica1"
    assert rejoined["replica_dsns"][0] == _node(rejoined, "primary")["dsn"]

    code, out, _ = run_cli(capsys, "status", "--dir", d)
    assert code == 0
    assert "replica2" in out
    assert up["replica_dsns"][1] in out

    down = run_json(capsys, "down", "--dir", d)
    assert down["message"] == f"sandbox in {d} stopped and removed"
    assert not sandbox_dir.exists()
    assert not any(pid_alive(p) for p in pids.values() if p)


def test_human_output_of_up_lists_dsns_and_how_to_stop(
    sandbox_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "up", "--replicas", "1", "--sync", "--dir", str(sandbox_dir))
    assert code == 0, err
    report = run_json(capsys, "status", "--dir", str(sandbox_dir))
    version, bindir = report["postgresql"]["version"], report["postgresql"]["bindir"]
    assert f"running PostgreSQL {version} (" in out and bindir in out
    assert (Path(bindir) / "postgres").exists()
    assert "export DATABASE_URL='postgresql://postgres@127.0.0.1:" in out
    assert "export DATABASE_REPLICA_URLS='postgresql://postgres@127.0.0.1:" in out
    assert f"replica-router sandbox down --dir {sandbox_dir}" in out
    primary = report["primary_dsn"]
    with psycopg.connect(primary) as conn:
        assert conn.execute("SHOW synchronous_standby_names").fetchone() == (
            'ANY 1 ("primary", "replica1")',
        )

    code, _, err = run_cli(capsys, "up", "--dir", str(sandbox_dir))
    assert code == 1
    assert "already holds a running sandbox" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "--replicas", "-1"], "expected a number >= 0, got -1"),
        (["up", "--replicas", "two"], "expected a whole number, got 'two'"),
        (["up", "--synchronous-commit", "always"], "invalid choice: 'always'"),
        (["lag", "replica1"], "one of the arguments --pause --resume --delay is required"),
        (["lag", "replica1", "--pause", "--resume"], "not allowed with argument"),
        (["lag", "replica1", "--delay", "-2"], "expected seconds >= 0, got -2"),
        (["lag", "replica1", "--delay", "soon"], "expected seconds, got 'soon'"),
        (["explode"], "invalid choice: 'explode'"),
        (["promote"], "the following arguments are required: node"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(capsys, *args, "--dir", str(tmp_path / "never"))
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_unknown_node_is_a_bad_argument(
    sandbox_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "up", "--replicas", "0", "--dir", str(sandbox_dir))
    assert code == 0, err
    code, _, err = run_cli(capsys, "lag", "replica7", "--pause", "--dir", str(sandbox_dir))
    assert code == 2
    assert err.strip() == (
        "replica-router sandbox lag: error: unknown node 'replica7'; nodes are: primary"
    )
    for action in ("kill", "start", "promote", "rejoin"):
        code, out, err = run_cli(capsys, action, "replica7", "--dir", str(sandbox_dir))
        assert (code, out) == (2, ""), (action, err)
        assert err.strip() == (
            f"replica-router sandbox {action}: error: unknown node 'replica7'; nodes are: primary"
        )
    code, _, err = run_cli(capsys, "lag", "primary", "--pause", "--dir", str(sandbox_dir))
    assert code == 1
    assert "primary is not a replica" in err


def test_commands_without_a_sandbox_say_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "nothing-here"
    code, _, err = run_cli(capsys, "status", "--dir", str(empty))
    assert code == 1
    assert f"no sandbox in {empty}" in err
    assert "replica-router sandbox up" in err
    code, out, _ = run_cli(capsys, "down", "--dir", str(empty))
    assert code == 0
    assert f"no sandbox in {empty}" in out


def test_default_dir_comes_from_the_environment(
    sandbox_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_SANDBOX_DIR", str(sandbox_dir))
    report = run_json(capsys, "up", "--replicas", "0")
    assert report["directory"] == str(sandbox_dir)
    assert (sandbox_dir / "sandbox.json").exists()
    assert os.stat(sandbox_dir / "sandbox.json").st_mode & 0o077 == 0  # private
    code, _, _ = run_cli(capsys, "down")
    assert code == 0
    assert not sandbox_dir.exists()
