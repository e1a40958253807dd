from __future__ import annotations

from typing import Any

from email_service.handlers import principal, runtime
from email_service.handlers.views import ms
from email_service.models import WebhookAttempt, WebhookEndpoint
from email_service.webhooks import service


def endpoint_view(endpoint: WebhookEndpoint) -> dict[str, Any]:
    """The API form of an endpoint; its secret is only ever in the create and rotate answers."""
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "eventTypes": endpoint.event_types,
        "accountId": endpoint.account_id,
        "status": endpoint.status,
        "disabledReason": endpoint.disabled_reason,
        "disabledAt": ms(endpoint.disabled_at),
        "createdAt": ms(endpoint.created_at),
        "updatedAt": ms(endpoint.updated_at),
        "previousSecretExpiresAt": ms(service.previous_secret_expiry(endpoint)),
    }


def attempt_view(attempt: WebhookAttempt) -> dict[str, Any]:
    return {
        "deliveryId": attempt.delivery_id,
        "eventType": attempt.event_type,
        "attempt": attempt.attempt,
        "attemptedAt": ms(attempt.attempted_at),
        "statusCode": attempt.status_code,
        "error": attempt.error,
        "durationMs": attempt.duration_ms,
        "succeeded": attempt.status_code is not None and 200 <= attempt.status_code < 300,
        "nextAttemptAt": ms(attempt.next_attempt_at),
    }


def create_webhook(body: dict[str, Any]) -> tuple[dict, int]:
    rt = runtime()
    created = service.create(rt.db, rt.cipher, principal(), body, rt.settings.destinations)
    return {**endpoint_view(created.endpoint), "secret": created.secret}, 201


def list_webhooks() -> tuple[dict, int]:
    endpoints = service.list_endpoints(runtime().db, principal())
    return {"webhooks": [endpoint_view(e) for e in endpoints]}, 200


def get_webhook(webhook_id: str) -> tuple[dict, int]:
    return endpoint_view(service.get(runtime().db, principal(), webhook_id)), 200


def delete_webhook(webhook_id: str) -> tuple[None, int]:
    service.remove(runtime().db, principal(), webhook_id)
    return None, 204


def enable_webhook(webhook_id: str) -> tuple[dict, int]:
    return endpoint_view(service.enable(runtime().db, principal(), webhook_id)), 200


def rotate_webhook_secret(webhook_id: str, body: dict[str, Any] | None = None) -> tuple[dict, int]:
    grace = (body or {}).get("graceSeconds", service.DEFAULT_GRACE_SECONDS)
    rt = runtime()
    rotated = service.rotate(rt.db, rt.cipher, principal(), webhook_id, grace)
    return {**endpoint_view(rotated.endpoint), "secret": rotated.secret}, 200


def list_webhook_deliveries(webhook_id: str, limit: int = 20) -> tuple[dict, int]:
    found = service.attempts(runtime().db, principal(), webhook_id, limit)
    return {"deliveries": [attempt_view(a) for a in found]}, 200
