from __future__ import annotations

from typing import Any

from email_service.handlers import principal, runtime
from email_service.handlers.views import ms
from email_service.models import Folder
from email_service.services import mail as service


def folder_view(folder: Folder) -> dict[str, Any]:
    return {
        "id": folder.id,
        "accountId": folder.account_id,
        "name": folder.name,
        "displayName": folder.display_name,
        "type": folder.type,
        "parentId": folder.parent_id,
        "messageCount": folder.message_count,
        "unreadCount": folder.unread_count,
        "syncedAt": ms(folder.synced_at),
    }


def list_folders(account_id: str) -> tuple[dict, int]:
    folders = service.list_folders(runtime().db, principal(), account_id)
    views = [folder_view(f) for f in folders]
    # The spec's Folder.syncedAt is not nullable: a folder never synced leaves it out.
    for view in views:
        if view["syncedAt"] is None:
            del view["syncedAt"]
    return {"folders": views, "total": len(views)}, 200
