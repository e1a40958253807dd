from __future__ import annotations

from email_service.conversations import service
from email_service.handlers import principal, runtime
from email_service.handlers.search import summary_view
from email_service.handlers.views import ms


def list_conversations(account_id: str, folder_id: str, limit: int = 50, cursor: str | None = None) -> tuple[dict, int]:
    page = service.list_conversations(runtime().db, principal(), account_id, folder_id, limit=limit, cursor=cursor)
    return {
        "conversations": [
            {
                "id": c.id,
                "subject": c.latest.subject,
                "messageCount": c.message_count,
                "unreadCount": c.unread_count,
                "participants": c.participants,
                "latestReceivedAt": ms(c.latest_received_at),
                "latestMessage": summary_view(c.latest),
            }
            for c in page.conversations
        ],
        "nextCursor": page.next_cursor,
    }, 200


def get_conversation(
    account_id: str, conversation_id: str, limit: int = 100, cursor: str | None = None
) -> tuple[dict, int]:
    found = service.get_conversation(runtime().db, principal(), account_id, conversation_id, limit=limit, cursor=cursor)
    return {
        "id": found.id,
        "accountId": account_id,
        "messages": [summary_view(m) for m in found.messages],
        "nextCursor": found.next_cursor,
    }, 200
