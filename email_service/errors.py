"""Errors that services raise and the API turns into ``ErrorResponse`` bodies.

Each carries the HTTP status, the short ``error`` title and the machine-readable ``code``
of the seed's ErrorResponse, so services never build HTTP responses themselves.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    error = "Internal server error"
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequestError(ServiceError):
    status = 400
    error = "Bad request"
    code = "VALIDATION_ERROR"


class ForbiddenError(ServiceError):
    status = 403
    error = "Forbidden"
    code = "FORBIDDEN"


class NotFoundError(ServiceError):
    status = 404
    error = "Not found"
    code = "NOT_FOUND"


class ConflictError(ServiceError):
    status = 409
    error = "Conflict"
    code = "CONFLICT"


class TooManyRequestsError(ServiceError):
    status = 429
    error = "Rate limit exceeded"
    code = "RATE_LIMITED"


class DependencyUnavailableError(ServiceError):
    status = 503
    error = "Service unavailable"
    code = "DEPENDENCY_UNAVAILABLE"
