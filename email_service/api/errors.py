"""Every error the API returns is the seed's ``ErrorResponse``, never problem+json or a trace."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping

import psycopg
import sqlalchemy.exc
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from email_service.errors import ServiceError

log = logging.getLogger(__name__)

TITLES = {
    400: ("Bad request", "VALIDATION_ERROR"),
    401: ("Unauthorized", "UNAUTHORIZED"),
    403: ("Forbidden", "FORBIDDEN"),
    404: ("Not found", "NOT_FOUND"),
    405: ("Method not allowed", "METHOD_NOT_ALLOWED"),
    406: ("Not acceptable", "NOT_ACCEPTABLE"),
    409: ("Conflict", "CONFLICT"),
    413: ("Payload too large", "PAYLOAD_TOO_LARGE"),
    415: ("Unsupported media type", "UNSUPPORTED_MEDIA_TYPE"),
    431: ("Request header fields too large", "HEADERS_TOO_LARGE"),
    429: ("Rate limit exceeded", "RATE_LIMITED"),
    500: ("Internal server error", "INTERNAL_ERROR"),
    503: ("Service unavailable", "DEPENDENCY_UNAVAILABLE"),
}
RATE_LIMIT_HEADERS_KEY = "email_service.rate_limit_headers"
# Messages may quote what a caller sent (an id, a path); beyond this length they are cut, so an
# error never mirrors a large input back.
MAX_MESSAGE_CHARS = 240
UNAUTHORIZED_MESSAGE = "Missing or invalid authentication credentials"
NUL_MESSAGE = "text must not contain NUL characters"


def _nul_in_text(exc: Exception) -> bool:
    """Whether PostgreSQL (or psycopg, before sending) refused a NUL character in text or JSON."""
    error = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    # Client side: psycopg cannot send NUL in text; server side: 22P05, \u0000 in jsonb.
    return isinstance(error, psycopg.errors.UntranslatableCharacter) or (
        isinstance(error, psycopg.DataError) and "NUL (0x00)" in str(error)
    )


class RateLimitExceeded(Exception):
    def __init__(self, message: str, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers)


def error_body(status: int, message: str, *, error: str | None = None, code: str | None = None) -> bytes:
    """The ``ErrorResponse`` JSON for ``status``."""
    title, default_code = TITLES.get(status, ("Error", "ERROR"))
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    body = {
        "error": error or title,
        "message": message,
        "code": code or default_code,
        "timestamp": int(time.time() * 1000),
    }
    return json.dumps(body).encode()


def error_response(
    status: int,
    message: str,
    *,
    error: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> ConnexionResponse:
    return ConnexionResponse(
        status_code=status,
        body=error_body(status, message, error=error, code=code),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def _rate_headers(request: ConnexionRequest) -> dict[str, str]:
    return dict(request.scope.get("extensions", {}).get(RATE_LIMIT_HEADERS_KEY, {}))


def install(app: object, allowed_methods: Callable[[str], list[str]]) -> None:
    """Register the handlers on a Connexion app; ``allowed_methods(path)`` feeds the 405 Allow header."""

    def service_error(request: ConnexionRequest, exc: ServiceError) -> ConnexionResponse:
        return error_response(exc.status, exc.message, error=exc.error, code=exc.code, headers=_rate_headers(request))

    def rate_limited(request: ConnexionRequest, exc: RateLimitExceeded) -> ConnexionResponse:
        return error_response(429, exc.message, headers=exc.headers)

    def problem(request: ConnexionRequest, exc: ProblemException) -> ConnexionResponse:
        return _from_status(request, exc.status, exc.detail, dict(exc.headers or {}))

    def http_error(request: ConnexionRequest, exc: HTTPException) -> ConnexionResponse:
        return _from_status(request, exc.status_code, exc.detail, dict(exc.headers or {}))

    def _from_status(request: ConnexionRequest, status: int, detail: object, headers: dict) -> ConnexionResponse:
        headers.update(_rate_headers(request))
        if status == 401:
            message = UNAUTHORIZED_MESSAGE
        elif status == 404:
            message = f"No resource at {request.url.path}"
        elif status == 405:
            methods = allowed_methods(request.url.path)
            headers["Allow"] = ", ".join(methods)
            message = f"{request.method} is not allowed here; allowed: {', '.join(methods)}"
        elif status >= 500:
            message = "The service could not complete the request"
        else:
            message = str(detail) if detail else TITLES.get(status, ("Error",))[0]
        return error_response(status, message, headers=headers)

    def malformed_body(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        message = (
            "Request body is not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "Malformed multipart body"
        )
        return error_response(400, message, headers=_rate_headers(request))

    def data_error(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        # Nothing stored holds a NUL, so one can only have come with the request: a field that
        # has no check of its own is the caller's error, not a 500.
        if _nul_in_text(exc):
            return error_response(400, NUL_MESSAGE, headers=_rate_headers(request))
        return unexpected(request, exc)

    def unexpected(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        # The trace goes to the log only; it must not reach the client.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "The service could not complete the request")

    app.add_error_handler(UnicodeDecodeError, malformed_body)
    app.add_error_handler(MultiPartException, malformed_body)
    app.add_error_handler(ServiceError, service_error)
    app.add_error_handler(RateLimitExceeded, rate_limited)
    app.add_error_handler(ProblemException, problem)
    app.add_error_handler(HTTPException, http_error)
    app.add_error_handler(sqlalchemy.exc.DataError, data_error)
    app.add_error_handler(psycopg.DataError, data_error)
    app.add_error_handler(Exception, unexpected)
