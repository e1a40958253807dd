"""Reading synced mail: folders, pages of messages, message details, attachments."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from email_service.db import Database
from email_service.errors import NotFoundError
from email_service.models import Account, Attachment, Folder, Message
from email_service.tenancy import Principal

SORTS = {
    "receivedAt:asc": (Message.received_at.asc(), Message.id.asc()),
    "receivedAt:desc": (Message.received_at.desc(), Message.id.desc()),
    "from:asc": (Message.from_address.asc(), Message.id.asc()),
    "from:desc": (Message.from_address.desc(), Message.id.desc()),
}
FILTERS = {"all": None, "read": Message.is_read.is_(True), "unread": Message.is_read.is_(False)}


@dataclass(frozen=True)
class MessagePage:
    items: list[Message]
    total: int


@dataclass(frozen=True)
class MessageDetail:
    message: Message
    attachments: list[Attachment]


def _require_account(session: Session, account_id: str) -> None:
    exists = session.scalar(select(Account.id).where(Account.id == account_id, Account.deleted_at.is_(None)))
    if exists is None:
        raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")


def list_folders(db: Database, principal: Principal, account_id: str) -> list[Folder]:
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        return list(session.scalars(select(Folder).where(Folder.account_id == account_id).order_by(Folder.name)))


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
) -> MessagePage:
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        folder = session.scalar(select(Folder.id).where(Folder.id == folder_id, Folder.account_id == account_id))
        if folder is None:
            raise NotFoundError(f"Folder with ID '{folder_id}' does not exist", code="FOLDER_NOT_FOUND")
        conditions = [Message.folder_id == folder_id]
        if FILTERS[filter_] is not None:
            conditions.append(FILTERS[filter_])
        total = session.scalar(select(func.count()).select_from(Message).where(*conditions)) or 0
        items = list(
            session.scalars(select(Message).where(*conditions).order_by(*SORTS[sort]).limit(limit).offset(offset))
        )
    return MessagePage(items=items, total=total)


def get_message(db: Database, principal: Principal, account_id: str, message_id: str) -> MessageDetail:
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        message = session.scalar(select(Message).where(Message.id == message_id, Message.account_id == account_id))
        if message is None:
            raise NotFoundError(f"Message with ID '{message_id}' does not exist", code="MESSAGE_NOT_FOUND")
        attachments = list(
            session.scalars(select(Attachment).where(Attachment.message_id == message_id).order_by(Attachment.id))
        )
    return MessageDetail(message=message, attachments=attachments)


def get_attachment(db: Database, principal: Principal, account_id: str, attachment_id: str) -> Attachment:
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        attachment = session.scalar(
            select(Attachment).where(Attachment.id == attachment_id, Attachment.account_id == account_id)
        )
        if attachment is None:
            raise NotFoundError(f"Attachment with ID '{attachment_id}' does not exist", code="ATTACHMENT_NOT_FOUND")
        return attachment
