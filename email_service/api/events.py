"""ASGI glue for ``GET /api/events``: server-sent events served on the event loop.

Connexion's FlaskApp runs Flask handlers in a fixed pool of 10 threads; a stream held open in a
handler would take one of them for its whole life, and ten streams would stop the API. This
middleware sits at the end of Connexion's stack (after routing, authentication, the rate limit
and request validation, so all of those apply exactly as to every other operation) and answers
the one operation itself, as a coroutine per stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
from connexion.exceptions import OAuthProblem
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from email_service.api.errors import UNAUTHORIZED_MESSAGE
from email_service.changes.stream import EventHub, EventStream
from email_service.errors import DependencyUnavailableError
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
# A client that takes nothing for this long is gone (or stuck): its stream is ended.
SEND_TIMEOUT_SECONDS = 60
SHUTDOWN_GRACE_SECONDS = 2


class EventStreamMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        operation: str,
        hub: EventHub,
        heartbeat_seconds: int,
        max_catch_up: int,
        max_streams_per_user: int,
    ) -> None:
        self.app = app
        self.operation = operation
        self.hub = hub
        self.heartbeat_seconds = heartbeat_seconds
        self.max_catch_up = max_catch_up
        self.max_streams_per_user = max_streams_per_user

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions", {})
        if scope["type"] != "http" or extensions.get("connexion_routing", {}).get("operation_id") != self.operation:
            await self.app(scope, receive, send)
            return
        token_info = extensions.get("connexion_context", {}).get("token_info")
        if not token_info:
            # The spec requires authentication here, so security has run; never stream without it.
            raise OAuthProblem(detail=UNAUTHORIZED_MESSAGE)
        principal = Principal(uuid.UUID(token_info["tenant_id"]), uuid.UUID(token_info["sub"]))
        request = Request(scope)
        # Opened (and refused with a 400 or 404 ErrorResponse) before the response starts.
        stream = await EventStream.open(
            self.hub,
            principal,
            request.query_params.get("accountId"),
            request.headers.get("last-event-id") or None,
            max_catch_up=self.max_catch_up,
            max_per_user=self.max_streams_per_user,
        )
        expires = token_info.get("claims", {}).get("exp")
        # On shutdown the stream is asked to end, so its response completes cleanly instead of
        # being cut off mid-body; the client then reconnects (elsewhere) with its last id.
        shutdown = anyio.Event()
        response = EventSourceResponse(
            _frames(stream, float(expires) if expires is not None else None, shutdown),
            shutdown_event=shutdown,
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
            ping=self.heartbeat_seconds,
            send_timeout=SEND_TIMEOUT_SECONDS,
            headers={"Cache-Control": "no-store"},
        )
        try:
            await response(scope, receive, send)
        finally:
            stream.close()


async def _frames(stream: EventStream, until: float | None, shutdown: anyio.Event) -> AsyncIterator[ServerSentEvent]:
    async def stop_on_shutdown() -> None:
        await shutdown.wait()
        stream.stop()

    watcher = asyncio.create_task(stop_on_shutdown())
    try:
        async for event in stream.events(until):
            yield ServerSentEvent(data=json.dumps(event.data, separators=(",", ":")), event=event.event, id=event.id)
    except DependencyUnavailableError:
        # The response has started, so no error answer is possible: end the stream; the client
        # reconnects with its last id and misses nothing.
        log.warning("events: database unreachable, ending a stream")
    finally:
        watcher.cancel()


def hub_lifespan(hub: EventHub) -> Callable[[object], AbstractAsyncContextManager[None]]:
    """Closes the hub's connections when the server stops."""

    @asynccontextmanager
    async def lifespan(app: object) -> AsyncIterator[None]:
        yield
        await hub.close()

    return lifespan
