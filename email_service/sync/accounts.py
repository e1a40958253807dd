"""The account rows as sync sees them: credentials for the session, sync state, what is due."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, text, update

from email_service.crypto import CredentialCipher
from email_service.db import Database
from email_service.models import Account
from email_service.protocols.destinations import DestinationPolicy
from email_service.protocols.imap import ImapSession
from email_service.protocols.pop3 import Pop3Session
from email_service.tenancy import Principal


@dataclass(frozen=True)
class SyncTarget:
    id: str
    protocol: str
    hostname: str
    port: int
    encryption: str
    username: str
    password: str

    def __repr__(self) -> str:  # never let the password reach a log line through repr()
        return f"SyncTarget(id={self.id!r}, protocol={self.protocol!r}, host={self.hostname!r}:{self.port})"

    def session(self, ca_file: Path | None, destinations: DestinationPolicy) -> ImapSession | Pop3Session:
        """A (not yet opened) session to the account's mail server, for a ``with`` block."""
        session_type = ImapSession if self.protocol == "imap" else Pop3Session
        return session_type(
            self.hostname,
            self.port,
            self.encryption,
            self.username,
            self.password,
            ca_file=ca_file,
            destinations=destinations,
        )


def load_target(db: Database, cipher: CredentialCipher, principal: Principal, account_id: str) -> SyncTarget | None:
    """The live, enabled account with its password decrypted, or None."""
    with db.tenant_session(principal) as session:
        account = session.scalars(
            select(Account).where(Account.id == account_id, Account.deleted_at.is_(None), Account.is_enabled.is_(True))
        ).one_or_none()
        if account is None:
            return None
        return SyncTarget(
            id=account.id,
            protocol=account.protocol,
            hostname=account.hostname,
            port=account.port,
            encryption=account.encryption,
            username=account.username,
            password=cipher.decrypt(account.password_encrypted),
        )


def mark_syncing(
    db: Database, principal: Principal, account_id: str, syncing: bool, *, succeeded: bool = False
) -> None:
    values: dict = {"is_syncing": syncing}
    if succeeded:
        values["last_sync_at"] = datetime.now(UTC)
    with db.tenant_session(principal) as session:
        session.execute(update(Account).where(Account.id == account_id).values(**values))


@dataclass(frozen=True)
class DueAccount:
    id: str
    principal: Principal


def due_for_sync(db: Database, limit: int = 500) -> list[DueAccount]:
    """Enabled accounts with automatic sync whose interval has passed, across all tenants."""
    with db.maintenance_session() as session:
        rows = session.execute(
            text(
                "SELECT id, tenant_id, user_id FROM accounts"
                " WHERE deleted_at IS NULL AND is_enabled AND is_sync_enabled"
                " AND (last_sync_at IS NULL OR last_sync_at + sync_interval * interval '1 second' <= now())"
                " ORDER BY last_sync_at NULLS FIRST LIMIT :limit"
            ),
            {"limit": limit},
        ).all()
    return [DueAccount(row.id, Principal(uuid.UUID(str(row.tenant_id)), uuid.UUID(str(row.user_id)))) for row in rows]
