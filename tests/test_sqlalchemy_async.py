"""The SQLAlchemy integration under asyncio: AsyncSession on AsyncCluster with the
psycopg async dialect, routed through the ``sync_session_class``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from helpers import FAST, HUNG_BOUND, replay_paused, run
from replica_router import AsyncCluster
from replica_router.integrations.sqlalchemy import async_sessionmaker, use_primary
from replica_router.sandbox import LocalCluster
from test_sqlalchemy import Base, Note, plain_engine

PORT = text("SELECT inet_server_port()")


@pytest.fixture(scope="module")
def schema(replica_cluster: LocalCluster) -> Iterator[None]:
    engine = plain_engine(replica_cluster.primary_dsn)
    Base.metadata.create_all(engine)
    replica_cluster.wait_replicated()
    yield
    engine.dispose()


def _cluster(lc: LocalCluster, **kwargs: Any) -> AsyncCluster:
    return AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST, **kwargs)


def test_async_sessionmaker_is_sqlalchemys_own(replica_cluster: LocalCluster) -> None:
    factory = async_sessionmaker(_cluster(replica_cluster), expire_on_commit=False)
    assert isinstance(factory, sa.ext.asyncio.async_sessionmaker)
    assert isinstance(factory(), AsyncSession)


def test_reads_writes_and_the_token(replica_cluster: LocalCluster, schema: None) -> None:
    lc = replica_cluster
    primary = lc.port("primary")

    async def main() -> None:
        async with _cluster(lc) as cluster:
            Session = async_sessionmaker(cluster)
            async with Session() as session:
                assert await session.scalar(PORT) != primary
            with replay_paused(lc):
                async with Session() as session:
                    note = Note(body="async")
                    session.add(note)
                    await session.flush()
                    assert await session.scalar(PORT) == primary  # the transaction wrote
                    note_id = note.id
                    await session.commit()
                    assert cluster.token is not None
                    query = select(Note.body).where(Note.id == note_id)
                    assert (await session.scalars(query)).one() == "async"
                    assert await session.scalar(PORT) == primary  # replicas lack the commit
                async with use_primary(), Session() as session:
                    assert await session.scalar(PORT) == primary
            assert sum(cluster.in_use(n) for n in cluster.node_names) == 0

    run(main())


@pytest.mark.slow
def test_200_concurrent_tasks_leak_no_pin_and_no_token(
    replica_cluster: LocalCluster, schema: None
) -> None:
    """Half the tasks write and read their write back; the other half only read.
    Replay is paused, so a writer's read-back passes only on the primary, and a
    reader that inherited anyone's token or pin would read from the primary too."""
    lc = replica_cluster
    primary = lc.port("primary")

    async def writer(
        Session: async_sessionmaker[AsyncSession], cluster: AsyncCluster, i: int
    ) -> None:
        with cluster.session(inherit=False):
            async with Session() as session:
                note = Note(body=f"task {i}")
                session.add(note)
                await session.commit()
            assert cluster.token is not None
            async with Session() as session:
                assert await session.get(Note, note.id) is not None
                assert await session.scalar(PORT) == primary

    async def reader(Session: async_sessionmaker[AsyncSession], cluster: AsyncCluster) -> None:
        with cluster.session(inherit=False):
            async with Session() as session:
                await session.scalars(select(Note.id).limit(1))
                assert await session.scalar(PORT) != primary
            assert cluster.token is None

    async def main() -> None:
        # 200 tasks share 10 primary connections on a loaded machine: waiting is fine.
        async with _cluster(lc, checkout_timeout=60.0) as cluster:
            Session = async_sessionmaker(cluster, expire_on_commit=False)
            with replay_paused(lc):
                tasks = [
                    writer(Session, cluster, i) if i % 2 else reader(Session, cluster)
                    for i in range(200)
                ]
                await asyncio.gather(*tasks)
            assert sum(cluster.in_use(n) for n in cluster.node_names) == 0

    run(main())


@pytest.mark.destructive
def test_a_read_in_flight_on_a_hung_replica_fails_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10 under asyncio: an AsyncSession's read on a replica that hangs
    fails within the bound; the next session reads elsewhere."""
    lc = fresh_replica_cluster
    port_sql = text("SELECT inet_server_port()")

    async def main() -> tuple[object, set[int]]:
        async with AsyncCluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:
            Session = async_sessionmaker(cluster)
            outcome: object = "no error"
            while outcome == "no error":
                async with Session() as session:
                    if await session.scalar(port_sql) != lc.port("replica1"):
                        continue
                    frozen("replica1")
                    try:
                        await asyncio.wait_for(session.scalar(port_sql), HUNG_BOUND + 1.0)
                    except sa.exc.OperationalError as exc:
                        outcome = exc
                    except TimeoutError:
                        outcome = "the read on the hung replica never returned"
            after = set()
            for _ in range(4):
                async with Session() as session:
                    after.add(await session.scalar(port_sql))
            return outcome, after

    outcome, after = run(main())
    assert isinstance(outcome, sa.exc.OperationalError), outcome
    assert after <= {lc.port("replica2"), lc.port("primary")}, after


def test_a_monotonic_read_never_goes_back_once_an_async_session_read_it(
    replica_cluster: LocalCluster, schema: None
) -> None:
    """Defect 9 through SQLAlchemy's asyncio sessions: the floor rises when a read is
    served, so replica2 (paused, without the row) serves no later read of the scope."""
    lc = replica_cluster
    query = text("SELECT inet_server_port(), count(*) FROM sa_notes WHERE body = 'amono'")

    async def main() -> list[tuple[int, int]]:
        async with _cluster(lc, read_your_writes=None, monotonic_reads=True) as cluster:
            Session = async_sessionmaker(cluster)
            held = None
            for _ in range(10):  # round robin: one of the first two lands on replica1
                session = Session()
                port, count = (await session.execute(query)).one()
                if port == lc.port("replica1"):
                    assert count == 1
                    held = session
                    break
                await session.close()
            assert held is not None, "no session read landed on replica1"
            later = []
            try:
                for _ in range(4):
                    async with Session() as session:
                        later.append(tuple((await session.execute(query)).one()))
            finally:
                await held.close()
            return later

    lc.pause_replay("replica2")
    try:
        lc.execute("primary", "INSERT INTO sa_notes (body) VALUES ('amono')")
        lc.wait_replicated()  # replica1 only: replica2 is paused
        later = run(main())
        assert all(count == 1 for _, count in later), f"a read went back in time: {later}"
    finally:
        lc.resume_replay("replica2")
        lc.execute("primary", "DELETE FROM sa_notes WHERE body = 'amono'")
        lc.wait_replicated()
