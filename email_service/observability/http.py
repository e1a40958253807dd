"""The API's observability middleware: request ids, an access line, HTTP metrics and ``GET /metrics``.

It sits outside Connexion's routing and error handling, so it sees every answer's final status
(401s, 429s and validation errors included) and, once the request is routed, its operation.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from email_service.api.errors import error_body
from email_service.api.resolver import handler_path
from email_service.observability import logs, metrics
from email_service.runtime import Runtime

access_log = logging.getLogger("email_service.access")
REQUEST_ID_HEADER = b"x-request-id"
# An incoming id is kept only if it is short and plain, so it cannot forge or bloat log lines.
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
METRICS_PATH = "/metrics"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_METHOD_LABELS = frozenset(m.upper() for m in HTTP_METHODS)  # any other method is labelled OTHER


def _operation_names(spec: Mapping[str, Any]) -> dict[str, str]:
    return {
        handler_path(operation): operation["operationId"]
        for item in spec["paths"].values()
        for method, operation in item.items()
        if method in HTTP_METHODS and isinstance(operation, dict) and "operationId" in operation
    }


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, spec: Mapping[str, Any], runtime: Runtime) -> None:
        self.app = app
        self.token = runtime.settings.metrics_token
        self.registry = metrics.registry(runtime)
        metrics.OPERATION_NAMES.update(_operation_names(spec))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope["path"] == METRICS_PATH and self.token:
            await self._metrics(headers, send)
            return
        incoming = headers.get(REQUEST_ID_HEADER, b"")
        request_id = incoming.decode() if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        # Connexion copies the scope as it routes, but these two dicts are shared with the copies:
        # what routing and authentication put in them is what the log lines and labels read.
        extensions = scope.setdefault("extensions", {})
        path_params = scope.setdefault("path_params", {})
        logs.start_request(request_id, extensions, path_params)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                echoed = (REQUEST_ID_HEADER, request_id.encode())
                message = {**message, "headers": [*message.get("headers", []), echoed]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            routed = (extensions.get("connexion_routing") or {}).get("operation_id")
            operation = metrics.OPERATION_NAMES.get(routed, "unrouted") if routed else "unrouted"
            method = scope["method"] if scope["method"] in _METHOD_LABELS else "OTHER"
            metrics.HTTP_REQUESTS.labels(operation, method, str(status)).inc()
            metrics.HTTP_DURATION.labels(operation, method).observe(elapsed)
            # The path without its query string: queries may hold search words, addresses, or
            # the credentials of a signed link or an OAuth2 callback.
            access_log.info(
                "%s %s %d %.0f ms (%s)",
                method,
                # Quoted, as uvicorn quotes it: a decoded %0A must not start a forged line.
                urllib.parse.quote(scope["path"]),
                status,
                elapsed * 1000,
                operation,
                extra={"operation": operation, "status": status, "duration_ms": round(elapsed * 1000, 1)},
            )

    async def _metrics(self, headers: dict[bytes, bytes], send: Send) -> None:
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if not metrics.token_matches(self.token, authorization):
            body = error_body(401, "metrics need the metrics bearer token (EMAIL_SERVICE_METRICS_TOKEN)")
            await _answer(send, 401, body, b"application/json", [(b"www-authenticate", b"Bearer")])
            return
        body = await anyio.to_thread.run_sync(metrics.exposition, self.registry)
        await _answer(send, 200, body, metrics.CONTENT_TYPE.encode(), [])


async def _answer(send: Send, status: int, body: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
