"""A routed session's bookkeeping (``session.RoutedSession``): pure, no server.

Every driver shell (psycopg sync and asyncio, psycopg2) keeps its state here, so
these rules hold for all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from replica_router.classify import Classifier
from replica_router.session import (
    MAX_RECORDED_SETTINGS,
    REPLAY_SETTINGS_SQL,
    TX_IDLE,
    TX_INERROR,
    TX_INTRANS,
    Link,
    RoutedSession,
    commit_possible,
    pipelines_position,
)
from replica_router.topology import NodeState, Role, Topology


@dataclass
class _Lease:
    node: str
    conn: Any = None


@dataclass
class _Monitor:
    suspects: list[str] = field(default_factory=list)
    probed: list[str] = field(default_factory=list)

    def mark_suspect(self, node: str, message: str) -> None:
        self.suspects.append(node)

    def probe_soon(self, node: str) -> None:
        self.probed.append(node)


class _Cluster:
    """Just what the bookkeeping touches: the classifier, the monitor, the settings and
    the scope's notes (recorded here instead of a scope)."""

    def __init__(self, ryw: str | None = "lsn", monotonic: bool = False) -> None:
        self.classifier = Classifier()
        self.monitor = _Monitor()
        self._ryw = ryw
        self._monotonic = monotonic
        self.writes: list[int | None] = []
        self.floors: list[int | None] = []

    @property
    def monotonic_reads(self) -> bool:
        return self._monotonic

    def record_write(self, position: int | None) -> None:
        self.writes.append(position)

    def record_read(self, position: int | None) -> None:
        if self._monotonic and position is not None:
            self.floors.append(position)


class Session(RoutedSession):
    _errors = psycopg


def session(ryw: str | None = "lsn", monotonic: bool = False) -> Session:
    return Session(_Cluster(ryw, monotonic), autocommit=True, read_only=None)


def topology(primary: str) -> Topology:
    nodes = tuple(
        NodeState(name=n, role=Role.PRIMARY if n == primary else Role.REPLICA, healthy=True)
        for n in ("a", "b")
    )
    return Topology(nodes=nodes, primary=primary)


def test_settings_are_replayed_from_where_a_link_stopped() -> None:
    s = session()
    reader, writer = Link(_Lease("r1"), "read"), Link(_Lease("primary"), "write")
    s._record_setting(reader, "SET a = 1", None)
    s._record_setting(reader, "SET b = 2", None)
    assert s._replay_plan(reader) == (False, [])  # it ran them itself
    assert s._replay_plan(writer) == (False, [("SET a = 1", None), ("SET b = 2", None)])
    s._replayed(writer)
    s._record_setting(reader, "SET c = 3", None)
    assert s._replay_plan(writer) == (False, [("SET c = 3", None)])


def test_read_back_settings_replace_the_list_and_links_reset_first() -> None:
    s = session()
    old, fresh = Link(_Lease("r1"), "read"), Link(_Lease("r2"), "read")
    s._record_setting(old, "SET a = 1", None)
    s._replayed(fresh)
    writer = Link(_Lease("primary"), "write")
    s._replace_settings(writer, [("search_path", "app"), ("role", "none")])
    reset, statements = s._replay_plan(fresh)
    assert reset  # it carries settings of the old list: RESET ALL, then the new list
    assert statements == [(REPLAY_SETTINGS_SQL, (["search_path", "role"], ["app", "none"]))]
    assert s._replay_plan(Link(_Lease("r3"), "read"))[0] is False  # a clean link needs no reset


def test_the_settings_list_asks_to_be_compacted_when_it_grows() -> None:
    s = session()
    link = Link(_Lease("r1"), "read")
    compact = [
        s._record_setting(link, f"SET a = {i}", None) for i in range(MAX_RECORDED_SETTINGS + 1)
    ]
    assert compact[-1] and not any(compact[:-1])


def test_session_state_in_a_transaction_pins_and_a_write_marks_it() -> None:
    s = session()
    analyze = s._cluster.classifier.analyze
    writer = Link(_Lease("primary"), "write")
    s._begin_transaction_on(writer)
    s._note_statement(writer, analyze("SELECT 1"))
    assert not s._tx_wrote and not s.pinned
    s._note_statement(writer, analyze("CREATE TEMP TABLE t (id int)"))
    assert s.pinned and writer.dirty
    s._note_statement(writer, analyze("INSERT INTO t VALUES (1)"))
    assert s._tx_wrote


def test_session_state_in_a_read_only_transaction_on_a_replica_is_refused() -> None:
    s = session()
    reader = Link(_Lease("r1"), "read")
    s._begin_transaction_on(reader)
    with pytest.raises(psycopg.NotSupportedError, match="replica"):
        s._note_statement(reader, s._cluster.classifier.analyze("LISTEN jobs"))
    assert not s.pinned


def test_a_write_link_is_kept_while_its_node_takes_writes() -> None:
    s = session()
    link = Link(_Lease("a"), "write")
    assert s._keeps_writer(link, topology("a"))
    assert not s._keeps_writer(link, topology("b"))


def test_a_lost_link_says_what_the_session_lost_and_has_its_node_probed() -> None:
    s = session()
    writer = Link(_Lease("primary"), "write")
    s._writer = writer
    s._begin_transaction_on(writer)
    s._pinned = True
    s._note_lost(writer)
    assert s._tx is None and s._writer is None
    with pytest.raises(psycopg.OperationalError, match="held this session's state"):
        s._check_open()
    # probed now, but not suspected: only a fresh connection failing too says the node
    # is down (design rule 9); a restart ends held links on a healthy node
    assert s._cluster.monitor.probed == ["primary"]
    assert s._cluster.monitor.suspects == []
    assert "transaction was lost" in (s._tx_lost or "")


def test_closing_releases_each_link_once() -> None:
    s = session()
    link = Link(_Lease("primary"), "write")
    s._writer = s._tx = link
    s._reader = Link(_Lease("r1"), "read")
    assert [x.node for x in s._closing_links()] == ["primary", "r1"]
    assert s._closing_links() == []
    with pytest.raises(psycopg.InterfaceError):
        s._check_open()


# (sql, in a transaction before, status after, failed, tag, executemany) -> may have committed
_COMMIT_CASES = [
    # autocommit: the statement ended its own transaction
    ("INSERT INTO t VALUES (1)", False, TX_IDLE, False, "INSERT 0 1", False, True),
    ("SELECT f()", False, TX_IDLE, False, "SELECT 1", False, True),
    ("SET work_mem = '8MB'", False, TX_IDLE, False, "SET", False, False),
    ("ROLLBACK", False, TX_IDLE, False, "ROLLBACK", False, False),
    ("INSERT INTO t VALUES (1)", False, TX_IDLE, True, None, False, False),
    ("CALL p()", False, TX_IDLE, True, None, False, True),
    ("INSERT INTO t VALUES (%s)", False, TX_IDLE, True, None, True, True),
    ("INSERT INTO t VALUES (1); COMMIT; SELECT 1/0", False, TX_IDLE, True, None, False, True),
    ("BEGIN; INSERT INTO t VALUES (1); COMMIT", False, TX_IDLE, False, "BEGIN", False, True),
    ("INSERT INTO t VALUES (1); COMMIT; BEGIN", False, TX_INTRANS, False, "INSERT", False, True),
    # inside a transaction: only what ends it committed
    ("COMMIT", True, TX_IDLE, False, "COMMIT", False, True),
    ("COMMIT AND CHAIN", True, TX_INTRANS, False, "COMMIT", False, True),
    ("COMMIT", True, TX_IDLE, False, "ROLLBACK", False, False),  # the transaction had failed
    ("COMMIT", True, TX_IDLE, True, None, False, False),  # e.g. a deferred constraint
    ("ROLLBACK", True, TX_IDLE, False, "ROLLBACK", False, False),
    ("SELECT f()", True, TX_INTRANS, False, "SELECT 1", False, False),
    ("INSERT INTO t VALUES (1); COMMIT", True, TX_IDLE, False, "INSERT 0 1", False, True),
    (
        "INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)",
        True,
        TX_INTRANS,
        False,
        "INSERT",
        False,
        False,
    ),
    ("COMMIT; BEGIN; SELECT 1/0", True, TX_INERROR, True, None, False, True),
]


@pytest.mark.parametrize("case", _COMMIT_CASES, ids=[f"{c[0][:30]}-{i}" for i, c in
                                                     enumerate(_COMMIT_CASES)])  # fmt: skip
def test_whether_a_commit_may_have_happened_is_the_servers_word(case: tuple[Any, ...]) -> None:
    """Design rule 1: the transaction status and the command tag decide; the classifier
    only says how many statements a string holds and whether it has transaction control."""
    sql, in_transaction, status, failed, tag, many, expected = case
    st = Classifier().analyze(sql)
    got = commit_possible(
        st, in_transaction=in_transaction, status=status, failed=failed, tag=tag, many=many
    )
    assert got is expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("INSERT INTO t VALUES (%s)", True),
        ("SELECT f()", True),
        ("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)", False),  # simple protocol
        ("COMMIT", False),
        ("COPY t FROM STDIN", False),
        ("CALL p()", False),
        ("SELECT pg_advisory_lock(1)", False),  # session state
    ],
)
def test_which_autocommit_statements_get_their_position_in_their_round_trip(
    sql: str, expected: bool
) -> None:
    assert pipelines_position(Classifier().analyze(sql)) is expected


def test_an_autocommit_statement_committed_what_the_server_says() -> None:
    s = session()
    analyze = s._cluster.classifier.analyze
    writer = Link(_Lease("primary"), "write")
    assert s._after_autocommit(writer, analyze("INSERT INTO t VALUES (1)"), TX_IDLE, "INSERT 0 1")
    assert s._after_autocommit(writer, analyze("SELECT f()"), TX_IDLE, "SELECT 1") == (True, False)
    assert s._after_autocommit(writer, analyze("ROLLBACK"), TX_IDLE, "ROLLBACK") == (False, False)
    assert s._after_autocommit(writer, analyze("SET search_path = app"), TX_IDLE, "SET") == (
        False,
        True,  # a SET the session replays: read back what the server now has
    )
    assert s._tx is None
    # A string that opened a transaction is the session's transaction from here. It
    # has transaction control, so it may have committed before (``...; COMMIT; BEGIN``),
    # and whether the open one wrote is asked of the server at its COMMIT.
    st = analyze("BEGIN; INSERT INTO t VALUES (1)")
    assert s._after_autocommit(writer, st, TX_INTRANS, "INSERT 0 1") == (True, False)
    assert s._tx is writer and not s._tx_wrote


def test_in_a_transaction_only_a_commit_the_server_made_is_covered() -> None:
    s = session(monotonic=True)
    analyze = s._cluster.classifier.analyze
    writer = Link(_Lease("primary"), "write")
    s._begin_transaction_on(writer)
    st = analyze("INSERT INTO t VALUES (1)")
    assert s._after_in_transaction(writer, st, TX_INTRANS, "INSERT 0 1") == (False, True, False)
    assert s._after_in_transaction(writer, analyze("COMMIT"), TX_IDLE, "COMMIT") == (
        True,
        False,
        True,
    )
    # An aborted transaction's COMMIT answers ROLLBACK: nothing to cover.
    s._commit_owed = False
    assert s._after_in_transaction(writer, analyze("COMMIT"), TX_IDLE, "ROLLBACK") == (
        False,
        False,
        True,
    )
    # A commit owed from before is asked once the transaction is not aborted.
    s._commit_owed = True
    assert s._after_in_transaction(writer, st, TX_INERROR, None)[0] is False
    assert s._after_in_transaction(writer, st, TX_INTRANS, "INSERT 0 1")[0] is True
    # On a replica nothing is committed, whatever the tag.
    reader = Link(_Lease("r1"), "read")
    s._commit_owed = False
    assert s._after_in_transaction(reader, analyze("COMMIT"), TX_IDLE, "COMMIT") == (
        False,
        False,
        True,
    )


def test_a_failed_statement_that_may_have_committed_owes_the_token_a_commit() -> None:
    s = session()
    analyze = s._cluster.classifier.analyze
    writer = Link(_Lease("primary"), "write")
    s._writer = writer
    several = analyze("INSERT INTO t VALUES (1); COMMIT; SELECT 1/0")
    assert s._after_failure_on(writer, several, TX_IDLE, in_transaction=False, many=False)
    assert s._commit_owed
    s._commit_owed = False
    one = analyze("INSERT INTO t VALUES (1)")
    assert not s._after_failure_on(writer, one, TX_IDLE, in_transaction=False, many=False)
    assert not s._commit_owed
    # executemany failing at its third row: the first two committed
    assert s._after_failure_on(writer, one, TX_IDLE, in_transaction=False, many=True)
    # owed, but not askable in an aborted transaction
    s._begin_transaction_on(writer)
    st = analyze("INSERT INTO t VALUES (1); COMMIT; BEGIN; SELECT 1/0")
    assert not s._after_failure_on(writer, st, TX_INERROR, in_transaction=True, many=False)
    assert s._commit_owed
    # a link the session no longer holds: nothing can be said of it
    s._commit_owed = False
    gone = Link(_Lease("old-primary"), "write")
    assert not s._after_failure_on(gone, several, TX_IDLE, in_transaction=False, many=False)
    assert not s._commit_owed


@pytest.mark.parametrize(
    ("ryw", "monotonic", "asked"),
    [("lsn", False, True), ("window", False, False), (None, False, None),
     (None, True, True), ("window", True, True)],
)  # fmt: skip
def test_a_committed_write_asks_the_position_only_when_something_uses_it(
    ryw: str | None, monotonic: bool, asked: bool | None
) -> None:
    s = session(ryw, monotonic)
    assert s._position_after_write() is asked
    s._written_at(42 if asked else None)
    cluster = s._cluster
    assert cluster.writes == [42 if asked else None]  # the cluster ignores it with ryw off
    assert cluster.floors == ([42] if monotonic else [])
