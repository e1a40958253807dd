"""No redirect for a trailing slash: such a path answers 404.

Starlette's routers redirect ``/api/accounts/`` to ``/api/accounts`` with an absolute
``Location`` built from the request's ``Host`` header, so anyone who can set that header (a
cache, a proxy that forwards it, a crafted link) could send callers to another host. No route of
the spec ends with a slash, so the redirect never helped a correct client.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send


class TrailingSlashMiddleware:
    def __init__(self, app: ASGIApp, exempt_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        # Swagger UI serves its index and files below a directory path ending in '/'.
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if len(path) > 1 and path.endswith("/") and not path.startswith(self.exempt_prefixes):
                raise HTTPException(404)
        await self.app(scope, receive, send)
