"""Starting a sync of an account on request."""

from __future__ import annotations

from email_service.models import TaskKind
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.services.accounts import get_account
from email_service.tenancy import Principal


def start_sync(
    runtime: Runtime, principal: Principal, account_id: str, *, force: bool, folders: list[str] | None
) -> tasks.Enqueued:
    """Runs at once whatever the account's backoff: someone asked for it."""
    get_account(runtime.db, principal, account_id)  # 404 unless the caller owns a live account
    if folders:
        # No mailbox name holds NUL (and PostgreSQL cannot store it): such a name matches no
        # folder, and stays one that matches none.
        folders = sorted({name.replace("\x00", "\ufffd") for name in folders})
    params = {"force": force, "folders": folders or None}
    return tasks.enqueue(runtime, TaskKind.SYNC, principal, account_id=account_id, params=params)
