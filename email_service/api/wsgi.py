"""How Flask's answers get from its worker threads to the event loop: whole, in one hop.

Connexion runs Flask behind a2wsgi, whose responder hands every piece of a response (the status
line, each body chunk, the closing empty chunk) from the worker thread to the event loop one at a
time, and blocks the thread on each hand-off until the loop has taken it: three cross-thread
round trips, each a future, a condition variable and a wake-up of the loop, for a JSON answer
that Flask produced as one chunk. Under load those hand-offs were a sixth of the API process's
CPU. Here a response is held in the worker thread while it stays small, and the event loop sends
it once the thread is done; a response that grows past ``HOLD_BYTES`` (an attachment, a raw
message) is passed on piece by piece as before, so memory per request stays bounded.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

from a2wsgi.wsgi import Body, WSGIMiddleware, WSGIResponder, build_environ

# Larger than any page of JSON the API answers with; small enough to hold for every request thread.
HOLD_BYTES = 256 * 1024


class _HoldingResponder(WSGIResponder):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # What the worker thread produced and the loop has not been given yet; None once streaming.
        self._held: list[dict[str, Any]] | None = []
        self._held_bytes = 0

    def send(self, message: dict[str, Any] | None) -> None:
        held = self._held
        if held is None or message is None:
            super().send(message)
            return
        held.append(message)
        self._held_bytes += len(message.get("body", b""))
        if self._held_bytes > HOLD_BYTES:
            # Too large to hold: from here on, as a2wsgi does, and what was held goes first.
            self._held = None
            for earlier in held:
                super().send(earlier)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        environ = build_environ(scope, Body(self.loop, receive))
        # The sender forwards what the thread passes on once a response streams; idle otherwise.
        sender = self.loop.create_task(self.sender(send))
        try:
            # The handler reads Connexion's request context (context variables) from its thread.
            run = functools.partial(contextvars.copy_context().run, self.wsgi)
            await self.loop.run_in_executor(self.executor, run, environ, self.start_response)
            await self.send_queue.put(None)
            await sender
            held, self._held = self._held, None
            if held:
                await _send_whole(send, held)
            if self.exc_info is not None:
                raise self.exc_info[1].with_traceback(self.exc_info[2])
        finally:
            if not sender.done():
                sender.cancel()


async def _send_whole(send: Any, messages: list[dict[str, Any]]) -> None:
    """The start message, then every body chunk joined into one final body message."""
    chunks = []
    for message in messages:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        else:
            await send(message)
    await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": False})


class HoldingWSGIMiddleware(WSGIMiddleware):
    """a2wsgi's WSGI-to-ASGI adapter (same thread pool), answering small responses in one hop."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await _HoldingResponder(self.app, self.executor, self.send_queue_size)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
