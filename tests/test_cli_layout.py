"""The command line fits: 80 columns, plain ``--help``, a closed pipe ends quietly.

Run as a user runs it (the console script, ``COLUMNS=80``, stdout a pipe) where
the terminal matters; the table layout of ``sandbox up`` is also checked in
process with a report holding a failing node.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from replica_router.cli import build_parser, description
from replica_router.cli.sandbox import _print_nodes
from replica_router.sandbox import LocalCluster

SCRIPT = str(Path(sys.executable).with_name("replica-router"))
WIDTH = 80
DEAD = "postgresql://postgres:hunter2@127.0.0.1:1/postgres"
UNRESOLVABLE = "postgresql://app@no-such-host-for-replica-router.invalid/app"


def run(*args: str, columns: int = WIDTH) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": str(columns)},
    )


def assert_fits(text: str, names: list[str]) -> None:
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), "\n".join(lines)
    for name in names:  # whole, on a line of its own row, never "replic…"
        assert any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", line) for line in lines), text
    assert "…" not in text, text


def dsn_lines_removed(out: str) -> str:
    """The output without DSNs and commands: long lines, but meant to be copied whole."""
    kept = [
        line
        for line in out.splitlines()
        if "postgresql://" not in line and not line.startswith("stop it with:")
    ]
    return "\n".join(kept)


def test_status_table_fits_80_columns_with_errors_below(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    dsns = [lc.dsn(name) for name in lc.node_names]
    result = run("status", *dsns, DEAD, UNRESOLVABLE)
    assert result.returncode == 0, result.stderr
    names = [f"127.0.0.1:{lc.port(n)}" for n in lc.node_names]
    names += ["127.0.0.1:1", "no-such-host-for-replica-router.invalid:5432"]
    assert_fits(result.stdout, names)
    below = " ".join(result.stdout.split())  # an error may wrap over several lines
    assert "127.0.0.1:1: connection to server at" in below
    assert "Connection refused" in below
    assert "hunter2" not in result.stdout + result.stderr


def test_sandbox_status_table_fits_80_columns(replica_cluster: LocalCluster) -> None:
    result = run("sandbox", "status", "--dir", str(replica_cluster.directory))
    assert result.returncode == 0, result.stderr
    table = dsn_lines_removed(result.stdout)
    assert_fits(table, list(replica_cluster.node_names))


def test_sandbox_up_table_puts_a_long_error_below_and_wraps_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    error = "could not connect: " + "a very long reason [not markup] " * 4 + "END"
    _print_nodes(sandbox_report(error))  # the table `sandbox up` and `status` print
    out = capsys.readouterr().out
    table = dsn_lines_removed(out)
    assert_fits(table, ["primary", "replica1", "replica12"])
    assert error in " ".join(out.split())
    assert out.index("replica12: could not connect") > out.index("replica1 ")


def sandbox_report(error: str) -> dict[str, Any]:
    def node(name: str, port: int, **measured: Any) -> dict[str, Any]:
        base = {
            "name": name,
            "port": port,
            "dsn": f"postgresql://postgres@127.0.0.1:{port}/postgres",
            "running": True,
            "configured_as": "primary" if name == "primary" else "replica",
            "role": None,
            "replay_lsn": None,
            "lag_bytes": None,
            "replay_paused": None,
            "apply_delay": None,
            "streaming_from": None,
        }
        return {**base, **measured}

    replica = {"role": "replica", "streaming_from": "primary", "replay_lsn": "1A/B374D848"}
    nodes = [
        node("primary", 54321, role="primary"),
        node("replica1", 54322, **replica, lag_bytes=123456789, replay_paused=True),
        node("replica12", 54323, **replica, lag_bytes=0, apply_delay="2500ms"),
        node("replica12", 54324, error=error),
    ]
    nodes[-1]["name"] = "replica12"
    return {
        "directory": "/var/tmp/a-rather-long-sandbox-directory-name/for-this-test/sb",
        "primary": "primary",
        "primary_dsn": nodes[0]["dsn"],
        "replica_dsns": [n["dsn"] for n in nodes[1:]],
        "system_identifier": 1,
        "nodes": nodes,
        "startup_seconds": 1.0,
    }


def test_watch_json_into_a_closed_pipe_ends_quietly(replica_cluster: LocalCluster) -> None:
    """``status --watch --json | head -1``: no BrokenPipe traceback."""
    proc = subprocess.Popen(
        [SCRIPT, "status", replica_cluster.primary_dsn, "--watch", "--json", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("[{")
        proc.stdout.close()  # what `head` does once it has its lines
        assert proc.wait(timeout=30) == 141
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_help_is_plain_text() -> None:
    helps = {p.prog: p.format_help() for p in _parsers(build_parser())}
    assert {"replica-router sandbox up", "replica-router status"} <= set(helps)
    for prog, text in helps.items():
        assert "``" not in text and not re.search(r":[a-z]+:`", text), f"{prog}:\n{text}"
    assert "replica-router sandbox: a local primary" in helps["replica-router sandbox"]


def test_description_drops_rest_markup() -> None:
    doc = "``up`` starts a :class:`~replica_router.sandbox.LocalCluster` (:func:`open`).\n\nMore."
    assert description(doc) == "up starts a LocalCluster (open)."
    assert description(None) is None
