"""Unit tests of the SQL classifier (no server): the corpus, analyze() fields, function
settings and learning, placeholders, the cache."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from classify_corpus import CORPUS, Case
from replica_router import ConfigurationError, Intent, classify
from replica_router.classify import Classifier, Statement, _replace_placeholders

R, W = Intent.READ, Intent.WRITE


def test_corpus_is_large_and_covers_both_intents() -> None:
    assert len(CORPUS) >= 80
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    assert sum(case.intent is R for case in CORPUS) >= 40
    assert sum(case.intent is W for case in CORPUS) >= 40


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CORPUS])
def test_corpus(case: Case) -> None:
    assert classify(case.sql) is case.intent
    statement = Classifier().analyze(case.sql)
    assert statement.intent is case.intent
    assert case.reason in statement.reason


def test_intent_values() -> None:
    assert Intent.READ.value == "read"
    assert Intent.WRITE.value == "write"
    assert Intent("write") is W


# --- analyze(): transaction control ----------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "transaction"),
    [
        ("BEGIN", "begin"),
        ("BEGIN ISOLATION LEVEL REPEATABLE READ", "begin"),
        ("BEGIN READ WRITE", "begin"),
        ("BEGIN READ ONLY", "begin_read_only"),
        # a hot standby refuses SERIALIZABLE, read-only or not (defect 14)
        ("begin transaction read only, isolation level serializable", "begin_serializable"),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", "begin_serializable"),
        ("START TRANSACTION", "begin"),
        (
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
            "begin_serializable",
        ),
        ("COMMIT", "commit"),
        ("END", "commit"),
        ("COMMIT AND CHAIN", "commit_and_chain"),
        ("COMMIT AND NO CHAIN", "commit"),
        ("ROLLBACK", "rollback"),
        ("ABORT", "rollback"),
        ("ROLLBACK AND CHAIN", "rollback_and_chain"),
        ("SAVEPOINT a", "savepoint"),
        ("RELEASE a", "release"),
        ("ROLLBACK TO a", "rollback_to"),
        ("PREPARE TRANSACTION 'g'", "prepare_transaction"),
        ("COMMIT PREPARED 'g'", "commit_prepared"),
        ("ROLLBACK PREPARED 'g'", "rollback_prepared"),
        ("SET TRANSACTION READ ONLY", "set_read_only"),
        ("SET TRANSACTION READ WRITE", "set_read_write"),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", "set_serializable"),
        ("SET transaction_read_only = on", "set_read_only"),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "set_serializable"),
        ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", None),
        ("SET LOCAL transaction_read_only = off", "set_read_write"),
        ("SELECT 1", None),
        ("INSERT INTO t VALUES (1)", None),
    ],
)
def test_transaction_control(sql: str, transaction: str | None) -> None:
    statement = Classifier().analyze(sql)
    assert statement.transaction == transaction
    if transaction is not None:
        assert statement.intent is W
        assert statement.session == frozenset()


def test_multi_statement_reports_last_transaction_control() -> None:
    analyze = Classifier().analyze
    assert analyze("BEGIN; INSERT INTO t VALUES (1); COMMIT").transaction == "commit"
    assert analyze("COMMIT; BEGIN READ ONLY").transaction == "begin_read_only"
    assert analyze("SELECT 1; SELECT 2").transaction is None


# --- analyze(): session effects -------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "session"),
    [
        ("SET search_path TO app", {"set"}),
        ("SET TIME ZONE 'UTC'", {"set"}),
        ("SET ROLE reporting", {"set"}),
        ("SET SESSION AUTHORIZATION DEFAULT", {"set"}),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", {"set"}),
        ("RESET search_path", {"set"}),
        ("RESET ALL", {"set"}),
        ("SET LOCAL search_path TO app", set()),
        ("SET TRANSACTION READ ONLY", set()),
        ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", set()),
        ("SELECT set_config('search_path', 'app', false)", {"set"}),
        ("SELECT set_config('search_path', 'app', 'off')", {"set"}),
        ("SELECT set_config('search_path', 'app', $1)", {"set"}),  # unknown: assume session
        ("SELECT set_config('search_path', 'app', true)", set()),
        ("SELECT set_config('search_path', 'app', 'on')", set()),
        ("SELECT setseed(0.5)", {"set"}),
        ("CREATE TEMP TABLE x (a int)", {"temp_table"}),
        ("CREATE TEMPORARY TABLE x (a int) ON COMMIT DROP", {"temp_table"}),
        ("CREATE TABLE pg_temp.x (a int)", {"temp_table"}),
        ("CREATE TEMP TABLE x AS SELECT 1", {"temp_table"}),
        ("SELECT 1 AS a INTO TEMP x", {"temp_table"}),
        ("SELECT 1 AS a INTO TEMPORARY TABLE x", {"temp_table"}),
        ("CREATE TEMP VIEW v AS SELECT 1", {"temp_table"}),
        ("CREATE TEMP SEQUENCE s", {"temp_table"}),
        ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", {"temp_table"}),
        ("CREATE TABLE x (a int)", set()),
        ("SELECT 1 AS a INTO x", set()),
        ("LISTEN chan", {"listen"}),
        ("UNLISTEN chan", {"listen"}),
        ("NOTIFY chan", set()),
        ("SELECT pg_advisory_lock(1)", {"advisory_lock"}),
        ("SELECT pg_advisory_lock_shared(1, 2)", {"advisory_lock"}),
        ("SELECT pg_try_advisory_lock(1)", {"advisory_lock"}),
        ("SELECT pg_catalog.pg_try_advisory_lock_shared(1)", {"advisory_lock"}),
        ("SELECT pg_advisory_xact_lock(1)", set()),
        ("SELECT pg_advisory_unlock(1)", set()),
        ("UPDATE jobs SET owner = 1 WHERE pg_try_advisory_lock(id)", {"advisory_lock"}),
        ("PREPARE p AS SELECT 1", {"prepare"}),
        ("PREPARE p (int) AS DELETE FROM t WHERE id = $1", {"prepare"}),
        ("DEALLOCATE p", {"prepare"}),
        ("DEALLOCATE ALL", {"prepare"}),
        ("DISCARD ALL", {"discard"}),
        ("DISCARD TEMP", {"discard"}),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", {"cursor"}),
        ("DECLARE c CURSOR FOR SELECT 1", set()),
        ("LOAD 'auto_explain'", {"load"}),
        ("SELECT 1", set()),
        ("SET search_path TO app; LISTEN chan; SELECT 1", {"set", "listen"}),
    ],
)
def test_session_effects(sql: str, session: set[str]) -> None:
    assert Classifier().analyze(sql).session == session


def test_session_statements_are_writes_except_reads_they_wrap() -> None:
    analyze = Classifier().analyze
    # Session state goes to the primary (pinning or replay is the connection's business)...
    for sql in ("SET a.b = 1", "RESET ALL", "LISTEN c", "DISCARD ALL", "DEALLOCATE ALL"):
        assert analyze(sql).intent is W, sql
    # ...but preparing or declaring a read is still a read.
    assert analyze("PREPARE p AS SELECT 1").intent is R
    assert analyze("DECLARE c CURSOR WITH HOLD FOR SELECT 1").intent is R


def test_statement_count() -> None:
    analyze = Classifier().analyze
    assert analyze("SELECT 1").statements == 1
    assert analyze("SELECT 1;").statements == 1
    assert analyze("SELECT 1; SELECT 2; ; SELECT 3").statements == 3
    assert analyze("").statements == 0
    assert analyze("not sql at all").statements == 0


def test_multi_statement_reason_names_the_first_write() -> None:
    statement = Classifier().analyze("SELECT 1; SELECT 2; DELETE FROM t; UPDATE t SET a = 1")
    assert statement.intent is W
    assert statement.reason == "statement 3 of 4: DELETE"


def test_statement_is_frozen_with_slots() -> None:
    statement = Classifier().analyze("SELECT 1")
    assert statement == Statement(Intent.READ, "SELECT")
    with pytest.raises(dataclasses.FrozenInstanceError):
        statement.intent = W  # type: ignore[misc]
    assert not hasattr(statement, "__dict__")


# --- placeholders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "rewritten"),
    [
        ("SELECT %s", "SELECT  $1 "),
        ("SELECT %s, %s", "SELECT  $1 ,  $2 "),
        ("SELECT %(a)s, %(b)s, %(a)s", "SELECT  $1 ,  $2 ,  $1 "),
        ("SELECT %b, %t", "SELECT  $1 ,  $2 "),
        ("SELECT '%s', %s", "SELECT '%s',  $1 "),
        ("SELECT 'it''s %s', %s", "SELECT 'it''s %s',  $1 "),
        ("SELECT E'\\'%s', %s", "SELECT E'\\'%s',  $1 "),
        ('SELECT "%s", %s', 'SELECT "%s",  $1 '),
        ("SELECT $$ %s $$, $tag$ %s $tag$, %s", "SELECT $$ %s $$, $tag$ %s $tag$,  $1 "),
        ("SELECT 1 -- %s\n, %s", "SELECT 1 -- %s\n,  $1 "),
        ("SELECT /* %s */ %s", "SELECT /* %s */  $1 "),
        ("SELECT 10 %% 3", "SELECT 10 % 3"),
        ("SELECT 10 % 3", "SELECT 10 % 3"),
        ("SELECT a$b$c, %s", "SELECT a$b$c,  $1 "),  # not a dollar quote: an identifier
        ("SELECT date'2020-01-01', %s", "SELECT date'2020-01-01',  $1 "),
    ],
)
def test_placeholder_rewrite(sql: str, rewritten: str) -> None:
    assert _replace_placeholders(sql) == rewritten


def test_placeholders_do_not_hide_writes() -> None:
    assert classify("UPDATE t SET a = %(a)s WHERE id = %(id)s") is W
    assert classify("SELECT * FROM t WHERE b = '%s' AND id = %s FOR SHARE") is W
    assert classify("SELECT * FROM t WHERE id = $1 FOR UPDATE") is W
    assert classify("SELECT nextval(%s)") is W


# --- functions: built-ins, settings, learning -------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_catalog.pg_notify('c', 'x')",
        "SELECT lo_import('/etc/passwd')",
        "SELECT loread(0, 1)",
        "SELECT pg_stat_reset()",
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
        "SELECT pg_logical_emit_message(true, 'p', 'x')",
        "SELECT pg_replication_origin_create('o')",
        "SELECT pg_cancel_backend(1)",
        "SELECT pg_switch_wal()",
        "SELECT pg_export_snapshot()",
        "SELECT txid_current_if_assigned()",
        "SELECT pg_current_xact_id_if_assigned()",
        "SELECT pg_try_advisory_xact_lock_shared(1)",
        "SELECT pg_advisory_unlock_all()",
        "SELECT pg_listening_channels()",
        "SELECT dblink('dbname=x', 'SELECT 1')",
        "SELECT ts_stat('SELECT v FROM docs')",
        "SELECT brin_summarize_new_values('i'::regclass)",
        "SELECT * FROM t WHERE a = (SELECT max(setval('s', 1)))",
    ],
)
def test_builtin_side_effect_functions_are_writes(sql: str) -> None:
    assert classify(sql) is W


def test_function_reasons() -> None:
    analyze = Classifier().analyze
    assert analyze("SELECT nextval('s')").reason == "calls nextval()"
    assert analyze("SELECT pg_catalog.nextval('s')").reason == "calls pg_catalog.nextval()"
    assert analyze("SELECT app.f()").reason == "calls unknown function app.f()"
    assert analyze('SELECT "Weird"()').reason == "calls unknown function Weird()"


def test_unknown_name_in_pg_catalog_is_a_read() -> None:
    # A newer server's built-in, written qualified: pg_catalog holds no user functions.
    assert classify("SELECT pg_catalog.some_future_builtin()") is R
    assert classify("SELECT some_future_builtin()") is W


def test_read_only_and_write_functions_settings() -> None:
    classifier = Classifier(
        read_only_functions=["my_fn", "reports.total", '"CamelFn"'],
        write_functions=["lower", "audit.touch"],
    )
    assert classifier.classify("SELECT my_fn()") is R
    assert classifier.classify("SELECT anywhere.my_fn()") is R
    assert classifier.classify("SELECT reports.total()") is R
    assert classifier.classify("SELECT total()") is R  # may resolve to reports.total
    assert classifier.classify("SELECT other.total()") is W
    assert classifier.classify('SELECT "CamelFn"()') is R
    assert classifier.classify("SELECT camelfn()") is W
    assert classifier.classify("SELECT lower('A')") is W
    assert classifier.analyze("SELECT lower('A')").reason == "calls lower() (write_functions)"
    assert classifier.classify("SELECT audit.touch()") is W
    assert classifier.classify("SELECT touch()") is W  # may resolve to audit.touch
    assert classifier.classify("SELECT upper('a')") is R


def test_settings_fold_case_like_sql_identifiers() -> None:
    classifier = Classifier(read_only_functions=["My_Fn", "Reports.Total"])
    assert classifier.classify("SELECT MY_FN()") is R
    assert classifier.classify("SELECT reports.total()") is R


def test_read_only_setting_overrides_builtin_side_effects() -> None:
    # The user knows better: e.g. a read-only replica role where nextval is on a proxy.
    assert (
        Classifier(read_only_functions=["set_config"]).classify("SELECT set_config('a', 'b', true)")
        is R
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"read_only_functions": "my_fn"}, "expected a list"),
        ({"read_only_functions": [""]}, "non-empty"),
        ({"write_functions": [None]}, "non-empty"),
        ({"write_functions": ["a.b.c.d"]}, "schema.name"),
        ({"write_functions": ["a..b"]}, "bad function name"),
        ({"read_only_functions": ["f"], "write_functions": ["F"]}, "both"),
        ({"read_only_functions": ["s.f"], "write_functions": ["S.f"]}, "s.f"),
        ({"cache_size": -1}, "cache_size"),
        ({"cache_size": 1.5}, "cache_size"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Classifier(**options)  # type: ignore[arg-type]


CATALOG = [
    ("pg_catalog", "lower", "i"),
    ("pg_catalog", "brand_new_builtin", "s"),
    ("public", "price_with_tax", "i"),
    ("public", "current_tenant", "s"),
    ("public", "bump_counter", "v"),
    ("app", "mixed", "i"),
    ("app", "mixed", "v"),  # an overload: the most volatile one counts
    ("public", "shadowed", "s"),
    ("audit", "shadowed", "v"),
    ("public", "lower", "v"),  # a user overload of a built-in name
]


def test_learned_volatility() -> None:
    classifier = Classifier()
    assert classifier.learn_function_catalog(CATALOG) == 7
    classify_ = classifier.classify
    assert classify_("SELECT price_with_tax(10)") is R
    assert classify_("SELECT public.price_with_tax(10)") is R
    assert classify_("SELECT * FROM t WHERE tenant = current_tenant()") is R
    assert classify_("SELECT bump_counter()") is W
    assert classifier.analyze("SELECT bump_counter()").reason == (
        "calls volatile function bump_counter()"
    )
    assert classify_("SELECT app.mixed()") is W
    assert classify_("SELECT public.shadowed()") is R
    assert classify_("SELECT audit.shadowed()") is W
    assert classify_("SELECT shadowed()") is W  # could be either: assume the volatile one
    assert classify_("SELECT other.price_with_tax()") is W  # not in that schema
    assert classify_("SELECT brand_new_builtin()") is R  # learned from pg_catalog
    assert classify_("SELECT lower('A')") is W  # may resolve to public.lower
    assert classify_("SELECT pg_catalog.lower('A')") is R
    assert classify_("SELECT nextval('s')") is W  # the side-effect table still wins


def test_settings_win_over_learned_volatility() -> None:
    classifier = Classifier(
        read_only_functions=["bump_counter"], write_functions=["current_tenant"]
    )
    classifier.learn_function_catalog(CATALOG)
    assert classifier.classify("SELECT bump_counter()") is R
    assert classifier.classify("SELECT current_tenant()") is W


def test_relearning_replaces_what_was_learned() -> None:
    classifier = Classifier()
    classifier.learn_function_catalog([("public", "f", "s")])
    assert classifier.classify("SELECT f()") is R
    classifier.learn_function_catalog([("public", "f", "v")])  # ALTER FUNCTION f VOLATILE
    assert classifier.classify("SELECT f()") is W
    classifier.learn_function_catalog([])  # DROP FUNCTION f
    assert classifier.analyze("SELECT f()").reason == "calls unknown function f()"


def test_bad_catalog_rows_are_refused() -> None:
    classifier = Classifier()
    classifier.learn_function_catalog([("public", "f", "s")])
    with pytest.raises(ConfigurationError, match="volatility"):
        classifier.learn_function_catalog([("public", "g", "x")])
    assert classifier.classify("SELECT f()") is R  # the previous snapshot is kept


# --- the cache --------------------------------------------------------------------------


def test_cache_is_bounded_and_counts_hits() -> None:
    classifier = Classifier(cache_size=3)
    for number in range(10):
        classifier.classify(f"SELECT {number}")
    assert classifier.cache_info().currsize == 3
    assert classifier.cache_info().misses == 10
    classifier.classify("SELECT 9")
    classifier.analyze("SELECT 9")
    assert classifier.cache_info().hits == 2
    assert classifier.analyze("SELECT 9") is classifier.analyze("SELECT 9")


def test_cache_can_be_disabled() -> None:
    classifier = Classifier(cache_size=0)
    assert classifier.classify("SELECT 1") is R
    assert classifier.cache_info().currsize == 0


def test_long_sql_is_not_cached() -> None:
    classifier = Classifier()
    values = ", ".join(f"({n}, 'row {n}')" for n in range(2000))
    sql = f"INSERT INTO t (id, b) VALUES {values}"
    assert len(sql) > 8192
    assert classifier.classify(sql) is W
    numbers = ", ".join(str(n) for n in range(3000))
    assert classifier.classify(f"SELECT b FROM t WHERE id IN ({numbers})") is R
    assert classifier.cache_info().currsize == 0


def test_too_deeply_nested_is_a_write() -> None:
    # Left-deep "1 + 1 + ..." nests beyond what the JSON decoder accepts: unknown -> primary.
    statement = Classifier().analyze("SELECT " + " + ".join(["1"] * 3000))
    assert statement.intent is W
    assert statement.reason == "too deeply nested to analyse"


def test_learning_invalidates_cached_results() -> None:
    classifier = Classifier()
    assert classifier.classify("SELECT price()") is W
    assert classifier.cache_info().currsize == 1
    classifier.learn_function_catalog([("public", "price", "i")])
    assert classifier.cache_info().currsize == 0
    assert classifier.classify("SELECT price()") is R


def test_concurrent_classification_while_learning() -> None:
    classifier = Classifier(cache_size=16)
    errors: list[BaseException] = []
    stop = threading.Event()

    def classify_loop() -> None:
        try:
            while not stop.is_set():
                for number in range(40):
                    intent = classifier.classify(f"SELECT nextval('s') + {number}")
                    assert intent is W
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=classify_loop, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(50):
        classifier.learn_function_catalog([("public", "f", "s")])
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"SELECT 1", None, 42])
def test_non_text_is_a_clear_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="SQL text as str"):
        classify(value)  # type: ignore[arg-type]


def test_str_subclass_is_accepted() -> None:
    class Query(str):
        pass

    assert classify(Query("SELECT 1")) is R
    assert classify(Query("DELETE FROM t")) is W


def test_repr_shows_cache_and_learning() -> None:
    classifier = Classifier(cache_size=10)
    classifier.classify("SELECT 1")
    assert repr(classifier) == "<Classifier learned_functions=0 cached=1/10>"
