"""Peewee integration: RoutedPostgresqlDatabase on real servers (replay paused wherever
staleness would show), plus the pure routing-by-type decision without a server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peewee
import psycopg
import pytest
from playhouse.pool import MaxConnectionsExceeded
from playhouse.postgres_ext import BinaryJSONField

from helpers import (
    FAST,
    HUNG_BOUND,
    commit_record_end,
    hung_mid_flight,
    replay_paused,
    replica_ports,
    scratch_table,
    wait_until,
)
from replica_router import Cluster, PrimaryUnavailable
from replica_router.integrations.peewee import (
    CLASSIFY,
    READ,
    WRITE,
    RoutedPostgresqlDatabase,
    check_connections,
    query_route,
    still_primary,
    use_primary,
)
from replica_router.sandbox import LocalCluster
from replica_router.topology import NodeState, Role, Topology


class _Base(peewee.Model):
    name = peewee.TextField()


def _model(db: peewee.Database, table: str) -> type[peewee.Model]:
    """A model on ``table`` bound to ``db`` (its own class: models are never rebound)."""
    meta = type("Meta", (), {"database": db, "table_name": table})
    return type(f"User_{table}", (_Base,), {"Meta": meta, "__module__": __name__})


def port(db: peewee.Database) -> int:
    """The port of the server a read through ``db`` ran on (routed like a select)."""
    row = db.execute_sql("SELECT inet_server_port()").fetchone()
    return int(row[0])


@pytest.fixture
def cluster(replica_cluster: LocalCluster) -> Iterator[Cluster]:
    lc = replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as c:
        yield c


@pytest.fixture
def db(cluster: Cluster) -> Iterator[RoutedPostgresqlDatabase]:
    database = RoutedPostgresqlDatabase(cluster)
    yield database
    database.close()


@pytest.fixture
def user(replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase) -> Iterator[Any]:
    table = f"pw_{uuid.uuid4().hex[:10]}"
    model = _model(db, table)
    replica_cluster.execute("primary", f"CREATE TABLE {table} (id serial PRIMARY KEY, name text)")
    replica_cluster.wait_replicated()
    try:
        yield model
    finally:
        replica_cluster.execute("primary", f"DROP TABLE IF EXISTS {table}")


def replica_only(lc: LocalCluster, db: RoutedPostgresqlDatabase) -> None:
    """Wait until this scope's reads go to a replica (the monitor saw the table's WAL)."""
    ports = replica_ports(lc)
    wait_until(lambda: port(db) in ports, what="a read on a replica")


# -- the pure decision --------------------------------------------------------------------


def test_query_types_decide_the_route_without_a_server() -> None:
    db = peewee.PostgresqlDatabase(None)
    model = _model(db, "t")
    assert query_route(model.select()) == READ
    assert query_route(model.select() | model.select()) == READ
    assert query_route(model.select().for_update()) == WRITE
    assert query_route(model.insert(name="a")) == WRITE
    assert query_route(model.insert_many([{"name": "a"}])) == WRITE
    assert query_route(model.update(name="b")) == WRITE
    assert query_route(model.delete()) == WRITE
    assert query_route(model.raw("SELECT 1")) == CLASSIFY  # raw SQL: the classifier decides
    cte = model.insert(name="c").returning(model.id).cte("made")
    assert query_route(cte.select_from(cte.c.id)) == CLASSIFY  # a data-modifying CTE may hide
    assert query_route(peewee.SQL("SELECT 1")) == CLASSIFY


def test_a_transaction_goes_on_while_its_node_is_the_unfenced_primary() -> None:
    up = NodeState("primary", Role.PRIMARY, healthy=True)
    assert still_primary(Topology((up,), "primary"), "primary")
    suspect = NodeState("primary", Role.PRIMARY, healthy=False)  # a failed probe or two
    assert still_primary(Topology((suspect,), "primary"), "primary")  # its server answers
    fenced = NodeState("primary", Role.PRIMARY, healthy=True, fenced=True)
    new = NodeState("replica1", Role.PRIMARY, healthy=True)
    assert not still_primary(Topology((fenced, new), "replica1"), "primary")
    demoted = NodeState("primary", Role.REPLICA, healthy=True)
    assert not still_primary(Topology((demoted,), None), "primary")
    assert not still_primary(Topology((new,), "replica1"), "primary")  # removed


# -- routing ---------------------------------------------------------------------------------


def test_select_goes_to_a_replica(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    replica_only(replica_cluster, db)
    before = {s.name: s.reads for s in db.status()}
    assert user.select().count() == 0
    after = {s.name: s.reads for s in db.status()}
    assert [n for n in after if after[n] > before[n]] in (
        [n] for n in replica_cluster.replica_names
    )


def test_create_then_get_by_id_sees_the_row_a_fresh_scope_may_not(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    lc = replica_cluster
    replica_only(lc, db)
    with replay_paused(lc):
        made = user.create(name="Ada")
        assert db.token is not None  # the commit advanced this scope's token
        assert user.get_by_id(made.id).name == "Ada"  # the replicas cannot have it: primary
        assert port(db) == lc.port("primary")
        with db.session(inherit=False):  # another request: no token
            assert port(db) in replica_ports(lc)
            assert user.get_or_none(user.id == made.id) is None  # the paused replica's view


def test_an_autocommit_create_token_is_at_or_past_its_commit_record(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    """The position that comes back with an autocommit ``create()`` (in its own round
    trip) is read after the statement's commit: checked against the commit record in
    the primary's WAL (pg_walinspect), and by a fresh scope holding only that token,
    which reads on the primary while replay is paused and sees the row."""
    lc = replica_cluster
    try:
        lc.execute("primary", "CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    except Exception as exc:  # a server without the contrib modules
        pytest.skip(f"pg_walinspect is not available: {exc}")
    replica_only(lc, db)
    with replay_paused(lc):
        start = lc.execute("primary", "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        with db.session(inherit=False):
            made = user.create(name="Ada")
            token = db.token
        assert token is not None
        table = user._meta.table_name
        xid = lc.execute("primary", f"SELECT xmin::text FROM {table} WHERE id = {made.id}")[0][0]
        assert commit_record_end(lc, start, xid) <= token.lsn
        with db.session(str(token), inherit=False):  # the next request, with the token
            assert port(db) == lc.port("primary")
            assert user.get_by_id(made.id).name == "Ada"


@pytest.mark.parametrize("mode", ["lsn", "window", None])
def test_a_write_reads_its_position_only_where_read_your_writes_uses_it(
    replica_cluster: LocalCluster, mode: str | None
) -> None:
    """The position query after an autocommit write (prepared on the primary link at
    its first use) is sent only in ``lsn`` mode: elsewhere no token is made of it."""
    lc = replica_cluster
    with (
        scratch_table(lc, "pw", "id serial PRIMARY KEY, name text") as table,
        Cluster(lc.primary_dsn, lc.replica_dsns, read_your_writes=mode, **FAST) as cluster,  # type: ignore[arg-type]
    ):
        database = RoutedPostgresqlDatabase(cluster)
        model = _model(database, table)
        try:
            with database.connection_context(), cluster.session(inherit=False):
                model.create(name="a")
                model.insert(name="b").execute()
                prepared = database.connection().execute(
                    "SELECT statement FROM pg_prepared_statements"
                )
                sent = any("wal_insert_lsn" in s for (s,) in prepared)
                assert sent == (mode == "lsn")
                assert (cluster.token is not None) == (mode == "lsn")
        finally:
            database.close()


def test_replica_reads_raise_the_monotonic_floor(replica_cluster: LocalCluster) -> None:
    """With monotonic reads, a select a replica served records where that replica stood
    (``cluster.record_read``): a later read in the scope never goes to a node behind it."""
    lc = replica_cluster
    with Cluster(
        lc.primary_dsn, lc.replica_dsns, max_lag=None, monotonic_reads=True, **FAST
    ) as cluster:
        database = RoutedPostgresqlDatabase(cluster)
        try:
            with cluster.session(inherit=False) as scope:
                assert scope.mark(cluster.system_identifier).floor is None
                wait_until(lambda: port(database) in replica_ports(lc), what="a replica read")
                floor = scope.mark(cluster.system_identifier).floor
                assert floor is not None and floor > 0
        finally:
            database.close()


def test_atomic_and_nested_savepoints_keep_everything_on_the_primary(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    lc = replica_cluster
    replica_only(lc, db)
    with replay_paused(lc), db.session(inherit=False):
        with db.atomic():
            assert port(db) == lc.port("primary")
            made = user.create(name="in-tx")
            with db.atomic():  # a savepoint
                assert user.get_by_id(made.id).name == "in-tx"  # uncommitted: same node
                with db.savepoint():
                    user.update(name="deeper").where(user.id == made.id).execute()
                    assert port(db) == lc.port("primary")
            with db.transaction():  # nested transaction() is a savepoint too
                assert user.select().where(user.name == "deeper").count() == 1
        assert db.token is not None
        assert user.get_by_id(made.id).name == "deeper"


@pytest.mark.parametrize("how", ["raw_update", "execute_sql_insert", "for_update", "insert_many"])
def test_writes_and_locking_reads_run_on_the_primary(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any, how: str
) -> None:
    """Each is run in a scope with no token while replay is paused: had it gone to a
    replica, it would fail (a read-only node) or not see the row written just now."""
    lc = replica_cluster
    table = user._meta.table_name
    replica_only(lc, db)
    with replay_paused(lc):
        lc.execute("primary", f"INSERT INTO {table} (id, name) VALUES (100, 'seed')")
        with db.session(inherit=False):
            assert db.token is None
            if how == "raw_update":
                rows = list(user.raw(f"UPDATE {table} SET name = %s RETURNING *", "raw"))
                assert [(r.id, r.name) for r in rows] == [(100, "raw")]
            elif how == "execute_sql_insert":
                db.execute_sql(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (2, "sql"))
                assert lc.execute("primary", f"SELECT name FROM {table} WHERE id = 2") == [("sql",)]
            elif how == "for_update":
                rows = list(user.select().where(user.id == 100).for_update())
                assert [r.name for r in rows] == ["seed"]  # only the primary has it
            else:
                user.insert_many([{"name": "m1"}, {"name": "m2"}]).execute()
                assert lc.execute("primary", f"SELECT count(*) FROM {table}") == [(3,)]
            assert db.token is not None  # the write's commit advanced the token
            assert port(db) == lc.port("primary")  # ... so this scope now reads the primary


def test_use_primary_module_and_database(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    lc = replica_cluster
    replica_only(lc, db)
    with use_primary():
        assert port(db) == lc.port("primary")
        assert user.select().count() == 0
    with db.use_primary():
        assert port(db) == lc.port("primary")
    other = RoutedPostgresqlDatabase(db.cluster)
    try:
        with other.use_primary():  # another database's block does not move this one
            assert port(db) in replica_ports(lc)
    finally:
        other.close()
    assert port(db) in replica_ports(lc)


def test_a_select_that_writes_is_refused_by_the_replica_and_runs_on_the_primary(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    lc = replica_cluster
    seq = f"{user._meta.table_name}_id_seq"
    replica_only(lc, db)
    assert db.token is None
    # A Select by its type; nextval() writes, which the read-only replica refuses.
    value = peewee.Select(columns=[peewee.fn.nextval(seq)]).bind(db).scalar()
    assert value >= 1
    assert lc.execute("primary", f"SELECT last_value FROM {seq}") == [(value,)]
    assert db.token is not None  # it committed on the primary: the token advanced


def test_peewee_errors_and_postgres_ext_fields_with_psycopg3_links(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase
) -> None:
    """Apps written for psycopg2 keep working: Peewee's exceptions and fields are
    driver-independent, and the links are psycopg 3 whatever else is installed."""
    table = f"pwj_{uuid.uuid4().hex[:10]}"
    meta = type("Meta", (), {"database": db, "table_name": table})
    doc = type(
        "Doc",
        (peewee.Model,),
        {
            "Meta": meta,
            "key": peewee.TextField(unique=True),
            "data": BinaryJSONField(),
            "__module__": __name__,
        },
    )
    assert isinstance(db._adapter, peewee.Psycopg3Adapter)
    db.create_tables([doc])
    try:
        doc.create(key="a", data={"tags": ["x", "y"]})
        with pytest.raises(peewee.IntegrityError):
            doc.create(key="a", data={})
        with db.atomic():
            assert doc.get(doc.key == "a").data == {"tags": ["x", "y"]}
        assert isinstance(db.connection(), psycopg.Connection)
    finally:
        db.drop_tables([doc])


# -- state per unit of work ----------------------------------------------------------------


def test_eight_threads_see_their_own_writes_and_nothing_else(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    """Threads 0-3 write and read back with replay paused (the primary must serve
    them); threads 4-7 only read and must stay on replicas throughout. Each thread's
    ``connection_context()`` is a unit of work of its own: outside it, threads share
    the process's root scope."""
    lc = replica_cluster
    replica_only(lc, db)
    barrier = threading.Barrier(8)
    results: dict[int, Any] = {}
    ports = replica_ports(lc)

    def work(i: int) -> None:
        try:
            seen: list[tuple[str, int]] = []
            with db.connection_context():
                for round_ in range(5):
                    barrier.wait(timeout=30)
                    if i < 4:
                        made = user.create(name=f"t{i}-{round_}")
                        got = user.get_by_id(made.id)
                        seen.append((got.name, port(db)))
                    else:
                        user.select().where(user.name == "none").count()
                        seen.append(("", port(db)))
                results[i] = (seen, db.token)
        except BaseException as exc:  # reported by the main thread
            results[i] = exc

    with replay_paused(lc):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for i in range(8):
        result = results[i]
        assert not isinstance(result, BaseException), result
        seen, token = result
        if i < 4:
            assert [name for name, _ in seen] == [f"t{i}-{r}" for r in range(5)]
            assert {p for _, p in seen} == {lc.port("primary")}
            assert token is not None
        else:
            assert {p for _, p in seen} <= ports, f"thread {i} read from the primary"
            assert token is None  # nobody else's write leaked into its scope
    db.close()
    assert all(db.cluster.in_use(n) == 0 for n in lc.node_names)


def test_a_connection_contexts_writes_reach_its_to_thread_and_the_code_after_it(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    """The unit of work of ``connection_context()`` is one scope object: a write in
    ``asyncio.to_thread`` inside it is read back in the block, and after the block the
    enclosing (root) scope still reads it (replay paused: only the primary has it)."""
    lc = replica_cluster
    replica_only(lc, db)

    async def main() -> tuple[int, int]:
        with db.connection_context():
            made = await asyncio.to_thread(user.create, name="in-a-thread")
            assert user.get_by_id(made.id).name == "in-a-thread"
            inside = port(db)
        return made.id, inside

    with replay_paused(lc):
        made_id, inside = asyncio.run(main())
        assert inside == lc.port("primary")
        with db.connection_context():
            pass  # another unit of work starts without it
        assert user.get_by_id(made_id).name == "in-a-thread"  # the root has its position


def test_asyncio_tasks_and_copied_contexts_never_share_links(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    lc = replica_cluster
    replica_only(lc, db)
    assert not db.is_closed()
    parent_conn = db.connection()  # the parent holds a primary link

    def in_copy() -> tuple[bool, Any]:
        closed = db.is_closed()
        with db.connection_context():
            return closed, db.connection()

    async def child() -> tuple[bool, Any]:
        return in_copy()

    async def main() -> list[tuple[bool, Any]]:
        return list(await asyncio.gather(child(), asyncio.to_thread(in_copy)))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_pool = pool.submit(contextvars.copy_context().run, in_copy).result()
    for closed, conn in [*asyncio.run(main()), in_pool]:
        assert closed  # the copy did not inherit the open scope...
        assert conn is not parent_conn  # ...nor its connection
    assert db.connection() is parent_conn


_GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import json, sys, uuid
import gevent, peewee
from replica_router import Cluster, PrimaryUnavailable
from replica_router.integrations.peewee import RoutedPostgresqlDatabase

primary, replicas, table = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
with Cluster(primary, replicas, max_lag=None, monitor_interval=0.1) as cluster:
    db = RoutedPostgresqlDatabase(cluster)
    class User(peewee.Model):
        name = peewee.TextField()
        class Meta:
            database = db
            table_name = table

    def work(i):  # each greenlet's connection_context() a unit of work of its own
        seen = []
        with db.connection_context():
            for r in range(5):
                gevent.sleep(0)  # let the other greenlets interleave
                if i % 2 == 0:
                    made = User.create(name="g%d-%d" % (i, r))
                    gevent.sleep(0)
                    got = User.get_by_id(made.id).name
                else:
                    got = None
                    User.select().count()
                port = db.execute_sql("SELECT inet_server_port()").fetchone()[0]
                seen.append([got, port])
            token = str(db.token) if db.token else None
        return {"seen": seen, "token": token}

    jobs = [gevent.spawn(work, i) for i in range(8)]
    gevent.joinall(jobs, raise_error=True)
    print(json.dumps([j.value for j in jobs]))
"""


@pytest.mark.slow
def test_gevent_greenlets_see_their_own_writes_and_nothing_else(
    replica_cluster: LocalCluster, user: Any, tmp_path: Path
) -> None:
    lc = replica_cluster
    script = tmp_path / "gevent_app.py"
    script.write_text(_GEVENT_SCRIPT)
    table = user._meta.table_name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with replay_paused(lc):
        done = subprocess.run(
            [sys.executable, str(script), lc.primary_dsn, ",".join(lc.replica_dsns), table],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for i, result in enumerate(results):
        ports = {p for _, p in result["seen"]}
        if i % 2 == 0:
            assert [g for g, _ in result["seen"]] == [f"g{i}-{r}" for r in range(5)]
            assert ports == {lc.port("primary")}
            assert result["token"] is not None
        else:
            assert ports <= replica_ports(lc), f"greenlet {i} read from the primary"
            assert result["token"] is None


# -- links and pools -------------------------------------------------------------------------


def test_close_and_connection_context_return_both_links(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    lc = replica_cluster
    cluster = db.cluster
    replica_only(lc, db)
    db.close()
    assert sum(cluster.in_use(n) for n in lc.node_names) == 0
    with db.connection_context():
        user.create(name="x")  # the primary link
        with db.session(inherit=False):
            replica_node = next(n for n in lc.replica_names if port(db) == lc.port(n))
        assert cluster.in_use("primary") == 1
        assert cluster.in_use(replica_node) == 1
    assert db.is_closed()
    assert sum(cluster.in_use(n) for n in lc.node_names) == 0
    db.connect()
    user.select().count()
    user.create(name="y")
    assert sum(cluster.in_use(n) for n in lc.node_names) == 2
    assert db.close() is True
    assert sum(cluster.in_use(n) for n in lc.node_names) == 0
    with pytest.raises(peewee.OperationalError), db.atomic():
        db.close()  # not while a transaction is open, as in Peewee


def test_max_connections_and_timeout_mean_what_playhouse_pool_says(
    replica_cluster: LocalCluster, cluster: Cluster
) -> None:
    db = RoutedPostgresqlDatabase(cluster, max_connections=1, timeout=None)
    waiting = RoutedPostgresqlDatabase(cluster, max_connections=1, timeout=0.3)
    try:
        db.connection()  # this thread holds the one primary link allowed
        waiting.connection()
        errors: list[BaseException] = []

        def other(database: RoutedPostgresqlDatabase) -> None:
            try:
                database.connection()
            except BaseException as exc:
                errors.append(exc)
            finally:
                database.close()

        for database in (db, waiting):
            t = threading.Thread(target=other, args=(database,))
            t.start()
            t.join(10)
        assert [type(e) for e in errors] == [MaxConnectionsExceeded, MaxConnectionsExceeded]
        db.close()
        t = threading.Thread(target=other, args=(db,))  # the link is free again
        t.start()
        t.join(10)
        assert len(errors) == 2
    finally:
        db.close()
        waiting.close()


def test_stale_timeout_replaces_old_connections(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    one = {"min_size": 1, "max_size": 1}
    with Cluster(lc.primary_dsn, [], pool_kwargs={"primary": one}, **FAST) as cluster:
        fresh = RoutedPostgresqlDatabase(cluster, stale_timeout=0.5)
        kept = RoutedPostgresqlDatabase(cluster)

        def backend(database: RoutedPostgresqlDatabase) -> int:
            with database.connection_context():
                return int(database.connection().info.backend_pid)

        first = backend(kept)
        assert backend(kept) == first  # one pooled connection, reused
        old = backend(fresh)
        wait_until(lambda: backend(fresh) != old, what="a new connection past stale_timeout")


def test_add_and_remove_replicas_at_run_time(replica_cluster: LocalCluster) -> None:
    lc = replica_cluster
    first, second = lc.replica_names
    with Cluster(lc.primary_dsn, {first: lc.dsn(first)}, max_lag=None, **FAST) as cluster:
        db = RoutedPostgresqlDatabase(cluster)
        try:
            assert set(db.check_connections()) == {"primary", first}
            assert port(db) == lc.port(first)
            assert db.add_replica(lc.dsn(second), name=second) == second
            assert check_connections(db) == {"primary": True, first: True, second: True}
            assert check_connections(cluster) == check_connections(db)

            def reaches_second() -> bool:
                with db.session(inherit=False):
                    return db.cluster.route_read() == second

            wait_until(reaches_second, what="reads routed to the added replica")
            assert port(db) == lc.port(first)  # the held link stays while it qualifies
            db.remove_replica(first)
            assert port(db) == lc.port(second)  # moved, no error
            assert set(db.check_connections()) == {"primary", second}
            assert [s.name for s in db.status()] == ["primary", second]
        finally:
            db.close()
        assert cluster.in_use(first) == 0 and cluster.in_use(second) == 0


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.destructive
def test_after_a_replica_restart_no_stale_socket_error_reaches_the_caller(
    make_replica_cluster: Any,
) -> None:
    lc = make_replica_cluster(replicas=1)
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
        db = RoutedPostgresqlDatabase(cluster)
        with db.connection_context():
            wait_until(lambda: port(db) == lc.port("replica1"), what="a read on the replica")
            lc.stop("replica1", mode="immediate")
            lc.start("replica1")
            for _ in range(5):  # the held link and the pool's idle ones are all dead
                assert port(db) in {lc.port("replica1"), lc.port("primary")}
            wait_until(lambda: port(db) == lc.port("replica1"), what="reads back on replica1")
        assert cluster.in_use("replica1") == 0


@pytest.mark.slow
@pytest.mark.destructive
def test_a_held_link_to_a_demoted_primary_never_runs_another_statement(
    make_replica_cluster: Any,
) -> None:
    lc = make_replica_cluster(replicas=1)
    table = "pw_fence"
    lc.execute("primary", f"CREATE TABLE {table} (id serial PRIMARY KEY, name text)")
    lc.wait_replicated()
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None, **FAST) as cluster:
        db = RoutedPostgresqlDatabase(cluster)
        user = _model(db, table)
        with db.connection_context():
            user.create(name="before")  # holds a link to the old primary
            lc.wait_replicated()
            failed = pytest.raises(peewee.OperationalError, match="no longer the primary")
            with failed, db.atomic():
                user.create(name="lost")
                lc.promote("replica1")  # the old primary keeps running: split brain
                wait_until(lambda: cluster.topology.primary == "replica1", what="follow")
            user.create(name="after")  # outside a transaction: the new primary
        old = lc.execute("primary", f"SELECT name FROM {table} ORDER BY id")
        new = lc.execute("replica1", f"SELECT name FROM {table} ORDER BY id")
        assert old == [("before",)]  # nothing committed on the demoted node
        assert new == [("before",), ("after",)]


def test_the_example_app_reads_its_own_writes_across_requests(
    replica_cluster: LocalCluster, cluster: Cluster
) -> None:
    from examples.peewee_app.app import SCHEMA, create_app

    lc = replica_cluster
    lc.execute("primary", SCHEMA)
    lc.wait_replicated()
    app = create_app(cluster)
    client, stranger = app.test_client(), app.test_client()
    with replay_paused(lc):
        made = client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
        assert made.status_code == 201
        path = f"/users/{made.get_json()['id']}"
        assert client.get(path).get_json()["name"] == "Ada"  # the cookie's token: primary
        assert stranger.get(path).status_code == 404  # no token: the paused replica
        renamed = client.post(f"{path}/rename", json={"name": "Ada L."})
        assert renamed.get_json()["name"] == "Ada L."
    assert client.get("/health").get_json() == {"primary": True, "replica1": True, "replica2": True}
    assert sum(cluster.in_use(n) for n in lc.node_names) == 0  # every request closed its links


def test_a_primary_link_the_server_hung_up_on_is_replaced_before_a_write(
    replica_cluster: LocalCluster, db: RoutedPostgresqlDatabase, user: Any
) -> None:
    """A backend terminated (a restart, an idle timeout) while the link sat idle: the
    next write goes out on a fresh connection instead of failing on the dead one."""
    lc = replica_cluster
    with db.connection_context():
        user.create(name="first")
        pid = db.connection().info.backend_pid
        lc.execute("primary", "SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(
            lambda: (
                not lc.execute("primary", "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
            ),
            what="the backend gone",
        )
        user.create(name="second")  # no error reaches the caller
        assert db.connection().info.backend_pid != pid
        with db.atomic():  # the transaction runs on the new link too
            assert user.select().count() == 2


def test_without_a_primary_reads_go_on_and_writes_fail_as_peewee_errors(
    replica_cluster: LocalCluster,
) -> None:
    lc = replica_cluster
    gone = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1
    with Cluster(gone, [lc.replica_dsns[0]], max_lag=None, connect_timeout=1, **FAST) as cluster:
        db = RoutedPostgresqlDatabase(cluster)
        try:
            assert port(db) == lc.port(lc.replica_names[0])  # reads keep working
            with pytest.raises(peewee.OperationalError) as caught:
                db.execute_sql("CREATE TEMP TABLE nowhere (a int)")
            assert isinstance(caught.value.__cause__, PrimaryUnavailable)
            with pytest.raises(peewee.OperationalError), db.atomic():
                pass  # BEGIN needs the primary too
            assert db.check_connections() == {"primary": False, "replica1": True}
        finally:
            db.close()


@pytest.mark.destructive
def test_a_read_in_flight_on_a_hung_replica_moves_on_within_the_bound(
    fresh_replica_cluster: LocalCluster, frozen: Callable[[str], None]
) -> None:
    """Design rule 10: a select sent on the held link to a replica that then hangs
    (SIGSTOP) does not wait for it: the monitor abandons the link (it came from the
    cluster's pool) and the read runs again on another node, within the bound."""
    lc = fresh_replica_cluster
    with Cluster(lc.primary_dsn, lc.replica_dsns, max_lag=None) as cluster:
        db = RoutedPostgresqlDatabase(cluster)

        def read_on_replica1(hold: Callable[[], None]) -> Any:
            with db.connection_context():
                wait_until(lambda: port(db) == lc.port("replica1"), what="a read on replica1")
                hold()
                return port(db)  # the held link: replica1, hung now

        done, outcome = hung_mid_flight(
            read_on_replica1, lambda: frozen("replica1"), HUNG_BOUND + 1.0
        )
        assert done, "the read on the hung replica never returned"
        assert outcome in (lc.port("replica2"), lc.port("primary")), outcome
        db.close()
