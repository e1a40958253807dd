"""A user's webhook endpoints through the API: create and rotate (the secret shown once), list, get, delete, enable."""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update

from email_service.crypto import CredentialCipher
from email_service.db import Database
from email_service.errors import BadRequestError, ConflictError, NotFoundError
from email_service.models import Account, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from email_service.protocols.destinations import DestinationPolicy, DestinationRefused
from email_service.services import key_rotation
from email_service.services.server_calls import SLOTS
from email_service.tenancy import Principal
from email_service.webhooks import signing, urls

# The spec's pattern: "wh_" and 24 letters or digits. No literal path segment has this shape, so
# /api/webhooks/{webhookId} can never be mistaken for /api/{accountId}/folders and the like.
ID_ALPHABET = string.ascii_letters + string.digits
MAX_ENDPOINTS_PER_USER = 50
DEFAULT_GRACE_SECONDS = 86400  # the spec's default: a day for receivers to take the new secret


@dataclass(frozen=True)
class Created:
    endpoint: WebhookEndpoint
    secret: str  # returned once, in the create or rotate answer; only its encryption is stored


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(ID_ALPHABET) for _ in range(24))


def _now() -> datetime:
    return datetime.now(UTC)


def create(
    db: Database, cipher: CredentialCipher, principal: Principal, body: Mapping[str, Any], policy: DestinationPolicy
) -> Created:
    url = body["url"]
    try:
        # The look-up of a host name the user chose waits on name servers the user may choose too.
        with SLOTS.slot(principal):
            urls.check(url, policy)
    except urls.WebhookUrlError as exc:
        raise BadRequestError(str(exc)) from None
    except DestinationRefused:
        raise BadRequestError(
            f"url {url} is not allowed: webhooks go to public addresses over https "
            "(loopback, private, link-local and reserved networks, and plain http, "
            "only where the operator allows them)",
            code="DESTINATION_NOT_ALLOWED",
        ) from None
    event_types = body.get("eventTypes")
    secret = signing.new_secret()
    now = _now()
    endpoint = WebhookEndpoint(
        id=new_id("wh_"),
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        url=url,
        description=body.get("description"),
        event_types=sorted(set(event_types)) if event_types else None,
        account_id=body.get("accountId"),
        secret_encrypted=cipher.encrypt(secret),
        status="enabled",
        created_at=now,
        updated_at=now,
    )
    with db.tenant_session(principal) as session:
        # The accounts it covers, with their last committed entry: what is committed now is their
        # history, and every entry numbered after it is new to this endpoint, whenever its
        # transaction began (entries are numbered as they commit). RLS shows only the caller's
        # accounts, so another user's id reads as missing.
        accounts = select(Account.id, Account.change_seq).where(Account.deleted_at.is_(None))
        if endpoint.account_id is not None:
            accounts = accounts.where(Account.id == endpoint.account_id)
        endpoint.start_seqs = {row.id: row.change_seq for row in session.execute(accounts)}
        if endpoint.account_id is not None and endpoint.account_id not in endpoint.start_seqs:
            raise NotFoundError(f"Account with ID '{endpoint.account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
        count = session.scalar(select(func.count()).select_from(WebhookEndpoint)) or 0
        if count >= MAX_ENDPOINTS_PER_USER:
            raise ConflictError(
                f"at most {MAX_ENDPOINTS_PER_USER} webhook endpoints per user; delete one first",
                code="TOO_MANY_WEBHOOKS",
            )
        session.add(endpoint)
    return Created(endpoint=endpoint, secret=secret)


def list_endpoints(db: Database, principal: Principal) -> list[WebhookEndpoint]:
    with db.tenant_session(principal) as session:
        return list(session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def _owned(session: Any, webhook_id: str, *, lock: bool = False) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, webhook_id, with_for_update=lock or None)
    if endpoint is None:
        raise NotFoundError(f"Webhook with ID '{webhook_id}' does not exist", code="WEBHOOK_NOT_FOUND")
    return endpoint


def get(db: Database, principal: Principal, webhook_id: str) -> WebhookEndpoint:
    with db.tenant_session(principal) as session:
        return _owned(session, webhook_id)


def remove(db: Database, principal: Principal, webhook_id: str) -> None:
    """Gone at once with its deliveries and attempts; a delivery being sent finishes unrecorded."""
    with db.tenant_session(principal) as session:
        _owned(session, webhook_id)
        session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == webhook_id))


def enable(db: Database, principal: Principal, webhook_id: str) -> WebhookEndpoint:
    """Deliver again: the endpoint's deliveries still waiting are due now, with their retries started over."""
    with db.tenant_session(principal) as session:
        endpoint = _owned(session, webhook_id)
        if endpoint.status != "enabled":
            now = _now()
            endpoint.status, endpoint.disabled_reason, endpoint.disabled_at = "enabled", None, None
            endpoint.updated_at = now
            # The failures counted so far belong to the outage the user has just dealt with: a
            # delivery left with its retries used up would otherwise disable the endpoint again
            # at its first failure, with no retry at all.
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.endpoint_id == webhook_id, WebhookDelivery.status == "pending")
                .values(next_attempt_at=now, attempts=0)
            )
        return endpoint


def rotate(
    db: Database, cipher: CredentialCipher, principal: Principal, webhook_id: str, grace_seconds: int
) -> Created:
    """A new secret; the one it replaces keeps signing for ``grace_seconds`` (0: stops at once).

    Only one previous secret is kept: a rotation within another's grace period ends the older
    secret at once, since the receiver was given the one being replaced now.
    """
    secret = signing.new_secret()
    now = _now()
    with db.tenant_session(principal) as session:
        # Locked: two rotations at once take turns, so the later one replaces (and, given a
        # grace period, keeps signing with) the secret the earlier one answered with.
        endpoint = _owned(session, webhook_id, lock=True)
        if grace_seconds > 0:
            endpoint.previous_secret_encrypted = endpoint.secret_encrypted
            endpoint.previous_secret_expires_at = now + timedelta(seconds=grace_seconds)
        else:
            endpoint.previous_secret_encrypted = endpoint.previous_secret_expires_at = None
        endpoint.secret_encrypted = cipher.encrypt(secret)
        endpoint.updated_at = now
    return Created(endpoint=endpoint, secret=secret)


def previous_secret_expiry(endpoint: WebhookEndpoint) -> datetime | None:
    """When the rotated-out secret stops signing; None when none signs any more (the dispatcher's rule too)."""
    until = endpoint.previous_secret_expires_at
    return until if until is not None and until > _now() else None


def forget_expired_secrets(db: Database) -> int:
    """Drop every rotated-out secret whose grace period is over; returns how many.

    Expired, it signs nothing (the dispatcher reads it only while it lasts), but it is still a
    secret a receiver once held: kept, it would sit in the database and in its backups for good.
    """
    with db.maintenance_session() as session:
        result = session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.previous_secret_expires_at <= func.now())
            .values(previous_secret_encrypted=None, previous_secret_expires_at=None)
        )
        return result.rowcount or 0


def attempts(db: Database, principal: Principal, webhook_id: str, limit: int) -> list[WebhookAttempt]:
    with db.tenant_session(principal) as session:
        _owned(session, webhook_id)
        return list(
            session.scalars(
                select(WebhookAttempt)
                .where(WebhookAttempt.endpoint_id == webhook_id)
                .order_by(WebhookAttempt.attempted_at.desc(), WebhookAttempt.id.desc())
                .limit(limit)
            )
        )


def rotate_secrets(db: Database, cipher: CredentialCipher) -> int:
    """Re-encrypt every endpoint's secret under the newest key (``rotate-keys``); returns how many changed."""
    return key_rotation.rotate_columns(
        db, cipher, WebhookEndpoint.__table__, ["secret_encrypted", "previous_secret_encrypted"]
    )
