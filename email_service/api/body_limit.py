"""Refuse request bodies above the configured size before anything reads them whole.

It sits after routing, so an operation may allow more than the default (uploads do).
"""

from __future__ import annotations

from collections.abc import Mapping

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

        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise HTTPException(400, detail="Content-Length is not a number") from None
                if declared > limit:
                    raise too_large()
        seen = 0

        async def counting_receive() -> Message:
            # A chunked body has no Content-Length; count what actually arrives.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large()
            return message

        await self.app(scope, counting_receive, send)
