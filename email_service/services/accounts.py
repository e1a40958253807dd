"""Account management: validation beyond the schema, encryption of credentials, tenancy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cuid2 import Cuid
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from email_service.addresses import InvalidAddress, canonical, comparison_key
from email_service.crypto import CredentialCipher
from email_service.db import Database
from email_service.errors import BadRequestError, ConflictError, NotFoundError
from email_service.models import Account, AuthType, OAuth2State, TaskKind, TokenState
from email_service.oauth2 import tokens
from email_service.oauth2.providers import OAuth2Provider
from email_service.protocols import destinations as destination_policy
from email_service.protocols.destinations import DestinationPolicy
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.services import key_rotation
from email_service.services.server_calls import SLOTS
from email_service.tenancy import Principal

_new_id = Cuid().generate
# Year 9999: a later expiry is as good as never, and datetime cannot hold it.
MAX_EPOCH_MS = 253_402_300_799_000
UNIQUE_EMAIL_INDEX = "accounts_user_email_live"
# API field -> column, for fields a client may set directly.
PLAIN_FIELDS = {
    "accountName": "account_name",
    "hostname": "hostname",
    "port": "port",
    "encryption": "encryption",
    "username": "username",
    "isSyncEnabled": "is_sync_enabled",
    "syncInterval": "sync_interval",
    "isEnabled": "is_enabled",
    "pop3DeleteOnServer": "pop3_delete_on_server",
    "smtpHostname": "smtp_hostname",
    "smtpPort": "smtp_port",
    "smtpEncryption": "smtp_encryption",
    "smtpUsername": "smtp_username",
}
# Fields only an update may set: the create schema does not name them, so on create nothing has
# checked their values (a string for isEnabled reached the database); a new account is enabled.
UPDATE_ONLY_FIELDS = frozenset({"isEnabled"})
SECRET_FIELDS = {"password": "password_encrypted", "smtpPassword": "smtp_password_encrypted"}
OAUTH2_SECRET_COLUMNS = ("oauth2_refresh_token_encrypted", "oauth2_access_token_encrypted")
# Changing any of these ends an account's sync backoff: the next automatic sync is due at once.
RETRY_NOW_FIELDS = frozenset(
    {"hostname", "port", "encryption", "username", "password", "syncInterval", "authType", "oauth2"}
)


@dataclass(frozen=True)
class Page:
    items: list[Account]
    total: int
    syncing: frozenset[str] = frozenset()  # ids of the listed accounts a sync is running for


def canonical_email(address: str) -> str:
    try:
        return canonical(address)
    except InvalidAddress as exc:
        message = f"emailAddress is not a valid email address: {exc}"
        raise BadRequestError(message, code="INVALID_EMAIL_FORMAT") from None


def _now() -> datetime:
    return datetime.now(UTC)


def _apply(
    account: Account,
    body: Mapping[str, Any],
    cipher: CredentialCipher,
    providers: Mapping[str, OAuth2Provider],
    *,
    creating: bool = False,
) -> None:
    for field, column in PLAIN_FIELDS.items():
        if field in body and not (creating and field in UPDATE_ONLY_FIELDS):
            setattr(account, column, body[field])
    auth_type = AuthType(body.get("authType", account.auth_type or AuthType.PASSWORD))
    if auth_type is AuthType.OAUTH2:
        if "password" in body or "smtpPassword" in body:
            raise BadRequestError("an oauth2 account logs in with tokens: send no password or smtpPassword")
        if account.protocol != "imap":
            raise BadRequestError("an oauth2 account must use imap (POP3 logins with OAuth2 are not supported)")
        if "oauth2" in body:
            _apply_tokens(account, body["oauth2"], cipher, providers)
        elif account.oauth2_refresh_token_encrypted is None:
            raise BadRequestError("oauth2 is required when authType is oauth2")
        # Tokens replace any password: nothing stale is kept to be decrypted later.
        account.password_encrypted = account.smtp_password_encrypted = None
    else:
        if "oauth2" in body:
            raise BadRequestError("oauth2 is only accepted with authType oauth2")
        if "password" not in body and account.password_encrypted is None:
            raise BadRequestError("password is required when authType is password")
        for column in (*OAUTH2_SECRET_COLUMNS, "oauth2_provider", "oauth2_expires_at"):
            setattr(account, column, None)
        account.oauth2_token_state = account.oauth2_token_error = None
        for field, column in SECRET_FIELDS.items():
            if field in body:
                setattr(account, column, cipher.encrypt(body[field]))
    account.auth_type = auth_type.value


def _apply_tokens(
    account: Account, grant: Mapping[str, Any], cipher: CredentialCipher, providers: Mapping[str, OAuth2Provider]
) -> None:
    """New tokens from the caller: the token state starts over as valid."""
    if grant["provider"] not in providers:
        raise BadRequestError(
            f"oauth2.provider {grant['provider']!r} is not a provider this service is configured for",
            code="OAUTH2_PROVIDER_UNKNOWN",
        )
    if ("accessToken" in grant) != ("expiresAt" in grant):
        raise BadRequestError("oauth2.accessToken and oauth2.expiresAt go together")
    account.oauth2_provider = grant["provider"]
    account.oauth2_refresh_token_encrypted = cipher.encrypt(grant["refreshToken"])
    if "accessToken" in grant:
        account.oauth2_access_token_encrypted = cipher.encrypt(grant["accessToken"])
        account.oauth2_expires_at = datetime.fromtimestamp(min(grant["expiresAt"], MAX_EPOCH_MS) / 1000, UTC)
    else:
        account.oauth2_access_token_encrypted = account.oauth2_expires_at = None  # fetched at first use
    account.oauth2_token_state = TokenState.VALID.value
    account.oauth2_token_error = None


def check_destinations(
    principal: Principal, account: Account, policy: DestinationPolicy, changed: Mapping[str, Any] | None = None
) -> None:
    """Refuse an account whose IMAP/POP3 or SMTP server is on a network the service must not reach.

    The same policy is applied again before every connection (``protocols.connect``); refusing
    here tells the user at once, instead of through a failed task later. Looking up a host name
    the user gave may wait on name servers the user chose: it holds one of the user's slots.
    """
    servers = (
        ("hostname", account.hostname, account.port, ("hostname", "port")),
        ("smtpHostname", account.smtp_hostname, account.smtp_port or 587, ("smtpHostname", "smtpPort")),
    )
    for field, host, port, fields in servers:
        if not host or (changed is not None and not any(name in changed for name in fields)):
            continue
        try:
            with SLOTS.slot(principal):
                destination_policy.check(host, port, policy)
        except destination_policy.DestinationRefused:
            message = (
                f"{field} {host}:{port} is not allowed: mail servers must be on public addresses "
                "(loopback, private, link-local and reserved networks are refused)"
            )
            raise BadRequestError(message, code="DESTINATION_NOT_ALLOWED") from None


def create_account(
    db: Database,
    cipher: CredentialCipher,
    principal: Principal,
    body: Mapping[str, Any],
    destinations: DestinationPolicy | None = None,
    providers: Mapping[str, OAuth2Provider] | None = None,
) -> Account:
    email_address = canonical_email(body["emailAddress"])
    account = Account(
        id=_new_id(),
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        email_address=email_address,
        email_key=comparison_key(email_address),
        protocol=body.get("protocol", "imap"),
        is_sync_enabled=body.get("isSyncEnabled", True),
        sync_interval=body.get("syncInterval", 300),
        is_enabled=True,
        created_at=_now(),
        next_sync_at=_now(),
    )
    account.updated_at = account.created_at
    _apply(account, body, cipher, providers or {}, creating=True)
    check_destinations(principal, account, destinations or DestinationPolicy())
    try:
        with db.tenant_session(principal) as session:
            session.add(account)
    except IntegrityError as exc:
        if UNIQUE_EMAIL_INDEX in str(exc.orig):
            # Unique per user: another user's addresses, even in the same tenant, are never revealed.
            raise ConflictError("Email address already registered", code="EMAIL_DUPLICATE") from None
        raise
    return account


def _owned(session: Any, account_id: str) -> Account:
    # RLS already limits rows to the principal; the WHERE clause only adds the id and liveness.
    account = session.scalars(
        select(Account).where(Account.id == account_id, Account.deleted_at.is_(None)).with_for_update()
    ).one_or_none()
    if account is None:
        raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
    return account


def list_accounts(db: Database, principal: Principal, limit: int, offset: int) -> Page:
    with db.tenant_session(principal) as session:
        live = Account.deleted_at.is_(None)
        # The total rides on the page (a user has few accounts); only a page past the end counts apart.
        rows = session.execute(
            select(Account, func.count().over().label("total"))
            .where(live)
            .order_by(Account.created_at, Account.id)
            .limit(limit)
            .offset(offset)
        ).all()
        items = [row.Account for row in rows]
        if rows:
            total = rows[0].total
        else:
            total = session.scalar(select(func.count()).select_from(Account).where(live)) if offset else 0
        # In the same transaction as the page, not one of its own.
        syncing = tasks.syncing_in(session, [account.id for account in items])
    return Page(items=items, total=total or 0, syncing=frozenset(syncing))


def get_account(db: Database, principal: Principal, account_id: str) -> Account:
    with db.tenant_session(principal) as session:
        return _owned(session, account_id)


def account_and_syncing(db: Database, principal: Principal, account_id: str) -> tuple[Account, bool]:
    """The account and whether a sync of it is running, read in one transaction."""
    with db.tenant_session(principal) as session:
        account = _owned(session, account_id)
        return account, bool(tasks.syncing_in(session, [account.id]))


def update_account(
    db: Database,
    cipher: CredentialCipher,
    principal: Principal,
    account_id: str,
    body: Mapping[str, Any],
    destinations: DestinationPolicy | None = None,
    providers: Mapping[str, OAuth2Provider] | None = None,
) -> Account:
    with db.tenant_session(principal) as session:
        if "oauth2" in body:
            # Before the row is read: a refresh under way commits its tokens first, and these
            # new ones then replace them (never the other way round).
            tokens.hold_refresh(session, account_id)
        account = _owned(session, account_id)
        _apply(account, body, cipher, providers or {})
        # Only a changed host or port is checked: an operator's narrower allow-list must not
        # keep users from renaming an account (the connection is refused anyway).
        check_destinations(principal, account, destinations or DestinationPolicy(), changed=body)
        account.updated_at = _now()
        if RETRY_NOW_FIELDS.intersection(body) or body.get("isEnabled") or body.get("isSyncEnabled"):
            # Someone changed what the failing sync depended on: try again now, not after the backoff.
            account.sync_failures = 0
            account.next_sync_at = account.updated_at
        return account


def delete_account(runtime: Runtime, principal: Principal, account_id: str) -> None:
    """Gone for the API at once; a job then removes its objects, uploads and rows for good."""
    with runtime.db.tenant_session(principal) as session:
        account = _owned(session, account_id)
        account.deleted_at = _now()
        account.updated_at = account.deleted_at
        account.is_sync_enabled = False
        # In the same transaction: an account deleted here always has the job that removes it.
        tasks.enqueue(runtime, TaskKind.CLEANUP, principal, account_id=account_id, session=session)


def syncing(runtime: Runtime, principal: Principal, account_ids: list[str]) -> set[str]:
    """Ids of the accounts a sync is running for right now (the tasks table says so)."""
    return tasks.syncing_accounts(runtime, principal, account_ids)


def rotate_credentials(db: Database, cipher: CredentialCipher, batch_size: int = 500) -> int:
    """Re-encrypt every stored credential under the newest key; returns how many changed.

    Mail passwords, OAuth2 tokens, and the PKCE verifiers of consent flows still under way.
    """
    columns = (*SECRET_FIELDS.values(), *OAUTH2_SECRET_COLUMNS)
    changed = key_rotation.rotate_columns(db, cipher, Account.__table__, columns, batch_size=batch_size)
    flows = OAuth2State.__table__
    verifiers = ["code_verifier_encrypted"]
    return changed + key_rotation.rotate_columns(db, cipher, flows, verifiers, key="state_hash", batch_size=batch_size)
