"""A real PgBouncer in front of a sandbox node (``LocalCluster(pgbouncer=...)``).

One PgBouncer process per node, on its own loopback port, pooling connections to
that node only: what a deployment with a pooler beside each database looks like.
It stays up while its node is stopped (clients then get PgBouncer's errors, as
they would in production). See docs/pgbouncer.md.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigurationError, SandboxError
from ._processes import version_output

__all__ = ["POOL_MODES", "PgBouncer", "config_text", "find_pgbouncer"]

POOL_MODES = ("transaction", "session")
_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")
INSTALL_HINT = (
    "install PgBouncer (Debian/Ubuntu: `apt-get install pgbouncer`; Fedora/RHEL: "
    "`dnf install pgbouncer`; macOS: `brew install pgbouncer`)"
)


@dataclass(frozen=True, slots=True)
class PgBouncer:
    """The ``pgbouncer`` program and its version."""

    path: str
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)

    @property
    def tracks_prepared_statements(self) -> bool:
        """1.21 added ``max_prepared_statements``: protocol-level prepared statements
        (psycopg's, after ``prepare_threshold`` executions) then work in transaction
        mode. Before, a statement prepared on one server connection is missing on the
        next one."""
        return self.version >= (1, 21)


def check_pool_mode(pool_mode: str | None) -> None:
    if pool_mode is not None and pool_mode not in POOL_MODES:
        raise ConfigurationError(
            f"pgbouncer: expected None, {' or '.join(repr(m) for m in POOL_MODES)}, "
            f"got {pool_mode!r}"
        )


def find_pgbouncer() -> PgBouncer:
    """``pgbouncer`` on ``PATH`` or in the usual ``sbin`` directories (Debian keeps it
    in /usr/sbin, off a normal user's ``PATH``)."""
    path = shutil.which("pgbouncer")
    if path is None:
        path = shutil.which("pgbouncer", path=os.pathsep.join(_SEARCH))
    if path is None:
        raise SandboxError(f"PgBouncer not found: {INSTALL_HINT}")
    out = version_output(path)
    match = re.search(r"PgBouncer\s+(\d+(?:\.\d+)*)", out)
    if match is None:
        raise SandboxError(f"cannot tell PgBouncer's version from {out.strip()!r}")
    return PgBouncer(path=path, version=tuple(int(p) for p in match.group(1).split(".")))


def _quote_password(password: str) -> str:
    return '"' + password.replace('"', '""') + '"'


def config_text(
    bouncer: PgBouncer,
    *,
    pool_mode: str,
    listen_port: int,
    server_port: int,
    auth_file: Path,
    password: str | None,
) -> str:
    """``pgbouncer.ini`` for one node.

    * ``ignore_startup_parameters = extra_float_digits, options``: the router opens
      read connections with ``options=-c default_transaction_read_only=on``, a startup
      parameter PgBouncer refuses otherwise. It is then not applied to the server
      connection (see docs/pgbouncer.md).
    * ``max_prepared_statements`` where PgBouncer has it (1.21+).
    * Quick retries after the node restarts (``server_login_retry``), bounded waits.
    """
    lines = [
        "; written by replica-router's sandbox",
        "[databases]",
        f"* = host=127.0.0.1 port={server_port}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {listen_port}",
        "unix_socket_dir =",
        f"pool_mode = {pool_mode}",
        f"auth_type = {'trust' if password is None else 'scram-sha-256'}",
        f"auth_file = {auth_file}",
        "admin_users = postgres",
        "max_client_conn = 500",
        "default_pool_size = 40",
        "ignore_startup_parameters = extra_float_digits, options",
        "server_login_retry = 0.2",
        "server_connect_timeout = 5",
        "query_wait_timeout = 15",
        "server_check_delay = 0",
        "log_connections = 0",
        "log_disconnections = 0",
    ]
    if bouncer.tracks_prepared_statements:
        lines.append("max_prepared_statements = 200")
    return "\n".join(lines) + "\n"


def auth_file_text(password: str | None) -> str:
    """The user list: with a password, in plain text so PgBouncer can also log in to
    the server with SCRAM on the client's behalf."""
    return f'"postgres" {_quote_password(password or "")}\n'
