"""Building log entries for the writers: one vocabulary for what changed, in the API's field names.

Writers compare the state before and after themselves and record only real differences, so a
write that changes nothing (a re-sync, a PATCH with the same values) leaves the log untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from email_service.changes.log import Entry
from email_service.models import ChangeEntity, ChangeKind

# Message columns as the API names them, so ``detail["fields"]`` reads like the Message schema.
MESSAGE_FIELDS = {
    "is_read": "isRead",
    "is_starred": "isStarred",
    "is_draft": "isDraft",
    "is_deleted": "isDeleted",
    "is_spam": "isSpam",
    "keywords": "labels",
    "folder_id": "folderId",
    "delivery_status": "deliveryStatus",
}


def message_created(message_id: str, folder_id: str) -> Entry:
    return Entry(ChangeEntity.MESSAGE, message_id, ChangeKind.CREATED, folder_id)


def message_destroyed(message_id: str, folder_id: str) -> Entry:
    return Entry(ChangeEntity.MESSAGE, message_id, ChangeKind.DESTROYED, folder_id)


def message_updated(message_id: str, folder_id: str, columns: Iterable[str], **extra: Any) -> Entry:
    fields = sorted({MESSAGE_FIELDS.get(column, column) for column in columns})
    return Entry(ChangeEntity.MESSAGE, message_id, ChangeKind.UPDATED, folder_id, {"fields": fields, **extra})


def message_moved(message_id: str, old_folder_id: str, new_folder_id: str, columns: Iterable[str] = ()) -> Entry:
    """A message now in another folder; ``from`` names the folder it left."""
    return message_updated(message_id, new_folder_id, ["folder_id", *columns], **{"from": old_folder_id})


def changed_columns(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The keys of ``after`` whose value differs from ``before``."""
    return [key for key, value in after.items() if before.get(key) != value]


def folder_created(folder_id: str) -> Entry:
    return Entry(ChangeEntity.FOLDER, folder_id, ChangeKind.CREATED, folder_id)


def folder_updated(folder_id: str, fields: Iterable[str]) -> Entry:
    return Entry(ChangeEntity.FOLDER, folder_id, ChangeKind.UPDATED, folder_id, {"fields": sorted(fields)})


def folder_destroyed(folder_id: str) -> Entry:
    return Entry(ChangeEntity.FOLDER, folder_id, ChangeKind.DESTROYED, folder_id)
