"""Reading the state of background tasks."""

from __future__ import annotations

from email_service.errors import NotFoundError
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.tenancy import Principal


def task_status(runtime: Runtime, principal: Principal, task_id: str) -> tasks.TaskView:
    view = tasks.view(runtime, principal, task_id)
    if view is None:
        raise NotFoundError(f"Task with ID '{task_id}' does not exist", code="TASK_NOT_FOUND")
    return view
