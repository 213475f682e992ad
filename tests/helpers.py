"""Helpers several test files share: ``from helpers import ...`` (pytest puts tests/
on ``sys.path``, as for ``classify_corpus``). Fixtures live in ``conftest.py``."""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from replica_router import Cluster
from replica_router.lsn import parse_lsn
from replica_router.sandbox import LocalCluster

T = TypeVar("T")

FAST = {"monitor_interval": 0.1}  # the monitor sees a change within a tenth of a second
HUNG_BOUND = 3.0  # design rule 10: a hung node is noticed, and left, within 3 s


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, what: str = "") -> T:
    """Poll ``predicate`` until it is truthy and return that value (the pause is a
    poll interval, not a sync); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(0.01)


def within(seconds: float, action: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``action`` in a thread; (finished in time, its result or exception)."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(action())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive(), outcome[0] if outcome else None)


async def awithin(seconds: float, action: Awaitable[Any]) -> tuple[bool, Any]:
    """:func:`within` for asyncio: (finished in time, its result or exception)."""
    try:
        return True, await asyncio.wait_for(action, seconds)
    except TimeoutError:
        return False, None
    except Exception as exc:
        return True, exc


def hung_mid_flight(
    action: Callable[[Callable[[], None]], Any], freeze: Callable[[], None], seconds: float
) -> tuple[bool, Any]:
    """Run ``action(hold)`` in a thread: ``hold()``, called once its connection is set
    up, returns after ``freeze()`` hung the node, so the query that follows goes to a
    hung server. (finished within ``seconds`` after that, its result or exception)."""
    ready, go = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def hold() -> None:
        ready.set()
        go.wait()

    def target() -> None:
        try:
            outcome.append(action(hold))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_until(lambda: ready.is_set() or not thread.is_alive(), what="the action set up")
    if not ready.is_set():
        raise AssertionError(f"the action ended before it held: {outcome}")
    freeze()
    go.set()
    thread.join(seconds)
    return (not thread.is_alive(), outcome[0] if outcome else None)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a fresh context, outside every session: the code there shares the
    process-wide root scope (empty at the start of each test), as a script's would."""
    return contextvars.Context().run(asyncio.run, coro)


def port_of(conn: Any, query: str = "SELECT inet_server_port()") -> int:
    """The port of the server that answered ``query`` (a psycopg or routed connection)."""
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


async def async_port_of(conn: Any, query: str = "SELECT inet_server_port()") -> int:
    """:func:`port_of` for an async connection."""
    cursor = await conn.execute(query)
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


def read_port(cluster: Cluster, **kwargs: Any) -> int:
    """The port of the node ``cluster.read(**kwargs)`` chose."""
    with cluster.read(**kwargs) as conn:
        return port_of(conn)


def replica_ports(lc: LocalCluster) -> set[int]:
    return {lc.port(name) for name in lc.replica_names}


def cluster_for(lc: LocalCluster, cls: type[Any] = Cluster) -> Any:
    """A cluster (not opened) with no lag bound: a paused replica stays eligible, so
    only the consistency token keeps a read off it."""
    return cls(primary=lc.primary_dsn, replicas=lc.replica_dsns, max_lag=None)


@contextmanager
def scratch_table(lc: LocalCluster, prefix: str, columns: str) -> Iterator[str]:
    """A new table ``<prefix>_<random>`` replicated everywhere; dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    lc.execute("primary", f"CREATE TABLE {name} ({columns})")
    lc.wait_replicated()
    try:
        yield name
    finally:
        lc.execute("primary", f"DROP TABLE IF EXISTS {name}")


@contextmanager
def replay_paused(lc: LocalCluster) -> Iterator[None]:
    """Every replica stops applying WAL: only the primary has what is written now."""
    try:
        for name in lc.replica_names:
            lc.pause_replay(name)
        yield
    finally:
        for name in lc.replica_names:
            lc.resume_replay(name)


def example_module(package: str) -> Any:
    """``examples/<package>/app.py`` imported (the examples are run from the repository
    root, not installed); registered in ``sys.modules`` so pydantic resolves the models'
    annotations through it."""
    path = Path(__file__).resolve().parent.parent / "examples" / package / "app.py"
    spec = importlib.util.spec_from_file_location(f"{package}_example_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def set_cookie_value(set_cookie_headers: Iterable[str], name: str) -> str | None:
    """Cookie ``name``'s value in a response's ``Set-Cookie`` headers (None if not set)."""
    for header in set_cookie_headers:
        cookie, _, rest = header.partition("=")
        if cookie == name:
            return rest.split(";", 1)[0]
    return None


def commit_record_end(lc: LocalCluster, start: str, xid: str) -> int:
    """Where transaction ``xid``'s commit record ends in the primary's WAL, read with
    pg_walinspect from ``start`` on: a token must be at or past it."""
    ends = lc.execute(
        "primary",
        "SELECT end_lsn::text FROM pg_get_wal_records_info("
        f"'{start}', pg_current_wal_flush_lsn()) "
        f"WHERE xid = '{xid}' AND resource_manager = 'Transaction' AND record_type = 'COMMIT'",
    )
    assert len(ends) == 1, ends
    return parse_lsn(ends[0][0])
