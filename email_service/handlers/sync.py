from __future__ import annotations

from typing import Any

from email_service.handlers import principal, runtime
from email_service.services import sync as service


def sync_account(account_id: str, body: dict[str, Any] | None = None) -> tuple[dict, int]:
    body = body or {}
    task_id, status = service.start_sync(
        runtime(), principal(), account_id, force=bool(body.get("force", False)), folders=body.get("folders")
    )
    started = status == "started"
    message = "Sync started in background" if status == "pending" else "A sync of this account is already running"
    return {"taskId": task_id, "status": "started" if started else "pending", "message": message}, 202


def get_sync_status(task_id: str) -> tuple[dict, int]:
    view = service.task_status(runtime(), principal(), task_id)
    body: dict[str, Any] = {"taskId": view.task_id, "status": view.status, "progress": view.progress}
    if view.result is not None:
        body["result"] = view.result
    if view.error is not None:
        body["error"] = view.error
    return body, 200
