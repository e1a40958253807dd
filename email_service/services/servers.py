"""An account's mail servers with their logins decrypted: what sync, delivery and filing connect to."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select

from email_service.crypto import CredentialCipher
from email_service.db import Database
from email_service.models import Account, AuthType
from email_service.oauth2.tokens import TokenSource
from email_service.protocols.servers import MailServer, Protocol
from email_service.tenancy import Principal


@dataclass(frozen=True)
class AccountServers:
    account_id: str
    email_address: str
    incoming: MailServer  # IMAP or POP3
    smtp: MailServer | None  # None when the account has no SMTP settings


def servers_of(account: Account, cipher: CredentialCipher, db: Database) -> AccountServers:
    """Decrypts the account's secrets; raises ``CredentialError`` when no configured key can.

    An OAuth2 account has no password: its servers carry a ``TokenSource`` instead, which reads
    (and refreshes) the token only when a session logs in.
    """
    tokens = None
    password = ""
    if account.auth_type == AuthType.OAUTH2:
        principal = Principal(uuid.UUID(str(account.tenant_id)), uuid.UUID(str(account.user_id)))
        tokens = TokenSource(db, cipher, principal, account.id)
    elif account.password_encrypted is not None:
        password = cipher.decrypt(account.password_encrypted)
    smtp = None
    if account.smtp_hostname:
        smtp = MailServer(
            Protocol.SMTP,
            account.smtp_hostname,
            account.smtp_port or 587,
            account.smtp_encryption or "starttls",
            account.smtp_username or account.username,
            # The SMTP login defaults to the account's own.
            cipher.decrypt(account.smtp_password_encrypted) if account.smtp_password_encrypted else password,
            token_source=tokens,
        )
    return AccountServers(
        account_id=account.id,
        email_address=account.email_address,
        incoming=MailServer(
            Protocol(account.protocol),
            account.hostname,
            account.port,
            account.encryption,
            account.username,
            password,
            token_source=tokens,
        ),
        smtp=smtp,
    )


def load_servers(
    db: Database, cipher: CredentialCipher, principal: Principal, account_id: str
) -> AccountServers | None:
    """The live, enabled account's servers, or None."""
    with db.tenant_session(principal) as session:
        account = session.scalars(
            select(Account).where(Account.id == account_id, Account.deleted_at.is_(None), Account.is_enabled.is_(True))
        ).one_or_none()
        if account is None:
            return None
        return servers_of(account, cipher, db)
