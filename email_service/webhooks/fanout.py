"""From the change log to deliveries: exactly one per (endpoint, change), however often it runs.

Each account has a position in ``webhook_cursors``. A pass locks it, reads the entries after it,
inserts one delivery per matching endpoint and moves the position, all in one transaction: a
crash before commit leaves nothing done, after commit everything. The unique key of deliveries
(endpoint, account, sequence) guards the same change against a second pass (two dispatchers
that both heard a notification). Sequence numbers of an account commit in order (``record``
holds the account's row until commit), so no entry can appear later below the position.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert

from email_service.db import Database
from email_service.models import Account, Change, WebhookCursor, WebhookDelivery, WebhookEndpoint
from email_service.webhooks import events
from email_service.webhooks.service import new_id

BATCH = 500
# Finished deliveries (and their attempts) stay listed this long; waiting ones are never removed.
RETENTION = timedelta(days=7)


def fan_out(db: Database, account_id: str, *, batch: int = BATCH) -> tuple[int, bool]:
    """One pass over ``account_id``'s new entries: (deliveries created, whether entries remain)."""
    with db.maintenance_session() as session:
        owner = session.execute(
            select(Account.tenant_id, Account.user_id).where(Account.id == account_id)
        ).one_or_none()
        if owner is None:
            return 0, False
        session.execute(
            insert(WebhookCursor)
            .values(account_id=account_id, tenant_id=owner.tenant_id, user_id=owner.user_id, seq=0)
            .on_conflict_do_nothing(index_elements=["account_id"])
        )
        # The lock makes passes over one account take turns; other accounts are not held up.
        position = session.scalar(
            select(WebhookCursor.seq).where(WebhookCursor.account_id == account_id).with_for_update()
        )
        # Read before the endpoints (each statement sees what is committed when it starts): an
        # endpoint made, and a change committed, between the two reads must not be skipped past.
        latest = session.scalar(select(Account.change_seq).where(Account.id == account_id)) or 0
        endpoints = list(
            session.scalars(
                select(WebhookEndpoint).where(
                    WebhookEndpoint.tenant_id == owner.tenant_id,
                    WebhookEndpoint.user_id == owner.user_id,
                    WebhookEndpoint.status == "enabled",
                    (WebhookEndpoint.account_id.is_(None)) | (WebhookEndpoint.account_id == account_id),
                )
            )
        )
        if not endpoints:
            # Nobody listens: move past what was committed before the endpoints were read.
            if latest > position:
                _move(session, account_id, latest)
            return 0, False
        changes = list(
            session.scalars(
                select(Change)
                .where(Change.account_id == account_id, Change.seq > position)
                .order_by(Change.seq)
                .limit(batch)
            )
        )
        if not changes:
            return 0, False
        now = datetime.now(UTC)
        rows = []
        for change in changes:
            kind = events.event_type(change)
            body = events.payload(change)
            for endpoint in endpoints:
                if endpoint.event_types is not None and kind not in endpoint.event_types:
                    continue
                if not _new_to(endpoint, account_id, change):
                    continue
                rows.append(
                    {
                        "id": new_id("msg_"),
                        "endpoint_id": endpoint.id,
                        "tenant_id": owner.tenant_id,
                        "user_id": owner.user_id,
                        "account_id": account_id,
                        "seq": change.seq,
                        "event_type": kind,
                        "payload": body,
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                    }
                )
        created = 0
        if rows:
            result = session.execute(
                insert(WebhookDelivery)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["endpoint_id", "account_id", "seq"])
                .returning(WebhookDelivery.id)
            )
            created = len(result.all())
        _move(session, account_id, changes[-1].seq)
        return created, len(changes) == batch


def _new_to(endpoint: WebhookEndpoint, account_id: str, change: Change) -> bool:
    """Whether ``change`` was committed after ``endpoint`` was made: it gets that, not the account's history."""
    if endpoint.start_seqs is not None:
        return change.seq > endpoint.start_seqs.get(account_id, 0)
    # An endpoint made before start positions were kept: by time, as then.
    return change.created_at >= endpoint.created_at - timedelta(seconds=1)


def _move(session: object, account_id: str, seq: int) -> None:
    session.execute(  # type: ignore[attr-defined]
        update(WebhookCursor).where(WebhookCursor.account_id == account_id).values(seq=seq)
    )


def accounts_behind(db: Database, limit: int = 1000) -> list[str]:
    """Accounts with committed entries past their position: what a lost notification left behind."""
    with db.maintenance_session() as session:
        return list(
            session.scalars(
                text(
                    "SELECT a.id FROM accounts a LEFT JOIN webhook_cursors c ON c.account_id = a.id"
                    " WHERE a.change_seq > coalesce(c.seq, 0) LIMIT :limit"
                ),
                {"limit": limit},
            )
        )


def prune(db: Database, *, older_than: timedelta = RETENTION, batch: int = 1000) -> int:
    """Remove up to ``batch`` finished deliveries older than ``older_than`` with their attempts."""
    with db.maintenance_session() as session:
        result = session.execute(
            text(
                "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries"
                " WHERE status <> 'pending' AND created_at < now() - make_interval(secs => :age) LIMIT :batch)"
            ),
            {"age": older_than.total_seconds(), "batch": batch},
        )
        return result.rowcount or 0
