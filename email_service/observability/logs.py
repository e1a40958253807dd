"""Log lines: plain text for a terminal, or one JSON object per line with the request's context.

``EMAIL_SERVICE_LOG_FORMAT=json`` gives every line (the service's, uvicorn's, RQ's) ``timestamp``,
``level``, ``logger`` and ``message``, and where known ``request_id``, ``tenant_id``,
``account_id`` and ``task_id``. A request's id comes from its ``X-Request-ID`` (or is made up)
and travels with the tasks the request enqueues, so a job's lines carry the id of the request
that asked for it. Context holds ids only: never a password, token, body or address.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from email_service.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("request_id", "tenant_id", "account_id", "task_id")
# Warnings about libraries' own imports, which a user of the commands can do nothing about.
_LIBRARY_WARNINGS = (
    "Using `httpx` with `starlette.testclient` is deprecated",
    "XDG_RUNTIME_DIR is not set",  # pgserver finds its run directory without it
)


@dataclass(frozen=True)
class LogContext:
    request_id: str | None = None
    tenant_id: str | None = None
    account_id: str | None = None
    task_id: str | None = None
    # A request's ASGI extensions and path parameters, filled in by Connexion as the request is
    # routed and authenticated: the tenant and account are read from them when a line is written.
    request_scope: dict[str, Any] = field(default_factory=dict, compare=False)

    def resolved(self) -> dict[str, str]:
        found = {name: getattr(self, name) for name in CONTEXT_FIELDS}
        extensions = self.request_scope.get("extensions") or {}
        token_info = (extensions.get("connexion_context") or {}).get("token_info") or {}
        if found["tenant_id"] is None and token_info.get("tenant_id"):
            found["tenant_id"] = token_info["tenant_id"]
        path_params = self.request_scope.get("path_params") or {}
        if found["account_id"] is None and isinstance(path_params.get("accountId"), str):
            found["account_id"] = path_params["accountId"]
        return {name: str(value) for name, value in found.items() if value is not None}


_NO_CONTEXT = LogContext()
_context: ContextVar[LogContext] = ContextVar("email_service_log_context", default=_NO_CONTEXT)  # noqa: B039 - frozen


def current() -> LogContext:
    return _context.get()


def bind(**fields: Any) -> None:
    """Add ids to this context's lines (a request's, or a job's)."""
    _context.set(replace(_context.get(), **fields))


def start_request(request_id: str, extensions: dict[str, Any], path_params: dict[str, Any]) -> None:
    scope = {"extensions": extensions, "path_params": path_params}
    _context.set(LogContext(request_id=request_id, request_scope=scope))


def carried() -> dict[str, str]:
    """What a job enqueued now carries of this context (its request id), for its own lines."""
    request_id = _context.get().request_id
    return {"request_id": request_id} if request_id else {}


def start_job(task_id: str, tenant_id: str, account_id: str | None, meta: dict[str, Any] | None) -> None:
    """A job's lines carry its task, tenant, account and the request id it was enqueued with."""
    request_id = (meta or {}).get("request_id")
    _context.set(
        LogContext(
            request_id=request_id if isinstance(request_id, str) else None,
            tenant_id=tenant_id,
            account_id=account_id,
            task_id=task_id,
        )
    )


class ContextFilter(logging.Filter):
    """Puts the context's ids on every record, where a JSON line shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().resolved().items():
            setattr(record, name, value)
        return True


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            # uvicorn repeats each message with terminal colours in an extra field.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )
    return logging.Formatter(TEXT_FORMAT)


def configure(settings: Settings) -> None:
    """One handler on the root logger, which uvicorn's and RQ's loggers reach too (see ``cli``)."""
    for message in _LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(settings.log_format))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
