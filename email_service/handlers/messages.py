from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Response

from email_service.errors import NotFoundError
from email_service.handlers import principal, runtime
from email_service.handlers.views import ms, streamed
from email_service.mail.htmltext import RemoteContent, hold_back_remote, sanitize_html
from email_service.mailbox import changes as message_changes
from email_service.mailbox import moves
from email_service.models import Attachment, Message
from email_service.services import mail as service
from email_service.storage import ObjectStore
from email_service.storage.disposition import file_headers

# The spec's Message.from is a required email; mail without a usable From still has to be listed.
UNKNOWN_SENDER = "unknown@unknown.invalid"
DOWNLOAD_LINK_LIFETIME = timedelta(hours=1)


def _addresses(values: list[str]) -> list[str]:
    return [value for value in values if "@" in value]


def message_view(message: Message | service.ListItem | service.MessageRow) -> dict[str, Any]:
    """A list item, from a Message or a row of ``services.mail.LIST_COLUMNS`` (or more)."""
    return {
        "id": message.id,
        "accountId": message.account_id,
        "folderId": message.folder_id,
        "from": message.from_address if "@" in message.from_address else UNKNOWN_SENDER,
        "fromName": message.from_name or None,
        "to": _addresses(message.to_addresses),
        "cc": _addresses(message.cc_addresses),
        "bcc": _addresses(message.bcc_addresses),
        "recipientNames": message.recipient_names or {},
        "subject": message.subject,
        "preview": message.preview[:200],
        "isRead": message.is_read,
        "isStarred": message.is_starred,
        "isSpam": message.is_spam,
        "isDeleted": message.is_deleted,
        "labels": list(message.keywords),
        "deliveryStatus": message.delivery_status,
        "attachmentCount": message.attachment_count,
        "receivedAt": ms(message.received_at),
        "createdAt": ms(message.created_at),
        "updatedAt": ms(message.updated_at),
    }


def attachment_view(attachment: Attachment | service.AttachmentRow, objects: ObjectStore) -> dict[str, Any]:
    view = {
        "id": attachment.id,
        "filename": attachment.filename,
        "mimeType": attachment.mime_type,
        "size": attachment.size,
        "contentId": attachment.content_id,
        "isInline": attachment.is_inline,
        "downloadUrl": objects.presigned_url(
            attachment.object_key,
            DOWNLOAD_LINK_LIFETIME,
            filename=attachment.filename,
            content_type=attachment.mime_type,
        ),
    }
    if attachment.message_id is not None:  # an upload belongs to no message yet
        view["messageId"] = attachment.message_id
    return view


def list_messages(
    account_id: str,
    folder_id: str,
    limit: int = 50,
    offset: int = 0,
    sort: str = "receivedAt:desc",
    filter_: str = "all",
    cursor: str | None = None,
) -> tuple[dict, int]:
    # The spec sets no minimum: a negative offset reads from the start, as PostgreSQL refuses one.
    offset = max(offset, 0)
    page = service.list_messages(
        runtime().db,
        principal(),
        account_id,
        folder_id,
        limit=limit,
        offset=min(offset, 2**62),
        sort=sort,
        filter_=filter_,
        cursor=cursor,
    )
    return {
        "messages": [message_view(m) for m in page.items],
        "pagination": {"total": page.total, "limit": limit, "offset": offset, "nextCursor": page.next_cursor},
    }, 200


def detail_view(
    detail: service.MessageDetail, objects: ObjectStore, remote_content: RemoteContent = RemoteContent.ALLOW
) -> dict[str, Any]:
    message = detail.message
    html = shown_html(message)
    shown = hold_back_remote(html, remote_content) if html else None
    return {
        **message_view(message),
        "body": message.body_text,
        "bodyHtml": shown.html if shown else html,
        "hasRemoteContent": shown.has_remote_content if shown else False,
        "headers": message.headers,
        "attachments": [attachment_view(a, objects) for a in detail.attachments],
        "conversationId": message.conversation_id,
    }


def shown_html(message: service.MessageRow) -> str | None:
    """The HTML body as the API shows it: always sanitised.

    Received mail is sanitised once, when stored. Mail written through the API (it has a delivery
    status) is stored as the user wrote it, so that it goes out unchanged, and is sanitised here.
    """
    if message.body_html is None or message.delivery_status is None:
        return message.body_html
    return sanitize_html(message.body_html).strip()


def get_message(account_id: str, message_id: str, remote_content: str = RemoteContent.ALLOW) -> tuple[dict, int]:
    rt = runtime()
    detail = service.get_message(rt.db, principal(), account_id, message_id)
    return detail_view(detail, rt.objects, RemoteContent(remote_content)), 200


def get_raw_message(account_id: str, message_id: str) -> Response:
    rt = runtime()
    raw = service.open_raw(rt.db, rt.objects, principal(), account_id, message_id)
    name = f"{' '.join(raw.subject.split())[:100] or 'message'}.eml"
    # A sender's bytes on the API's origin, like an attachment: never sniffed into HTML or run.
    headers = file_headers("message/rfc822", name)
    if isinstance(raw.content, bytes):
        return Response(raw.content, headers=headers)
    # Streamed, as attachments are: an original may be large.
    return streamed(raw.content, headers)


def update_message(
    account_id: str, message_id: str, body: dict[str, Any], remote_content: str = RemoteContent.ALLOW
) -> tuple[dict, int]:
    rt = runtime()
    detail = message_changes.update_message(rt, principal(), account_id, message_id, body)
    # The client shows this answer in place of the message it opened: hold back what it held back.
    return detail_view(detail, rt.objects, RemoteContent(remote_content)), 200


def _result(outcome: moves.Outcome, folder_id: str | None) -> dict[str, Any]:
    return {
        "messageIds": outcome.done,
        "deletedForGood": outcome.deleted_for_good,
        "notFound": outcome.not_found,
        "folderId": folder_id,
    }


def _one(outcome: moves.Outcome, message_id: str) -> None:
    if outcome.not_found:
        raise NotFoundError(f"Message with ID '{message_id}' does not exist", code="MESSAGE_NOT_FOUND")


def move_message(
    account_id: str, message_id: str, body: dict[str, Any], remote_content: str = RemoteContent.ALLOW
) -> tuple[dict, int]:
    rt = runtime()
    _one(moves.move_messages(rt, principal(), account_id, [message_id], body["folderId"]), message_id)
    detail = service.get_message(rt.db, principal(), account_id, message_id)
    return detail_view(detail, rt.objects, RemoteContent(remote_content)), 200


def delete_message(account_id: str, message_id: str, permanent: bool = False) -> tuple[dict, int]:
    outcome = moves.delete_messages(runtime(), principal(), account_id, [message_id], permanent=permanent)
    _one(outcome, message_id)
    return _result(outcome, None if outcome.deleted_for_good else outcome.folder_id), 200


def move_messages(account_id: str, body: dict[str, Any]) -> tuple[dict, int]:
    outcome = moves.move_messages(runtime(), principal(), account_id, body["messageIds"], body["folderId"])
    return _result(outcome, body["folderId"]), 200


def delete_messages(account_id: str, body: dict[str, Any]) -> tuple[dict, int]:
    permanent = bool(body.get("permanent", False))
    outcome = moves.delete_messages(runtime(), principal(), account_id, body["messageIds"], permanent=permanent)
    return _result(outcome, None if permanent else outcome.folder_id), 200
