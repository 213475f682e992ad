"""Read-your-writes across requests and worker processes, for ASGI apps.

Each HTTP request runs in its own consistency scope, seeded with the token the
client sent back (header or cookie). When the request writes, the response
carries the new token, so the client's next request -- served by any worker
process, reading from any replica -- sees that write. Pure ASGI: works with
Starlette, FastAPI and anything else speaking ASGI 3, imports none of them.

The token is read when the app sends ``http.response.start``: headers cannot
change later. A typical endpoint has written by then; a streaming response
that writes *while* streaming its body cannot hand that write's token on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import ExitStack
from functools import cached_property
from typing import Any

from ._web import TokenMiddleware, enter_scope

__all__ = ["ConsistencyMiddleware"]

Message = MutableMapping[str, Any]
ASGIScope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, Receive, Send], Awaitable[None]]


class ConsistencyMiddleware(TokenMiddleware[ASGIApp]):
    """Carry the consistency token between an HTTP client and the cluster.

    ``cluster`` is a ``Cluster`` or an ``AsyncCluster``. Lifespan and websocket
    traffic passes through untouched.
    """

    @cached_property
    def _header_key(self) -> bytes:
        return self.transport.header_name.lower().encode("latin-1")

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_value = forwarded_proto = None
        cookies = []  # HTTP/2 and HTTP/3 clients may send each cookie in its own header
        for key, value in scope["headers"]:
            if key == self._header_key:
                header_value = value.decode("latin-1")
            elif key == b"cookie":
                cookies.append(value.decode("latin-1"))
            elif key == b"x-forwarded-proto":
                forwarded_proto = value.decode("latin-1")
        incoming = self.transport.incoming(
            header_value,
            "; ".join(cookies) or None,
            https=self.is_https(scope.get("scheme", "http"), forwarded_proto),
        )

        with ExitStack() as stack:
            consistency, incoming = enter_scope(stack, self.cluster, incoming)

            async def send_with_token(message: Message) -> None:
                if message["type"] == "http.response.start":
                    extra = self.response_headers(incoming, consistency)
                    if extra:
                        headers = list(message.get("headers", ()))
                        headers.extend(
                            (name.lower().encode("latin-1"), value.encode("latin-1"))
                            for name, value in extra
                        )
                        message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, send_with_token)
