from __future__ import annotations

from typing import Any

from email_service.folders import service as folders
from email_service.handlers import principal, runtime
from email_service.handlers.views import ms
from email_service.models import Folder
from email_service.services import mail as service


def folder_view(folder: Folder | service.FolderRow) -> dict[str, Any]:
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


def _view(folder: Folder | service.FolderRow) -> dict[str, Any]:
    view = folder_view(folder)
    # The spec's Folder.syncedAt is not nullable: a folder never synced leaves it out.
    if view["syncedAt"] is None:
        del view["syncedAt"]
    return view


def list_folders(account_id: str) -> tuple[dict, int]:
    views = [_view(f) for f in service.list_folders(runtime().db, principal(), account_id)]
    return {"folders": views, "total": len(views)}, 200


def create_folder(account_id: str, body: dict[str, Any]) -> tuple[dict, int]:
    return _view(folders.create_folder(runtime(), principal(), account_id, body)), 201


def update_folder(account_id: str, folder_id: str, body: dict[str, Any]) -> tuple[dict, int]:
    return _view(folders.update_folder(runtime(), principal(), account_id, folder_id, body)), 200


def delete_folder(account_id: str, folder_id: str) -> tuple[None, int]:
    folders.delete_folder(runtime(), principal(), account_id, folder_id)
    return None, 204
