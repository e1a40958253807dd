from __future__ import annotations

from typing import Any

from email_service.handlers import principal, runtime
from email_service.handlers.views import ms
from email_service.outgoing import compose as service


def send_email(body: dict[str, Any]) -> tuple[dict, int]:
    composed = service.compose(runtime(), principal(), body, draft=False)
    return {"taskId": composed.task_id, "status": "pending", "messageId": composed.message.id}, 202


def save_draft(body: dict[str, Any]) -> tuple[dict, int]:
    composed = service.compose(runtime(), principal(), body, draft=True)
    message = composed.message
    return {"draftId": message.id, "accountId": message.account_id, "createdAt": ms(message.created_at)}, 201


def retry_send(account_id: str, message_id: str) -> tuple[dict, int]:
    composed = service.retry_send(runtime(), principal(), account_id, message_id)
    return {"taskId": composed.task_id, "status": "pending", "messageId": composed.message.id}, 202
