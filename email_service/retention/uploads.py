"""Uploads that no message took within the retention time are removed, bytes and row."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from email_service.models import Attachment
from email_service.runtime import Runtime

log = logging.getLogger(__name__)


def remove_unused_uploads(runtime: Runtime, older_than: timedelta, *, limit: int = 500) -> int:
    """Remove up to ``limit`` uploads older than ``older_than`` that no message uses; returns how many."""
    cutoff = datetime.now(UTC) - older_than
    with runtime.db.maintenance_session() as session:
        unused = session.execute(
            select(Attachment.id, Attachment.object_key)
            .where(Attachment.message_id.is_(None), Attachment.created_at < cutoff)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for row in unused:
            runtime.objects.delete(row.object_key)
        if unused:
            # Only rows still unused: a send that took one meanwhile keeps it (its object is gone
            # then, and that send fails in words rather than sending a stale file).
            session.execute(
                delete(Attachment).where(Attachment.id.in_([r.id for r in unused]), Attachment.message_id.is_(None))
            )
    if unused:
        log.info("removed %d uploads no message used", len(unused))
    return len(unused)
