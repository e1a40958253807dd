from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, LargeBinary, Text, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from email_service.models.base import Base


class AuthType(StrEnum):
    PASSWORD = "password"  # noqa: S105 - the name of a login method, not a secret
    OAUTH2 = "oauth2"


class TokenState(StrEnum):
    VALID = "valid"
    # The provider refused a refresh, or the server refused a freshly refreshed token: only new
    # tokens from the user end it.
    REFRESH_FAILED = "refresh_failed"


class Account(Base):
    """A user's mail account. Passwords and OAuth2 tokens are Fernet tokens, never plaintext."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    account_name: Mapped[str] = mapped_column(Text, nullable=False)
    email_address: Mapped[str] = mapped_column(Text, nullable=False)
    # The canonical address, case-folded: unique per user among live accounts.
    email_key: Mapped[str] = mapped_column(Text, nullable=False)
    protocol: Mapped[str] = mapped_column(Text, nullable=False)
    hostname: Mapped[str] = mapped_column(Text, nullable=False)
    port: Mapped[int] = mapped_column(Integer, nullable=False)
    encryption: Mapped[str] = mapped_column(Text, nullable=False)
    username: Mapped[str] = mapped_column(Text, nullable=False)
    auth_type: Mapped[str] = mapped_column(Text, nullable=False, default=AuthType.PASSWORD)
    password_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)  # None for OAuth2 accounts
    oauth2_provider: Mapped[str | None] = mapped_column(Text)
    oauth2_refresh_token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    oauth2_access_token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    oauth2_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    oauth2_token_state: Mapped[str | None] = mapped_column(Text)
    oauth2_token_error: Mapped[str | None] = mapped_column(Text)
    smtp_hostname: Mapped[str | None] = mapped_column(Text)
    smtp_port: Mapped[int | None] = mapped_column(Integer)
    smtp_encryption: Mapped[str | None] = mapped_column(Text)
    smtp_username: Mapped[str | None] = mapped_column(Text)
    smtp_password_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    is_sync_enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    sync_interval: Mapped[int] = mapped_column(Integer, nullable=False, default=300)
    last_sync_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Automatic sync: when it is next due, and how it has been failing (reset by a success).
    next_sync_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sync_failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_sync_error: Mapped[str | None] = mapped_column(Text)
    last_sync_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The change log's last sequence number, and the highest one pruned (see models.change).
    change_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    change_floor: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    is_enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    # POP3: deleting a message through the API deletes it on the server too (DELE) only if set.
    pop3_delete_on_server: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class OAuth2State(Base):
    """A consent flow begun and not yet finished: single use, short-lived, bound to its user."""

    __tablename__ = "oauth2_states"

    state_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    provider: Mapped[str] = mapped_column(Text, nullable=False)
    code_verifier_encrypted: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    return_url: Mapped[str] = mapped_column(Text, nullable=False)
    account: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
