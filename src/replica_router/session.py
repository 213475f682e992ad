"""A routed session's rules: which node each statement goes to, and what it leaves behind.

Decides, for the routed connections of every driver (psycopg sync and asyncio,
psycopg2): where a statement outside a transaction goes (:func:`route`); which
statements open a transaction and on which node; when the session pins to the
primary (state that lives in one backend: temp tables, ``LISTEN``, advisory
locks, ``PREPARE``...); which settings are replayed on a node connection taken
later (:meth:`RoutedSession._replay_plan`); whether a held link may still be
used (:meth:`RoutedSession._keeps_writer`, :meth:`RoutedSession._still_readable`);
and when the token must follow the primary (:func:`commit_possible`: what the
server's transaction status and command tag say, not what the classifier
thought of the statement).

Must not: talk to a server, import a driver, or wait. The driver shells keep the
node connections and run what these rules ask for; :class:`RoutedSession` is the
state they share (held links, the open transaction, the settings to replay),
changed only by its bookkeeping methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from .classify import Intent, SessionEffect, Statement
from .errors import PrimaryUnavailable
from .routing import route_write

if TYPE_CHECKING:
    from .topology import Topology

__all__ = [
    "BEGINS",
    "MAX_RECORDED_SETTINGS",
    "PINNING_EFFECTS",
    "REPLAY_SETTINGS_SQL",
    "ROUTE_BEGIN_READ",
    "ROUTE_BEGIN_WRITE",
    "ROUTE_READ",
    "ROUTE_SETTING",
    "ROUTE_WRITE",
    "SESSION_SETTINGS_SQL",
    "TX_IDLE",
    "TX_INERROR",
    "TX_INTRANS",
    "Link",
    "RoutedSession",
    "begin_sql",
    "commit_possible",
    "is_plain_setting",
    "pipelines_position",
    "refuse_on_replica",
    "refused_read",
    "route",
    "uses_copy",
    "writes_data",
]

_READ: Final = Intent.READ


def refused_read(st: Statement) -> Statement:
    """A statement judged a read that a read-only node refused: it writes after all.

    The classifier misses writes it cannot see (a function re-declared VOLATILE after
    we learned it, a view calling one): the node refused before changing anything,
    so running it on the primary instead is safe.
    """
    return dataclasses.replace(st, intent=Intent.WRITE, reason="refused by a read-only node")


BEGINS: Final = frozenset({"begin", "begin_read_only", "begin_serializable"})
# A hot standby refuses serializable transactions, read-only ones included.
_SERIALIZABLE: Final = frozenset({"begin_serializable", "set_serializable"})
# Session state that lives in one backend and cannot be copied to another one.
PINNING_EFFECTS: Final[frozenset[SessionEffect]] = frozenset(
    {"temp_table", "listen", "advisory_lock", "prepare", "discard", "cursor", "load"}
)
# Statements the classifier calls writes that change no data (no token needed).
_SETTING_REASONS: Final = frozenset({"SET", "RESET", "SET LOCAL", "SET TRANSACTION"})
_PLAIN_SETTING_REASONS: Final = frozenset({"SET", "RESET"})
_SET_ONLY: Final = frozenset({"set"})
MAX_RECORDED_SETTINGS: Final = 32  # then compact them into one read-back from pg_settings

# Session-level settings of this backend, as set_config() can replay them in this
# order; session_authorization and role are not in pg_settings (GUC_NO_SHOW_ALL), so
# they are asked for by name, role last (setting session_authorization resets it).
SESSION_SETTINGS_SQL: Final = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"
    " UNION ALL SELECT 'session_authorization',"
    " pg_catalog.current_setting('session_authorization')"
    " UNION ALL SELECT 'role', pg_catalog.current_setting('role')"
)
REPLAY_SETTINGS_SQL: Final = (
    "SELECT pg_catalog.set_config(s.name, s.setting, false)"
    " FROM unnest(%s::text[], %s::text[]) AS s(name, setting)"
)

# What to do with a statement that is not inside a transaction (see route()).
ROUTE_READ: Final = 0  # autocommit read: the read node
ROUTE_WRITE: Final = 1  # autocommit: the primary (also every statement of a pinned session)
ROUTE_SETTING: Final = 2  # plain SET/RESET: any held node, recorded for replay
ROUTE_BEGIN_READ: Final = 3  # opens a transaction on the read node (declared read-only)
ROUTE_BEGIN_WRITE: Final = 4  # opens a transaction on the primary


def route(
    st: Statement,
    *,
    autocommit: bool,
    read_only: bool | None,
    pinned: bool,
    serializable: bool = False,
) -> int:
    """Where a statement goes when no transaction is open (a pure decision).

    ``serializable``: the session's transactions are SERIALIZABLE, which a hot
    standby refuses, so even read-only ones open on the primary."""
    control = st.transaction
    if not autocommit or control in BEGINS:
        declared = (
            read_only is True
            or control == "begin_read_only"
            or (control == "set_read_only" and not autocommit)
        )
        on_replica = declared and not pinned and not serializable and control not in _SERIALIZABLE
        return ROUTE_BEGIN_READ if on_replica else ROUTE_BEGIN_WRITE
    if pinned:
        return ROUTE_WRITE
    session = st.session
    if session:
        return ROUTE_SETTING if session == _SET_ONLY and is_plain_setting(st) else ROUTE_WRITE
    return ROUTE_READ if st.intent is _READ else ROUTE_WRITE


def refuse_on_replica(st: Statement, errors: Any) -> None:
    """A read-only transaction runs on a replica: session state taken there would be lost.

    ``errors`` is the driver's module (its ``NotSupportedError`` is raised)."""
    if st.session & PINNING_EFFECTS:
        raise errors.NotSupportedError(
            f"{st.reason}: a read-only transaction runs on a replica, where this session "
            "state would be lost; run it outside the read-only transaction"
        )


def is_plain_setting(st: Statement) -> bool:
    """One ``SET``/``RESET`` statement: its text can be replayed on another node as is."""
    return st.statements == 1 and st.reason in _PLAIN_SETTING_REASONS


def writes_data(st: Statement) -> bool:
    """True when committing the statement may change data (the token must advance)."""
    if st.intent is _READ or st.reason in _SETTING_REASONS:
        return False
    return st.transaction is None or st.transaction == "commit_prepared"


# libpq's PQtransactionStatus() values: psycopg's ``TransactionStatus`` and psycopg2's
# ``TRANSACTION_STATUS_*`` are both these numbers.
TX_IDLE: Final = 0
TX_INTRANS: Final = 2
TX_INERROR: Final = 3
# Command tags of one statement that committed no data of its own: it ended no
# transaction that wrote (ROLLBACK; also what COMMIT answers for an aborted
# transaction), or it cannot write (SET, SHOW...). Server facts, not guesses.
_NOTHING_COMMITTED_TAGS: Final = frozenset(
    {
        "ROLLBACK",
        "PREPARE TRANSACTION",
        "BEGIN",
        "START TRANSACTION",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "RESET",
        "SHOW",
        "DEALLOCATE",
        "DEALLOCATE ALL",
        "DISCARD ALL",
        "LISTEN",
        "UNLISTEN",
    }
)


# Statements that may commit inside themselves, then fail (transaction control in a
# procedure or a DO block called in autocommit): what they are, not what they do.
_COMMITS_INSIDE: Final = frozenset({"CALL", "DO"})


def commit_possible(
    st: Statement,
    *,
    in_transaction: bool,
    status: int,
    failed: bool,
    tag: str | None,
    many: bool = False,
) -> bool:
    """Whether running ``st`` on the primary may have committed a transaction, so the
    token must follow the primary's position (design rule 1: act on what the server
    says, not on what the classifier inferred).

    ``in_transaction``: a transaction was open before the statement; ``status``: the
    connection's transaction status after it (``TX_*``); ``failed``: it raised;
    ``tag``: the command tag the driver shows (the first or the last statement's);
    ``many``: it was an ``executemany`` (one statement per parameter set).

    * Ran in autocommit: every statement that reached the server ended its own
      transaction. One that failed committed nothing, unless it was several
      (``INSERT ...; COMMIT; SELECT 1/0``, an ``executemany`` failing at its third
      row) or could commit inside (``CALL``, ``DO``). A lone statement whose tag
      says it committed nothing (``ROLLBACK``, ``SET``...) is left out.
    * Inside a transaction, one statement: only COMMIT ends it committed (its tag is
      ``COMMIT``, also for ``COMMIT AND CHAIN``; an aborted transaction's COMMIT
      answers ``ROLLBACK``); a failed statement commits nothing.
    * Several statements in one string: a COMMIT may sit anywhere in it. The
      transaction is over (idle now), or it is open again and the string has
      transaction control (``...; COMMIT; BEGIN; ...``): then it may have committed.
      Without transaction control a string cannot end the transaction it runs in.
    """
    several = st.statements != 1 or many
    if not in_transaction:
        if status != TX_IDLE:
            return several and st.transaction is not None  # "INSERT; COMMIT; BEGIN"
        if several:
            return True
        if failed:
            return st.reason in _COMMITS_INSIDE
        return tag not in _NOTHING_COMMITTED_TAGS
    if several:
        return status == TX_IDLE or st.transaction is not None
    return not failed and tag == "COMMIT"


def uses_copy(st: Statement) -> bool:
    """``COPY ... FROM STDIN`` / ``TO STDOUT``: it needs ``cursor.copy()``. Sent with
    ``execute()`` it would leave the node connection in the COPY state, so it is
    refused before anything is sent."""
    reason = st.reason
    return reason in _COPY_PROTOCOL or reason.startswith("COPY of a write")


_COPY_PROTOCOL: Final = frozenset({"COPY FROM", "COPY TO"})


def pipelines_position(st: Statement) -> bool:
    """Whether an autocommit statement on the primary may be sent in pipeline mode with
    the position query after its own Sync (one round trip for both; psycopg only).

    One statement (a string of several cannot use the extended protocol), no
    transaction control (its Sync ends the implicit transaction, which is what
    commits it), no session state, no ``COPY`` (no pipeline for it), no ``CALL``
    or ``DO`` (transaction control inside them wants the simple protocol).
    """
    return (
        st.statements == 1
        and st.transaction is None
        and not st.session
        and st.reason not in _COMMITS_INSIDE
        and not st.reason.startswith("COPY")
    )


def begin_sql(isolation_level: str | None, read_only: bool | None, deferrable: bool | None) -> str:
    """``BEGIN`` with the connection's transaction characteristics (``isolation_level``
    in SQL words, e.g. ``"REPEATABLE READ"``)."""
    parts = ["BEGIN"]
    if isolation_level is not None:
        parts.append("ISOLATION LEVEL " + isolation_level)
    if read_only is not None:
        parts.append("READ ONLY" if read_only else "READ WRITE")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


class Leased(Protocol):
    """A node connection checked out for a session (the cluster's ``Lease`` is one)."""

    conn: Any
    node: str


class Link:
    """A node connection a routed connection holds, and how far its session is replayed."""

    __slots__ = ("applied", "conn", "dirty", "fresh", "gen", "lease", "node", "role", "version")

    def __init__(self, lease: Leased, role: str) -> None:
        self.lease: Any = lease
        self.conn: Any = lease.conn
        self.node = lease.node
        self.role = role  # "read" (a read-pool connection) or "write" (the primary's write pool)
        self.fresh = True  # the cluster counted the route that leased it
        self.dirty = False  # carries session state: DISCARD ALL before it goes back
        self.version = 0  # settings list version replayed here
        self.applied = 0  # entries of that version replayed here
        self.gen = 0  # the connection's settings generation this link matches

    def __repr__(self) -> str:
        return f"<link {self.role} {self.node}>"


class RoutedSession:
    """State and bookkeeping shared by the routed connections (psycopg sync and
    async, and psycopg2's in :mod:`replica_router.integrations.psycopg2`); no I/O.

    The cluster is used only for its snapshot, scope and counters.
    """

    _cluster: Any
    _errors: Any  # the driver module whose exception classes users catch
    # The driver's read_only holds outside transactions too (psycopg2 sets
    # default_transaction_read_only in autocommit); psycopg's applies to BEGIN only.
    _read_only_in_autocommit: bool = False

    def __init__(
        self,
        cluster: Any,
        *,
        autocommit: bool,
        read_only: bool | None,
    ) -> None:
        self._cluster = cluster
        self._analyze = cluster.classifier.analyze
        self._autocommit = bool(autocommit)
        self._read_only = read_only
        self._isolation_level: Any = None  # the driver's value; see _isolation_sql()
        self._deferrable: bool | None = None
        self._begin = begin_sql(None, read_only, None)
        self._serializable = False  # a hot standby refuses the session's transactions
        self._closed = False
        # Look before the next statement: closed, a lost link, function volatility to learn.
        self._attention = True
        self._reader: Link | None = None
        self._writer: Link | None = None
        self._last: Link | None = None  # the link the last statement ran on (``info``)
        self._read_topology: Topology | None = None
        self._read_mark: object = None  # the scope's mark it was validated for
        self._write_topology: Topology | None = None
        self._tx: Link | None = None  # the node the open transaction runs on
        self._tx_wrote = False
        # A commit may have happened that the token does not cover yet, asked for as
        # soon as the connection can answer (it could not: an aborted transaction).
        self._commit_owed = False
        self._tx_settings = False  # a session SET ran inside it: read settings back at its end
        self._tx_lost: str | None = None  # its node connection broke: fail until rollback
        self._blocks = 0  # transaction() blocks entered
        self._pinned = False
        self._failed: str | None = None  # a pinned session's connection broke
        self._settings: list[tuple[Any, Any]] = []
        self._settings_version = 0
        self._settings_gen = 0

    # -- the DB-API connection attributes the drivers share -----------------------------

    @property
    def cluster(self) -> Any:
        return self._cluster

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pinned(self) -> bool:
        """True once session state bound this connection to the primary (see module doc)."""
        return self._pinned

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._check_no_transaction("autocommit")
        self._autocommit = bool(value)

    @property
    def read_only(self) -> bool | None:
        """``True``: transactions are declared read-only and may run on a replica."""
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._check_no_transaction("read_only")
        self._read_only = None if value is None else bool(value)
        self._rebuild_begin()

    @property
    def deferrable(self) -> bool | None:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self._check_no_transaction("deferrable")
        self._deferrable = None if value is None else bool(value)
        self._rebuild_begin()

    @property
    def nodes(self) -> dict[str, str]:
        """The nodes held right now: ``{"read": name, "write": name, "transaction": name}``."""
        held = {"read": self._reader, "write": self._writer, "transaction": self._tx}
        return {role: link.node for role, link in held.items() if link is not None}

    def _isolation_sql(self) -> str | None:
        """The isolation level in SQL words (the driver's numbering differs)."""
        return None

    def _rebuild_begin(self) -> None:
        isolation = self._isolation_sql()
        self._begin = begin_sql(isolation, self._read_only, self._deferrable)
        self._serializable = isolation == "SERIALIZABLE"

    def _autocommit_read(self, st: Statement) -> bool:
        """Outside a transaction: a read the read link may serve (the common path) —
        autocommit, no session state to keep, not pinned."""
        return self._autocommit and st.intent is _READ and not st.session and not self._pinned

    def _autocommit_read_only(self, autocommit: bool) -> bool:
        """Autocommit statements must be refused by the server if they write: they run
        on the read link (a replica, or the primary's read-only connection), and its
        refusal is final, not a misclassified read to retry on the primary."""
        return autocommit and self._read_only is True and self._read_only_in_autocommit

    def _setting_on_reader(self) -> bool:
        """A plain SET outside a transaction runs on the read link (re-validated, so a
        dead replica's link is replaced), unless only a write link is held: it is
        recorded and replayed wherever the session goes next, so any valid link will do."""
        return self._reader is not None or self._writer is None

    def _transactions_on_replica(self) -> bool:
        """A transaction opened by ``transaction()`` runs on the read node: declared
        read-only, not pinned, and not SERIALIZABLE (a hot standby refuses that)."""
        return self._read_only is True and not self._pinned and not self._serializable

    def _check_no_transaction(self, attribute: str) -> None:
        self._check_open()
        if self._tx is not None or self._tx_lost is not None:
            raise self._errors.ProgrammingError(
                f"can't change {attribute!r} now: connection in transaction status INTRANS"
            )

    def _closed_error(self) -> Exception:
        error: Exception = self._errors.InterfaceError("the connection is closed")
        return error

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()
        if self._failed is not None:
            raise self._errors.OperationalError(self._failed)
        if self._tx_lost is not None:
            raise self._errors.OperationalError(self._tx_lost)

    def _check_commit(self, verb: str) -> None:
        if self._closed:
            raise self._closed_error()
        if self._blocks:
            raise self._errors.ProgrammingError(
                f"Explicit {verb}() forbidden within a Transaction context. "
                f"(Transaction will be automatically committed on successful exit from context.)"
            )

    def _keeps_writer(self, link: Link, topology: Topology) -> bool:
        """Whether the held write ``link`` still goes where writes go.

        Checked at every use of the link, not only when it was taken: a node that was
        fenced, replaced by a promotion or removed never runs another statement of
        ours. A pinned session cannot move (its state lives in that backend), so it
        fails with a clear error instead; a primary that is merely unhealthy keeps
        its pinned session (the next statement will tell).
        """
        if topology is self._write_topology:
            return True
        if route_write(topology) == link.node:
            self._write_topology = topology
            return True
        if not self._pinned:
            return False
        state = topology.by_name.get(link.node)
        if state is not None and not state.fenced and topology.primary in (None, link.node):
            return True
        self._failed = (
            f"{link.node}, which holds this session's state (temp tables, LISTEN, locks, "
            "prepared statements), no longer takes writes (fenced, failed over or removed); "
            "the session cannot move: open a new connection"
        )
        raise PrimaryUnavailable(self._failed)

    def _before_commit(self) -> None:
        """Raise unless ``commit()`` may run now: a transaction whose node was lost cannot."""
        self._check_commit("commit")
        if self._tx_lost is not None:
            raise self._errors.OperationalError(self._tx_lost)

    def _before_rollback(self) -> None:
        """Raise unless ``rollback()`` may run now; it ends a lost transaction too."""
        self._check_commit("rollback")
        self._tx_lost = None

    def _closing_links(self) -> list[Link]:
        """Mark the connection closed; the links ``close()`` must release (none twice)."""
        if self._closed:
            return []
        self._closed = self._attention = True
        return self._links()

    # -- bookkeeping (no I/O) -------------------------------------------------------------

    def _begin_transaction_on(self, link: Link) -> None:
        self._tx = link
        self._tx_wrote = False
        self._tx_settings = False

    def _note_statement(self, link: Link, st: Statement) -> None:
        """Before a statement runs inside the transaction on ``link``."""
        session = st.session
        if session:
            if session & PINNING_EFFECTS:
                if link.role == "read":
                    refuse_on_replica(st, self._errors)
                self._pinned = True
                link.dirty = True
            if "set" in session and not self._pinned:
                self._tx_settings = True
                link.dirty = True
        if link.role == "write" and not self._tx_wrote and writes_data(st):
            self._tx_wrote = True  # a transaction on a replica writes nothing (the server refuses)

    def _after_autocommit(
        self, link: Link, st: Statement, status: int, tag: str | None
    ) -> tuple[bool, bool]:
        """An autocommit statement ran on the primary ``link``, which it left in
        ``status``: (whether it committed a write, whether the session's settings are to
        be read back). A string that opened a transaction (``BEGIN; INSERT ...``) is the
        session's transaction from here. The classifier may say "write" (no need to
        ask); only the server says "no"."""
        wrote = writes_data(st)
        if status != TX_IDLE:
            self._begin_transaction_on(link)
            self._tx_wrote = wrote
        committed = wrote or commit_possible(
            st, in_transaction=False, status=status, failed=False, tag=tag
        )
        return committed, status == TX_IDLE and "set" in st.session and not self._pinned

    def _after_in_transaction(
        self, link: Link, st: Statement, status: int, tag: str | None
    ) -> tuple[bool, bool, bool]:
        """A statement ran in the transaction on ``link``, which it left in ``status``:
        (a commit to cover now, a read to note for monotonic reads, the transaction
        over). A COMMIT (AND CHAIN), or a string with a COMMIT in it, is what the
        server says it did, not what the classifier saw."""
        settle = False
        if link.role == "write":
            if commit_possible(st, in_transaction=True, status=status, failed=False, tag=tag):
                self._commit_owed = True
                self._tx_wrote = False
            settle = self._commit_owed and status != TX_INERROR
        note_read = status == TX_INTRANS and self._cluster.monotonic_reads
        return settle, note_read, status == TX_IDLE

    def _after_failure_on(
        self, link: Link, st: Statement, status: int, *, in_transaction: bool, many: bool
    ) -> bool:
        """A statement failed on ``link``, still connected, leaving it in ``status``. It
        may have committed before it failed (``INSERT ...; COMMIT; SELECT 1/0``,
        ``executemany`` in autocommit): then a commit is owed to the token. True when
        its position can be asked now (the transaction left is not aborted)."""
        if link not in (self._writer, self._tx):
            return False
        if not commit_possible(st, in_transaction=in_transaction, status=status, failed=True,
                               tag=None, many=many):  # fmt: skip
            return False
        self._commit_owed = True
        return status != TX_INERROR

    def _position_after_write(self) -> bool | None:
        """After a committed write, whether the primary's position is asked first (for
        read-your-writes by position, or monotonic reads); None: nothing is noted."""
        if self._cluster.monotonic_reads:
            return True
        return self._position_wanted()

    def _written_at(self, position: int | None) -> None:
        """A write committed at ``position`` (None: unknown, window mode still notes
        it): the scope's token follows, and with monotonic reads its floor (through
        the public seam, as the psycopg2 adapter's writes always went)."""
        cluster = self._cluster
        cluster.record_write(position)
        cluster.record_read(position)  # a no-op without monotonic reads

    def _record_setting(self, link: Link, query: Any, params: Any) -> bool:
        """A plain SET/RESET ran on ``link``; True when the list should be compacted."""
        self._settings.append((query, params))
        self._settings_gen += 1
        link.applied = len(self._settings)
        link.gen = self._settings_gen
        link.dirty = True
        return len(self._settings) > MAX_RECORDED_SETTINGS

    def _replace_settings(self, link: Link, rows: Iterable[Sequence[Any]]) -> None:
        """The session's settings, read back from ``link``, become what is replayed."""
        names, values = [], []
        for name, value in rows:
            names.append(name)
            values.append(value)
        self._settings = [(REPLAY_SETTINGS_SQL, (names, values))]
        self._settings_version += 1
        self._settings_gen += 1
        link.version = self._settings_version
        link.applied = 1
        link.gen = self._settings_gen
        link.dirty = True

    def _replay_plan(self, link: Link) -> tuple[bool, list[tuple[Any, Any]]]:
        """What ``link`` must run to match the session: (RESET ALL first?, statements)."""
        if link.version == self._settings_version:
            return False, self._settings[link.applied :]
        return link.dirty, list(self._settings)

    def _replayed(self, link: Link) -> None:
        link.version = self._settings_version
        link.applied = len(self._settings)
        link.gen = self._settings_gen
        if self._settings:
            link.dirty = True

    def _forget(self, link: Link) -> None:
        if link is self._last:
            self._last = None
        if link is self._reader:
            self._reader = None
        if link is self._writer:
            self._writer = None
        if link is self._tx:
            self._tx = None

    def _info_link(self) -> Link:
        """The link ``info`` describes: the open transaction's, else the one the last
        statement ran on, else a held one (the primary's first)."""
        if self._closed:
            raise self._closed_error()
        link = self._tx or self._last or self._writer or self._reader
        if link is None:
            raise self._errors.ProgrammingError(
                "no node connection yet: info describes the node the last statement ran "
                "on (run one first, or use cluster.read() / cluster.write() for one node)"
            )
        return link

    def _links(self) -> list[Link]:
        links: list[Link] = []
        for link in (self._tx, self._reader, self._writer):
            if link is not None and link not in links:
                links.append(link)
        return links

    def _note_lost(self, link: Link) -> None:
        """``link``'s connection broke: forget it, say what the session lost, and have
        its node probed now."""
        node = link.node
        self._attention = True
        if link is self._tx:
            self._tx_lost = (
                f"the transaction was lost: the connection to {node} broke; "
                "roll back to go on (the server rolled the transaction back)"
            )
        if self._pinned and link.role == "write":
            self._failed = (
                f"the connection to {node}, which held this session's state (temp tables, "
                "LISTEN, locks, prepared statements), was lost"
            )
        self._forget(link)
        monitor = self._cluster.monitor
        if monitor is not None:  # a link ending says nothing yet of its node (rule 9)
            monitor.probe_soon(node)

    def _count(self, link: Link, st: Statement) -> None:
        self._last = link
        if link.fresh:
            link.fresh = False  # the lease was counted when it was routed
            return
        self._cluster._count_route("read" if st.intent is _READ else "write", link.node)

    def _read_key(self) -> tuple[Topology, object]:
        """The snapshot and the scope's mark now: while both are the ones the held read
        link was validated for, it needs no new decision."""
        key: tuple[Topology, object] = self._cluster._read_key()
        return key

    def _keeps_reader(self, link: Link, topology: Topology, mark: object) -> bool:
        """Whether the held read ``link`` may serve a read now: nothing changed since it
        was validated (the hot path: two identity checks), or routing still picks it."""
        if topology is self._read_topology and mark is self._read_mark:
            return True
        if self._still_readable(link, topology):
            self._read_topology, self._read_mark = topology, mark
            return True
        return False

    def _hold(self, lease: Leased, role: str, topology: Topology, mark: object = None) -> Link:
        """``lease`` becomes the session's read or write link, valid for ``topology``."""
        link = Link(lease, role)
        if role == "read":
            self._reader = link
            self._read_topology, self._read_mark = topology, mark
        else:
            self._writer = link
            self._write_topology = topology
        return link

    def _still_readable(self, link: Link, topology: Topology) -> bool:
        """Does the routing still allow reading on ``link``'s node? (counts a fallback)"""
        cluster = self._cluster
        decision = cluster._rules.decide(topology, cluster._plan_read(topology), prefer=link.node)
        if decision.target != link.node:
            return False
        if decision.fallback is not None:
            cluster._count_fallback(decision.fallback, link.node)
        return True

    def _position_wanted(self) -> bool | None:
        """None: read-your-writes is off; False: a write is noted without a position."""
        ryw = self._cluster._ryw
        return None if ryw is None else ryw == "lsn"

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        mode = "autocommit" if self._autocommit else "transactional"
        held = " ".join(f"{k}={v}" for k, v in self.nodes.items())
        pinned = " pinned" if self._pinned else ""
        return f"<{type(self).__name__} {state} {mode}{pinned}{' ' + held if held else ''}>"
