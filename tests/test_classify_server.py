"""The classifier checked against real PostgreSQL: hot-standby replicas run what it calls
a read and reject the writes it guards against; volatility learned from pg_proc."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import psycopg
import pytest

from classify_corpus import CORPUS, REJECTS, RUNS, Case
from replica_router import Intent
from replica_router._builtin_functions import BUILTIN_FUNCTION_NAMES
from replica_router.classify import Classifier, _has_side_effects
from replica_router.sandbox import LocalCluster

SCHEMA = "classify_corpus"
SETUP = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
SET search_path TO {SCHEMA};
CREATE TABLE t (id int PRIMARY KEY, a int, b text);
INSERT INTO t SELECT g, g % 3, 'row ' || g FROM generate_series(1, 10) AS g;
CREATE TABLE u (id int, b int);
INSERT INTO u VALUES (1, 1), (2, 2);
CREATE TABLE queue (id int, payload text);
CREATE TABLE archive (id int, payload text);
CREATE SEQUENCE s;
CREATE VIEW v AS SELECT id, a FROM t;
CREATE MATERIALIZED VIEW mv AS SELECT id, b FROM t;
CREATE FUNCTION my_fn() RETURNS int LANGUAGE sql SET search_path FROM CURRENT
    AS 'INSERT INTO u (id) VALUES (0) RETURNING id';
CREATE PROCEDURE my_proc() LANGUAGE sql SET search_path FROM CURRENT
    AS 'INSERT INTO u (id) VALUES (0)';
"""

# Volatile built-ins of PostgreSQL 15 reviewed as free of side effects (sizes, file and
# directory listings, clocks, sleeps, handlers that SQL cannot call). A new version's
# volatile built-in fails test_every_volatile_builtin_was_reviewed until someone
# decides which list it belongs to.
REVIEWED_HARMLESS_VOLATILE = frozenset(
    """
    RI_FKey_cascade_del RI_FKey_cascade_upd RI_FKey_check_ins RI_FKey_check_upd
    RI_FKey_noaction_del RI_FKey_noaction_upd RI_FKey_restrict_del RI_FKey_restrict_upd
    RI_FKey_setdefault_del RI_FKey_setdefault_upd RI_FKey_setnull_del RI_FKey_setnull_upd
    amvalidate bernoulli brinhandler bthandler clock_timestamp current_query currtid2
    dsnowball_init dsnowball_lexize gen_random_uuid ginhandler gisthandler hashhandler
    heap_tableam_handler pg_blocking_pids pg_collation_actual_version pg_control_checkpoint
    pg_control_init pg_control_recovery pg_control_system pg_current_logfile
    pg_database_collation_actual_version pg_database_size pg_get_backend_memory_contexts
    pg_get_multixact_members pg_get_shmem_allocations pg_get_wal_replay_pause_state
    pg_get_wal_resource_managers pg_hba_file_rules pg_ident_file_mappings pg_indexes_size
    pg_is_in_recovery pg_is_wal_replay_paused pg_isolation_test_session_is_blocked
    pg_jit_available pg_last_committed_xact pg_last_wal_receive_lsn pg_last_wal_replay_lsn
    pg_last_xact_replay_timestamp pg_lock_status pg_ls_archive_statusdir pg_ls_dir
    pg_ls_logdir pg_ls_logicalmapdir pg_ls_logicalsnapdir pg_ls_replslotdir pg_ls_tmpdir
    pg_ls_waldir pg_notification_queue_usage pg_partition_ancestors pg_partition_tree
    pg_prepared_xact pg_read_binary_file pg_read_file pg_read_file_old pg_relation_size
    pg_safe_snapshot_blocking_pids pg_sequence_last_value pg_show_all_file_settings
    pg_show_replication_origin_status pg_sleep pg_sleep_for pg_sleep_until
    pg_stat_clear_snapshot pg_stat_file pg_stat_force_next_flush
    pg_stat_get_recovery_prefetch pg_stat_get_xact_blocks_fetched pg_stat_get_xact_blocks_hit
    pg_stat_get_xact_function_calls pg_stat_get_xact_function_self_time
    pg_stat_get_xact_function_total_time pg_stat_get_xact_numscans
    pg_stat_get_xact_tuples_deleted pg_stat_get_xact_tuples_fetched
    pg_stat_get_xact_tuples_hot_updated pg_stat_get_xact_tuples_inserted
    pg_stat_get_xact_tuples_returned pg_stat_get_xact_tuples_updated pg_stat_have_stats
    pg_table_size pg_tablespace_size pg_total_relation_size pg_xact_commit_timestamp
    pg_xact_commit_timestamp_origin pg_xact_status plpgsql_call_handler
    plpgsql_inline_handler plpgsql_validator random spghandler
    suppress_redundant_updates_trigger system timeofday tsvector_update_trigger
    tsvector_update_trigger_column txid_status unique_key_recheck
    """.split()  # noqa: SIM905 - a word list reads better than 110 quoted names
)


STANDBY_REFUSAL = re.compile(r"in a read-only transaction|during recovery|recovery is in progress")


@pytest.fixture(scope="module")
def corpus_cluster(replica_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The shared sandbox with the corpus's tables in their own schema, replicated."""
    with psycopg.connect(replica_cluster.primary_dsn, autocommit=True) as conn:
        conn.execute(SETUP)
    replica_cluster.wait_replicated()
    for dsn in replica_cluster.replica_dsns:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    yield replica_cluster
    with psycopg.connect(replica_cluster.primary_dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


def run(dsn: str, case: Case) -> None:
    """Execute a corpus statement on one node, rolling back whatever it did."""
    with psycopg.connect(dsn, autocommit=True, options=f"-c search_path={SCHEMA}") as conn:
        if case.autocommit:
            execute(conn, case)
        else:
            with conn.transaction(force_rollback=True):
                execute(conn, case)


def execute(conn: psycopg.Connection[tuple[object, ...]], case: Case) -> None:
    with conn.cursor() as cursor:
        if not case.copy:
            cursor.execute(case.sql, case.params)
            return
        with cursor.copy(case.sql) as copy:
            if " TO STDOUT" in case.sql:
                for _ in copy:
                    pass


def server_cases(expected: str, intent: Intent) -> list[object]:
    return [
        pytest.param(case, id=case.id)
        for case in CORPUS
        if case.server == expected and case.intent is intent
    ]


def test_every_read_in_the_corpus_is_checked_on_a_replica_or_explained() -> None:
    unchecked = {case.id for case in CORPUS if case.intent is Intent.READ and case.server != RUNS}
    # Each needs something a fresh replica session cannot have, or only errors anywhere:
    assert unchecked == {
        "pg-sleep",  # runs, but for a second
        "pct-s-in-literal-and-param",  # psycopg would substitute inside the literal too
        "pct-glued-to-keyword",
        "dollar-param",
        "fetch",
        "close",
    }
    assert not [case.id for case in CORPUS if case.intent is Intent.READ and case.server == REJECTS]


@pytest.mark.parametrize("case", server_cases(RUNS, Intent.READ))
def test_replica_runs_what_is_classified_read(corpus_cluster: LocalCluster, case: Case) -> None:
    assert Classifier().classify(case.sql) is Intent.READ
    run(corpus_cluster.replica_dsns[0], case)


@pytest.mark.parametrize("case", server_cases(REJECTS, Intent.WRITE))
def test_replica_rejects_what_is_classified_write(corpus_cluster: LocalCluster, case: Case) -> None:
    assert Classifier().classify(case.sql) is Intent.WRITE
    with pytest.raises(psycopg.Error) as raised:
        run(corpus_cluster.replica_dsns[0], case)
    # Refused for being a standby ("cannot execute INSERT in a read-only transaction",
    # "cannot execute LISTEN during recovery", ...), not for being a bad statement:
    assert STANDBY_REFUSAL.search(str(raised.value)), str(raised.value)
    run(corpus_cluster.primary_dsn, case)  # the statement itself is fine on the primary


@pytest.mark.parametrize("case", server_cases(RUNS, Intent.WRITE))
def test_conservative_writes_a_replica_would_accept(
    corpus_cluster: LocalCluster, case: Case
) -> None:
    """Session state, locks and PREPARE go to the primary although a replica accepts them:
    what they set up must be where the statements that depend on it run."""
    assert Classifier().classify(case.sql) is Intent.WRITE
    run(corpus_cluster.replica_dsns[0], case)


def test_learned_volatility_matches_what_replicas_accept(corpus_cluster: LocalCluster) -> None:
    with psycopg.connect(corpus_cluster.primary_dsn, autocommit=True) as conn:
        conn.execute(
            """
            DROP SCHEMA IF EXISTS classify_learn CASCADE;
            CREATE SCHEMA classify_learn;
            CREATE TABLE classify_learn.hits (n int);
            CREATE FUNCTION classify_learn.doubled(x int) RETURNS int
                LANGUAGE sql IMMUTABLE AS 'SELECT x * 2';
            CREATE FUNCTION classify_learn.hit_count() RETURNS bigint
                LANGUAGE sql STABLE AS 'SELECT count(*) FROM classify_learn.hits';
            CREATE FUNCTION classify_learn.record_hit() RETURNS int LANGUAGE sql VOLATILE
                AS 'INSERT INTO classify_learn.hits VALUES (1) RETURNING n';
            """
        )
    corpus_cluster.wait_replicated()
    immutable = "SELECT classify_learn.doubled(21)"
    stable = "SELECT classify_learn.hit_count()"
    volatile = "SELECT classify_learn.record_hit()"
    classifier = Classifier()
    for sql in (immutable, stable, volatile):
        assert classifier.analyze(sql).reason.startswith("calls unknown function")

    with psycopg.connect(corpus_cluster.primary_dsn) as conn:
        learned = classifier.learn_functions(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert learned >= 3
    assert classifier.classify(immutable) is Intent.READ
    assert classifier.classify(stable) is Intent.READ
    assert classifier.classify("SELECT doubled(1)") is Intent.READ  # found in any schema
    assert classifier.analyze(volatile).reason == (
        "calls volatile function classify_learn.record_hit()"
    )

    replica = corpus_cluster.replica_dsns[1]
    with psycopg.connect(replica, autocommit=True) as conn:
        assert conn.execute(immutable).fetchone() == (42,)
        assert conn.execute(stable).fetchone() == (0,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute(volatile)
    with psycopg.connect(corpus_cluster.primary_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA classify_learn CASCADE")


def test_async_learning(corpus_cluster: LocalCluster) -> None:
    async def learn() -> int:
        async with await psycopg.AsyncConnection.connect(
            corpus_cluster.primary_dsn, autocommit=True
        ) as conn:
            return await classifier.alearn_functions(conn)

    classifier = Classifier()
    assert classifier.classify(f"SELECT {SCHEMA}.my_fn()") is Intent.WRITE
    assert asyncio.run(learn()) >= 1
    # my_fn is VOLATILE (the default): now known rather than unknown, still a write.
    assert classifier.analyze(f"SELECT {SCHEMA}.my_fn()").reason == (
        f"calls volatile function {SCHEMA}.my_fn()"
    )


def test_bundled_builtin_names_match_the_server(corpus_cluster: LocalCluster) -> None:
    rows = corpus_cluster.execute(
        corpus_cluster.primary_name,
        "SELECT DISTINCT p.proname FROM pg_catalog.pg_proc AS p"
        " JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace"
        " WHERE n.nspname IN ('pg_catalog', 'information_schema')",
    )
    server_names = {name for (name,) in rows}
    assert server_names - BUILTIN_FUNCTION_NAMES == set()


def test_every_volatile_builtin_was_reviewed(corpus_cluster: LocalCluster) -> None:
    rows = corpus_cluster.execute(
        corpus_cluster.primary_name,
        "SELECT DISTINCT proname FROM pg_catalog.pg_proc"
        " WHERE pronamespace = 'pg_catalog'::regnamespace AND provolatile = 'v'",
    )
    unreviewed = {
        name
        for (name,) in rows
        if not _has_side_effects(name) and name not in REVIEWED_HARMLESS_VOLATILE
    }
    assert unreviewed == set(), "new volatile built-ins: side effects or harmless?"
