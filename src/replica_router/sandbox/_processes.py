"""Operating-system plumbing: which user runs the servers, and their processes.

PostgreSQL refuses to run as root, so a root caller (containers, CI) runs the
servers as an unprivileged user. Servers are started in their own session so a
Ctrl-C in the terminal reaches Python (which then shuts them down in order)
rather than killing them half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigurationError, SandboxError

__all__ = [
    "STOP_SIGNALS",
    "RunAs",
    "check_traversable",
    "chown_tree",
    "is_suspended",
    "pid_alive",
    "postmaster_pid",
    "postmaster_status",
    "process_start_marker",
    "resolve_run_as",
    "run",
    "signal_tree",
    "spawn",
    "terminate_postmaster",
    "version_output",
    "wait_gone",
]

USER_ENV = "REPLICA_ROUTER_SANDBOX_USER"
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged account a root caller runs the servers as."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def resolve_run_as(os_user: str | None, environ: Mapping[str, str] | None = None) -> RunAs | None:
    """``None`` when we are not root: the servers simply run as the caller."""
    env = os.environ if environ is None else environ
    if os.geteuid() != 0:
        if os_user is not None:
            import getpass

            if os_user != getpass.getuser():
                raise ConfigurationError(
                    f"os_user={os_user!r}: switching to another OS user needs root; "
                    "without root the servers run as the current user (leave os_user unset)"
                )
        return None
    import pwd

    name = os_user or env.get(USER_ENV) or "postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(
            f"running as root, the sandbox starts PostgreSQL as an unprivileged OS user, but "
            f"user {name!r} does not exist; create it (e.g. `useradd --system postgres`) or "
            f"choose an existing one with os_user= or {USER_ENV}"
        ) from None
    if entry.pw_uid == 0:
        raise SandboxError(
            f"os user {name!r} is root; PostgreSQL refuses to run as root, choose an "
            f"unprivileged user with os_user= or {USER_ENV}"
        )
    return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def check_traversable(path: Path, run_as: RunAs | None) -> None:
    """Fail early, and clearly, when the server user cannot reach ``path``."""
    if run_as is None:
        return
    groups = set(os.getgrouplist(run_as.name, run_as.gid))
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == run_as.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise SandboxError(
                f"OS user {run_as.name!r} (which runs the servers) cannot enter {parent}; "
                f"choose a sandbox directory it can reach, e.g. under /tmp"
            )


def chown_tree(root: Path, run_as: RunAs | None) -> None:
    if run_as is None:
        return
    os.chown(root, run_as.uid, run_as.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), run_as.uid, run_as.gid, follow_symlinks=False)


def run(
    args: Sequence[str], run_as: RunAs | None, cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool to completion; a failure carries its output."""
    extra = run_as.popen_kwargs() if run_as else {}
    try:
        done = subprocess.run(
            list(args),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
            **extra,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"{Path(args[0]).name} failed to run: {exc}") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise SandboxError(f"{Path(args[0]).name} failed (exit {done.returncode}): {output}")
    return done


def version_output(program: str) -> str:
    """What ``program --version`` prints; a program that cannot run is a SandboxError."""
    try:
        return subprocess.run(
            [program, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"cannot run {program} --version: {exc}") from None


def spawn(
    args: Sequence[str], run_as: RunAs | None, cwd: Path, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start a long-running server in its own session, output appended to ``log``."""
    extra = run_as.popen_kwargs() if run_as else {}
    return subprocess.Popen(
        list(args),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **extra,
    )


def _proc_stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name (state is [0]); [] off Linux."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return raw.rsplit(")", 1)[-1].split()


def is_suspended(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (a frozen server); False off Linux."""
    fields = _proc_stat_fields(pid)
    return bool(fields) and fields[0] == "T"


def process_start_marker(pid: int) -> str:
    """Something that differs between two processes that got the same pid (Linux)."""
    fields = _proc_stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""  # field 22 of stat: starttime


def pid_alive(pid: int, marker: str = "") -> bool:
    """Whether ``pid`` runs (a zombie does not count), and is the process ``marker`` names."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat_fields(pid)
    if fields and fields[0] in ("Z", "X"):
        return False
    return not marker or not fields or fields[19] == marker


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every server process is the postmaster's)."""
    if sys.platform.startswith("linux"):
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _proc_stat_fields(int(entry.name))
                if len(fields) > 1 and fields[1] == str(pid):
                    found.append(int(entry.name))
        return found
    try:
        out = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(word) for word in out.split()]


def signal_tree(pid: int, signum: int) -> None:
    """Send ``signum`` to a postmaster and then to each of its children.

    The postmaster goes first: stopped, it forks no new child while we list them
    (SIGSTOP); continued first, it is awake when its children are (SIGCONT).
    A signal is delivered after ``kill()`` returns, so on Linux a SIGSTOP returns
    only once the kernel reports each process stopped: a frozen node is frozen.
    """
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return
    if signum == signal.SIGSTOP:
        _wait_stopped([pid])
    children = _children(pid)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)
    if signum == signal.SIGSTOP:
        _wait_stopped(children)


def _wait_stopped(pids: Sequence[int], timeout: float = 5.0) -> None:
    """Poll /proc until none of ``pids`` runs any more (stopped, exited or gone)."""
    if not sys.platform.startswith("linux"):
        return
    deadline = time.monotonic() + timeout
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        waiting = [p for p in waiting if (f := _proc_stat_fields(p)) and f[0] not in "TtZX"]
        if waiting:
            time.sleep(0.001)


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the live postmaster serving ``data_dir``, if any.

    A stale ``postmaster.pid`` whose number now belongs to an unrelated process
    is ignored (on Linux the process's working directory must be the data dir).
    """
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first.strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or not pid_alive(pid):
        return None
    if sys.platform.startswith("linux"):
        try:
            if Path(os.readlink(f"/proc/{pid}/cwd")) != data_dir.resolve():
                return None
        except OSError:
            return None
    return pid


def postmaster_status(data_dir: Path) -> str:
    """The status line of ``postmaster.pid``: ``ready``, ``standby``, ``starting``..."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().split("\n")
    except OSError:
        return ""
    return lines[7].strip() if len(lines) > 7 else ""


def wait_gone(pid: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return True
        elif not pid_alive(pid):
            return True
        time.sleep(0.01)
    return False


def terminate_postmaster(
    pid: int, mode: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Stop a postmaster the way ``pg_ctl stop -m MODE`` does; SIGKILL as a last resort.

    A frozen server (SIGSTOP) is continued after the signal, so it acts on it.
    """
    try:
        os.kill(pid, STOP_SIGNALS[mode])
    except ProcessLookupError:
        return
    signal_tree(pid, signal.SIGCONT)
    if wait_gone(pid, timeout, process):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not wait_gone(pid, 5.0, process):
        raise SandboxError(f"postmaster {pid} did not exit after SIGKILL")
