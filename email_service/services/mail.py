"""Reading synced mail: folders, pages of messages, message details, attachments."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from functools import cache
from typing import Any

from psycopg.rows import args_row
from sqlalchemy import select
from sqlalchemy.orm import Session

from email_service.db import Database
from email_service.errors import NotFoundError
from email_service.models import Account, Attachment, Folder, Message
from email_service.outgoing import delivery
from email_service.services import cursors
from email_service.storage import ObjectNotFound, ObjectReader, ObjectStore, unavailable_if_unreachable
from email_service.tenancy import Principal

# sort -> (key column, descending). Every order ends with the id, so it is total and a cursor
# (key, id) names one position in it; each is an index of 0002 read forwards or backwards.
SORTS = {
    "receivedAt:asc": (Message.received_at, False),
    "receivedAt:desc": (Message.received_at, True),
    "from:asc": (Message.from_address, False),
    "from:desc": (Message.from_address, True),
}
# filter -> the condition it adds to a page's WHERE clause (see _page_sql).
FILTERS = {"all": "", "read": " AND is_read", "unread": " AND NOT is_read"}


# What a list item shows (handlers.messages.message_view), and nothing else: bodies and headers
# are most of a row's bytes and only getMessage returns them.
LIST_COLUMNS = (
    Message.id,
    Message.account_id,
    Message.folder_id,
    Message.from_address,
    Message.from_name,
    Message.to_addresses,
    Message.cc_addresses,
    Message.bcc_addresses,
    Message.recipient_names,
    Message.subject,
    Message.preview,
    Message.is_read,
    Message.is_starred,
    Message.is_spam,
    Message.is_deleted,
    Message.keywords,
    Message.delivery_status,
    Message.attachment_count,
    Message.received_at,
    Message.created_at,
    Message.updated_at,
)


def _row_type(name: str, columns: tuple[Any, ...]) -> type:
    # Read rows as plain named tuples: SQLAlchemy's Row resolves each attribute by name through
    # its metadata, which cost more than everything else in building a 50-message page.
    return namedtuple(name, [column.key for column in columns])


def _column_list(columns: tuple[Any, ...], table: str = "") -> str:
    prefix = f"{table}." if table else ""
    return ", ".join(prefix + column.key for column in columns)


def _in_live_account(table: str, columns: tuple[Any, ...], match: str = "") -> str:
    """SQL for ``columns`` of the ``table`` rows of the account (those that also ``match``),
    each beside the account's id: one round trip.

    No row: the account does not exist (or is deleted). A row whose columns are NULL: the
    account exists but has no such row. Names come from the model, values are parameters.
    """
    condition = f"{match} AND " if match else ""
    return (
        f"SELECT accounts.id, {_column_list(columns, table)} FROM accounts"  # noqa: S608 - names from the model
        f" LEFT JOIN {table} ON {condition}{table}.account_id = accounts.id"
        " WHERE accounts.id = %(account)s AND accounts.deleted_at IS NULL"
    )


ListItem = _row_type("ListItem", LIST_COLUMNS)

# What a folder shows (handlers.folders.folder_view).
FOLDER_COLUMNS = (
    Folder.id,
    Folder.account_id,
    Folder.name,
    Folder.display_name,
    Folder.type,
    Folder.parent_id,
    Folder.message_count,
    Folder.unread_count,
    Folder.synced_at,
)
FolderRow = _row_type("FolderRow", FOLDER_COLUMNS)

# What a message's detail shows (handlers.messages.detail_view): a list item's columns and the content.
DETAIL_COLUMNS = (*LIST_COLUMNS, Message.body_text, Message.body_html, Message.headers, Message.conversation_id)
MessageRow = _row_type("MessageRow", DETAIL_COLUMNS)
ATTACHMENT_COLUMNS = (
    Attachment.id,
    Attachment.message_id,
    Attachment.filename,
    Attachment.mime_type,
    Attachment.size,
    Attachment.content_id,
    Attachment.is_inline,
    Attachment.object_key,
)
AttachmentRow = _row_type("AttachmentRow", ATTACHMENT_COLUMNS)


@dataclass(frozen=True)
class MessagePage:
    items: list[ListItem]
    total: int
    next_cursor: str | None


def total_for(filter_: str, message_count: int, unread_count: int) -> int:
    """``pagination.total`` from the folder's counts, which the database keeps exact (migration 0013)."""
    if filter_ == "unread":
        return unread_count
    if filter_ == "read":
        return message_count - unread_count
    return message_count


@dataclass(frozen=True)
class MessageDetail:
    message: MessageRow
    attachments: list[AttachmentRow]


def _require_account(session: Session, account_id: str) -> None:
    exists = session.scalar(select(Account.id).where(Account.id == account_id, Account.deleted_at.is_(None)))
    if exists is None:
        raise _account_missing(account_id)


def _account_missing(account_id: str) -> NotFoundError:
    return NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")


def list_folders(db: Database, principal: Principal, account_id: str) -> list[FolderRow]:
    # Fixed SQL on psycopg, as list_messages: through the ORM the folders cost twice the database's work.
    with db.tenant_connection(principal) as connection, connection.cursor() as cursor:
        # The account's existence and its folders in one round trip: no row means no account.
        rows = cursor.execute(_FOLDERS_OF_LIVE_ACCOUNT, {"account": account_id}).fetchall()
    if not rows:
        raise _account_missing(account_id)
    return [FolderRow(*row[1:]) for row in rows if row[1] is not None]


_FOLDERS_OF_LIVE_ACCOUNT = _in_live_account("folders", FOLDER_COLUMNS) + " ORDER BY folders.name"


def list_messages(
    db: Database,
    principal: Principal,
    account_id: str,
    folder_id: str,
    *,
    limit: int,
    offset: int,
    sort: str,
    filter_: str,
    cursor: str | None = None,
) -> MessagePage:
    key, descending = SORTS[sort]
    parameters: dict[str, Any] = {"account": account_id, "folder": folder_id, "limit": limit + 1, "offset": offset}
    if cursor is not None:
        after = cursors.decode(cursor, sort, filter_, time_key=key is Message.received_at)
        parameters |= {"after_key": after.key, "after_id": after.id}
    # The busiest read of the API runs as two fixed statements on the tenant's psycopg connection
    # (same role and row-level security): building and caching SQLAlchemy statements and
    # processing their results cost three times the database's own work here.
    with (
        db.tenant_connection(principal) as connection,
        connection.cursor(row_factory=args_row(ListItem)) as rows_cursor,
        connection.cursor() as found_cursor,
    ):
        # One round trip answers both "does the account exist" and "does the folder, with what counts".
        found = found_cursor.execute(_FOLDER_OF_LIVE_ACCOUNT, parameters).fetchone()
        if found is None:
            raise _account_missing(account_id)
        if found[1] is None:
            raise NotFoundError(f"Folder with ID '{folder_id}' does not exist", code="FOLDER_NOT_FOUND")
        # One row more than asked says whether a next page exists, without counting.
        rows = rows_cursor.execute(_page_sql(sort, filter_, cursor is not None), parameters).fetchall()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = cursors.encode(sort, filter_, getattr(last, key.key), last.id)
    total = total_for(filter_, found[1], found[2])
    return MessagePage(items=rows, total=total, next_cursor=next_cursor)


_FOLDER_OF_LIVE_ACCOUNT = _in_live_account(
    "folders", (Folder.message_count, Folder.unread_count), "folders.id = %(folder)s"
)


@cache
def _page_sql(sort: str, filter_: str, after: bool) -> str:
    """A page of ``LIST_COLUMNS`` in one of the SORTS and FILTERS, from a cursor position or an offset."""
    key, descending = SORTS[sort]
    direction, beyond = ("DESC", "<") if descending else ("ASC", ">")
    where = f"folder_id = %(folder)s{FILTERS[filter_]}"
    if after:
        where += f" AND ({key.key}, id) {beyond} (%(after_key)s, %(after_id)s)"
    return (
        f"SELECT {_column_list(LIST_COLUMNS)} FROM messages WHERE {where}"
        f" ORDER BY {key.key} {direction}, id {direction} LIMIT %(limit)s OFFSET %(offset)s"
    )


def get_message(db: Database, principal: Principal, account_id: str, message_id: str) -> MessageDetail:
    # Fixed SQL on the tenant's psycopg connection, as list_messages: through the ORM, loading one
    # message and its attachments cost twice the database's own work.
    parameters = {"account": account_id, "message": message_id}
    with (
        db.tenant_connection(principal) as connection,
        connection.cursor() as found_cursor,
        connection.cursor(row_factory=args_row(AttachmentRow)) as attachments_cursor,
    ):
        # One row: the account exists; its message columns are NULL when it has no such message.
        found = found_cursor.execute(_MESSAGE_OF_LIVE_ACCOUNT, parameters).fetchone()
        if found is None:
            raise _account_missing(account_id)
        if found[1] is None:
            raise NotFoundError(f"Message with ID '{message_id}' does not exist", code="MESSAGE_NOT_FOUND")
        attachments = attachments_cursor.execute(_ATTACHMENTS_OF_MESSAGE, parameters).fetchall()
    return MessageDetail(message=MessageRow(*found[1:]), attachments=attachments)


_MESSAGE_OF_LIVE_ACCOUNT = _in_live_account("messages", DETAIL_COLUMNS, "messages.id = %(message)s")
# A message lists its files in the order it carries them (received mail) or sent them (mail
# written through the API); mail stored before positions were kept has none, which sorts last,
# by id as before.
_ATTACHMENTS_OF_MESSAGE = (
    f"SELECT {_column_list(ATTACHMENT_COLUMNS)} FROM attachments WHERE message_id = %(message)s ORDER BY position, id"  # noqa: S608 - names from the model
)


def open_attachment(
    db: Database, objects: ObjectStore, principal: Principal, account_id: str, attachment_id: str
) -> tuple[Attachment, ObjectReader]:
    """The attachment and a reader of its bytes (the caller closes it)."""
    missing = NotFoundError(f"Attachment with ID '{attachment_id}' does not exist", code="ATTACHMENT_NOT_FOUND")
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        attachment = session.scalar(
            select(Attachment).where(Attachment.id == attachment_id, Attachment.account_id == account_id)
        )
    if attachment is None:
        raise missing
    try:
        with unavailable_if_unreachable():
            return attachment, objects.open(attachment.object_key)
    except ObjectNotFound:
        # Its row was read just before a clean-up (a deleted account, a rebuilt folder) removed
        # the object: gone, as the row is a moment later.
        raise missing from None


@dataclass(frozen=True)
class RawMessage:
    subject: str
    content: ObjectReader | bytes  # the stored original (the caller closes it), or built bytes


def open_raw(db: Database, objects: ObjectStore, principal: Principal, account_id: str, message_id: str) -> RawMessage:
    """The message in Internet Message Format: the original the server gave, as stored, or for
    one written through the service (nothing stored), the message as it goes out."""
    missing = NotFoundError(f"Message with ID '{message_id}' does not exist", code="MESSAGE_NOT_FOUND")
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        row = session.execute(
            select(Message.subject, Message.raw_object_key).where(
                Message.id == message_id, Message.account_id == account_id
            )
        ).one_or_none()
    if row is None:
        raise missing
    try:
        with unavailable_if_unreachable():
            if row.raw_object_key is not None:
                return RawMessage(row.subject, objects.open(row.raw_object_key))
            built = delivery.written(db, objects, principal, message_id)
    except ObjectNotFound:
        # Removed by a clean-up (a rebuilt folder, a deleted message) since the row was read.
        raise missing from None
    if built is None:
        raise missing
    return RawMessage(row.subject, built)
