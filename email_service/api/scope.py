from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send


class ScopeValuesMiddleware:
    """Puts this app's collaborators into every request's scope, for code Connexion calls by name."""

    def __init__(self, app: ASGIApp, values: Mapping[str, Any]) -> None:
        self.app = app
        self.values = dict(values)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {}).update(self.values)
        await self.app(scope, receive, send)
