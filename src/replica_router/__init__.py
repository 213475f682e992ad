"""replica-router: PostgreSQL read replicas without stale reads or misrouted writes."""

from __future__ import annotations

from .classify import Intent, classify
from .cluster import AsyncCluster, Cluster
from .consistency import Token
from .errors import (
    ConfigurationError,
    ConsistencyTimeout,
    Error,
    NoReplicaAvailable,
    PrimaryUnavailable,
    TokenError,
)

__all__ = [
    "AsyncCluster",
    "Cluster",
    "ConfigurationError",
    "ConsistencyTimeout",
    "Error",
    "Intent",
    "NoReplicaAvailable",
    "PrimaryUnavailable",
    "Token",
    "TokenError",
    "classify",
]
