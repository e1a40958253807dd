"""Refuse request bodies above the configured size before anything reads them whole.

It sits after routing, so an operation may allow more than the default (uploads do). A chunked
body (no Content-Length) is read here, within the same limit, and handed on with its length:
Connexion's validators take a request without Content-Length for one without a body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, per_operation: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.default = max_bytes
        self.per_operation = dict(per_operation or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        operation = scope.get("extensions", {}).get("connexion_routing", {}).get("operation_id")
        limit = self.per_operation.get(operation, self.default)

        def too_large() -> HTTPException:
            return HTTPException(413, detail=f"Request body exceeds {limit} bytes")

        headers = Headers(scope=scope)
        if "content-length" in headers:
            try:
                declared = int(headers["content-length"])
            except ValueError:
                raise HTTPException(400, detail="Content-Length is not a number") from None
            if declared > limit:
                raise too_large()
        elif "transfer-encoding" in headers:
            body = await _read_within(receive, limit, too_large)
            scope["headers"] = [
                *((k, v) for k, v in scope["headers"] if k != b"transfer-encoding"),
                (b"content-length", str(len(body)).encode()),
            ]
            receive = _replay(body, receive)
        seen = 0

        async def counting_receive() -> Message:
            # Whatever arrives beyond a declared length is counted too.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large()
            return message

        await self.app(scope, counting_receive, send)


async def _read_within(receive: Receive, limit: int, too_large: Callable[[], HTTPException]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client went away; nothing will read this request.
            raise HTTPException(400, detail="Request body ended early")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
