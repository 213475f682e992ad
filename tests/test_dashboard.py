"""The dashboard: its JSON API on a real sandbox, its CLI, and the page in headless Chromium.

The browser test needs Chromium (Debian: ``apt-get install chromium``); without it
the test is skipped with that instruction, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_until
from replica_router.cli import main
from replica_router.cluster import Cluster
from replica_router.dashboard import DashboardServer
from replica_router.sandbox import LocalCluster

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--window-size=1280,1100",
)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


ROOT = Path(__file__).resolve().parent.parent


def _dev() -> Any:
    """The repository's dev.py: where finding Chromium is decided, for dev.py and us."""
    spec = importlib.util.spec_from_file_location("replica_router_dev", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dev = _dev()


def chromium(path: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """Chromium, else skip the browser test with how to install it (fail under CI)."""
    found = dev.find_chromium(path)
    if found is None:
        message = f"the dashboard browser test needs Chromium ({dev.CHROMIUM_HINT})"
        if dev.browser_required(environ):
            pytest.fail(f"{message}; it is mandatory under CI=true")
        pytest.skip(message)
    return str(found)


def test_without_chromium_the_browser_test_is_skipped_saying_how_to_install(
    tmp_path: Path,
) -> None:
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium(path=str(tmp_path), environ={})


def test_under_ci_a_missing_chromium_fails_the_browser_test(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="mandatory under CI=true"):
        chromium(path=str(tmp_path), environ={"CI": "true"})


def test_a_chromium_on_path_is_used(tmp_path: Path) -> None:
    fake = tmp_path / "chromium-browser"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert chromium(path=str(tmp_path), environ={"CI": "true"}) == str(fake)


def test_dev_py_test_goes_on_without_chromium_after_a_one_line_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python3 dev.py test`` on a laptop without Chromium (nor apt-get, nor root
    powers to use it): one line, then the suite runs -- no exit."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    dev.ensure_browser()
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    assert "will be skipped" in out and "brew install --cask chromium" in out


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )


class Dom(HTMLParser):
    """Every element's attributes, and the text inside each element carrying data-node."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.node_text: dict[str, str] = {}
        self._open_nodes: list[tuple[str, str, int]] = []  # (tag, node name, depth)
        self._depth = 0
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        self._depth += 1
        if "data-node" in attributes and tag == "div":
            self._open_nodes.append((tag, attributes["data-node"], self._depth))

    def handle_endtag(self, tag: str) -> None:
        if self._open_nodes and self._open_nodes[-1][2] == self._depth:
            self._open_nodes.pop()
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        for _, name, _ in self._open_nodes:
            self.node_text[name] = self.node_text.get(name, "") + data + " "

    def with_attr(self, name: str, tag: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.elements if name in a and (tag is None or t == tag)]


@pytest.fixture
def cluster(replica_cluster: LocalCluster) -> Iterator[Cluster]:
    nodes = {name: replica_cluster.dsn(name) for name in replica_cluster.node_names}
    with Cluster(nodes=nodes, monitor_interval=0.2) as cluster:
        yield cluster


@pytest.fixture
def dashboard_process(replica_cluster: LocalCluster) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``replica-router dashboard --sandbox DIR --port 0`` as its own process; yields its URL."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from replica_router.cli import main; sys.exit(main())",
            "dashboard",
            "--sandbox",
            str(replica_cluster.directory),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        if not selector.select(timeout=30):
            pytest.fail("the dashboard printed no URL within 30 s")
        line = process.stdout.readline()
        assert line.startswith("dashboard on http://127.0.0.1:"), (line, process.stderr.read())
        yield line.split()[2], process
    finally:
        selector.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        process.stdout.close()
        if process.stderr is not None:
            process.stderr.close()


# -- the JSON API and the page's source -------------------------------------------------------


def test_api_status_reports_every_node_and_counters(
    cluster: Cluster, replica_cluster: LocalCluster
) -> None:
    with cluster.read() as conn:
        conn.execute("SELECT 1")
    with DashboardServer(cluster, port=0, max_lag=2.0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, content_type, body = get(server.url + "api/status")
        assert status == 200 and content_type == "application/json"
        payload = json.loads(body)
        by_name = {n["name"]: n for n in payload["nodes"]}
        assert set(by_name) == set(replica_cluster.node_names)
        assert payload["primary"] == replica_cluster.primary_name
        assert by_name[replica_cluster.primary_name]["role"] == "primary"
        for name in replica_cluster.replica_names:
            node = by_name[name]
            assert node["role"] == "replica" and node["healthy"] is True
            assert node["port"] == replica_cluster.port(name)
            assert {"lag_seconds", "lag_bytes", "timeline", "fenced", "last_error"} <= set(node)
        assert payload["max_lag"] == 2.0
        assert sum(payload["counters"]["reads"].values()) == 1
        assert payload["counters"]["failovers"] == 0

        # the sampler records lag once a second; "since" returns only what is newer
        first = wait_until(
            lambda: json.loads(get(server.url + "api/status")[2])["history"], 5, "a sample"
        )
        assert set(first[0]["lag"]) == set(replica_cluster.replica_names)
        newest = first[-1]["t"]
        later = json.loads(get(f"{server.url}api/status?since={newest}")[2])["history"]
        assert all(sample["t"] > newest for sample in later)

        assert get(server.url + "api/status?since=yesterday")[0] == 400
        assert get(server.url + "nothing-here")[0] == 404


def test_page_is_self_contained(cluster: Cluster) -> None:
    with DashboardServer(cluster, port=0) as server:
        status, content_type, page = get(server.url)
    assert status == 200 and content_type.startswith("text/html")
    assert "<svg" in page and "api/status" in page
    # works offline: no script, style or font from elsewhere (only the SVG namespace URI)
    urls = {u for u in _urls(page) if u != "http://www.w3.org/2000/svg"}
    assert urls == set(), urls
    assert ".innerHTML" not in page  # node names and errors are set as text, never as markup


def _urls(text: str) -> set[str]:
    import re

    return set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text))


# -- the command line ---------------------------------------------------------------------


def test_cli_argument_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["dashboard"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sandbox" in err

    with pytest.raises(SystemExit) as exited:
        main(["dashboard", "--port", "70000", "postgresql://u@h/db"])
    assert exited.value.code == 2 and "port" in capsys.readouterr().err

    assert main(["dashboard", "--sandbox", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("replica-router dashboard: error: no sandbox in") and err.count("\n") == 1

    assert main(["dashboard", "postgresql://u@h:notaport/db"]) == 2
    assert "port" in capsys.readouterr().err


def test_cli_reports_a_busy_port(
    replica_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dsns = [replica_cluster.dsn(name) for name in replica_cluster.node_names]
        code = main(["dashboard", *dsns, "--port", str(port)])  # nodes given as DSNs
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# -- the page in a real browser ---------------------------------------------------------


@pytest.mark.slow
def test_page_shows_every_node_and_lag_in_chromium(
    replica_cluster: LocalCluster,
    dashboard_process: tuple[str, subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    url, process = dashboard_process
    lc = replica_cluster
    lagging = lc.replica_names[0]
    lc.pause_replay(lagging)
    try:
        lc.execute(lc.primary_name, "CREATE TABLE IF NOT EXISTS dashboard_probe (x int)")
        lc.execute(lc.primary_name, "INSERT INTO dashboard_probe SELECT generate_series(1, 500)")

        def lag_seen() -> dict[str, Any] | None:
            nodes = {n["name"]: n for n in json.loads(get(url + "api/status")[2])["nodes"]}
            return nodes if (nodes[lagging]["lag_bytes"] or 0) > 0 else None

        wait_until(lag_seen, 15, f"{lagging}'s lag in bytes to show")
        wait_until(
            lambda: len(json.loads(get(url + "api/status")[2])["history"]) >= 2, 10, "samples"
        )

        dom_html = run_chromium(tmp_path, "--virtual-time-budget=4000", "--dump-dom", url).stdout
        screenshot = tmp_path / "dashboard.png"
        run_chromium(tmp_path, "--virtual-time-budget=4000", f"--screenshot={screenshot}", url)
    finally:
        lc.resume_replay(lagging)

    dom = Dom(dom_html)
    connection = [a for t, a in dom.elements if a.get("id") == "conn"]
    assert connection and connection[0].get("class") == "live", dom_html[:2000]
    cards = {a["data-node"] for a in dom.with_attr("data-node", "div")}
    boxes = {a["data-node"] for a in dom.with_attr("data-node", "g")}
    assert cards == set(lc.node_names)  # every node has a card
    assert boxes == set(lc.node_names)  # and a box in the topology diagram
    lines = {a["data-replica"] for a in dom.with_attr("data-replica", "path")}
    assert lines == set(lc.replica_names)  # one lag line per replica in the chart
    card = dom.node_text[lagging]
    assert "replica" in card and "127.0.0.1:" in card
    lag_text = card.split("lag", 1)[1].split("replay LSN", 1)[0]
    assert "·" in lag_text and not lag_text.strip().endswith(" 0 B"), lag_text
    assert dom.node_text[lc.primary_name].count("primary") >= 2  # name and role badge

    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000

    process.send_signal(signal.SIGTERM)  # a service manager's stop: clean exit, code 0
    assert process.wait(timeout=30) == 0
