"""Starting syncs and reading the state of background tasks."""

from __future__ import annotations

from email_service.errors import NotFoundError
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.services.accounts import get_account
from email_service.tenancy import Principal


def start_sync(
    runtime: Runtime, principal: Principal, account_id: str, *, force: bool, folders: list[str] | None
) -> tuple[str, str]:
    get_account(runtime.db, principal, account_id)  # 404 unless the caller owns a live account
    return tasks.enqueue_sync(runtime.redis, principal, account_id, force=force, folders=folders)


def task_status(runtime: Runtime, principal: Principal, task_id: str) -> tasks.TaskView:
    view = tasks.view(runtime.redis, principal, task_id)
    if view is None:
        raise NotFoundError(f"Task with ID '{task_id}' does not exist", code="TASK_NOT_FOUND")
    return view
