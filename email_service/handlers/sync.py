from __future__ import annotations

from typing import Any

from email_service.handlers import principal, runtime
from email_service.mailbox import service
from email_service.models import TaskStatus
from email_service.services.tasks import task_status


def sync_account(account_id: str, body: dict[str, Any] | None = None) -> tuple[dict, int]:
    body = body or {}
    enqueued = service.start_sync(
        runtime(), principal(), account_id, force=bool(body.get("force", False)), folders=body.get("folders")
    )
    if enqueued.after_running:
        message = "Queued to run after the sync that is running now"
    elif enqueued.created:
        message = "Sync started in background"
    elif enqueued.status is TaskStatus.STARTED:
        message = "A sync of this account is already running; this request joined it"
    else:
        message = "A sync of this account is already waiting to run; this request joined it"
    status = "started" if enqueued.status is TaskStatus.STARTED else "pending"
    return {"taskId": enqueued.task_id, "status": status, "message": message, "created": enqueued.created}, 202


def get_sync_status(task_id: str) -> tuple[dict, int]:
    view = task_status(runtime(), principal(), task_id)
    body: dict[str, Any] = {
        "taskId": view.task_id,
        "status": str(view.status),
        "progress": view.progress,
        "kind": str(view.kind),
        "attempts": view.attempts,
    }
    if view.result is not None:
        body["result"] = view.result
    if view.error is not None:
        body["error"] = view.error
    if view.account_id is not None:
        body["accountId"] = view.account_id
    if view.message_id is not None:
        body["messageId"] = view.message_id
    return body, 200
