"""replica-router: PostgreSQL read replicas without stale reads or misrouted writes."""

from __future__ import annotations

from .classify import Intent, classify
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
    "Intent",
    "NoReplicaAvailable",
    "PrimaryUnavailable",
    "TokenError",
    "classify",
]
