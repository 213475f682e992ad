"""What we know about the nodes: configuration, measurements, snapshots.

``NodeSpec`` is configuration (what the user said), ``NodeState`` is one
measurement of a node (what the probe saw), and ``Topology`` is an immutable
snapshot of every node at one moment. The monitor builds a new ``Topology`` and
swaps it in as a whole; routing reads whatever snapshot it holds, without a lock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .dsn import DsnInfo, redact

__all__ = ["NodeSpec", "NodeState", "NodeStatus", "Role", "Topology"]


class Role(str, enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"
    UNKNOWN = "unknown"  # not probed yet, or unreachable since start

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node as configured. ``role`` is what the user *expects*; the probe decides."""

    name: str
    dsn: str = field(repr=False)
    info: DsnInfo
    role: Role = Role.UNKNOWN
    weight: float = 1.0

    @property
    def redacted_dsn(self) -> str:
        return redact(self.dsn)


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node as last measured. Immutable: a new probe makes a new object."""

    name: str
    role: Role = Role.UNKNOWN
    healthy: bool = False
    fenced: bool = False  # claims primary on an older timeline: no reads, no writes
    diverged: bool = False  # replica off the primary's timeline and its history: no reads
    timeline: int | None = None
    system_identifier: int | None = None
    current_lsn: int | None = None  # primary: pg_current_wal_lsn()
    receive_lsn: int | None = None  # replica: pg_last_wal_receive_lsn()
    replay_lsn: int | None = None  # replica: pg_last_wal_replay_lsn(); primary: current
    replay_paused: bool = False
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    latency_ms: float | None = None  # smoothed probe round trip
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None  # already redacted
    probed_at: float | None = None  # time.monotonic() of the last probe

    @property
    def position(self) -> int | None:
        """The WAL position this node's data reflects (what a token is compared to)."""
        return self.current_lsn if self.role is Role.PRIMARY else self.replay_lsn


@dataclass(frozen=True, slots=True)
class Topology:
    """Every node's state at one moment, plus which node takes writes."""

    nodes: tuple[NodeState, ...]
    primary: str | None  # name of the node that takes writes now, if any
    generation: int = 0
    taken_at: float = 0.0
    by_name: Mapping[str, NodeState] = field(init=False, repr=False, compare=False)
    # Derived once per snapshot so the routing hot path iterates without building.
    replicas: tuple[NodeState, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", MappingProxyType({n.name: n for n in self.nodes}))
        replicas = tuple(n for n in self.nodes if n.role is Role.REPLICA)
        object.__setattr__(self, "replicas", replicas)

    @property
    def primary_state(self) -> NodeState | None:
        return self.by_name.get(self.primary) if self.primary is not None else None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """The public, display-safe view of a node returned by ``Cluster.status()``."""

    name: str
    host: str
    port: int
    role: str
    healthy: bool
    lag_seconds: float | None
    lag_bytes: int | None
    replay_lsn: str | None
    latency_ms: float | None
    last_error: str | None
    timeline: int | None = None
    fenced: bool = False
    configured_role: str = "unknown"
    in_use: int = 0
    reads: int = 0
    writes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
