"""Read-your-writes and monotonic reads: tokens, scopes, and commit capture.

A :class:`Token` is the WAL position (LSN) of a commit plus the identity of the
cluster it was made on (``system_identifier``): a replica whose replay position
has reached the token has that commit. Tokens are short strings, so they can
cross threads, processes and HTTP requests.

A :class:`Scope` is what one unit of work (a request, a job) has written and
read so far. Scopes live in a ``contextvars.ContextVar``; ``session()`` opens
one for a block. Code outside every ``session()`` shares one process-wide *root*
scope, the same object in every thread, task and copied context: request state
is created at the scope boundary, never by whichever context asks first, so a
write made in ``asyncio.to_thread``, an executor or ``copy_context().run``
reaches its caller. A scope keeps one position per cluster (keyed by
``system_identifier``), so an application talking to two clusters never applies
one cluster's LSN to the other.

Everything here is pure except :func:`commit_and_capture` and its async twin,
the one round trip that commits and learns the commit's position.
"""

from __future__ import annotations

import contextvars
import os
import re
import threading
from collections.abc import Iterator
from contextlib import ContextDecorator, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
import psycopg.errors
from psycopg.pq import ConnStatus, ExecStatus, TransactionStatus

from .errors import TokenError
from .lsn import format_lsn, parse_lsn

__all__ = [
    "NODE_POSITION_SQL",
    "POSITION_SQL",
    "WROTE_COMMIT_POSITION_SQL",
    "WROTE_SQL",
    "Mark",
    "Scope",
    "Token",
    "acommit_and_capture",
    "commit_and_capture",
    "current_scope",
    "peek_scope",
    "session",
    "unit_of_work",
]

_MAX_U64 = 0xFFFFFFFFFFFFFFFF
_VERSION = "1"
# "1.<system id, base 36, may be empty>.<lsn, base 36>"; 2**64 is 13 base-36 digits.
# Both cases spelled out, not re.IGNORECASE: under it, [a-z] also matches K (U+212A),
# ſ (U+017F) and ı (U+0131), which int(..., 36) then rejects with a bare ValueError.
_TOKEN_RE = re.compile(r"1\.([0-9A-Za-z]{0,13})\.([0-9A-Za-z]{1,13})")
_MAX_TOKEN_TEXT = 64  # longer input is garbage; don't regex-scan a megabyte cookie
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"

# COMMIT and the position after it, one simple-protocol round trip. The insert
# position is read *after* the commit record was inserted, so it is at or past
# its end; pg_current_wal_lsn() (the write position) would not be with
# synchronous_commit=off, where the record may not be written yet.
# The primary's WAL insert position: read after a commit, at or past its commit record.
# No ::text cast: results come back as text anyway, and the cast costs the server.
POSITION_SQL = "SELECT pg_catalog.pg_current_wal_insert_lsn()"
# The position any node's data reflects: replayed on a replica, inserted on the primary.
NODE_POSITION_SQL = (
    "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()"
    " ELSE pg_catalog.pg_current_wal_insert_lsn() END"
)
_COMMIT_AND_POSITION = b"COMMIT; " + POSITION_SQL.encode()
# Whether the open transaction was assigned a transaction id (it changed data: every
# row written, locked or a logged sequence step assigns one), read inside it before
# it ends. A server fact that decides whether a commit advances the token where the
# classifier saw no write (a view or function that writes, a function re-declared).
WROTE_SQL = "SELECT pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL"
# One simple-protocol round trip: did it write, COMMIT, the position after the commit.
WROTE_COMMIT_POSITION_SQL = f"{WROTE_SQL}; COMMIT; {POSITION_SQL}"


def _base36(value: int) -> str:
    if value == 0:
        return "0"
    out = []
    while value:
        value, digit = divmod(value, 36)
        out.append(_DIGITS[digit])
    return "".join(reversed(out))


@dataclass(frozen=True, slots=True)
class Token:
    """A commit's WAL position on one cluster; ``str()`` is cookie and URL safe.

    ``system_id`` is the cluster's ``system_identifier``; ``None`` means "any
    cluster" (a token built by hand). Compare and merge tokens, don't compute
    with them.
    """

    lsn: int
    system_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lsn, bool) or not isinstance(self.lsn, int):
            raise TokenError(f"token lsn must be an int, got {type(self.lsn).__name__}")
        if not 0 <= self.lsn <= _MAX_U64:
            raise TokenError(f"token lsn {self.lsn} is outside 0..2**64-1")
        sid = self.system_id
        if sid is not None and (isinstance(sid, bool) or not isinstance(sid, int)):
            raise TokenError(f"token system_id must be an int or None, got {type(sid).__name__}")
        if sid is not None and not 0 < sid <= _MAX_U64:
            raise TokenError(f"token system_id {sid} is outside 1..2**64-1")

    @classmethod
    def parse(cls, text: str) -> Token:
        """The token ``str(token)`` produced; a :class:`TokenError` for anything else."""
        if not isinstance(text, str):
            raise TokenError(f"a token is a string, got {type(text).__name__}")
        stripped = text.strip()
        if len(stripped) > _MAX_TOKEN_TEXT:
            raise TokenError(f"not a replica-router token: {len(stripped)} characters is too long")
        match = _TOKEN_RE.fullmatch(stripped)
        if match is None:
            shown = stripped if len(stripped) <= 40 else stripped[:40] + "..."
            raise TokenError(
                f"not a replica-router token: {shown!r} (expected '1.<cluster>.<position>')"
            )
        sid_text, lsn_text = match.groups()
        lsn = int(lsn_text, 36)
        sid = int(sid_text, 36) if sid_text else None
        if lsn > _MAX_U64 or (sid is not None and not 0 < sid <= _MAX_U64):
            raise TokenError(f"not a replica-router token: {stripped!r} is out of range")
        return cls(lsn, sid)

    def __str__(self) -> str:
        sid = "" if self.system_id is None else _base36(self.system_id)
        return f"{_VERSION}.{sid}.{_base36(self.lsn)}"

    def __repr__(self) -> str:
        return f"Token(lsn={format_lsn(self.lsn)!r}, system_id={self.system_id!r})"

    def belongs_to(self, system_id: int | None) -> bool:
        """True unless both sides know their cluster and the clusters differ."""
        return self.system_id is None or system_id is None or self.system_id == system_id

    def merge(self, other: Token | None) -> Token:
        """The later of two tokens of the same cluster (:class:`TokenError` across clusters)."""
        if other is None:
            return self
        if not self.belongs_to(other.system_id):
            raise TokenError(
                f"cannot merge tokens of two clusters ({self.system_id} and {other.system_id})"
            )
        later = self if self.lsn >= other.lsn else other
        if later.system_id is None:  # keep the identity whichever side knows it
            sid = self.system_id if self.system_id is not None else other.system_id
            if sid is not None:
                return Token(later.lsn, sid)
        return later


class Mark(NamedTuple):
    """What a scope knows about one cluster. Immutable: updates replace it whole."""

    position: int | None = None  # token LSN: reads must see at least this
    floor: int | None = None  # monotonic reads: the position last read at
    last_write_at: float | None = None  # time.monotonic() of the last write (window mode)

    def merged(self, other: Mark) -> Mark:
        """The later of each field; ``self`` itself when ``other`` adds nothing (a held
        read link validated for this mark stays valid)."""
        position = _max(self.position, other.position)
        floor = _max(self.floor, other.floor)
        last_write_at = _max(self.last_write_at, other.last_write_at)
        if (position == self.position and floor == self.floor
                and last_write_at == self.last_write_at):  # fmt: skip
            return self
        return Mark(position, floor, last_write_at)


def _max(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


_EMPTY = Mark()


class Scope:
    """The consistency state of one unit of work; see :func:`session`.

    Reads take :meth:`mark` without a lock (entries are immutable tuples swapped
    in whole); the updates take a small lock because a scope can be shared by
    threads (``asyncio.to_thread`` copies the context, scope included) and a
    lost update would lose a write's position.
    """

    __slots__ = ("_latest", "_lock", "_marks", "user_id")

    def __init__(self, parent: Scope | None = None, *, user_id: str | None = None) -> None:
        self._lock = threading.Lock()
        self._marks: dict[int | None, Mark] = dict(parent._marks) if parent else {}
        self._latest: int | None = parent._latest if parent else None
        inherited = parent.user_id if parent is not None else None
        self.user_id: str | None = user_id if user_id is not None else inherited

    # -- reading -------------------------------------------------------------

    def mark(self, system_id: int | None) -> Mark:
        """This scope's position, floor and last write on one cluster."""
        marks = self._marks
        mark = marks.get(system_id, _EMPTY)
        if system_id is not None and None in marks:  # tokens made without a cluster id
            mark = mark.merged(marks[None])
        return mark

    def token_for(self, system_id: int | None) -> Token | None:
        """The token to hand on for one cluster (its commits this scope must see)."""
        position = self.mark(system_id).position
        return None if position is None else Token(position, system_id)

    @property
    def token(self) -> Token | None:
        """The token of the cluster this scope last wrote to (or was given a token for).

        An application with one cluster needs nothing else; with several, use
        ``cluster.token`` (= ``token_for(cluster.system_identifier)``).
        """
        if not self._marks:
            return None
        key = self._latest if self._latest in self._marks else next(iter(self._marks))
        return self.token_for(key)

    # -- updating ------------------------------------------------------------

    def advance(self, token: Token) -> None:
        """Require every later read of this scope to see ``token``'s commit."""
        self._update(token.system_id, Mark(position=token.lsn))

    def note_write(self, system_id: int | None, position: int | None, at: float) -> None:
        """A write transaction committed at ``position`` (if known) at monotonic time ``at``."""
        self._update(system_id, Mark(position=position, last_write_at=at))

    def raise_floor(self, system_id: int | None, position: int) -> None:
        """Monotonic reads: this scope has seen data as of ``position``."""
        self._update(system_id, Mark(floor=position))

    def merge_mark(self, system_id: int | None, mark: Mark) -> None:
        """Take what ``mark`` knows about one cluster (e.g. a user's last write)."""
        self._update(system_id, mark)

    def absorb(self, other: Scope) -> None:
        """Take every position ``other`` learned (a nested scope closing into its parent)."""
        for system_id, mark in list(other._marks.items()):
            self._update(system_id, mark)
        if other._latest is not None:
            self._latest = other._latest

    def _update(self, system_id: int | None, change: Mark) -> None:
        with self._lock:
            self._marks[system_id] = self._marks.get(system_id, _EMPTY).merged(change)
            if change.position is not None or change.last_write_at is not None:
                self._latest = system_id

    def __repr__(self) -> str:
        return f"<Scope token={self.token} user_id={self.user_id!r}>"


_SCOPE: contextvars.ContextVar[Scope] = contextvars.ContextVar("replica_router.scope")
# Code outside every session(): one scope for the whole process (see the module doc).
_ROOT = Scope()


def current_scope() -> Scope:
    """The scope of the current ``session()``, else the process-wide root scope.

    Nothing is created or set here: a context that asks first (a thread of
    ``asyncio.to_thread``, a copied context) must not make a scope its caller
    never sees.
    """
    scope = _SCOPE.get(None)
    return _ROOT if scope is None else scope


# The read hot path's name for the same lookup (it creates nothing either).
peek_scope = current_scope


def _root_after_fork() -> None:
    """In a forked child: the root keeps what the parent knew (the child goes on with
    the parent's work, so it must read the parent's writes) under a fresh lock (a
    thread of the parent may have held the old one at the fork)."""
    _ROOT._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_root_after_fork)


@contextmanager
def unit_of_work() -> Iterator[Scope]:
    """A framework's natural boundary (Peewee's ``connection_context()``) as a unit of
    work for code outside every session: it starts empty, so another thread's writes
    do not steer its reads, and hands what it learned to the root scope on exit, so
    code after it still reads its writes. Inside a session it is that session."""
    if _SCOPE.get(None) is not None:
        yield current_scope()
        return
    scope = Scope()
    reset = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(reset)
        _ROOT.absorb(scope)


def session(
    token: Token | str | None = None, *, user_id: str | None = None, inherit: bool = True
) -> _Session:
    """Open a nested consistency scope for the ``with`` block.

    It starts with everything the enclosing scope knows (plus ``token``), and on
    exit hands what it learned back to the enclosing scope: code after the block
    is the same unit of work and must still read its writes. ``token`` may be a
    ``Token`` or its string; a bad string raises :class:`TokenError`. This
    module-level form accepts any cluster's token; ``Cluster.session()`` also
    refuses a token of another cluster.

    ``inherit=False`` opens an independent unit of work instead (a web request,
    a job taken from a queue): it starts empty and gives nothing back, so a
    long-lived thread or task neither leaks one request's writes into the next
    nor accumulates them all.
    """
    return _Session(token, user_id, inherit)


class _Session(ContextDecorator):
    """:func:`session`'s context manager. A class rather than a generator: every web
    request opens one, and the generator's machinery cost twice the scope itself.
    Usable as a decorator too (a fresh one per call), as the generator was."""

    _entered: tuple[Scope, Scope | None, contextvars.Token[Scope]]  # set by __enter__

    def __init__(self, token: Token | str | None, user_id: str | None, inherit: bool) -> None:
        self._token = token
        self._user_id = user_id
        self._inherit = inherit

    def _recreate_cm(self) -> _Session:
        return _Session(self._token, self._user_id, self._inherit)

    def __enter__(self) -> Scope:
        token = self._token
        if isinstance(token, str):
            token = Token.parse(token)
        parent = current_scope() if self._inherit else None
        scope = Scope(parent, user_id=self._user_id)
        if token is not None:
            scope.advance(token)
        self._entered = (scope, parent, _SCOPE.set(scope))
        return scope

    def __exit__(self, *exc_info: object) -> None:
        scope, parent, reset = self._entered
        _SCOPE.reset(reset)
        if parent is not None:
            parent.absorb(scope)


def commit_and_capture(conn: psycopg.Connection[Any]) -> int | None:
    """Commit ``conn``'s transaction; return a WAL position at or past its commit record.

    One round trip: ``COMMIT; SELECT pg_current_wal_insert_lsn()`` goes as one
    simple-protocol message, so the server runs both and answers once. It is sent
    with libpq's ``PQexec`` (psycopg's ``pgconn.exec_``, under the connection's
    lock) rather than a cursor: the cursor's multi-result machinery costs more
    client time than the SELECT costs the server. ``PQexec`` returns the last
    result only, which is sound because the COMMIT is sent only from a healthy
    transaction: if it fails, its error is the last result (nothing after it
    runs). From an aborted transaction this rolls back and returns ``None``
    (what COMMIT would do); with no transaction it returns ``None``. The
    connection must be on the primary.
    """
    status = conn.pgconn.transaction_status
    if status != TransactionStatus.INTRANS:
        if status == TransactionStatus.INERROR:
            conn.rollback()
        return None
    with conn.lock:
        result = conn.pgconn.exec_(_COMMIT_AND_POSITION)
    if result.status == ExecStatus.FATAL_ERROR:
        if conn.pgconn.status == ConnStatus.BAD:
            message = result.get_error_message(conn.info.encoding)
            raise psycopg.OperationalError(f"COMMIT failed, outcome unknown: {message}")
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    if result.status != ExecStatus.TUPLES_OK or not result.ntuples:
        return None
    value = result.get_value(0, 0)
    return None if value is None else parse_lsn(value.decode())


async def acommit_and_capture(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """:func:`commit_and_capture` for an ``AsyncConnection`` (a cursor: ``PQexec``
    would block the event loop)."""
    status = conn.pgconn.transaction_status
    if status != TransactionStatus.INTRANS:
        if status == TransactionStatus.INERROR:
            await conn.rollback()
        return None
    cursor = conn.cursor()
    await cursor.execute(_COMMIT_AND_POSITION)
    return _read_position(cursor)


def _read_position(cursor: psycopg.AsyncCursor[Any]) -> int | None:
    if cursor.statusmessage != "COMMIT":
        return None  # "ROLLBACK": the transaction had failed, nothing was committed
    if not cursor.nextset():
        return None
    row = cursor.pgresult
    value = row.get_value(0, 0) if row is not None and row.ntuples else None
    return None if value is None else parse_lsn(value.decode())
