"""Mail written through the API, as the send and draft jobs see it: the row, its parts, where it goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from email_service.changes import entries as changes
from email_service.changes.log import record
from email_service.crypto import CredentialCipher
from email_service.db import Database
from email_service.models import Account, Attachment, DeliveryStatus, Folder, Message
from email_service.observability import metrics
from email_service.outgoing.build import Original, OutgoingAttachment, build_message, wire_bytes
from email_service.protocols.servers import MailServer
from email_service.services.servers import servers_of
from email_service.storage import ObjectStore
from email_service.storage.streams import ChunkStream
from email_service.tenancy import Principal


@dataclass(frozen=True)
class Outgoing:
    message_id: str
    message_id_header: str  # the Message-ID it goes out with, which finds a copy already filed
    status: DeliveryStatus | None
    uid: int | None
    folder_name: str
    folder_id: str
    folder_type: str
    folder_on_server: bool  # False: made here for an account never synced, perhaps under another name there
    envelope_from: str
    recipients: list[str]
    data: bytes
    date: datetime
    smtp: MailServer | None
    account_enabled: bool


def written(db: Database, objects: ObjectStore, principal: Principal, message_id: str) -> bytes | None:
    """A message written through the service, as it goes out (no Bcc header); None when there is none."""
    with db.tenant_session(principal) as session:
        message = session.scalar(
            select(Message)
            .join(Account, Account.id == Message.account_id)
            .where(Message.id == message_id, Account.deleted_at.is_(None))
        )
        if message is None:
            return None
        attachments = _attachments(session, message.id)
    return wire_bytes(_build(message, attachments, objects))


def _attachments(session: Session, message_id: str) -> list[Attachment]:
    # In the order the request listed them (ids are random, and rows come back in any order).
    return list(
        session.scalars(
            select(Attachment)
            .where(Attachment.message_id == message_id)
            .order_by(Attachment.position.nulls_last(), Attachment.id)
        )
    )


def _build(message: Message, attachments: list[Attachment], objects: ObjectStore) -> EmailMessage:
    """The message a row written through the service stands for, built as the send job builds it."""
    headers = message.headers or {}
    original = None
    if headers.get("In-Reply-To"):
        original = Original(
            message_id=headers["In-Reply-To"],
            references=[r for r in headers.get("References", "").split() if r != headers["In-Reply-To"]],
        )
    return build_message(
        from_address=message.from_address,
        from_name=message.from_name,
        to=list(message.to_addresses),
        cc=list(message.cc_addresses),
        reply_to=headers.get("Reply-To"),
        subject=message.subject,
        body=message.body_html if message.body_html is not None else message.body_text,
        is_html=message.body_html is not None,
        attachments=[
            OutgoingAttachment(
                filename=a.filename,
                mime_type=a.mime_type,
                size=a.size,
                open=lambda key=a.object_key: ChunkStream(objects.open(key)),
            )
            for a in attachments
        ],
        message_id=message.message_id_header,
        date=message.created_at,
        in_reply_to=original,
    )


def load(
    db: Database, cipher: CredentialCipher, objects: ObjectStore, principal: Principal, message_id: str
) -> Outgoing | None:
    with db.tenant_session(principal) as session:
        row = session.execute(
            select(Message, Folder, Account)
            .join(Folder, Folder.id == Message.folder_id)
            .join(Account, Account.id == Message.account_id)
            .where(Message.id == message_id, Account.deleted_at.is_(None))
        ).one_or_none()
        if row is None:
            return None
        message, folder, account = row.Message, row.Folder, row.Account
        attachments = _attachments(session, message.id)
        smtp = servers_of(account, cipher, db).smtp
    built = _build(message, attachments, objects)
    return Outgoing(
        message_id=message.id,
        message_id_header=message.message_id_header,
        status=DeliveryStatus(message.delivery_status) if message.delivery_status else None,
        uid=message.uid,
        folder_name=folder.name,
        folder_id=folder.id,
        folder_type=folder.type,
        folder_on_server=folder.uidvalidity is not None,
        envelope_from=message.from_address,
        recipients=[*message.to_addresses, *message.cc_addresses, *message.bcc_addresses],
        data=wire_bytes(built),
        date=message.created_at,
        smtp=smtp,
        account_enabled=account.is_enabled,
    )


def set_status(
    db: Database,
    principal: Principal,
    message_id: str,
    status: DeliveryStatus,
    error: str | None = None,
    *,
    unless: tuple[DeliveryStatus, ...] = (),
    guard: Callable[[Session], bool] | None = None,
) -> bool:
    """Set the delivery status (not over one of ``unless``); returns whether the row changed.

    ``guard``, if given, must also hold in the same transaction (it may lock what it reads).
    """
    with db.tenant_session(principal) as session:
        # Locked, so the status compared is the one replaced, and the log says so only if it differs.
        query = select(Message.account_id, Message.folder_id, Message.delivery_status).where(Message.id == message_id)
        if unless:
            query = query.where(Message.delivery_status.not_in([str(s) for s in unless]))
        row = session.execute(query.with_for_update()).one_or_none()
        if row is None or (guard is not None and not guard(session)):
            return False
        session.execute(
            update(Message).where(Message.id == message_id).values(delivery_status=str(status), delivery_error=error)
        )
        metrics.delivery_status_changed(row.delivery_status, status)
        if row.delivery_status != str(status):
            record(
                session,
                principal,
                row.account_id,
                [changes.message_updated(message_id, row.folder_id, ["delivery_status"])],
            )
        return True
