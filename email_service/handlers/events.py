"""The events stream's operation: answered on the event loop, before Flask.

Connexion needs a handler for every operation of the spec. ``streamEvents`` is answered by
``email_service.api.events.EventStreamMiddleware`` after Connexion's security, rate limit and
validation, so an open stream never holds one of Flask's request threads; a request reaches this
function only on an app built without that middleware.
"""

from __future__ import annotations

from typing import NoReturn

from email_service.errors import ServiceError


def stream_events(account_id: str | None = None) -> NoReturn:
    raise ServiceError("The events stream is not served by this application")
