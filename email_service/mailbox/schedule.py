"""Automatic sync: which accounts are due, and each account's record of success and failure.

``next_sync_at`` on the account is the single answer to "when does this account sync next":
after a success its interval on, after a failure the backoff of ``queue.policy.sync_backoff``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import literal_column, text, update

from email_service.db import Database
from email_service.models import Account
from email_service.queue.policy import sync_backoff
from email_service.tenancy import Principal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DueAccount:
    id: str
    principal: Principal


def due_for_sync(db: Database, limit: int = 500) -> list[DueAccount]:
    """Enabled accounts with automatic sync whose next sync time has come, across all tenants.

    Accounts with a sync waiting or running are left out: the scheduler would only join it.
    """
    with db.maintenance_session() as session:
        rows = session.execute(
            text(
                "SELECT a.id, a.tenant_id, a.user_id FROM accounts a"
                " WHERE a.deleted_at IS NULL AND a.is_enabled AND a.is_sync_enabled"
                " AND (a.next_sync_at IS NULL OR a.next_sync_at <= now())"
                " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.account_id = a.id AND t.kind = 'sync'"
                "                 AND t.status IN ('pending', 'started', 'retry'))"
                " ORDER BY a.next_sync_at NULLS FIRST LIMIT :limit"
            ),
            {"limit": limit},
        ).all()
    return [DueAccount(row.id, Principal(uuid.UUID(str(row.tenant_id)), uuid.UUID(str(row.user_id)))) for row in rows]


def record_success(db: Database, principal: Principal, account_id: str, *, full: bool) -> None:
    """A sync succeeded: the backoff is over. Only a sync of every folder moves the next one out."""
    now = datetime.now(UTC)
    values: dict = {"sync_failures": 0, "last_sync_error": None, "last_sync_error_at": None}
    if full:
        values.update(last_sync_at=now, next_sync_at=literal_column("now() + sync_interval * interval '1 second'"))
    with db.tenant_session(principal) as session:
        session.execute(update(Account).where(Account.id == account_id).values(**values))


def record_failure(
    db: Database,
    principal: Principal,
    account_id: str,
    message: str,
    *,
    permanent: bool,
    attempted_at: datetime | None = None,
) -> None:
    """A sync failed: show why on the account and back its automatic sync off.

    Not when the account's settings changed after the sync began (``attempted_at``): the
    failure may be of the settings just replaced (a password being fixed), and the change
    has made the next sync due at once; a sync that fails with the new settings counts.
    """
    now = datetime.now(UTC)
    with db.tenant_session(principal) as session:
        account = session.get(Account, account_id, with_for_update=True)
        if account is None:
            return
        if attempted_at is not None and account.updated_at > attempted_at:
            log.info("account %s: sync failed, but its settings changed since it began; not backed off", account_id)
            return
        account.sync_failures += 1
        account.last_sync_error = message
        account.last_sync_error_at = now
        account.next_sync_at = now + sync_backoff(account.sync_failures, permanent=permanent)
