"""Statements with their expected classification, shared by the unit and server tests.

Each case also says what a hot-standby replica really does with the statement, checked
by tests/test_classify_server.py against the sandbox:

* ``RUNS``: a replica executes it (inside a transaction that is rolled back);
* ``REJECTS``: a replica refuses it while the primary executes it (rolled back), so
  sending it to a replica would be a bug;
* ``None``: not run (needs session state, would fail on any node, or is harmful).

Every read must be ``RUNS`` or carry a reason for ``None``; writes marked ``RUNS`` are
where the classifier is deliberately conservative (session state, locks).

Objects the statements use (created by the server test in its own schema): tables
``t(id, a, b)``, ``u(id, b)``, ``queue(id, payload)``, ``archive(id, payload)``,
sequence ``s``, view ``v``, materialized view ``mv``, function ``my_fn()`` and
procedure ``my_proc()`` (both insert into ``u``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from replica_router import Intent

R, W = Intent.READ, Intent.WRITE
RUNS: Literal["runs"] = "runs"
REJECTS: Literal["rejects"] = "rejects"


@dataclass(frozen=True)
class Case:
    id: str
    sql: str
    intent: Intent
    reason: str = ""  # expected substring of Statement.reason
    server: Literal["runs", "rejects"] | None = None
    params: Any = None  # psycopg parameters for the server run
    autocommit: bool = False  # cannot run inside a transaction block (VACUUM)
    copy: bool = False  # run with cursor.copy()


CORPUS: list[Case] = [
    # --- plain reads ----------------------------------------------------------------
    Case("select-1", "SELECT 1", R, "SELECT", RUNS),
    Case("select-where", "SELECT * FROM t WHERE id = 1", R, "SELECT", RUNS),
    Case("mixed-case", "SeLeCt a FrOm T wHeRe Id = 1", R, "SELECT", RUNS),
    Case("leading-paren", "(SELECT 1)", R, "SELECT", RUNS),
    Case("nested-parens", "((SELECT a FROM t) UNION (SELECT b FROM u))", R, "SELECT", RUNS),
    Case("leading-whitespace", " \n\t SELECT a FROM t", R, "SELECT", RUNS),
    Case("values", "VALUES (1), (2)", R, "SELECT", RUNS),
    Case("table", "TABLE t", R, "SELECT", RUNS),
    Case("with-read", "WITH x AS (SELECT a FROM t) SELECT * FROM x", R, "SELECT", RUNS),
    Case(
        "with-recursive",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) "
        "SELECT sum(i) FROM n",
        R,
        "SELECT",
        RUNS,
    ),
    Case("union-all", "SELECT a FROM t UNION ALL SELECT b FROM u", R, "SELECT", RUNS),
    Case("subquery-in", "SELECT * FROM t WHERE a IN (SELECT b FROM u)", R, "SELECT", RUNS),
    Case("exists", "SELECT EXISTS (SELECT 1 FROM t WHERE a > 0)", R, "SELECT", RUNS),
    Case(
        "lateral",
        "SELECT * FROM t, LATERAL (SELECT b FROM u WHERE u.id = t.id) AS l",
        R,
        "SELECT",
        RUNS,
    ),
    Case("view", "SELECT * FROM v", R, "SELECT", RUNS),
    Case("materialized-view", "SELECT * FROM mv", R, "SELECT", RUNS),
    Case("tablesample", "SELECT count(*) FROM t TABLESAMPLE SYSTEM (50)", R, "SELECT", RUNS),
    Case("catalog", "SELECT relname FROM pg_class WHERE relkind = 'r' LIMIT 1", R, "", RUNS),
    Case("show", "SHOW search_path", R, "SHOW", RUNS),
    Case("show-all", "SHOW ALL", R, "SHOW", RUNS),
    Case("multi-read", "SELECT 1; SELECT 2", R, "2 read statements", RUNS),
    # --- built-in functions that are reads --------------------------------------------
    Case("now", "SELECT now()", R, "SELECT", RUNS),
    Case("pg-sleep", "SELECT pg_sleep(1)", R, "SELECT"),  # read; not run to keep tests fast
    Case("pg-sleep-short", "SELECT pg_sleep(0.01)", R, "SELECT", RUNS),
    Case(
        "builtins",
        "SELECT lower(b), length(b), coalesce(a, 0), count(*) OVER () FROM t",
        R,
        "SELECT",
        RUNS,
    ),
    Case(
        "aggregates",
        "SELECT count(*), sum(a), avg(a), max(b) FROM t GROUP BY a HAVING count(*) > 0",
        R,
        "SELECT",
        RUNS,
    ),
    Case("window", "SELECT id, row_number() OVER (ORDER BY id) FROM t", R, "SELECT", RUNS),
    Case(
        "volatile-but-harmless",
        "SELECT random(), gen_random_uuid(), clock_timestamp()",
        R,
        "SELECT",
        RUNS,
    ),
    Case("pg-catalog-qualified", "SELECT pg_catalog.lower('A'), pg_catalog.now()", R, "", RUNS),
    Case(
        "special-syntax",
        "SELECT extract(year FROM now()), trim(both ' ' from ' x '), substring('abc' from 2), "
        "position('b' in 'abc'), now() AT TIME ZONE 'UTC', overlay('abc' placing 'x' from 2)",
        R,
        "SELECT",
        RUNS,
    ),
    Case("generate-series", "SELECT * FROM generate_series(1, 3) AS g", R, "SELECT", RUNS),
    Case("json", "SELECT jsonb_build_object('a', 1) -> 'a', to_jsonb(t) FROM t", R, "", RUNS),
    Case("current-setting", "SELECT current_setting('search_path')", R, "SELECT", RUNS),
    Case("in-recovery", "SELECT pg_is_in_recovery(), inet_server_port()", R, "SELECT", RUNS),
    Case("snapshot", "SELECT pg_current_snapshot()", R, "SELECT", RUNS),
    # --- text that looks like a write but is not one ------------------------------------
    Case("keywords-in-string", "SELECT 'DELETE FROM t; UPDATE t SET a = 1' AS x", R, "", RUNS),
    Case("keywords-in-comment", "SELECT 1 /* DELETE FROM t */", R, "SELECT", RUNS),
    Case("keywords-in-line-comment", "-- UPDATE t SET a = 1\nSELECT 1", R, "SELECT", RUNS),
    Case("keywords-in-dollar-quote", "SELECT $$INSERT INTO t VALUES (1)$$", R, "", RUNS),
    Case(
        "keyword-identifiers",
        'SELECT "update", "delete" FROM (SELECT 1 AS "update", 2 AS "delete") AS x',
        R,
        "SELECT",
        RUNS,
    ),
    Case("column-named-nextval", "SELECT x.nextval FROM (SELECT 1 AS nextval) AS x", R, "", RUNS),
    # --- placeholders ------------------------------------------------------------------
    Case("pct-s", "SELECT * FROM t WHERE id = %s", R, "SELECT", RUNS, params=(1,)),
    Case(
        "pct-named",
        "SELECT * FROM t WHERE id = %(id)s AND a > %(id)s",
        R,
        "SELECT",
        RUNS,
        params={"id": 1},
    ),
    Case("pct-binary", "SELECT * FROM t WHERE id = %b", R, "SELECT", RUNS, params=(1,)),
    Case("pct-no-space", "SELECT a FROM t WHERE id=%s", R, "SELECT", RUNS, params=(1,)),
    # psycopg sends "LIMIT$1", which PostgreSQL reads as one identifier: an error on
    # every node, so classifying it is only about not crashing.
    Case("pct-glued-to-keyword", "SELECT a FROM t LIMIT%s", R, "SELECT"),
    Case("dollar-param", "SELECT * FROM t WHERE id = $1", R, "SELECT"),  # psycopg wants %s
    Case(
        "escaped-percent",
        "SELECT 10 %% 3, b FROM t WHERE b LIKE 'x%%' AND id = %s",
        R,
        "SELECT",
        RUNS,
        params=(1,),
    ),
    Case("modulo", "SELECT 10 % 3", R, "SELECT", RUNS),
    Case("pct-s-in-literal", "SELECT '%s' AS s", R, "SELECT", RUNS),
    # psycopg would substitute inside the literal too; the classifier must not care:
    Case("pct-s-in-literal-and-param", "SELECT '%s' AS s, b FROM t WHERE id = %s", R, "SELECT"),
    Case("pct-s-doubled-quote", "SELECT a FROM t WHERE b = 'it''s %s here'", R, "", RUNS),
    Case("pct-s-in-e-string", "SELECT E'\\'%s' AS s", R, "SELECT", RUNS),
    Case("pct-s-in-dollar-quote", "SELECT $q$ %s $q$", R, "SELECT", RUNS),
    Case("pct-s-in-identifier", 'SELECT 1 AS "50%s"', R, "SELECT", RUNS),
    Case("pct-s-in-comment", "SELECT 1 -- %s\n", R, "SELECT", RUNS),
    Case(
        "pct-for-update",
        "SELECT * FROM t WHERE id = %s FOR UPDATE",
        W,
        "FOR UPDATE",
        REJECTS,
        params=(1,),
    ),
    Case(
        "pct-insert",
        "INSERT INTO t (id, a) VALUES (%s, %s)",
        W,
        "INSERT",
        REJECTS,
        params=(101, 1),
    ),
    Case("named-in-literal", "INSERT INTO t (id, b) VALUES (%(id)s, '%(b)s')", W, "INSERT"),
    # --- EXPLAIN ------------------------------------------------------------------------
    Case("explain-select", "EXPLAIN SELECT * FROM t", R, "EXPLAIN", RUNS),
    Case("explain-analyze-select", "EXPLAIN ANALYZE SELECT * FROM t", R, "EXPLAIN", RUNS),
    Case(
        "explain-options-read",
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT count(*) FROM t",
        R,
        "EXPLAIN",
        RUNS,
    ),
    Case("explain-update", "EXPLAIN UPDATE t SET a = 1", R, "without ANALYZE", RUNS),
    Case("explain-nextval", "EXPLAIN SELECT nextval('s')", R, "without ANALYZE", RUNS),
    Case("explain-insert", "EXPLAIN INSERT INTO t (id) VALUES (200)", R, "without ANALYZE", RUNS),
    Case("explain-select-into", "EXPLAIN SELECT * INTO t_new FROM t", R, "without", RUNS),
    Case("explain-create-table-as", "EXPLAIN CREATE TABLE t_new AS SELECT 1", R, "without", RUNS),
    Case(
        "explain-analyze-create-table-as",
        "EXPLAIN ANALYZE CREATE TABLE t_new AS SELECT 1",
        W,
        "CREATE TABLE AS",
        REJECTS,
    ),
    Case("explain-analyze-false", "EXPLAIN (ANALYZE false) DELETE FROM t", R, "", RUNS),
    Case(
        "explain-analyze-delete",
        "EXPLAIN ANALYZE DELETE FROM t WHERE id = -1",
        W,
        "EXPLAIN ANALYZE: DELETE",
        REJECTS,
    ),
    Case(
        "explain-analyze-json-update",
        "EXPLAIN (ANALYZE, FORMAT JSON) UPDATE t SET a = a WHERE id = -1",
        W,
        "UPDATE",
        REJECTS,
    ),
    Case(
        "explain-analyze-nextval",
        "EXPLAIN ANALYZE SELECT nextval('s')",
        W,
        "nextval",
        REJECTS,
    ),
    Case("explain-execute", "EXPLAIN EXECUTE p_unknown", W, "prepared statement"),
    # --- DML ------------------------------------------------------------------------------
    Case("insert", "INSERT INTO t (id, a, b) VALUES (100, 1, 'x')", W, "INSERT", REJECTS),
    Case("insert-mixed-case", "InSeRt InTo t (id) VaLuEs (102)", W, "INSERT", REJECTS),
    Case(
        "insert-on-conflict",
        "INSERT INTO t (id) VALUES (1) ON CONFLICT (id) DO NOTHING",
        W,
        "INSERT",
        REJECTS,
    ),
    Case("update", "UPDATE t SET a = a + 1 WHERE id = 1", W, "UPDATE", REJECTS),
    Case("delete", "DELETE FROM t WHERE id = -1", W, "DELETE", REJECTS),
    Case(
        "merge",
        "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.b",
        W,
        "MERGE",
        REJECTS,
    ),
    Case("block-comment-hides", "/* SELECT */ DELETE FROM t WHERE id = -1", W, "DELETE", REJECTS),
    Case(
        "line-comment-hides",
        "-- SELECT\nUPDATE t SET a = a WHERE id = -1",
        W,
        "UPDATE",
        REJECTS,
    ),
    Case(
        "nested-comment-hides",
        "/* a /* nested SELECT */ comment */ DELETE FROM t WHERE id = -1",
        W,
        "DELETE",
        REJECTS,
    ),
    # --- writable CTEs ------------------------------------------------------------------
    Case(
        "writable-cte",
        "WITH d AS (DELETE FROM queue WHERE id = -1 RETURNING *) SELECT count(*) FROM d",
        W,
        "writable CTE (DELETE)",
        REJECTS,
    ),
    Case(
        "writable-cte-move",
        "WITH moved AS (DELETE FROM queue WHERE id = -1 RETURNING *) "
        "INSERT INTO archive SELECT * FROM moved",
        W,
        "INSERT",
        REJECTS,
    ),
    Case(
        "cte-then-insert",
        "WITH x AS (SELECT 1 AS id) INSERT INTO u (id) SELECT id FROM x",
        W,
        "INSERT",
        REJECTS,
    ),
    Case(
        "writable-cte-update",
        "WITH u2 AS (UPDATE t SET a = a WHERE id = -1 RETURNING *) SELECT * FROM u2",
        W,
        "writable CTE (UPDATE)",
        REJECTS,
    ),
    # PostgreSQL itself refuses a writable CTE below the top level (on every node), but
    # peers classified these as reads: the parser still sees them.
    Case(
        "writable-cte-in-subquery",
        "SELECT * FROM t WHERE a IN (SELECT b FROM "
        "(WITH d AS (DELETE FROM u WHERE id = -1 RETURNING b) SELECT b FROM d) AS s)",
        W,
        "writable CTE (DELETE)",
    ),
    Case(
        "writable-cte-nested-cte",
        "WITH a AS (WITH b AS (UPDATE t SET a = a WHERE id = -1 RETURNING id) "
        "SELECT id FROM b) SELECT * FROM a",
        W,
        "writable CTE (UPDATE)",
    ),
    Case(
        "writable-cte-insert-in-exists",
        "SELECT EXISTS (WITH i AS (INSERT INTO u (id) VALUES (1) RETURNING id) SELECT * FROM i)",
        W,
        "writable CTE (INSERT)",
    ),
    # --- row locks ----------------------------------------------------------------------
    Case("for-update", "SELECT * FROM t WHERE id = 1 FOR UPDATE", W, "FOR UPDATE", REJECTS),
    Case("for-no-key-update", "SELECT * FROM t FOR NO KEY UPDATE", W, "FOR NO KEY UPDATE", REJECTS),
    Case("for-share", "SELECT * FROM t FOR SHARE", W, "FOR SHARE", REJECTS),
    Case("for-key-share", "SELECT * FROM t FOR KEY SHARE SKIP LOCKED", W, "FOR KEY SHARE", REJECTS),
    Case("for-update-of-nowait", "SELECT * FROM t, u FOR UPDATE OF t NOWAIT", W, "", REJECTS),
    Case(
        "for-update-in-cte",
        "WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x",
        W,
        "",
        REJECTS,
    ),
    Case(
        "for-update-in-subquery",
        "SELECT * FROM (SELECT * FROM t FOR UPDATE) AS x",
        W,
        "FOR UPDATE",
        REJECTS,
    ),
    # PostgreSQL rejects locking clauses on set operations everywhere; still writes.
    Case("union-for-update", "SELECT a FROM t UNION SELECT b FROM u FOR UPDATE", W, "FOR UPDATE"),
    Case(
        "union-branch-for-share",
        "(SELECT a FROM t FOR SHARE) UNION ALL SELECT b FROM u",
        W,
        "FOR SHARE",
    ),
    Case("mixed-case-lock", "select * from t for No Key Update", W, "FOR NO KEY UPDATE", REJECTS),
    # --- SELECT INTO and friends --------------------------------------------------------
    Case("select-into", "SELECT * INTO t_copy FROM t", W, "SELECT INTO", REJECTS),
    Case("select-into-temp", "SELECT 1 AS x INTO TEMP tmp_x", W, "SELECT INTO", REJECTS),
    Case(
        "create-table-as", "CREATE TABLE t_copy AS SELECT * FROM t", W, "CREATE TABLE AS", REJECTS
    ),
    Case(
        "create-matview",
        "CREATE MATERIALIZED VIEW mv2 AS SELECT * FROM t",
        W,
        "CREATE MATERIALIZED VIEW",
        REJECTS,
    ),
    Case("refresh-matview", "REFRESH MATERIALIZED VIEW mv", W, "REFRESH", REJECTS),
    # --- functions with side effects ----------------------------------------------------
    Case("nextval", "SELECT nextval('s')", W, "calls nextval()", REJECTS),
    Case("nextval-qualified", "SELECT pg_catalog.nextval('s')", W, "nextval", REJECTS),
    Case("nextval-spaced-upper", "select NEXTVAL ( 's' ) as id", W, "nextval", REJECTS),
    Case("nextval-in-where", "SELECT * FROM t WHERE id = nextval('s')", W, "nextval", REJECTS),
    Case("nextval-in-values", "VALUES (nextval('s'))", W, "nextval", REJECTS),
    Case(
        "nextval-deep",
        "SELECT * FROM t WHERE id = ANY(ARRAY(SELECT coalesce(nextval('s'), 0)))",
        W,
        "nextval",
        REJECTS,
    ),
    Case("setval", "SELECT setval('s', 10)", W, "setval", REJECTS),
    Case("currval", "SELECT currval('s')", W, "currval"),  # fails without nextval anywhere
    Case("lastval", "SELECT lastval()", W, "lastval"),
    Case("txid-current", "SELECT txid_current()", W, "txid_current", REJECTS),
    Case("pg-current-xact-id", "SELECT pg_current_xact_id()", W, "pg_current_xact_id", REJECTS),
    Case("current-wal-lsn", "SELECT pg_current_wal_lsn()", W, "pg_current_wal_lsn", REJECTS),
    Case("lo-create", "SELECT lo_create(0)", W, "lo_create", REJECTS),
    Case("pg-notify", "SELECT pg_notify('chan', 'x')", W, "pg_notify", REJECTS),
    Case(
        "query-to-xml",
        "SELECT query_to_xml('SELECT nextval(''s'')', true, false, '')",
        W,
        "query_to_xml",
        REJECTS,
    ),
    Case("advisory-lock", "SELECT pg_advisory_lock(42)", W, "pg_advisory_lock", RUNS),
    Case("try-advisory-xact-lock", "SELECT pg_try_advisory_xact_lock(42)", W, "advisory", RUNS),
    Case("set-config-session", "SELECT set_config('application_name', 'x', false)", W, "", RUNS),
    Case("set-config-local", "SELECT set_config('application_name', 'x', true)", W, "", RUNS),
    Case("setseed", "SELECT setseed(0.5)", W, "setseed", RUNS),
    Case("terminate-backend", "SELECT pg_terminate_backend(0)", W, "pg_terminate_backend"),
    Case("reload-conf", "SELECT pg_reload_conf()", W, "pg_reload_conf"),
    Case("promote", "SELECT pg_promote()", W, "pg_promote"),
    Case("dblink-exec", "SELECT dblink_exec('dbname=x', 'DELETE FROM t')", W, "dblink_exec"),
    # --- user-defined functions ---------------------------------------------------------
    Case("unknown-function", "SELECT my_fn()", W, "unknown function my_fn()", REJECTS),
    Case("unknown-qualified", "SELECT public.my_fn()", W, "unknown function public.my_fn()"),
    Case("unknown-in-from", "SELECT * FROM my_fn()", W, "my_fn", REJECTS),
    Case("unknown-nested", "SELECT coalesce(my_fn()::text, lower(b)) FROM t", W, "my_fn", REJECTS),
    # --- COPY ---------------------------------------------------------------------------
    Case("copy-to-stdout", "COPY t TO STDOUT", R, "COPY TO", RUNS, copy=True),
    Case(
        "copy-query-to-stdout",
        "COPY (SELECT a FROM t) TO STDOUT WITH (FORMAT csv)",
        R,
        "COPY TO",
        RUNS,
        copy=True,
    ),
    Case("copy-from", "COPY t FROM STDIN", W, "COPY FROM", REJECTS, copy=True),
    Case(
        "copy-delete-returning",
        "COPY (DELETE FROM t WHERE id = -1 RETURNING *) TO STDOUT",
        W,
        "DELETE",
        REJECTS,
        copy=True,
    ),
    Case("copy-to-file", "COPY t TO '/tmp/rr-never-written.csv'", W, "server file"),
    Case("copy-to-program", "COPY t TO PROGRAM 'cat'", W, "PROGRAM"),
    # --- cursors and prepared statements -------------------------------------------------
    Case("declare", "DECLARE c CURSOR FOR SELECT * FROM t", R, "DECLARE", RUNS),
    Case("declare-hold", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", R, "DECLARE", RUNS),
    Case(
        "declare-for-update",
        "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
        W,
        "FOR UPDATE",
        REJECTS,
    ),
    Case("fetch", "FETCH 10 FROM c", R, "FETCH"),  # needs the cursor's session
    Case("close", "CLOSE c", R, ""),
    Case("prepare-read", "PREPARE p_read AS SELECT * FROM t", R, "PREPARE of a read", RUNS),
    # PREPARE only plans: a replica accepts it, but EXECUTE would write.
    Case("prepare-write", "PREPARE p_ins AS INSERT INTO t (id) VALUES ($1)", W, "INSERT", RUNS),
    Case("execute", "EXECUTE p_ins(1)", W, "EXECUTE"),
    Case("deallocate", "DEALLOCATE ALL", W, "DEALLOCATE", RUNS),
    # --- utility statements ---------------------------------------------------------------
    Case("lock-exclusive", "LOCK TABLE t IN ACCESS EXCLUSIVE MODE", W, "LOCK", REJECTS),
    Case("lock-share", "LOCK TABLE t IN ACCESS SHARE MODE", W, "LOCK", RUNS),
    Case("call", "CALL my_proc()", W, "CALL", REJECTS),
    Case("do", "DO $$BEGIN INSERT INTO u (id) VALUES (1); END$$", W, "DO", REJECTS),
    Case("listen", "LISTEN chan", W, "LISTEN", REJECTS),
    Case("unlisten", "UNLISTEN *", W, "UNLISTEN", RUNS),
    Case("notify", "NOTIFY chan, 'x'", W, "NOTIFY", REJECTS),
    Case("vacuum", "VACUUM t", W, "VACUUM", REJECTS, autocommit=True),
    Case("vacuum-all", "VACUUM", W, "VACUUM"),
    Case("analyze", "ANALYZE t", W, "ANALYZE", REJECTS),
    Case("analyze-all", "ANALYZE", W, "ANALYZE"),
    Case("reindex", "REINDEX TABLE t", W, "REINDEX", REJECTS),
    Case("cluster", "CLUSTER t USING t_pkey", W, "CLUSTER", REJECTS),
    Case("checkpoint", "CHECKPOINT", W, "CHECKPOINT"),
    Case("discard", "DISCARD ALL", W, "DISCARD"),
    Case("load", "LOAD 'plpgsql'", W, "LOAD"),
    Case("alter-system", "ALTER SYSTEM SET work_mem = '8MB'", W, "ALTER SYSTEM"),
    # --- DDL ------------------------------------------------------------------------------
    Case("create-table", "CREATE TABLE t2 (id int)", W, "CREATE TABLE", REJECTS),
    Case("create-temp-table", "CREATE TEMP TABLE tmp_y (a int)", W, "CREATE TABLE", REJECTS),
    Case("create-temp-view", "CREATE TEMP VIEW tmp_v AS SELECT 1", W, "CREATE VIEW", REJECTS),
    Case("alter-table", "ALTER TABLE t ADD COLUMN c int", W, "ALTER TABLE", REJECTS),
    Case("drop-table", "DROP TABLE IF EXISTS no_such_table", W, "DROP", REJECTS),
    Case("create-index", "CREATE INDEX ON t (a)", W, "CREATE INDEX", REJECTS),
    Case("truncate", "TRUNCATE t", W, "TRUNCATE", REJECTS),
    Case("grant", "GRANT SELECT ON t TO PUBLIC", W, "GRANT", REJECTS),
    Case("comment-on", "COMMENT ON TABLE t IS 'x'", W, "COMMENT", REJECTS),
    Case("create-sequence", "CREATE SEQUENCE s2", W, "CREATE SEQUENCE", REJECTS),
    Case(
        "create-function",
        "CREATE FUNCTION f2() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        W,
        "CREATE FUNCTION",
        REJECTS,
    ),
    # --- multi-statement strings ----------------------------------------------------------
    Case(
        "multi-write-last", "SELECT 1; DELETE FROM t WHERE id = -1", W, "statement 2 of 2", REJECTS
    ),
    Case("multi-write-first", "UPDATE t SET a = a WHERE id = -1; SELECT 1", W, "1 of 2", REJECTS),
    Case("multi-hidden", "SELECT 1; /* x */ ; INSERT INTO u (id) VALUES (1)", W, "INSERT", REJECTS),
    Case("multi-transaction", "BEGIN; INSERT INTO t (id) VALUES (103); COMMIT", W, "1 of 3"),
    # --- transaction control and session state -------------------------------------------
    Case("begin", "BEGIN", W, "transaction control: BEGIN"),
    Case("begin-read-only", "BEGIN READ ONLY", W, "BEGIN READ ONLY"),
    Case("start-transaction", "START TRANSACTION ISOLATION LEVEL SERIALIZABLE", W, "BEGIN"),
    Case("commit", "COMMIT", W, "COMMIT"),
    Case("end", "END", W, "COMMIT"),
    Case("rollback", "ROLLBACK", W, "ROLLBACK"),
    Case("abort", "ABORT", W, "ROLLBACK"),
    Case("savepoint", "SAVEPOINT sp", W, "SAVEPOINT"),
    Case("release", "RELEASE SAVEPOINT sp", W, "RELEASE"),
    Case("rollback-to", "ROLLBACK TO SAVEPOINT sp", W, "ROLLBACK TO SAVEPOINT"),
    Case("prepare-transaction", "PREPARE TRANSACTION 'gid'", W, "PREPARE TRANSACTION"),
    Case("commit-prepared", "COMMIT PREPARED 'gid'", W, "COMMIT PREPARED"),
    Case("set", "SET search_path TO public", W, "SET", RUNS),
    Case("set-local", "SET LOCAL statement_timeout = '5s'", W, "SET LOCAL", RUNS),
    Case("reset-all", "RESET ALL", W, "RESET", RUNS),
    Case("set-transaction-read-only", "SET TRANSACTION READ ONLY", W, "SET TRANSACTION", RUNS),
    Case(
        "set-session-characteristics",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        W,
        "SET",
        RUNS,
    ),
    # --- what does not parse ----------------------------------------------------------------
    Case("garbage", "SELEKT 1", W, "does not parse"),
    Case("garbage-words", "please route this to a replica", W, "does not parse"),
    Case("unterminated-string", "SELECT 'abc", W, "does not parse"),
    Case("empty", "", W, "empty statement"),
    Case("whitespace", "  \n ", W, "empty statement"),
    Case("comment-only", "-- SELECT 1", W, "empty statement"),
    Case("semicolons", ";;", W, "empty statement"),
    Case("nul-byte", "SELECT 1\x00; DELETE FROM t", W, "NUL"),
]
