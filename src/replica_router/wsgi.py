"""Read-your-writes across requests and worker processes, for WSGI apps (Flask, ...).

Each request runs in its own consistency scope, seeded with the token the client
sent back (header or cookie); when the request writes, the response carries the
new token. The scope lives in a private copy of the context that also covers
iterating the response body, so a streamed body still reads with the token and
nothing leaks into the server thread's context.

The token is read when the app calls ``start_response`` (after a Flask view has
returned): headers cannot change later, so writes made while the body is being
iterated cannot hand their token on. Write before you respond.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from functools import cached_property
from typing import TYPE_CHECKING

from ._web import TokenMiddleware, enter_scope

if TYPE_CHECKING:  # typeshed's WSGI types, the ones Flask and werkzeug are typed with
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import (
        StartResponse,
        WSGIApplication,  # noqa: F401 (quoted in the base class)
        WSGIEnvironment,
    )

__all__ = ["ConsistencyMiddleware"]


class ConsistencyMiddleware(TokenMiddleware["WSGIApplication"]):
    """Carry the consistency token between an HTTP client and a ``Cluster``."""

    @cached_property
    def _environ_key(self) -> str:
        return "HTTP_" + self.transport.header_name.upper().replace("-", "_")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        incoming = self.transport.incoming(
            environ.get(self._environ_key),
            environ.get("HTTP_COOKIE"),
            https=self.is_https(
                environ.get("wsgi.url_scheme", "http"), environ.get("HTTP_X_FORWARDED_PROTO")
            ),
        )
        context = contextvars.copy_context()
        stack = ExitStack()
        consistency, incoming = context.run(enter_scope, stack, self.cluster, incoming)

        def start_with_token(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None, /
        ) -> Callable[[bytes], object]:
            extra = self.response_headers(incoming, consistency)
            return start_response(status, [*headers, *extra], exc_info)

        try:
            body = context.run(self.app, environ, start_with_token)
        except BaseException:
            context.run(stack.close)
            raise
        return _ScopedBody(body, context, stack)


class _ScopedBody:
    """The app's body, iterated and closed inside the request's context.

    A server calls ``close()``; a test client may never do so (Flask's
    ``test_client`` without ``buffered=True``) and just drops the body. Then the
    scope is closed when the body is garbage-collected, still inside the
    request's context: left to the garbage collector, the scope's generator
    would be closed in whatever context is current and fail to reset its
    context variable ("... was created in a different Context").
    """

    def __init__(self, body: Iterable[bytes], context: contextvars.Context, stack: ExitStack):
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._context = context
        self._close_scope = weakref.finalize(self, context.run, stack.close)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._body)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            self._close_scope()
