"""SQL text -> ``Intent.READ`` or ``Intent.WRITE``, decided by PostgreSQL's own parser.

Routers that look at the first keyword send ``WITH d AS (DELETE ...) SELECT``,
``SELECT nextval('s')``, ``SELECT ... FOR UPDATE`` and ``/* SELECT */ DELETE`` to a
replica. We parse with pglast (libpg_query: the server's grammar) and walk the whole
tree. The rule is one-sided on purpose: a statement is a read only when we can show it
is one; anything else, including what does not parse, is a write. A read sent to the
primary costs a little load; a write sent to a replica is an error, or a session effect
(a sequence value, an advisory lock) taken on the wrong node.

Results are cached by SQL text in a bounded LRU whose key also holds the rule snapshot,
so learning function volatility (``Classifier.learn_functions``) can never serve an
answer computed under the old rules. The routing rules are documented in
``docs/routing-rules.md``.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from pglast import parser as _pg_parser

from ._builtin_functions import BUILTIN_FUNCTION_NAMES
from .errors import ConfigurationError

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "Classifier",
    "Intent",
    "SessionEffect",
    "Statement",
    "TransactionControl",
    "classify",
]

logger = logging.getLogger("replica_router.classify")


class Intent(enum.Enum):
    """Where a statement may run: ``READ`` on any replica, ``WRITE`` on the primary only."""

    READ = "read"
    WRITE = "write"


TransactionControl = Literal[
    "begin",
    "begin_read_only",
    "begin_serializable",
    "commit",
    "commit_and_chain",
    "rollback",
    "rollback_and_chain",
    "savepoint",
    "release",
    "rollback_to",
    "prepare_transaction",
    "commit_prepared",
    "rollback_prepared",
    "set_read_only",
    "set_read_write",
    "set_serializable",
]
"""What a transaction-control statement does to the connection's transaction."""

SessionEffect = Literal[
    "set", "temp_table", "listen", "advisory_lock", "prepare", "discard", "cursor", "load"
]
"""Session state a statement leaves behind, which a later statement may depend on."""


@dataclass(frozen=True, slots=True)
class Statement:
    """Everything a router needs to know about one SQL string (possibly several statements).

    ``transaction`` is the last transaction-control statement in the string (its net
    effect on the connection); ``session`` is the union of the session state every
    statement leaves behind.
    """

    intent: Intent
    reason: str
    transaction: TransactionControl | None = None
    session: frozenset[SessionEffect] = frozenset()
    statements: int = 1


# SQL longer than this is not cached: it is almost always a one-off (a bulk INSERT with
# inline values), and the cache must not pin megabytes of text.
_LONGEST_CACHED_SQL: Final = 8192
_DEFAULT_CACHE_SIZE: Final = 4096

# --- psycopg placeholders -----------------------------------------------------------------

# One alternation, scanned left to right: a literal, quoted identifier or comment is
# consumed whole (and kept), so a "%s" inside it is never taken for a placeholder. The
# lookahead lets the regex engine skip every other character quickly (5x faster).
_PLACEHOLDER_SCAN: Final = re.compile(
    r"""
    (?=[-'"$/%]|[eE]')
    (?:
      (?<![\w$])[eE]'(?:[^'\\]|\\.|'')*'           # E'...' string: backslash escapes
    | '(?:[^']|'')*'                                # '...' (also B'', X'', U&'', N'')
    | "(?:[^"]|"")*"                                # quoted identifier
    | (?<![\w$])\$(?P<tag>(?:[^\W\d]\w*)?)\$.*?\$(?P=tag)\$   # dollar quoting
    | --[^\n]*                                      # line comment
    | /\*.*?\*/                                     # block comment
    | %%                                            # psycopg's escaped percent sign
    | %(?:\((?P<name>[^)]*)\))?[sbt]                # %s %b %t %(name)s ...
    )
    """,
    re.VERBOSE | re.DOTALL,
)


def _replace_placeholders(sql: str) -> str:
    """Turn psycopg's ``%s`` / ``%(name)s`` into ``$n`` so PostgreSQL's grammar accepts them."""
    numbers: dict[str, int] = {}
    positional = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal positional
        text = match[0]
        if text[0] != "%":
            return text
        if text == "%%":
            return "%"
        name = match["name"]
        if name is None:
            positional += 1
            number = positional
        else:
            number = numbers.setdefault(name, len(numbers) + 1)
        # Spaces keep "LIMIT%s" from becoming the identifier "LIMIT$1".
        return f" ${number} "

    return _PLACEHOLDER_SCAN.sub(replace, sql)


# --- built-in functions with side effects ---------------------------------------------------

# Built-in (pg_catalog) functions that change state, take locks, run SQL given as text,
# or return something bound to the session or only valid on the primary. Every other
# built-in is a read; user-defined functions are judged by volatility (see _Rules).
_SIDE_EFFECT_FUNCTIONS: Final = frozenset(
    {
        # sequences (currval/lastval read state left by an earlier nextval)
        "nextval",
        "setval",
        "currval",
        "lastval",
        # notification, settings, random seed
        "pg_notify",
        "set_config",
        "setseed",
        # transaction ids and snapshots: assigned or exported on this node only
        "txid_current",
        "txid_current_if_assigned",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "pg_export_snapshot",
        # WAL: only meaningful (or only allowed) on the primary
        "pg_current_wal_lsn",
        "pg_current_wal_insert_lsn",
        "pg_current_wal_flush_lsn",
        "pg_walfile_name",
        "pg_walfile_name_offset",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_log_standby_snapshot",
        # large objects (the lo_ prefix is below)
        "loread",
        "lowrite",
        # server and backend control
        "pg_promote",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_rotate_logfile_old",
        "pg_log_backend_memory_contexts",
        "pg_wal_replay_pause",
        "pg_wal_replay_resume",
        # replication slots
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_replication_slot_advance",
        "pg_sync_replication_slots",
        # catalog and index maintenance
        "pg_import_system_collations",
        "pg_nextoid",
        "pg_extension_config_dump",
        "pg_stop_making_pinned_objects",
        "brin_summarize_new_values",
        "brin_summarize_range",
        "brin_desummarize_range",
        "gin_clean_pending_list",
        "pg_restore_relation_stats",
        "pg_restore_attribute_stats",
        "pg_clear_relation_stats",
        "pg_clear_attribute_stats",
        # run SQL given as a string (which may call nextval, for one)
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "ts_stat",
        "ts_rewrite",
        # results that depend on this session's earlier statements
        "pg_listening_channels",
        "pg_prepared_statement",
        "pg_cursor",
        "pg_my_temp_schema",
        # pg_stat_statements (extension functions are matched by name in any schema)
        "pg_stat_statements_reset",
    }
)
_SIDE_EFFECT_PREFIXES: Final = (
    "pg_advisory_",  # advisory locks and unlocks, session and transaction level
    "pg_try_advisory_",
    "lo_",  # large objects
    "pg_stat_reset",  # statistics resets
    "pg_replication_origin_",
    "pg_logical_",  # logical decoding and emitted messages
    "binary_upgrade_",
    "pg_file_",  # adminpack: pg_file_write, pg_file_unlink, ...
    "dblink",  # dblink, dblink_exec, dblink_connect: arbitrary SQL elsewhere
)
_SESSION_ADVISORY_LOCKS: Final = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    }
)
_CATALOG_SCHEMAS: Final = frozenset({"pg_catalog", "information_schema"})
_VOLATILITY_RANK: Final = {"i": 0, "s": 1, "v": 2}


def _has_side_effects(name: str) -> bool:
    return name in _SIDE_EFFECT_FUNCTIONS or name.startswith(_SIDE_EFFECT_PREFIXES)


def _parse_function_name(text: object, setting: str) -> tuple[str | None, str]:
    """``"f"``, ``"s.f"``, ``'"MyF"'``: SQL identifier rules (unquoted parts fold to lower case)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError(
            f"{setting}: function names must be non-empty strings, got {text!r}"
        )
    parts = []
    for raw in text.strip().split("."):
        part = raw.strip()
        if len(part) >= 2 and part[0] == part[-1] == '"':
            part = part[1:-1].replace('""', '"')
        else:
            part = part.lower()
        if not part:
            raise ConfigurationError(f"{setting}: bad function name {text!r}")
        parts.append(part)
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ConfigurationError(f"{setting}: expected 'name' or 'schema.name', got {text!r}")


@dataclass(frozen=True, slots=True)
class _NameSet:
    """Function names from a setting; an unqualified entry matches the name in any schema."""

    any_schema: frozenset[str]
    qualified: frozenset[tuple[str, str]]
    qualified_names: frozenset[str]

    @classmethod
    def parse(cls, names: Iterable[str], setting: str) -> _NameSet:
        if isinstance(names, str):
            raise ConfigurationError(f"{setting}: expected a list of function names, got a string")
        parsed = [_parse_function_name(name, setting) for name in names]
        qualified = frozenset((s, n) for s, n in parsed if s is not None)
        return cls(
            any_schema=frozenset(n for s, n in parsed if s is None),
            qualified=qualified,
            qualified_names=frozenset(n for _, n in qualified),
        )

    def matches(self, schema: str | None, name: str) -> bool:
        # An unqualified call may resolve to the configured "s.f" through search_path.
        if name in self.any_schema:
            return True
        if schema is None:
            return name in self.qualified_names
        return (schema, name) in self.qualified

    def overlap(self, other: _NameSet) -> frozenset[str]:
        mine = self.any_schema | {f"{s}.{n}" for s, n in self.qualified}
        theirs = other.any_schema | {f"{s}.{n}" for s, n in other.qualified}
        return mine & theirs


@dataclass(frozen=True, eq=False, slots=True)
class _Rules:
    """An immutable snapshot of what the classifier knows about functions.

    Compared by identity: it is part of the cache key, so a new snapshot (after
    learning from the server) never meets a result computed under an old one.
    """

    builtin_names: frozenset[str]
    # name -> {schema: most volatile provolatile among its overloads}
    learned: Mapping[str, Mapping[str, str]]
    read_only: _NameSet
    write: _NameSet

    def write_reason(self, schema: str | None, name: str) -> str | None:
        """Why calling ``schema.name()`` makes a statement a write, or None if it does not."""
        shown = name if schema is None else f"{schema}.{name}"
        if self.write.matches(schema, name):
            return f"calls {shown}() (write_functions)"
        if self.read_only.matches(schema, name):
            return None
        user = self.learned.get(name)
        if schema is None or schema in _CATALOG_SCHEMAS:
            if _has_side_effects(name):
                return f"calls {shown}()"
            if schema is not None:
                return None  # explicitly pg_catalog: a built-in without side effects
            if user is not None and "v" in user.values():
                return f"calls volatile function {shown}()"  # may resolve to the user's one
            if name in self.builtin_names or user is not None:
                return None
            return f"calls unknown function {shown}()"
        volatility = user.get(schema) if user is not None else None
        if volatility is None:
            return f"calls unknown function {shown}()"
        if volatility == "v":
            return f"calls volatile function {shown}()"
        return None


# --- the parse-tree walk ------------------------------------------------------------------

_MODIFYING: Final = {
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}
_LOCK_STRENGTHS: Final = {
    "LCS_FORKEYSHARE": "FOR KEY SHARE",
    "LCS_FORSHARE": "FOR SHARE",
    "LCS_FORNOKEYUPDATE": "FOR NO KEY UPDATE",
    "LCS_FORUPDATE": "FOR UPDATE",
}
# Keys of the parse tree that can turn a query into a write. The JSON form of the tree
# puts user text only in string values, so these keys cannot be forged by a literal.
_HAZARDS: Final = frozenset({"FuncCall", "lockingClause", "intoClause", *_MODIFYING})
_TRUE_WORDS: Final = frozenset({"true", "on", "yes", "1", "t", "y"})
_FALSE_WORDS: Final = frozenset({"false", "off", "no", "0", "f", "n"})
_CURSOR_OPT_HOLD: Final = 0x20  # PostgreSQL's CURSOR_OPT_HOLD (DECLARE ... WITH HOLD)

Node = dict[str, Any]


def _truth(value: Any) -> bool | None:
    """The boolean a constant node spells (``true``, ``'on'``, ``1``), or None if unknown."""
    if not isinstance(value, dict):
        return None
    const = value.get("A_Const")
    if const is None:
        text = value.get("String", {}).get("sval")
    elif "boolval" in const:
        return bool(const["boolval"].get("boolval", False))
    elif "ival" in const:
        return bool(const["ival"].get("ival", 0))
    else:
        text = const.get("sval", {}).get("sval")
    if isinstance(text, str):
        word = text.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _option(options: Iterable[Node], name: str) -> Node | None:
    """The DefElem option ``name`` (such as EXPLAIN's ``analyze``), if given."""
    for item in options:
        elem: Node = item.get("DefElem", {})
        if elem.get("defname") == name:
            return elem
    return None


def _option_value(option: Node) -> bool | None:
    """A bare option (``EXPLAIN (ANALYZE)``) is true; None: not a readable constant."""
    return True if "arg" not in option else _truth(option["arg"])


def _is_serializable(options: Iterable[Node]) -> bool:
    """``ISOLATION LEVEL SERIALIZABLE`` among a transaction's options: a hot standby
    refuses such a transaction, read-only or not."""
    option = _option(options, "transaction_isolation")
    arg = option.get("arg", {}) if option is not None else {}
    level = arg.get("A_Const", {}).get("sval", {}).get("sval")
    return isinstance(level, str) and level.lower() == "serializable"


def _is_temp(relation: Node | None) -> bool:
    if not relation:
        return False
    schema = relation.get("schemaname", "")
    return relation.get("relpersistence") == "t" or schema.startswith("pg_temp")


def _label(kind: str) -> str:
    """Human name of a statement kind: ``AlterTableStmt`` -> ``ALTER TABLE``."""
    known = _LABELS.get(kind)
    if known is not None:
        return known
    base = kind.removesuffix("Stmt")
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", base).upper()


_LABELS: Final = {
    "CreateStmt": "CREATE TABLE",
    "IndexStmt": "CREATE INDEX",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "AlterSeqStmt": "ALTER SEQUENCE",
    "ViewStmt": "CREATE VIEW",
    "CreateTrigStmt": "CREATE TRIGGER",
    "RuleStmt": "CREATE RULE",
    "CreatedbStmt": "CREATE DATABASE",
    "DropdbStmt": "DROP DATABASE",
    "CheckPointStmt": "CHECKPOINT",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "CreateTableAsStmt": "CREATE TABLE AS",
    "DoStmt": "DO",
    "CallStmt": "CALL",
    "DeallocateStmt": "DEALLOCATE",
    "ExecuteStmt": "EXECUTE of a prepared statement",
}


class _Scan:
    """What one statement's tree says: the first reason it is a write, its session effects."""

    __slots__ = ("rules", "session", "write_reason")

    def __init__(self, rules: _Rules) -> None:
        self.rules = rules
        self.write_reason: str | None = None
        self.session: set[SessionEffect] = set()

    def write(self, reason: str) -> None:
        if self.write_reason is None:
            self.write_reason = reason

    def result(self, read_reason: str) -> Statement:
        reason = self.write_reason
        return Statement(
            intent=Intent.READ if reason is None else Intent.WRITE,
            reason=read_reason if reason is None else reason,
            session=frozenset(self.session),
        )

    def tree(self, root: Any) -> None:
        """Visit every node below ``root`` (at any depth) for what makes a query a write."""
        stack = [root]
        pop, extend = stack.pop, stack.extend
        hazards = _HAZARDS
        while stack:
            node = pop()
            if type(node) is dict:
                if not hazards.isdisjoint(node):
                    self._hazard(node)
                extend(node.values())
            elif type(node) is list:
                extend(node)

    def _hazard(self, node: Node) -> None:
        for key in _HAZARDS.intersection(node):
            value = node[key]
            if key == "FuncCall":
                self.function(value)
            elif key == "lockingClause":
                for clause in value:
                    strength = clause.get("LockingClause", {}).get("strength", "")
                    self.write(_LOCK_STRENGTHS.get(strength, "row-locking clause"))
            elif key == "intoClause":
                self.write("SELECT INTO")
                if _is_temp(value.get("rel")):
                    self.session.add("temp_table")
            else:
                self.write(f"writable CTE ({_MODIFYING[key]})")

    def function(self, call: Node) -> None:
        names = [part["String"]["sval"] for part in call.get("funcname", ())]
        schema = names[-2] if len(names) >= 2 else None
        name = names[-1]
        reason = self.rules.write_reason(schema, name)
        if reason is None:
            return
        self.write(reason)
        if schema is not None and schema not in _CATALOG_SCHEMAS:
            return
        if name in _SESSION_ADVISORY_LOCKS:
            self.session.add("advisory_lock")
        elif name == "setseed":
            self.session.add("set")
        elif name == "set_config":
            args = call.get("args", ())
            if len(args) < 3 or _truth(args[2]) is not True:  # is_local => transaction only
                self.session.add("set")


def _query_statement(rules: _Rules, query: Node) -> Statement:
    """Analyse a statement nested in another one (EXPLAIN, DECLARE, COPY, PREPARE)."""
    ((kind, body),) = query.items()
    return _statement(rules, kind, body)


def _statement(rules: _Rules, kind: str, body: Node) -> Statement:
    """Analyse one top-level statement, given as its parse-tree node type and fields."""
    scan = _Scan(rules)
    if kind == "SelectStmt":
        scan.tree(body)
        return scan.result("SELECT")
    if kind in _MODIFYING:
        scan.write(_MODIFYING[kind])
        scan.tree(body)  # for session effects, e.g. RETURNING pg_advisory_lock(id)
        return scan.result("")
    if kind == "VariableShowStmt":
        return Statement(Intent.READ, "SHOW")
    if kind == "ExplainStmt":
        return _explain(rules, body)
    if kind in ("FetchStmt", "ClosePortalStmt"):
        # A cursor lives in a transaction (pinned to one node) or, WITH HOLD, in a
        # session pinned by its DECLARE: these go where the cursor is.
        verb = "CLOSE" if kind == "ClosePortalStmt" else "MOVE" if body.get("ismove") else "FETCH"
        return Statement(Intent.READ, f"{verb} cursor")
    if kind == "DeclareCursorStmt":
        inner = _query_statement(rules, body["query"])
        held = body.get("options", 0) & _CURSOR_OPT_HOLD
        return Statement(
            inner.intent,
            "DECLARE CURSOR" if inner.intent is Intent.READ else f"DECLARE CURSOR: {inner.reason}",
            session=(inner.session | {"cursor"}) if held else inner.session,
        )
    if kind == "CopyStmt":
        return _copy(rules, body)
    if kind == "PrepareStmt":
        inner = _query_statement(rules, body["query"])
        write = inner.intent is Intent.WRITE
        return Statement(
            inner.intent,
            f"PREPARE of a write: {inner.reason}" if write else "PREPARE of a read",
            session=inner.session | {"prepare"},
        )
    if kind == "TransactionStmt":
        return _transaction(body)
    if kind == "VariableSetStmt":
        return _set(body)
    scan.write(_label(kind))
    if kind == "VacuumStmt" and not body.get("is_vacuumcmd"):
        scan.write_reason = "ANALYZE"
    elif kind == "CreateTableAsStmt":
        if body.get("objtype") == "OBJECT_MATVIEW":
            scan.write_reason = "CREATE MATERIALIZED VIEW"
        if _is_temp(body.get("into", {}).get("rel")):
            scan.session.add("temp_table")
    elif kind in ("CreateStmt", "ViewStmt", "CreateSeqStmt"):
        if _is_temp(body.get("relation") or body.get("view") or body.get("sequence")):
            scan.session.add("temp_table")
    elif kind == "CreateFunctionStmt":
        names = [part["String"]["sval"] for part in body.get("funcname", ())]
        if len(names) >= 2 and names[-2].startswith("pg_temp"):
            scan.session.add("temp_table")
    elif kind in ("ListenStmt", "UnlistenStmt"):
        scan.session.add("listen")
    elif kind == "DeallocateStmt":
        scan.session.add("prepare")
    elif kind == "DiscardStmt":
        scan.session.add("discard")
    elif kind == "LoadStmt":
        scan.session.add("load")
    return scan.result("")


def _explain(rules: _Rules, body: Node) -> Statement:
    # ANALYZE executes the statement; an unreadable option value counts as ANALYZE.
    analyze = _option(body.get("options", ()), "analyze")
    if analyze is not None and _option_value(analyze) is not False:
        inner = _query_statement(rules, body["query"])
        return Statement(inner.intent, f"EXPLAIN ANALYZE: {inner.reason}", session=inner.session)
    if "ExecuteStmt" in body["query"]:
        return Statement(Intent.WRITE, "EXPLAIN EXECUTE of a prepared statement")
    return Statement(Intent.READ, "EXPLAIN without ANALYZE")


def _copy(rules: _Rules, body: Node) -> Statement:
    """COPY; the reasons "COPY FROM", "COPY TO" and "COPY of a write: ..." are the
    forms that use the COPY protocol (STDIN / STDOUT), see ``session.uses_copy``."""
    if body.get("is_from"):
        if body.get("is_program"):
            return Statement(Intent.WRITE, "COPY FROM PROGRAM")
        if "filename" in body:
            return Statement(Intent.WRITE, "COPY FROM a server file")
        return Statement(Intent.WRITE, "COPY FROM")
    if body.get("is_program"):
        return Statement(Intent.WRITE, "COPY TO PROGRAM")
    if "filename" in body:
        return Statement(Intent.WRITE, "COPY TO a server file")
    if "query" in body:
        inner = _query_statement(rules, body["query"])
        if inner.intent is Intent.WRITE:
            return Statement(
                Intent.WRITE, f"COPY of a write: {inner.reason}", session=inner.session
            )
    return Statement(Intent.READ, "COPY TO")


_TRANSACTION_KINDS: Final[Mapping[str, TransactionControl]] = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to",
    "TRANS_STMT_PREPARE": "prepare_transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}


def _transaction(body: Node) -> Statement:
    kind = _TRANSACTION_KINDS.get(body.get("kind", ""))
    if kind is None:
        return Statement(Intent.WRITE, "transaction control")
    options = body.get("options", ())
    read_only = _option(options, "transaction_read_only")
    if kind == "begin" and _is_serializable(options):
        kind = "begin_serializable"
    elif kind == "begin" and read_only is not None and _option_value(read_only) is True:
        kind = "begin_read_only"
    elif kind == "commit" and body.get("chain"):
        kind = "commit_and_chain"
    elif kind == "rollback" and body.get("chain"):
        kind = "rollback_and_chain"
    words = kind.replace("_", " ").upper().replace("ROLLBACK TO", "ROLLBACK TO SAVEPOINT")
    return Statement(Intent.WRITE, f"transaction control: {words}", transaction=kind)


def _set(body: Node) -> Statement:
    """SET / RESET: transaction-scoped forms leave no session state behind."""
    name = body.get("name", "")
    args = body.get("args", ())
    if name.startswith("TRANSACTION") or name == "transaction_read_only":
        if name == "transaction_read_only":  # SET transaction_read_only = on
            read_only = _truth(args[0]) if args else None
        else:  # SET TRANSACTION READ ONLY, ISOLATION LEVEL ... / SNAPSHOT ...
            option = _option(args, "transaction_read_only")
            read_only = None if option is None else _option_value(option)
        transaction: TransactionControl | None = None
        if _is_serializable(args):
            transaction = "set_serializable"
        elif read_only is not None:
            transaction = "set_read_only" if read_only else "set_read_write"
        return Statement(Intent.WRITE, "SET TRANSACTION", transaction=transaction)
    if body.get("is_local"):
        return Statement(Intent.WRITE, "SET LOCAL")
    verb = "RESET" if body.get("kind", "").startswith("VAR_RESET") else "SET"
    return Statement(Intent.WRITE, verb, session=frozenset({"set"}))


def _analyze(rules: _Rules, sql: str) -> Statement:
    """Classify ``sql`` from scratch under ``rules`` (the uncached path)."""
    if not isinstance(sql, str):
        raise TypeError(
            f"classify() needs the SQL text as str, not {type(sql).__name__}; "
            "decode bytes, and render psycopg.sql objects with .as_string(conn)"
        )
    sql = str(sql)  # pglast wants exactly str, not a subclass
    if "\0" in sql:  # libpq cannot send it and the C parser would stop there
        return Statement(Intent.WRITE, "does not parse (NUL character)", statements=0)
    text = _replace_placeholders(sql) if "%" in sql else sql
    try:
        tree = json.loads(_pg_parser.parse_sql_json(text))
    except _pg_parser.ParseError:
        return Statement(Intent.WRITE, "does not parse", statements=0)
    except RecursionError:  # json's decoder recurses; e.g. "a + b + ... " with 1,000 terms
        return Statement(Intent.WRITE, "too deeply nested to analyse", statements=0)
    raw_statements = tree.get("stmts", ())
    if not raw_statements:
        return Statement(Intent.WRITE, "empty statement", statements=0)
    try:
        results = [_query_statement(rules, raw["stmt"]) for raw in raw_statements]
    except (LookupError, TypeError, ValueError, AttributeError):
        # A parse tree shape this code does not know (another pglast version?): unknown
        # means primary. Logged without the SQL, which may carry personal data.
        logger.warning("unexpected parse tree, routing to the primary", exc_info=True)
        return Statement(Intent.WRITE, "not understood", statements=len(raw_statements))
    if len(results) == 1:
        return results[0]
    return _combine(results)


def _combine(results: list[Statement]) -> Statement:
    """One verdict for a multi-statement string: any write makes the whole string a write."""
    count = len(results)
    reason = f"{count} read statements"
    intent = Intent.READ
    transaction: TransactionControl | None = None
    session: frozenset[SessionEffect] = frozenset()
    for number, result in enumerate(results, 1):
        if result.intent is Intent.WRITE and intent is Intent.READ:
            intent = Intent.WRITE
            reason = f"statement {number} of {count}: {result.reason}"
        if result.transaction is not None:
            transaction = result.transaction
        session |= result.session
    return Statement(intent, reason, transaction, session, count)


# --- the public classifier ----------------------------------------------------------------


class Classifier:
    """Classifies SQL text, with function settings and a bounded LRU cache of results.

    ``read_only_functions`` / ``write_functions`` (as in Pgpool-II) name functions whose
    effect you know better than we do: ``"f"`` or ``"schema.f"``, with SQL identifier
    rules (unquoted names fold to lower case). They override everything else.
    ``learn_functions(conn)`` reads user functions' declared volatility from the server;
    until then a function that is not built in counts as a write.
    """

    FUNCTION_CATALOG_QUERY: Final = (
        "SELECT n.nspname, p.proname, p.provolatile::text"
        " FROM pg_catalog.pg_proc AS p"
        " JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace"
    )

    def __init__(
        self,
        *,
        read_only_functions: Iterable[str] = (),
        write_functions: Iterable[str] = (),
        cache_size: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ConfigurationError(f"cache_size must be an int >= 0, got {cache_size!r}")
        read_only = _NameSet.parse(read_only_functions, "read_only_functions")
        write = _NameSet.parse(write_functions, "write_functions")
        both = read_only.overlap(write)
        if both:
            raise ConfigurationError(
                f"functions listed in both read_only_functions and write_functions: "
                f"{', '.join(sorted(both))}"
            )
        self._rules = _Rules(BUILTIN_FUNCTION_NAMES, {}, read_only, write)
        self._cached_analyze = functools.lru_cache(maxsize=cache_size)(_analyze)

    def __repr__(self) -> str:
        info = self._cached_analyze.cache_info()
        return (
            f"<Classifier learned_functions={len(self._rules.learned)} "
            f"cached={info.currsize}/{info.maxsize}>"
        )

    def classify(self, sql: str) -> Intent:
        """``Intent.WRITE`` unless ``sql`` is provably a read."""
        if type(sql) is str and len(sql) <= _LONGEST_CACHED_SQL:
            return self._cached_analyze(self._rules, sql).intent
        return _analyze(self._rules, sql).intent

    def analyze(self, sql: str) -> Statement:
        """The full verdict: intent, reason, transaction control and session effects."""
        if type(sql) is str and len(sql) <= _LONGEST_CACHED_SQL:
            return self._cached_analyze(self._rules, sql)
        return _analyze(self._rules, sql)

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses, maximum and current size of the result cache."""
        return self._cached_analyze.cache_info()

    def learn_functions(self, conn: psycopg.Connection[Any]) -> int:
        """Read every function's volatility from ``conn`` (the primary); returns how many
        user-defined functions were learned.

        A STABLE or IMMUTABLE function becomes a read, a VOLATILE one a write. PostgreSQL
        does not check these declarations: a function wrongly declared STABLE that writes
        will be sent to a replica and fail there. List it in ``write_functions``.
        """
        from psycopg.rows import tuple_row

        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(self.FUNCTION_CATALOG_QUERY)
            return self.learn_function_catalog(cursor.fetchall())

    async def alearn_functions(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """``learn_functions`` for an ``AsyncConnection``."""
        from psycopg.rows import tuple_row

        async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(self.FUNCTION_CATALOG_QUERY)
            return self.learn_function_catalog(await cursor.fetchall())

    def learn_function_catalog(self, rows: Iterable[tuple[str, str, str]]) -> int:
        """Replace the learned functions with ``(schema, name, provolatile)`` rows, the
        result of ``FUNCTION_CATALOG_QUERY`` from any connection source."""
        builtin = set(BUILTIN_FUNCTION_NAMES)
        learned: dict[str, dict[str, str]] = {}
        for schema, name, volatility in rows:
            if volatility not in _VOLATILITY_RANK:
                raise ConfigurationError(
                    f"function {schema}.{name}: volatility must be 'i', 's' or 'v', "
                    f"got {volatility!r}"
                )
            if schema in _CATALOG_SCHEMAS:
                builtin.add(name)
                continue
            overloads = learned.setdefault(name, {})
            known = overloads.get(schema)
            if known is None or _VOLATILITY_RANK[volatility] > _VOLATILITY_RANK[known]:
                overloads[schema] = volatility
        old = self._rules
        # Swap the snapshot first: the cache is keyed on it, so clearing is only about
        # memory, and a classification racing with us can only store an unreachable entry.
        self._rules = _Rules(frozenset(builtin), learned, old.read_only, old.write)
        self._cached_analyze.cache_clear()
        count = sum(len(schemas) for schemas in learned.values())
        logger.info("learned the volatility of %d user-defined functions", count)
        return count


_default_classifier: Final = Classifier()


def classify(sql: str) -> Intent:
    """Classify ``sql`` with the default settings: ``Intent.WRITE`` unless provably a read."""
    return _default_classifier.classify(sql)
