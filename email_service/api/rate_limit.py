"""Per-user rate limits, counted in Redis so every API process shares one counter.

The limits come from the spec's ``x-rate-limits`` table, matched to operations once at start-up:
an entry's endpoint may be a glob (``/api/sync/*``); operations no entry names get the
``ALL_OTHER`` limit, each with its own counter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import anyio
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from email_service.api.errors import RATE_LIMIT_HEADERS_KEY, RateLimitExceeded
from email_service.observability import metrics

log = logging.getLogger(__name__)
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@dataclass(frozen=True)
class Rule:
    bucket: str
    item: RateLimitItem


def rules_from_spec(spec: Mapping[str, Any], key: Callable[[dict], str]) -> dict[str, Rule]:
    """``key(operation)`` -> rule, for every operation that requires authentication.

    ``key`` must give the name Connexion's routing reports for the operation (the resolved handler).
    """
    table = spec["x-rate-limits"]["byEndpoint"]
    default = next(entry for entry in table if entry["endpoint"] == "ALL_OTHER")
    listed = [entry for entry in table if entry is not default]
    global_security = spec.get("security")
    rules: dict[str, Rule] = {}
    for path, item in spec["paths"].items():
        for method in HTTP_METHODS:
            operation = item.get(method)
            if operation is None or not operation.get("security", global_security):
                continue
            entry = next(
                (e for e in listed if e.get("method", "").lower() == method and fnmatchcase(path, e["endpoint"])),
                None,
            )
            if entry is None:
                rules[key(operation)] = Rule(operation["operationId"], _item(default))
            else:
                rules[key(operation)] = Rule(f"{entry['method']} {entry['endpoint']}", _item(entry))
    return rules


def _item(entry: Mapping[str, Any]) -> RateLimitItem:
    return parse(f"{int(entry['limit'])} per {entry['window']}")


def storage_uri(redis_url: str) -> str:
    """The ``limits`` storage URI for a redis-py URL (``unix://`` becomes ``redis+unix://``)."""
    if redis_url.startswith("unix://"):
        return "redis+" + redis_url
    return redis_url


class UserRateLimiter:
    def __init__(self, rules: Mapping[str, Rule], redis_url: str) -> None:
        self.rules = dict(rules)
        storage = storage_from_string(storage_uri(redis_url), socket_timeout=2, socket_connect_timeout=2)
        self._limiter = MovingWindowRateLimiter(storage)

    def hit(self, operation_id: str, user_key: str) -> tuple[bool, dict[str, str]] | None:
        """Count one request; ``None`` when the operation is not limited."""
        rule = self.rules.get(operation_id)
        if rule is None:
            return None
        allowed = self._limiter.hit(rule.item, user_key, rule.bucket)
        reset_at, remaining = self._limiter.get_window_stats(rule.item, user_key, rule.bucket)
        headers = {
            "X-RateLimit-Limit": str(rule.item.amount),
            "X-RateLimit-Remaining": str(max(0, remaining)),
            "X-RateLimit-Reset": str(int(reset_at * 1000)),
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(reset_at - time.time())))
        return allowed, headers


class RateLimitMiddleware:
    """Sits after authentication, so it knows the user and the operation."""

    def __init__(self, app: ASGIApp, limiter: UserRateLimiter | None) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions", {})
        token_info = extensions.get("connexion_context", {}).get("token_info")
        operation_id = extensions.get("connexion_routing", {}).get("operation_id")
        if scope["type"] != "http" or self.limiter is None or not token_info or not operation_id:
            await self.app(scope, receive, send)
            return
        user_key = f"{token_info['tenant_id']}:{token_info['sub']}"
        try:
            outcome = await anyio.to_thread.run_sync(self.limiter.hit, operation_id, user_key)
        except Exception as exc:  # noqa: BLE001 - a Redis outage must not take the whole API down
            log.warning("rate limiter unavailable, request allowed: %s", type(exc).__name__)
            outcome = None
        if outcome is None:
            await self.app(scope, receive, send)
            return
        allowed, headers = outcome
        extensions[RATE_LIMIT_HEADERS_KEY] = headers
        if not allowed:
            metrics.rate_limited(operation_id)
            raise RateLimitExceeded(f"Too many requests - try again in {headers['Retry-After']} seconds", headers)
        raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *raw_headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
