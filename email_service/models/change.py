"""The change log: what happened to an account's messages and folders, in commit order."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, DateTime, Enum, ForeignKey, Text, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from email_service.models.base import Base


class ChangeEntity(StrEnum):
    MESSAGE = "message"
    FOLDER = "folder"


class ChangeKind(StrEnum):
    CREATED = "created"
    UPDATED = "updated"  # flags, labels, or the folder (a move); detail says which
    DESTROYED = "destroyed"


def _values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


class Change(Base):
    __tablename__ = "changes"

    account_id: Mapped[str] = mapped_column(Text, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    entity: Mapped[ChangeEntity] = mapped_column(
        Enum(ChangeEntity, native_enum=False, create_constraint=False, values_callable=_values), nullable=False
    )
    entity_id: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[ChangeKind] = mapped_column(
        Enum(ChangeKind, native_enum=False, create_constraint=False, values_callable=_values), nullable=False
    )
    folder_id: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
