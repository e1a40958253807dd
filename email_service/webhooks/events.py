"""Event types and the JSON payload of a delivery, made from one change-log entry."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from email_service.models import Change

EVENT_TYPES = (
    "message.created",
    "message.updated",
    "message.destroyed",
    "folder.created",
    "folder.updated",
    "folder.destroyed",
)


def event_type(change: Change) -> str:
    return f"{change.entity}.{change.kind}"


def payload(change: Change) -> dict[str, Any]:
    """The body every endpoint gets for ``change``; ``seq`` orders an account's events."""
    return {
        "type": event_type(change),
        "timestamp": change.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": {
            "accountId": change.account_id,
            "id": change.entity_id,
            "folderId": change.folder_id,
            "seq": change.seq,
            "detail": change.detail or {},
        },
    }
