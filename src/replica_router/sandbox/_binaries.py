"""Finding the PostgreSQL server binaries on this machine.

Distributions put them in different places (Debian keeps ``initdb`` off the
``PATH``), so we look in the usual order and, if nothing works, say how to
install them instead of failing with a bare ``FileNotFoundError``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SandboxError

__all__ = ["MIN_MAJOR", "Binaries", "find_binaries"]

MIN_MAJOR = 13  # primary_conninfo became reloadable in 13; promote re-points by reload
_REQUIRED = ("initdb", "postgres")
_VERSIONED_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # Homebrew, Intel
    "/usr/local/pgsql/bin",  # built from source
)
_INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`; "
    "Fedora/RHEL: `dnf install postgresql-server`; macOS: `brew install postgresql@15`) "
    "or point PG_BINDIR at the directory holding initdb and postgres"
)


@dataclass(frozen=True, slots=True)
class Binaries:
    """Where the server programs are, and which major version they are."""

    bindir: Path
    major: int

    def path(self, program: str) -> str:
        return str(self.bindir / program)


def _has_server(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED)


def _pg_config_bindir(path: str) -> Path | None:
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _version_key(directory: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", directory))


def _candidates(environ: Mapping[str, str], globs: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    path = environ.get("PATH", "")
    from_pg_config = _pg_config_bindir(path)
    if from_pg_config is not None:
        found.append(from_pg_config)
    on_path = shutil.which("initdb", path=path)
    if on_path is not None:
        found.append(Path(on_path).resolve().parent)
    for pattern in globs:
        found.extend(Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True))
    return found


def _major_version(postgres: str) -> int:
    try:
        out = subprocess.run(
            [postgres, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"cannot run {postgres} --version: {exc}") from None
    match = re.search(r"\)\s*(\d+)", out) or re.search(r"(\d+)", out)
    if match is None:
        raise SandboxError(f"cannot tell the version of {postgres} from {out.strip()!r}")
    return int(match.group(1))


def find_binaries(
    environ: Mapping[str, str] | None = None, globs: Sequence[str] = _VERSIONED_GLOBS
) -> Binaries:
    """Locate ``initdb`` and ``postgres``: ``PG_BINDIR``, ``pg_config``, ``PATH``, then
    the newest versioned install directory. An explicit ``PG_BINDIR`` that lacks them
    is an error rather than silently ignored."""
    env = os.environ if environ is None else environ
    explicit = env.get("PG_BINDIR")
    if explicit:
        if not _has_server(Path(explicit)):
            raise SandboxError(
                f"PG_BINDIR={explicit!r} does not contain executable {' and '.join(_REQUIRED)}; "
                f"fix PG_BINDIR or unset it, or {_INSTALL_HINT}"
            )
        chosen: Path | None = Path(explicit)
    else:
        chosen = next((d for d in _candidates(env, globs) if _has_server(d)), None)
    if chosen is None:
        raise SandboxError(
            f"PostgreSQL server binaries (initdb, postgres) not found: {_INSTALL_HINT}"
        )
    major = _major_version(str(chosen / "postgres"))
    if major < MIN_MAJOR:
        raise SandboxError(
            f"{chosen} holds PostgreSQL {major}; the sandbox needs {MIN_MAJOR} or newer: "
            f"{_INSTALL_HINT}"
        )
    return Binaries(bindir=chosen, major=major)
