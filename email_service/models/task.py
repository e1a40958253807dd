"""Background tasks: what the task API shows, and what workers claim, run, retry and reap."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import DateTime, Enum, ForeignKey, Integer, Text, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from email_service.models.base import Base


class TaskKind(StrEnum):
    SYNC = "sync"
    SEND = "send"
    DRAFT = "draft"
    WRITEBACK = "writeback"
    CLEANUP = "cleanup"  # remove a deleted account's objects and rows


class TaskStatus(StrEnum):
    PENDING = "pending"  # waiting for a worker
    STARTED = "started"  # a worker runs it and keeps its heartbeat fresh
    RETRY = "retry"  # failed in a way worth trying again; waits for its next attempt
    SUCCESS = "success"
    FAILURE = "failure"

    @property
    def active(self) -> bool:
        return self in (TaskStatus.PENDING, TaskStatus.STARTED, TaskStatus.RETRY)


def _values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    account_id: Mapped[str | None] = mapped_column(Text, ForeignKey("accounts.id"))
    message_id: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[TaskKind] = mapped_column(
        Enum(TaskKind, native_enum=False, create_constraint=False, values_callable=_values), nullable=False
    )
    status: Mapped[TaskStatus] = mapped_column(
        Enum(TaskStatus, native_enum=False, create_constraint=False, values_callable=_values), nullable=False
    )
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    progress: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    abandoned: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    run_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    carrier_id: Mapped[str | None] = mapped_column(Text)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
