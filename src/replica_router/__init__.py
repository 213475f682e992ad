"""replica-router: PostgreSQL read replicas without stale reads or misrouted writes."""

from __future__ import annotations

from .classify import Intent, classify
from .cluster import Cluster
from .cluster_async import AsyncCluster
from .connection import RoutedConnection
from .connection_async import AsyncRoutedConnection
from .consistency import Token
from .errors import (
    ConfigurationError,
    ConsistencyTimeout,
    Error,
    NodeUnavailable,
    NoReplicaAvailable,
    PrimaryUnavailable,
    TokenError,
)
from .topology import NodeStatus

__all__ = [
    "AsyncCluster",
    "AsyncRoutedConnection",
    "Cluster",
    "ConfigurationError",
    "ConsistencyTimeout",
    "Error",
    "Intent",
    "NoReplicaAvailable",
    "NodeStatus",
    "NodeUnavailable",
    "PrimaryUnavailable",
    "RoutedConnection",
    "Token",
    "TokenError",
    "classify",
]
