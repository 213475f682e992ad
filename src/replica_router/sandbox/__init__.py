"""A real PostgreSQL primary with streaming replicas on this machine.

Used by replica-router's own tests, its demo, the ``replica-router sandbox``
command and the pytest fixtures users get from ``replica_router.pytest_plugin``.
See docs/sandbox.md.
"""

from __future__ import annotations

from ._cluster import LocalCluster

__all__ = ["LocalCluster"]
