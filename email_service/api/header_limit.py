"""Bound the request's header block: 431 beyond ``max_header_bytes``.

Two layers. ``BoundedH11Protocol`` is the HTTP server's parser (uvicorn's h11 protocol): it stops
buffering a header block once it exceeds the limit, so a 10 MB ``Authorization`` header is never
read whole (uvicorn's default httptools parser has no such bound). ``HeaderLimitMiddleware`` checks
the parsed headers exactly, whatever server runs the app: h11 only measures a block that has not
arrived complete, so one that arrives in a single read is measured here.
"""

from __future__ import annotations

import sys

import h11
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from email_service.api.errors import error_body

TOO_LARGE_MESSAGE = "Request headers exceed {limit} bytes"
# After a refusal the client may still be sending; closing at once would reset the connection and
# could destroy the answer before the client reads it (a lingering close, as nginx does).
LINGER_SECONDS = 2.0


class HeaderLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Each header line is "name: value\r\n".
            size = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
            if size > self.max_bytes:
                raise HTTPException(431, detail=TOO_LARGE_MESSAGE.format(limit=self.max_bytes))
        await self.app(scope, receive, send)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose refusals are ``ErrorResponse`` JSON, 431 for oversized headers.

    Run it with ``h11_max_incomplete_event_size`` set to the header limit. uvicorn answers every
    request h11 cannot parse through ``send_400_response`` from inside its ``except`` block, so the
    exception, and h11's status hint (431 for a header block over the limit), is still at hand.
    """

    _refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused request, read only so the answer is not reset away
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        exc = sys.exc_info()[1]
        status = 400
        message = "The request is not valid HTTP/1.1"
        if isinstance(exc, h11.RemoteProtocolError) and exc.error_status_hint == 431:
            status = 431
            message = TOO_LARGE_MESSAGE.format(limit=self.config.h11_max_incomplete_event_size)
        body = error_body(status, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self._refused = True
        self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
