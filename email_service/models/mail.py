"""Synced mail: folders, messages and their attachments (bytes live in object storage)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ARRAY, BigInteger, Boolean, DateTime, ForeignKey, Identity, Integer, Text, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from email_service.models.base import Base


class DeliveryStatus(StrEnum):
    """Where mail written through the API stands; NULL for mail that came from a server."""

    DRAFT = "draft"
    QUEUED = "queued"
    SENDING = "sending"  # the data went out and the server's reply is awaited
    SENT = "sent"
    FAILED = "failed"
    AMBIGUOUS = "ambiguous"  # no reply to the data: the server may or may not have accepted it


class Folder(Base):
    __tablename__ = "folders"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    account_id: Mapped[str] = mapped_column(Text, ForeignKey("accounts.id"), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    display_name: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    delimiter: Mapped[str | None] = mapped_column(Text)
    parent_id: Mapped[str | None] = mapped_column(Text, ForeignKey("folders.id", ondelete="SET NULL"))
    attributes: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, default=list)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    uidnext: Mapped[int | None] = mapped_column(BigInteger)
    highestmodseq: Mapped[int | None] = mapped_column(BigInteger)
    message_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    unread_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    account_id: Mapped[str] = mapped_column(Text, ForeignKey("accounts.id"), nullable=False)
    folder_id: Mapped[str] = mapped_column(Text, ForeignKey("folders.id", ondelete="CASCADE"), nullable=False)
    uid: Mapped[int | None] = mapped_column(BigInteger)
    pop3_uidl: Mapped[str | None] = mapped_column(Text)
    modseq: Mapped[int | None] = mapped_column(BigInteger)
    message_id_header: Mapped[str | None] = mapped_column(Text)
    conversation_id: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text, nullable=False, default="")
    from_address: Mapped[str] = mapped_column(Text, nullable=False, default="")
    from_name: Mapped[str | None] = mapped_column(Text)
    to_addresses: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, default=list)
    cc_addresses: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, default=list)
    bcc_addresses: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, default=list)
    # address -> display name, for the recipients in To, Cc and Bcc that the headers name
    recipient_names: Mapped[dict[str, str]] = mapped_column(JSONB, nullable=False, default=dict)
    preview: Mapped[str] = mapped_column(Text, nullable=False, default="")
    body_text: Mapped[str] = mapped_column(Text, nullable=False, default="")
    body_html: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    is_read: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    is_starred: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    is_spam: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    is_deleted: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    is_draft: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    keywords: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, default=list)
    size: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    attachment_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    raw_object_key: Mapped[str | None] = mapped_column(Text)
    writeback_pending: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # The fields (is_read, is_starred, is_spam, keywords) whose change waits for the server.
    writeback_fields: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, default=list)
    delivery_status: Mapped[str | None] = mapped_column(Text)
    delivery_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class MessageMove(Base):
    """A move or deletion made through the API that the server has not made yet.

    ``uid`` (IMAP) or ``pop3_uidl`` (POP3) is where the message still is on the server, in
    ``source_folder_id``; ``target_folder_id`` is where it goes, None to delete it for good.
    ``message_id`` is the row that follows the move (None once the row is deleted).
    """

    __tablename__ = "message_moves"

    # A number, not a cuid: never shown, and a bulk move makes hundreds at once.
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    account_id: Mapped[str] = mapped_column(Text, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    message_id: Mapped[str | None] = mapped_column(Text, ForeignKey("messages.id", ondelete="SET NULL"), unique=True)
    source_folder_id: Mapped[str] = mapped_column(Text, ForeignKey("folders.id", ondelete="CASCADE"), nullable=False)
    uid: Mapped[int | None] = mapped_column(BigInteger)
    pop3_uidl: Mapped[str | None] = mapped_column(Text)
    target_folder_id: Mapped[str | None] = mapped_column(Text, ForeignKey("folders.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Attachment(Base):
    __tablename__ = "attachments"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    account_id: Mapped[str] = mapped_column(Text, ForeignKey("accounts.id"), nullable=False)
    message_id: Mapped[str | None] = mapped_column(Text, ForeignKey("messages.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    mime_type: Mapped[str] = mapped_column(Text, nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    content_id: Mapped[str | None] = mapped_column(Text)
    is_inline: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    object_key: Mapped[str] = mapped_column(Text, nullable=False)
    # Its place among the files of a message written through the API (the request's order);
    # None for received mail and unattached uploads.
    position: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
