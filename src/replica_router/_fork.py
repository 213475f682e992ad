"""Fork safety (issue 11, design rule 7): a Cluster open in a process that forks.

After ``os.fork()`` (gunicorn ``--preload``, multiprocessing's fork start method)
the child inherits the parent's pooled connections - the same sockets, the same
server sessions - but none of its threads: no monitor, no pool workers. Using
them would interleave two processes' protocol messages on one backend; closing
them would end the parent's sessions (libpq sends Terminate). So in the child,
right after the fork, every cluster that was open forgets its inherited pools and
monitor without closing anything (psycopg's connection finalizer does not close a
connection made in another process) and opens afresh. An ``AsyncCluster`` cannot
be opened outside its event loop: it is left closed, and using it raises an error
that says to open it again.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Protocol

__all__ = ["closed", "opened"]

log = logging.getLogger("replica_router.cluster")


class _Forkable(Protocol):
    def _after_fork(self) -> None: ...


_open: weakref.WeakSet[Any] = weakref.WeakSet()


def opened(cluster: _Forkable) -> None:
    """``cluster`` was opened: re-open it in a forked child."""
    _open.add(cluster)


def closed(cluster: _Forkable) -> None:
    _open.discard(cluster)


def _in_child() -> None:
    clusters = list(_open)
    _open.clear()
    for cluster in clusters:
        try:
            cluster._after_fork()
        except Exception:  # the child goes on; the cluster says what failed when used
            log.exception("re-opening %r after fork failed", cluster)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)
