from __future__ import annotations

from typing import Any

from email_service.changes import feed
from email_service.handlers import principal, runtime


def _ids(changes: feed.IdChanges) -> dict[str, list[str]]:
    return {"created": changes.created, "updated": changes.updated, "destroyed": changes.destroyed}


def get_changes(account_id: str, since: str | None = None, limit: int = feed.DEFAULT_LIMIT) -> tuple[dict, int]:
    page = feed.changes_since(runtime().db, principal(), account_id, since, limit)
    body: dict[str, Any] = {
        "accountId": page.account_id,
        "oldCursor": page.old_cursor,
        "newCursor": page.new_cursor,
        "hasMore": page.has_more,
        **_ids(page.messages),
        "folders": _ids(page.folders),
    }
    return body, 200
