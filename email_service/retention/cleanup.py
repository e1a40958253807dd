"""Removing a deleted account for good: its objects, uploads and rows.

Deleting an account through the API is a soft delete (the API's database role cannot delete
rows); this job, run right after it, removes everything the account held. It runs as the
database owner through the maintenance policy, limited to the one account it names.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import delete, func, select, text, update

from email_service.models import Account, Attachment, Folder, Message, Task, TaskKind, TaskStatus
from email_service.queue import tasks
from email_service.queue.policy import CLEANUP_AGAIN_AFTER
from email_service.queue.runner import TaskContext
from email_service.queue.tasks import TaskRetry
from email_service.runtime import Runtime
from email_service.tenancy import Principal

log = logging.getLogger(__name__)


def account_prefix(tenant_id: uuid.UUID, account_id: str) -> str:
    """Where every object of an account lives in object storage (raw mail, attachments, uploads)."""
    return f"{tenant_id}/{account_id}/"


def run_cleanup(context: TaskContext) -> dict[str, Any]:
    runtime, account_id = context.runtime, context.account_id
    assert account_id is not None
    with runtime.db.maintenance_session() as session:
        account = session.scalar(
            select(Account).where(Account.id == account_id, Account.tenant_id == context.principal.tenant_id)
        )
        if account is None:
            return {"removed": "nothing (already gone)"}
        if account.deleted_at is None:
            return {"removed": "nothing (the account is not deleted)"}
    try:
        # Objects first: if this fails the rows still say what to remove, and the retry does it.
        runtime.objects.delete_prefix(account_prefix(context.principal.tenant_id, account_id))
    except Exception as exc:  # noqa: BLE001 - any storage failure is worth another try later
        raise TaskRetry(f"object storage did not remove the account's files ({type(exc).__name__})") from None
    context.progress(50)
    counts = _delete_rows(runtime, account_id)
    log.info("removed deleted account %s: %s", account_id, counts)
    return counts


def _delete_rows(runtime: Runtime, account_id: str) -> dict[str, Any]:
    with runtime.db.maintenance_session() as session:
        attachments = session.execute(delete(Attachment).where(Attachment.account_id == account_id)).rowcount
        messages = session.execute(delete(Message).where(Message.account_id == account_id)).rowcount
        folders = session.execute(delete(Folder).where(Folder.account_id == account_id)).rowcount
        # Tasks keep their outcome without the account (its id on them becomes NULL); the
        # unfinished ones can never run now, and say why.
        session.execute(
            update(Task)
            .where(
                Task.account_id == account_id,
                Task.kind != TaskKind.CLEANUP,
                Task.status.in_([TaskStatus.PENDING, TaskStatus.RETRY, TaskStatus.STARTED]),
            )
            .values(status=TaskStatus.FAILURE, error="the account was deleted", finished_at=func.now())
        )
        session.execute(delete(Account).where(Account.id == account_id))
    return {"messagesRemoved": messages, "attachmentsRemoved": attachments, "foldersRemoved": folders}


# Deleted accounts with no clean-up waiting or running, and none that ended recently.
_UNCLEANED = text("""
    SELECT a.id, a.tenant_id, a.user_id FROM accounts a
    WHERE a.deleted_at IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM tasks t WHERE t.account_id = a.id AND t.kind = 'cleanup'
          AND (t.status IN ('pending', 'started', 'retry') OR t.finished_at > now() - :again_after)
      )
    ORDER BY a.deleted_at
    LIMIT :limit
""")


def requeue_cleanups(runtime: Runtime, *, limit: int = 100) -> int:
    """Queue a new clean-up for deleted accounts whose last one failed; returns how many.

    A clean-up that ran out of tries (object storage down for longer than its retries last) or
    whose worker kept dying leaves the account hidden with all its mail and files: nothing else
    would ever remove them. The scheduler's leader calls this each pass.
    """
    with runtime.db.maintenance_session() as session:
        rows = session.execute(_UNCLEANED, {"again_after": CLEANUP_AGAIN_AFTER, "limit": limit}).all()
    for row in rows:
        principal = Principal(uuid.UUID(str(row.tenant_id)), uuid.UUID(str(row.user_id)))
        log.warning("deleted account %s still holds data; its clean-up is queued again", row.id)
        tasks.enqueue(runtime, TaskKind.CLEANUP, principal, account_id=row.id)
    return len(rows)
