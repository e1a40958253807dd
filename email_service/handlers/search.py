from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from email_service.handlers import principal, runtime
from email_service.handlers.messages import message_view
from email_service.models import Message
from email_service.search import service
from email_service.search.service import SearchQuery


def summary_view(message: Message) -> dict[str, Any]:
    """A listed message with its conversation, as search and conversations show it."""
    return {**message_view(message), "conversationId": message.conversation_id or message.id}


def _moment(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def search_messages(
    account_id: str,
    q: str | None = None,
    from_: str | None = None,
    to: str | None = None,
    subject: str | None = None,
    after: int | None = None,
    before: int | None = None,
    has_attachment: bool | None = None,
    is_read: bool | None = None,
    is_starred: bool | None = None,
    label: str | None = None,
    folder_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[dict, int]:
    query = SearchQuery(
        text=q,
        sender=from_,
        recipient=to,
        subject=subject,
        after=_moment(after),
        before=_moment(before),
        has_attachment=has_attachment,
        is_read=is_read,
        is_starred=is_starred,
        label=label,
        folder_id=folder_id,
    )
    page = service.search(runtime().db, principal(), account_id, query, limit=limit, cursor=cursor)
    return {"messages": [summary_view(hit.message) for hit in page.hits], "nextCursor": page.next_cursor}, 200
