"""The sandbox's state file, and reaping sandboxes whose owner died.

Every sandbox directory holds ``sandbox.json``: the nodes, ports and settings
(so ``replica-router sandbox ...`` from another shell can operate it) and the
pid of the Python process that owns it. A test run that was SIGKILLed cannot
clean up after itself; the next sandbox created on the machine finds the dead
owner and removes what it left. Sandboxes made by ``sandbox up`` are marked
``persistent`` and are never reaped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SandboxError
from ._processes import pid_alive, postmaster_pid, terminate_postmaster

__all__ = [
    "BOUNCER_PID_SUFFIX",
    "ROOT_ENV",
    "STATE_FILE",
    "NodeRecord",
    "SandboxState",
    "reap_directory",
    "reap_orphans",
    "remove_sandbox",
    "stop_bouncers",
    "temp_root",
]

logger = logging.getLogger("replica_router.sandbox")

STATE_FILE = "sandbox.json"
BOUNCER_PID_SUFFIX = ".pgbouncer.pid"  # "<pid> <start marker>" of a node's PgBouncer
_FORMAT = 1


@dataclass(slots=True)
class NodeRecord:
    name: str
    port: int
    standby: bool
    upstream: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    bouncer_port: int | None = None  # PgBouncer in front of it, when the sandbox has one


@dataclass(slots=True)
class SandboxState:
    owner_pid: int
    owner_marker: str
    persistent: bool
    created_dir: bool
    bindir: str
    major: int
    os_user: str | None
    password: str | None
    sync: bool
    synchronous_commit: str
    primary_name: str
    system_identifier: int | None
    nodes: list[NodeRecord]
    version: str = ""  # of the server binaries, "18.6"
    origin: str = ""  # how they were found
    pgbouncer: str | None = None  # pool mode of the PgBouncer per node, or None
    pgbouncer_version: str = ""

    def save(self, directory: Path) -> None:
        data = asdict(self)
        data["format"] = _FORMAT
        tmp = directory / f".{STATE_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, directory / STATE_FILE)

    @classmethod
    def load(cls, directory: Path) -> SandboxState:
        path = directory / STATE_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise SandboxError(
                f"no sandbox in {directory} (no {STATE_FILE}); start one with "
                "`replica-router sandbox up`"
            ) from None
        except (OSError, ValueError) as exc:
            raise SandboxError(f"cannot read {path}: {exc}") from None
        if data.pop("format", None) != _FORMAT:
            raise SandboxError(f"{path} was written by an incompatible version")
        try:
            nodes = [NodeRecord(**n) for n in data.pop("nodes")]
            return cls(nodes=nodes, **data)
        except (KeyError, TypeError) as exc:  # fields of another release of this package
            raise SandboxError(f"{path} was written by an incompatible version ({exc})") from None


ROOT_ENV = "REPLICA_ROUTER_SANDBOX_ROOT"
_SHM = Path("/dev/shm")
_SHM_MIN_FREE = 4 << 30  # a sandbox's WAL is capped well below this


def _roots() -> list[Path]:
    """Candidate parents for sandboxes, preferred first."""
    name = f"replica-router-sandboxes-{os.getuid()}"
    explicit = os.environ.get(ROOT_ENV)
    if explicit:
        return [Path(explicit).absolute()]
    roots = [Path(tempfile.gettempdir()) / name]
    try:
        shm = os.statvfs(_SHM)
        if shm.f_bavail * shm.f_frsize >= _SHM_MIN_FREE:
            roots.insert(0, _SHM / name)  # memory-backed: creating ~1000 files is cheap
    except OSError:
        pass
    return roots


def temp_root() -> Path:
    """Where sandboxes without an explicit directory live, one per OS user:
    ``$REPLICA_ROUTER_SANDBOX_ROOT``, else ``/dev/shm`` when it has room, else the
    temp dir. Disposable sandboxes gain nothing from a disk."""
    return _roots()[0]


def _owner_alive(state: SandboxState) -> bool:
    return pid_alive(state.owner_pid, state.owner_marker)


def reap_directory(directory: Path) -> bool:
    """Stop and delete one sandbox if it is disposable and its owner is gone."""
    try:
        state = SandboxState.load(directory)
    except SandboxError:
        return False
    if state.persistent or _owner_alive(state):
        return False
    remove_sandbox(directory, state)
    logger.info("reaped orphaned sandbox %s (owner pid %d is gone)", directory, state.owner_pid)
    return True


def stop_bouncers(directory: Path) -> None:
    """Stop every PgBouncer of the sandbox in ``directory`` (recorded in pid files)."""
    for pidfile in directory.glob(f"*{BOUNCER_PID_SUFFIX}"):
        try:
            pid_text, _, marker = pidfile.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if pid_alive(pid, marker):
            terminate_postmaster(pid, "smart", timeout=10.0)  # SIGTERM: PgBouncer exits at once
        pidfile.unlink(missing_ok=True)


def remove_sandbox(directory: Path, state: SandboxState) -> None:
    stop_bouncers(directory)
    for node in state.nodes:
        pid = postmaster_pid(directory / node.name)
        if pid is not None:
            terminate_postmaster(pid, "immediate", timeout=10.0)
    if state.created_dir:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def reap_orphans(root: Path | None = None) -> list[Path]:
    """Remove every disposable sandbox whose owner process is dead, under ``root``
    or (by default) every place :func:`temp_root` may choose."""
    reaped = []
    for base in [root] if root is not None else _roots():
        try:
            children = sorted(base.iterdir())
        except OSError:
            continue
        for child in children:
            if child.is_dir() and reap_directory(child):
                reaped.append(child)
    return reaped
