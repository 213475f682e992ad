"""The few exceptions replica-router raises.

Everything is rooted at :class:`Error`. Errors about connectivity also subclass
``psycopg.OperationalError`` so that handlers an application already has for a
lost database keep working unchanged.
"""

from __future__ import annotations

import psycopg

__all__ = [
    "ConfigurationError",
    "ConsistencyTimeout",
    "Error",
    "NoReplicaAvailable",
    "NodeUnavailable",
    "PrimaryUnavailable",
    "SandboxError",
    "TokenError",
]


class Error(Exception):
    """Root of every exception raised by replica-router."""


class ConfigurationError(Error, ValueError):
    """Bad settings or a bad DSN; the message names the field, never the password."""


class TokenError(Error, ValueError):
    """A consistency token that cannot be parsed or belongs to another cluster."""


class PrimaryUnavailable(Error, psycopg.OperationalError):
    """No primary can take a write now (down, fenced, or failing over)."""


class NoReplicaAvailable(Error, psycopg.OperationalError):
    """A read found no eligible node and ``fallback="error"`` forbids the primary."""


class NodeUnavailable(Error, psycopg.OperationalError):
    """A connection to one named node could not be had (``Cluster.checkout``)."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


class ConsistencyTimeout(NoReplicaAvailable):
    """No node reached the scope's token (or staleness bound) within the wait."""


class SandboxError(Error, RuntimeError):
    """The local PostgreSQL sandbox could not be set up or operated."""
