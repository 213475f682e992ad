"""What the ASGI and WSGI middlewares share: reading and writing the token.

A request brings its token in a header (preferred: set by API clients on purpose)
or a cookie (set by us on an earlier response). A token we cannot use -- garbage,
a truncated cookie, a token from another cluster -- is logged at WARNING and
ignored: the request is served as if it had none, never failed. The response
carries the token back only when the request's scope advanced it (it wrote).

The cookie is ``Secure`` when the request came over https (or, behind a proxy
we are told to trust, when ``X-Forwarded-Proto`` says so): a plain-http test
client (Starlette's TestClient, Flask's test_client) drops a Secure cookie
without a word, and the user's next request would read stale data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .consistency import Scope, Token
from .errors import ConfigurationError, TokenError

__all__ = ["Incoming", "SessionSource", "TokenMiddleware", "TokenTransport", "enter_scope"]

log = logging.getLogger("replica_router.web")

# RFC 6265 cookie-name / RFC 7230 header-name characters ("token").
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SAMESITE = {"lax": "Lax", "strict": "Strict", "none": "None"}
_LOGGED_CHARS = 60  # a bad value is quoted in the log only this far


class SessionSource(Protocol):
    """What the middlewares need from a ``Cluster`` or ``AsyncCluster``."""

    @property
    def system_identifier(self) -> int | None: ...

    def session(
        self, token: Token | None = None, *, inherit: bool = True
    ) -> AbstractContextManager[Scope]: ...


@dataclass(frozen=True, slots=True)
class Incoming:
    """The token a request brought, and whether its cookie should be cleared."""

    token: Token | None
    from_cookie: bool = False
    clear_cookie: bool = False  # the cookie held an unusable token: expire it (no more warnings)
    https: bool = False  # the client reached us over https (directly or via a trusted proxy)


_NOTHING = Incoming(None)
_NOTHING_OVER_HTTPS = Incoming(None, https=True)


@dataclass(frozen=True, slots=True)
class TokenTransport:
    """Where the token travels (cookie and/or header) and the cookie's attributes."""

    cookie_name: str = "rr_token"
    header_name: str = "X-Replica-Router-Token"
    secure: bool | None = None  # None: Secure exactly when the request came over https
    httponly: bool = True
    samesite: str | None = "lax"
    max_age: int | None = 3600
    path: str = "/"
    use_cookie: bool = True
    use_header: bool = True

    def __post_init__(self) -> None:
        if not (self.use_cookie or self.use_header):
            raise ConfigurationError("use_cookie and use_header are both off: nothing carries it")
        if not _HTTP_TOKEN.fullmatch(self.cookie_name):
            raise ConfigurationError(f"cookie_name {self.cookie_name!r} is not a valid name")
        if not _HTTP_TOKEN.fullmatch(self.header_name):
            raise ConfigurationError(f"header_name {self.header_name!r} is not a valid name")
        if self.samesite is not None and self.samesite.lower() not in _SAMESITE:
            raise ConfigurationError(
                f"samesite={self.samesite!r}: expected 'lax', 'strict', 'none' or None"
            )
        if self.samesite is not None and self.samesite.lower() == "none" and not self.secure:
            raise ConfigurationError("samesite='none' needs secure=True (browsers drop it)")
        if self.max_age is not None and self.max_age <= 0:
            raise ConfigurationError(f"max_age={self.max_age!r}: expected seconds > 0 or None")
        if not self.path.startswith("/") or ";" in self.path:
            raise ConfigurationError(f"path {self.path!r}: expected an absolute URL path")

    def incoming(
        self, header_value: str | None, cookie_header: str | None, *, https: bool = False
    ) -> Incoming:
        """The first usable token of: the header, then each cookie of our name."""
        if (header_value is None or not self.use_header) and (
            not cookie_header or not self.use_cookie or self.cookie_name not in cookie_header
        ):
            return _NOTHING_OVER_HTTPS if https else _NOTHING  # most requests
        if self.use_header and header_value is not None:
            token = _parse_or_warn(header_value, f"header {self.header_name}")
            if token is not None:
                return Incoming(token, https=https)
        clear_cookie = False
        if self.use_cookie and cookie_header:
            for value in cookie_values(cookie_header, self.cookie_name):
                token = _parse_or_warn(value, f"cookie {self.cookie_name}")
                if token is not None:
                    return Incoming(token, from_cookie=True, https=https)
                clear_cookie = True
        return Incoming(None, clear_cookie=clear_cookie, https=https)

    def cookie_is_secure(self, incoming: Incoming) -> bool:
        """The explicit ``secure=`` setting, else whether the request came over https."""
        return incoming.https if self.secure is None else self.secure

    def response_headers(
        self, incoming: Incoming, scope: Scope, cluster: SessionSource
    ) -> list[tuple[str, str]]:
        """Headers to add to the response: the token when the request advanced it."""
        secure = self.cookie_is_secure(incoming)
        token = scope.token_for(cluster.system_identifier)
        if token is None or token == incoming.token:
            return [("Set-Cookie", self._cookie("", 0, secure))] if incoming.clear_cookie else []
        text = str(token)
        headers = []
        if self.use_cookie:
            headers.append(("Set-Cookie", self._cookie(text, self.max_age, secure)))
        if self.use_header:
            headers.append((self.header_name, text))
        return headers

    def _cookie(self, value: str, max_age: int | None, secure: bool) -> str:
        parts = [f"{self.cookie_name}={value}", f"Path={self.path}"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if secure:
            parts.append("Secure")
        if self.httponly:
            parts.append("HttpOnly")
        if self.samesite is not None:
            parts.append(f"SameSite={_SAMESITE[self.samesite.lower()]}")
        return "; ".join(parts)


App = TypeVar("App")


class TokenMiddleware(Generic[App]):
    """The part both middlewares share: the wrapped app, the cluster, and the
    :class:`TokenTransport` built (and checked) from the keyword options.

    ``secure=None`` (the default) makes the cookie ``Secure`` when the request came
    over https; ``True``/``False`` force it. ``trust_forwarded_proto=True`` takes the
    scheme from ``X-Forwarded-Proto`` (its last value: the one our own proxy set);
    turn it on only behind a proxy that sets that header.
    """

    def __init__(
        self,
        app: App,
        cluster: SessionSource,
        *,
        cookie_name: str = "rr_token",
        header_name: str = "X-Replica-Router-Token",
        secure: bool | None = None,
        trust_forwarded_proto: bool = False,
        httponly: bool = True,
        samesite: str | None = "lax",
        max_age: int | None = 3600,
        path: str = "/",
        use_cookie: bool = True,
        use_header: bool = True,
    ) -> None:
        self.app = app
        self.cluster = cluster
        self.trust_forwarded_proto = trust_forwarded_proto
        self._warned_secure_over_http = False
        self.transport = TokenTransport(
            cookie_name=cookie_name,
            header_name=header_name,
            secure=secure,
            httponly=httponly,
            samesite=samesite,
            max_age=max_age,
            path=path,
            use_cookie=use_cookie,
            use_header=use_header,
        )

    def is_https(self, scheme: str, forwarded_proto: str | None) -> bool:
        """Whether the client reached us over https, as far as we may believe."""
        if self.trust_forwarded_proto and forwarded_proto:
            scheme = forwarded_proto.rsplit(",", 1)[-1]
        return scheme.strip().lower() in ("https", "wss")

    def response_headers(self, incoming: Incoming, scope: Scope) -> list[tuple[str, str]]:
        """The transport's headers; warns once when a Secure cookie goes out over http."""
        headers = self.transport.response_headers(incoming, scope, self.cluster)
        if (
            not incoming.https
            and not self._warned_secure_over_http
            and self.transport.cookie_is_secure(incoming)
            and any(name == "Set-Cookie" for name, _ in headers)
        ):
            self._warned_secure_over_http = True
            log.warning(
                "a Secure %s cookie went out over plain http: clients drop it, so their next"
                " request may read stale data (secure=None follows the request's scheme;"
                " behind an https proxy, trust_forwarded_proto=True)",
                self.transport.cookie_name,
            )
        return headers


def cookie_values(cookie_header: str, name: str) -> Iterable[str]:
    """Every value of cookie ``name`` in a ``Cookie:`` header, in order.

    Hand-rolled rather than ``http.cookies``: that parser gives up on the whole
    header when *another* cookie is malformed, and we must not lose ours to it.
    """
    for pair in cookie_header.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            yield value


def enter_scope(
    stack: ExitStack, cluster: SessionSource, incoming: Incoming
) -> tuple[Scope, Incoming]:
    """Open the request's consistency scope; a token the cluster refuses is dropped
    (and, when it came in the cookie, the cookie is cleared).

    A request is its own unit of work: it starts from a new root scope, so it
    neither inherits nor feeds a scope that the server's thread or task may
    carry (a sync WSGI worker serves every request on one thread, whose context
    would otherwise collect every request's writes and hand them to the next).
    """
    if incoming.token is not None:
        try:
            scope = cluster.session(token=incoming.token, inherit=False)
            return stack.enter_context(scope), incoming
        except TokenError as exc:
            log.warning("ignoring a consistency token from another cluster: %s", exc)
            incoming = Incoming(None, clear_cookie=incoming.from_cookie)
    return stack.enter_context(cluster.session(inherit=False)), incoming


def _parse_or_warn(value: str, where: str) -> Token | None:
    try:
        return Token.parse(value)
    except TokenError as exc:
        shown = value[:_LOGGED_CHARS] + ("..." if len(value) > _LOGGED_CHARS else "")
        log.warning("ignoring a malformed consistency token in %s (%r): %s", where, shown, exc)
        return None
