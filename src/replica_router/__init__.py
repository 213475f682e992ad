"""replica-router: PostgreSQL read replicas without stale reads or misrouted writes."""

from __future__ import annotations

from .errors import (
    ConfigurationError,
    ConsistencyTimeout,
    Error,
    NoReplicaAvailable,
    PrimaryUnavailable,
    TokenError,
)

__all__ = [
    "ConfigurationError",
    "ConsistencyTimeout",
    "Error",
    "NoReplicaAvailable",
    "PrimaryUnavailable",
    "TokenError",
]
