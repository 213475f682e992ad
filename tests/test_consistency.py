"""Tokens and scopes, without a server."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading

import pytest

from replica_router.consistency import Scope, Token, current_scope, peek_scope, session
from replica_router.errors import TokenError

SYSID = 7312345678901234567


def test_token_round_trips_through_its_string() -> None:
    for token in (
        Token(0, SYSID),
        Token(0x16B374D848, SYSID),
        Token(2**64 - 1, 2**64 - 1),
        Token(12345, None),
    ):
        text = str(token)
        assert Token.parse(text) == token
        assert len(text) <= 30
        assert all(c.isalnum() or c == "." for c in text), text  # cookie and URL safe


def test_token_string_is_short_and_versioned() -> None:
    assert str(Token(0x3000060, 1)) == "1.1.tys80"
    assert str(Token(5, None)) == "1..5"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "   ",
        "hello",
        "1.abc",
        "2.abc.def",  # unknown version
        "1.abc.",  # no position
        "1.a_b.c",  # int() would accept the underscore; we don't
        "1.+1.5",
        "1.-1.5",
        "1.zzzzzzzzzzzzzz.5",  # 14 digits: more than 64 bits
        "1.5.zzzzzzzzzzzzz",  # 13 digits but > 2**64-1
        "1.0.5",  # system id 0 does not exist
        "1.5.5.5",
        "x" * 5000,
    ],
)
def test_parse_rejects_garbage_with_a_clear_error(garbage: str) -> None:
    with pytest.raises(TokenError, match="token"):
        Token.parse(garbage)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TokenError, match="string"):
        Token.parse(b"1.1.1")  # type: ignore[arg-type]


def test_parse_error_does_not_echo_a_huge_input() -> None:
    with pytest.raises(TokenError) as info:
        Token.parse("1." + "y" * 10_000)
    assert len(str(info.value)) < 200


def test_token_validates_its_fields() -> None:
    with pytest.raises(TokenError):
        Token(-1, SYSID)
    with pytest.raises(TokenError):
        Token(2**64, SYSID)
    with pytest.raises(TokenError):
        Token(True, SYSID)
    with pytest.raises(TokenError):
        Token(1, 0)


def test_merge_keeps_the_later_position_and_refuses_other_clusters() -> None:
    a, b = Token(10, SYSID), Token(20, SYSID)
    assert a.merge(b) == b
    assert b.merge(a) == b
    assert a.merge(None) == a
    assert Token(30, None).merge(a) == Token(30, SYSID)  # the identity survives
    with pytest.raises(TokenError, match="two clusters"):
        a.merge(Token(5, SYSID + 1))


def test_repr_shows_the_lsn_the_server_way() -> None:
    assert repr(Token(0x16B374D848, 3)) == "Token(lsn='16/B374D848', system_id=3)"


def run_in_fresh_context(fn):  # type: ignore[no-untyped-def]
    return contextvars.Context().run(fn)


def test_code_outside_every_session_shares_one_root_scope() -> None:
    """Design rule 6: no context makes a scope of its own by asking first, so a copy
    (``to_thread``, an executor, ``copy_context().run``) and its caller see one object."""
    root = run_in_fresh_context(current_scope)
    assert run_in_fresh_context(peek_scope) is root
    assert contextvars.copy_context().run(current_scope) is not root  # the test's session
    seen: list[Scope] = []
    thread = threading.Thread(target=lambda: seen.append(current_scope()))
    thread.start()
    thread.join()
    assert seen == [root]
    with session(inherit=False) as own:
        assert contextvars.copy_context().run(current_scope) is own
    assert run_in_fresh_context(current_scope) is root


def test_scope_keeps_positions_per_cluster() -> None:
    scope = Scope()
    scope.advance(Token(100, 1))
    scope.advance(Token(50, 2))
    scope.advance(Token(80, 1))  # older: ignored
    assert scope.token_for(1) == Token(100, 1)
    assert scope.token_for(2) == Token(50, 2)
    assert scope.token_for(3) is None
    assert scope.token == Token(100, 1)  # the cluster last given a token


def test_a_token_without_cluster_applies_to_every_cluster() -> None:
    scope = Scope()
    scope.advance(Token(70, None))
    assert scope.mark(1).position == 70
    scope.advance(Token(90, 1))
    assert scope.mark(1).position == 90
    assert scope.mark(2).position == 70


def test_floor_and_window_marks() -> None:
    scope = Scope()
    scope.raise_floor(1, 40)
    scope.raise_floor(1, 30)
    scope.note_write(1, None, at=12.5)
    mark = scope.mark(1)
    assert mark.floor == 40
    assert mark.position is None
    assert mark.last_write_at == 12.5
    assert scope.token is None  # a floor or a window mark is not a token


def test_session_nests_inherits_and_hands_back() -> None:
    def body() -> None:
        outer = current_scope()
        outer.advance(Token(10, SYSID))
        with session() as inner:
            assert inner is not outer
            assert inner.token == Token(10, SYSID)  # inherited
            inner.advance(Token(25, SYSID))
            with session(token=str(Token(20, SYSID)), user_id="u1") as innermost:
                assert innermost.token == Token(25, SYSID)
                assert innermost.user_id == "u1"
                assert current_scope() is innermost
            assert current_scope() is inner
        assert current_scope() is outer
        assert outer.token == Token(25, SYSID)  # the write in the block is not forgotten

    run_in_fresh_context(body)


def test_session_parses_strings_and_rejects_garbage() -> None:
    def body() -> None:
        with pytest.raises(TokenError), session(token="nonsense"):
            pass
        assert current_scope().token is None

    run_in_fresh_context(body)


def test_session_scope_survives_an_exception_and_restores_the_parent() -> None:
    def body() -> None:
        outer = current_scope()
        with pytest.raises(RuntimeError), session() as inner:
            inner.advance(Token(5, 1))
            raise RuntimeError("boom")
        assert current_scope() is outer
        assert outer.token_for(1) == Token(5, 1)

    run_in_fresh_context(body)


def test_session_as_a_decorator_opens_a_scope_per_call_and_recursion() -> None:
    seen: list[Scope] = []

    @session(inherit=False)
    def job(depth: int) -> None:
        mine = current_scope()
        seen.append(mine)
        mine.advance(Token(100 + depth, SYSID))
        if depth:
            job(depth - 1)
        assert current_scope() is mine  # the inner call's scope is gone again

    def body() -> None:
        outer = current_scope()
        job(1)
        job(0)
        assert len({id(scope) for scope in seen}) == 3  # each call its own scope
        assert current_scope() is outer
        assert outer.token is None  # inherit=False hands nothing back

    run_in_fresh_context(body)


def test_a_thread_outside_every_session_shares_the_root_and_a_session_keeps_its_own() -> None:
    def body() -> None:
        current_scope().advance(Token(99, 1))
        seen: list[Token | None] = []

        def job() -> None:
            seen.append(current_scope().token)  # the root: what the caller wrote
            with session(inherit=False) as own:  # a unit of work of its own
                seen.append(own.token)
                own.advance(Token(120, 1))
            current_scope().advance(Token(110, 1))  # outside it: the root

        thread = threading.Thread(target=job)
        thread.start()
        thread.join()
        assert seen == [Token(99, 1), None]
        assert current_scope().token == Token(110, 1)

    run_in_fresh_context(body)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_keeps_the_roots_positions_under_a_fresh_lock() -> None:
    """Design rule 7: the child goes on with the parent's work (it reads the parent's
    writes), and a lock a parent thread held at the fork cannot block it."""
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork")
    root = run_in_fresh_context(current_scope)
    root.advance(Token(77, 1))
    root._lock.acquire()  # as if another thread were updating it at the fork
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if the root works and kept the token
            code = 1
            try:
                child_root = run_in_fresh_context(current_scope)
                kept = child_root.token == Token(77, 1)
                if not child_root._lock.acquire(timeout=5):  # the parent's lock: held
                    code = 3
                else:
                    child_root._lock.release()
                    child_root.advance(Token(80, 1))
                    code = 0 if kept and child_root.token == Token(80, 1) else 2
            finally:
                os._exit(code)
    finally:
        root._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert root.token == Token(77, 1)  # the child's write stays in the child


def test_asyncio_tasks_get_their_own_nested_sessions() -> None:
    async def worker(n: int) -> Token | None:
        with session() as scope:
            scope.advance(Token(n, 1))
            await asyncio.sleep(0)
            return current_scope().token

    async def main() -> list[Token | None]:
        return list(await asyncio.gather(*(worker(n) for n in range(1, 6))))

    assert asyncio.run(main()) == [Token(n, 1) for n in range(1, 6)]


def test_concurrent_advances_keep_the_maximum() -> None:
    scope = Scope()
    barrier = threading.Barrier(8)

    def advance(start: int) -> None:
        barrier.wait()
        for lsn in range(start, 4000, 8):
            scope.advance(Token(lsn, 1))

    threads = [threading.Thread(target=advance, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert scope.token_for(1) == Token(3999, 1)
