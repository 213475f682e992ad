"""The SQLAlchemy integration on real servers: sessions route per transaction,
commits advance the scope's token, engines borrow the cluster's connections.

Replay is paused on every replica wherever a stale read would show: a read that
must see a write then passes only if it ran on the primary (or on a replica
that provably has the write)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from helpers import FAST, HUNG_BOUND, hung_mid_flight, replay_paused, wait_until
from replica_router import Cluster, ConfigurationError
from replica_router.integrations.sqlalchemy import (
    RoutingSession,
    cluster_from_engines,
    engines,
    pool_settings,
    sessionmaker,
    use_primary,
)
from replica_router.sandbox import LocalCluster


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "sa_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


def plain_engine(dsn: str) -> Engine:
    """An ordinary SQLAlchemy engine on one node (set-up and baselines)."""
    return sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))


class Ports:
    """The server port of every statement SQLAlchemy sends, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.seen.append((cursor.connection.info.port, statement))

    def ports(self) -> list[int]:
        return [port for port, _ in self.seen]

    def of(self, fragment: str) -> list[int]:
        return [port for port, sql in self.seen if fragment in sql]


@pytest.fixture(scope="module")
def schema(replica_cluster: LocalCluster) -> Iterator[None]:
    engine = plain_engine(replica_cluster.primary_dsn)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE SEQUENCE IF NOT EXISTS sa_seq"))
    engine.dispose()
    replica_cluster.wait_replicated()
    yield
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def cluster(replica_cluster: LocalCluster, schema: None) -> Iterator[Cluster]:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
        yield cluster


@pytest.fixture
def ports() -> Iterator[Ports]:
    seen = Ports()
    event.listen(Engine, "before_cursor_execute", seen)
    yield seen
    event.remove(Engine, "before_cursor_execute", seen)


def _add(session: RoutingSession, body: str) -> Note:
    note = Note(body=body)
    session.add(note)
    return note


def test_sessionmaker_is_sqlalchemys_own(cluster: Cluster) -> None:
    factory = sessionmaker(cluster, expire_on_commit=False)
    assert isinstance(factory, sa.orm.sessionmaker)
    with factory() as session:
        assert isinstance(session, RoutingSession)
        assert session.expire_on_commit is False


def test_reads_after_flush_and_autoflush_see_the_rows(
    cluster: Cluster, replica_cluster: LocalCluster, ports: Ports
) -> None:
    lc = replica_cluster
    primary = lc.port("primary")
    with replay_paused(lc), sessionmaker(cluster)() as session:
        first = session.scalars(select(Note).where(Note.body == "nothing")).all()
        assert first == [] and ports.ports()[-1] in {lc.port(n) for n in lc.replica_names}
        note = _add(session, "flushed")
        session.flush()
        assert session.scalars(select(Note).where(Note.id == note.id)).one() is note
        _add(session, "autoflushed")  # no flush(): the query's autoflush writes it
        bodies = session.scalars(select(Note.body).where(Note.body == "autoflushed")).all()
        assert bodies == ["autoflushed"]
        assert ports.of("INSERT") == [primary, primary]
        assert ports.of("sa_notes.body =")[-1] == primary  # the reads after the write
        session.rollback()


def test_commit_advances_the_token_and_the_reload_sees_the_new_value(
    cluster: Cluster, replica_cluster: LocalCluster, ports: Ports
) -> None:
    lc = replica_cluster
    Session = sessionmaker(cluster)  # expire_on_commit=True, SQLAlchemy's default
    with sessionmaker(cluster)() as session:
        note = _add(session, "old")
        session.commit()
        note_id = note.id
    lc.wait_replicated()
    with replay_paused(lc), Session() as session:
        note = session.get(Note, note_id)
        assert note is not None and note.body == "old"
        note.body = "new"
        before = cluster.token
        session.commit()
        assert cluster.token is not None and (before is None or cluster.token.lsn > before.lsn)
        assert note.body == "new"  # the expire_on_commit reload (sqlalchemy#5650)
        assert ports.of("UPDATE") == [lc.port("primary")]
        assert ports.of("sa_notes.id =")[-1] == lc.port("primary")
        with Session() as other:  # a new session in the same scope
            assert other.get(Note, note_id).body == "new"  # type: ignore[union-attr]
            assert other.scalars(select(Note.body).where(Note.id == note_id)).one() == "new"


def test_a_child_process_with_the_token_sees_the_write(
    cluster: Cluster, replica_cluster: LocalCluster
) -> None:
    lc = replica_cluster
    with replay_paused(lc):
        with sessionmaker(cluster)() as session:
            note = _add(session, "for the child")
            session.commit()
            note_id = note.id
        token = str(cluster.token)
        child = textwrap.dedent(
            f"""
            import sys
            from sqlalchemy import text
            from replica_router import Cluster
            from replica_router.integrations.sqlalchemy import sessionmaker
            with Cluster({lc.primary_dsn!r}, {lc.replica_dsns!r}, max_lag=None) as cluster:
                with cluster.session(token=sys.argv[1]), sessionmaker(cluster)() as s:
                    q = text("SELECT body FROM sa_notes WHERE id = :id")
                    print(s.scalar(q, {{"id": {note_id}}}))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", child, token],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "for the child"


@pytest.mark.parametrize(
    "statement",
    [
        text("UPDATE sa_notes SET body = body WHERE id = -1"),
        select(Note).where(Note.id == -1).with_for_update(),
        select(func.nextval("sa_seq")),
        select(insert(Note).values(body="cte").returning(Note.id).cte("made")),
        update(Note).where(Note.id == -1).values(body="x"),
    ],
    ids=["text-update", "for-update", "nextval", "insert-cte", "orm-update"],
)
def test_writes_run_on_the_primary(
    cluster: Cluster, replica_cluster: LocalCluster, ports: Ports, statement: Any
) -> None:
    with sessionmaker(cluster)() as session:
        session.execute(statement)
        session.scalars(select(Note.id).where(Note.id == -2)).all()  # later reads stay
        assert set(ports.ports()) == {replica_cluster.port("primary")}
        session.rollback()


def test_connection_without_arguments_is_the_primary(
    cluster: Cluster, replica_cluster: LocalCluster
) -> None:
    with sessionmaker(cluster)() as session:
        port = session.connection().execute(text("SELECT inet_server_port()")).scalar()
        assert port == replica_cluster.port("primary")


def test_twenty_reads_in_a_transaction_use_one_replica_connection(
    cluster: Cluster, replica_cluster: LocalCluster, ports: Ports
) -> None:
    lc = replica_cluster
    with sessionmaker(cluster)() as session:
        pids = {session.scalar(text("SELECT pg_backend_pid()")) for _ in range(20)}
        assert len(pids) == 1
        assert len(set(ports.ports())) == 1 and ports.ports()[0] != lc.port("primary")
        assert sum(cluster.in_use(n) for n in cluster.node_names) == 1
    assert sum(cluster.in_use(n) for n in cluster.node_names) == 0


def test_an_object_loaded_from_a_replica_is_written_on_the_primary(
    cluster: Cluster, replica_cluster: LocalCluster, ports: Ports
) -> None:
    lc = replica_cluster
    with sessionmaker(cluster)() as session:
        note = _add(session, "loaded")
        session.commit()
        note_id = note.id
    lc.wait_replicated()
    ports.seen.clear()
    with cluster.session(inherit=False), sessionmaker(cluster)() as session:
        loaded = session.get(Note, note_id)
        assert loaded is not None
        assert ports.ports()[0] != lc.port("primary")  # loaded from a replica
        loaded.body = "changed"
        session.commit()
    assert ports.of("UPDATE") == [lc.port("primary")]
    assert lc.execute("primary", f"SELECT body FROM sa_notes WHERE id = {note_id}") == [
        ("changed",)
    ]


@pytest.mark.destructive
def test_lagging_and_stopped_replicas_get_no_reads(make_replica_cluster: Any) -> None:
    lc = make_replica_cluster(replicas=2)
    engine = plain_engine(lc.primary_dsn)
    Base.metadata.create_all(engine)
    engine.dispose()
    lc.wait_replicated()
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=0.5, **FAST) as cluster:
        Session = sessionmaker(cluster)
        lc.pause_replay("replica1")
        lc.execute("primary", "INSERT INTO sa_notes (body) VALUES ('lag')")
        wait_until(lambda: not _eligible(cluster, "replica1"), what="replica1 lagging")
        lc.stop("replica2", mode="immediate")
        wait_until(lambda: not _eligible(cluster, "replica2"), what="replica2 down")
        for _ in range(5):
            with cluster.session(inherit=False), Session() as session:
                port = session.scalar(text("SELECT inet_server_port()"))
                assert port == lc.port("primary")
        lc.resume_replay("replica1")


def _eligible(cluster: Cluster, node: str) -> bool:
    state = cluster.topology.by_name[node]
    return state.healthy and (state.lag_seconds or 0.0) <= 0.5


def test_use_primary_context_decorator_and_execution_option(
    cluster: Cluster, replica_cluster: LocalCluster
) -> None:
    primary = replica_cluster.port("primary")
    port = text("SELECT inet_server_port()")
    Session = sessionmaker(cluster)
    with Session() as session:
        assert session.scalar(port) != primary
    with use_primary(), Session() as session:
        assert session.scalar(port) == primary

    @use_primary()
    def read() -> Any:
        with Session() as session:
            return session.scalar(port)

    assert read() == primary
    with Session() as session:
        assert session.scalar(port, execution_options={"use_primary": True}) == primary
        assert (
            session.scalar(select(func.inet_server_port()).execution_options(use_primary=True))
            == primary
        )
        assert session.scalar(port) != primary  # only that statement


def test_an_explicit_bind_wins(replica_cluster: LocalCluster, cluster: Cluster) -> None:
    lc = replica_cluster
    engine = plain_engine(lc.replica_dsns[1])
    with engine.connect() as conn:
        with sessionmaker(cluster)(bind=conn) as session:
            assert session.scalar(text("SELECT inet_server_port()")) == lc.port("replica2")
        with RoutingSession(bind=conn) as session:  # no cluster needed then
            assert session.scalar(text("SELECT inet_server_port()")) == lc.port("replica2")
    engine.dispose()


def test_replica_engines_are_read_only(cluster: Cluster, replica_cluster: LocalCluster) -> None:
    with sessionmaker(cluster)() as session:
        session.scalar(text("SELECT 1"))  # the transaction reads from a replica
        engine = session.get_bind(clause=select(Note))
    assert isinstance(engine, Engine)
    with engine.connect() as conn, pytest.raises(sa.exc.InternalError, match="read-only"):
        conn.execute(text("INSERT INTO sa_notes (body) VALUES ('no')"))


@pytest.mark.destructive
def test_writes_follow_a_promotion_and_a_fenced_primary_runs_nothing(
    make_replica_cluster: Any,
) -> None:
    """The old primary keeps running after the promotion (split brain): the session
    that held its write connection is refused at its next statement, the write
    engine is disposed, and new sessions write to the new primary."""
    lc = make_replica_cluster(replicas=2)
    engine = plain_engine(lc.primary_dsn)
    Base.metadata.create_all(engine)
    engine.dispose()
    lc.wait_replicated()
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
        Session = sessionmaker(cluster)
        held = Session()
        _add(held, "before")
        held.flush()  # a write connection to the primary, transaction open
        assert ("primary", "write") in engines(cluster)
        lc.promote("replica1")
        wait_until(
            lambda: (
                cluster.topology.primary == "replica1"
                and cluster.topology.by_name["primary"].fenced
            ),
            what="replica1 elected, the old primary fenced",
        )
        _add(held, "after the promotion")
        with pytest.raises(sa.exc.OperationalError, match="no longer the primary"):
            held.flush()
        held.rollback()
        held.close()
        assert lc.execute("primary", "SELECT count(*) FROM sa_notes") == [(0,)]
        with Session() as session:
            note = _add(session, "on the new primary")
            session.commit()
            note_id = note.id
            assert session.connection().execute(text("SELECT inet_server_port()")).scalar() == (
                lc.port("replica1")
            )
        assert lc.execute("replica1", f"SELECT body FROM sa_notes WHERE id = {note_id}") == [
            ("on the new primary",)
        ]
        assert ("primary", "write") not in engines(cluster)
        assert ("primary", "read") not in engines(cluster)  # fenced: no reads either


def test_seed_004s_engines_become_the_clusters_pools(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster

    def url(dsn: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        user, host, port, db = info.get("user", ""), info["host"], info["port"], info["dbname"]
        return f"postgresql+psycopg://{user}@{host}:{port}/{db}"

    primary = sa.create_engine(
        url(lc.primary_dsn), pool_size=3, max_overflow=2, pool_recycle=1800, pool_pre_ping=True
    )
    replicas = [sa.create_engine(url(d), pool_size=4, max_overflow=1) for d in lc.replica_dsns]
    cluster = cluster_from_engines(primary, replicas, max_lag=None, **FAST)
    assert isinstance(cluster, Cluster)
    assert cluster._pool_kwargs["primary"]["max_size"] == 5
    assert cluster._pool_kwargs["replica"] == {
        **cluster._pool_kwargs["replica"],
        "min_size": 4,
        "max_size": 5,
        "check": None,
    }
    with cluster, sessionmaker(cluster)() as session:
        assert session.scalar(text("SELECT inet_server_port()")) in {
            lc.port(n) for n in lc.replica_names
        }
    assert primary.pool.checkedout() == 0 and primary.pool.checkedin() == 0  # type: ignore[attr-defined]


def test_pool_settings_keep_create_engines_meaning() -> None:
    assert pool_settings(pool_size=30, max_overflow=20, pool_recycle=1800, pool_pre_ping=True) == {
        "min_size": 30,
        "max_size": 50,
        "max_lifetime": 1800.0,
    }
    assert pool_settings()["check"] is None  # no pre-ping: no check per checkout
    with pytest.raises(ConfigurationError):
        pool_settings(pool_size=0)


def test_a_failed_commit_is_sqlalchemys_error_and_advances_nothing(
    cluster: Cluster, replica_cluster: LocalCluster
) -> None:
    """The COMMIT (with its position query) fails on a deferred constraint: SQLAlchemy
    wraps it as for any commit, nothing is written, and the token stays put."""
    lc = replica_cluster
    table = "sa_deferred"
    lc.execute("primary", f"DROP TABLE IF EXISTS {table}")
    lc.execute(
        "primary",
        f"CREATE TABLE {table} (id int, CONSTRAINT one UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    try:
        with sessionmaker(cluster)() as session:
            session.execute(text(f"INSERT INTO {table} VALUES (1), (1)"))  # checked at COMMIT
            with pytest.raises(sa.exc.IntegrityError, match="one"):
                session.commit()
        assert cluster.token is None
        assert lc.execute("primary", f"SELECT count(*) FROM {table}") == [(0,)]
        assert sum(cluster.in_use(n) for n in cluster.node_names) == 0
    finally:
        lc.execute("primary", f"DROP TABLE IF EXISTS {table}")


def test_streamed_results_work_on_a_replica(
    cluster: Cluster, replica_cluster: LocalCluster, ports: Ports
) -> None:
    """Read connections are autocommit, where PostgreSQL refuses DECLARE CURSOR: a
    replica buffers what ``stream_results`` / ``yield_per`` ask for instead of failing."""
    options = {"stream_results": True, "yield_per": 2}
    with sessionmaker(cluster)() as session:
        rows = session.execute(text("SELECT generate_series(1, 5)"), execution_options=options)
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert ports.ports() and ports.ports()[-1] != replica_cluster.port("primary")


@pytest.mark.destructive
def test_a_read_in_flight_on_a_hung_replica_fails_within_the_bound_then_reads_move(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10: a session's read sent to a replica that then hangs (SIGSTOP)
    fails within the bound (its connection came from the cluster's pool, so the
    monitor abandons it with the others); the next session reads elsewhere."""
    lc = fresh_replica_cluster
    port_sql = text("SELECT inet_server_port()")
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:
        Session = sessionmaker(cluster)

        def read_on_replica1(hold: Callable[[], None]) -> Any:
            while True:  # sessions until one's transaction reads on replica1
                with Session() as session:
                    if session.scalar(port_sql) == lc.port("replica1"):
                        hold()
                        return session.scalar(port_sql)  # the same node: hung now

        done, outcome = hung_mid_flight(
            read_on_replica1, lambda: frozen("replica1"), HUNG_BOUND + 1.0
        )
        assert done, "the read on the hung replica never returned"
        assert isinstance(outcome, sa.exc.OperationalError), outcome
        for _ in range(4):
            with Session() as session:
                assert session.scalar(port_sql) in (lc.port("replica2"), lc.port("primary"))


def test_a_monotonic_read_never_goes_back_once_a_session_read_it(
    replica_cluster: LocalCluster, schema: None
) -> None:
    """Defect 9 through SQLAlchemy: once a session's read saw the row on replica1, no
    later read of the scope may be served by replica2, which has not replayed it."""
    lc = replica_cluster
    with Cluster(
        lc.primary_dsn,
        lc.replica_dsns,
        max_lag=None,
        read_your_writes=None,
        monotonic_reads=True,
        **FAST,  # type: ignore[arg-type]
    ) as cluster:
        Session = sessionmaker(cluster)
        query = text("SELECT inet_server_port(), count(*) FROM sa_notes WHERE body = 'mono'")
        lc.pause_replay("replica2")
        try:
            lc.execute("primary", "INSERT INTO sa_notes (body) VALUES ('mono')")
            lc.wait_replicated()  # replica1 only: replica2 is paused
            held = None
            for _ in range(10):  # round robin: one of the first two lands on replica1
                session = Session()
                port, count = session.execute(query).one()
                if port == lc.port("replica1"):
                    assert count == 1
                    held = session
                    break
                session.close()
            assert held is not None, "no session read landed on replica1"
            try:
                later = []
                for _ in range(4):
                    with Session() as session:
                        later.append(tuple(session.execute(query).one()))
            finally:
                held.close()
            assert all(count == 1 for _, count in later), f"a read went back in time: {later}"
        finally:
            lc.resume_replay("replica2")
            lc.execute("primary", "DELETE FROM sa_notes WHERE body = 'mono'")
            lc.wait_replicated()
