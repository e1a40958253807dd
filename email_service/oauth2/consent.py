"""The consent flow, for callers that do not run their own: authorization code with PKCE.

``begin`` stores a pending flow (the state's SHA-256, the PKCE verifier encrypted, who began it,
what account to make, where to return) and answers the provider's authorization URL. ``finish``
runs on the provider's redirect, which carries no JWT: it deletes the flow's row in the statement
that finds it, so a state works once, and only within its lifetime. The row says for whom the
account is made, never the request. Only then is the code exchanged and the account created or
updated, through the same service as the API's own requests.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

import requests
from authlib.integrations.base_client import OAuthError
from sqlalchemy import delete

from email_service.errors import BadRequestError, ConflictError, ForbiddenError, NotFoundError
from email_service.models import OAuth2State
from email_service.oauth2.providers import OAuth2Provider, within
from email_service.oauth2.tokens import ANSWER_UNREADABLE, lifetime
from email_service.protocols.errors import reply_line
from email_service.runtime import Runtime
from email_service.services import accounts
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
CALLBACK_PATH = "/api/oauth2/callback"


@dataclass(frozen=True)
class Begun:
    authorization_url: str
    expires_at: datetime


def _hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def callback_url(runtime: Runtime) -> str:
    return runtime.settings.public_url + CALLBACK_PATH


def return_url_allowed(url: str, allowed: tuple[str, ...]) -> bool:
    """Same scheme, host and port as an allowed URL, and a path at or under its path."""
    try:
        target = urlsplit(url)
        target_port = target.port
    except ValueError:
        return False
    if target.username or target.password or "\\" in url:
        return False
    # urlsplit drops tabs and line breaks that the redirect would keep (a line break cannot be
    # sent in the Location header at all), and a browser resolves "." and ".." segments, also
    # percent-encoded, before it goes: either would let the checked URL differ from the one used.
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in url):
        return False
    if any(unquote(segment) in (".", "..") for segment in target.path.split("/")):
        return False
    for entry in allowed:
        base = urlsplit(entry)
        if (target.scheme, target.hostname, target_port) != (base.scheme, base.hostname, base.port):
            continue
        prefix = base.path.rstrip("/")
        if target.path == base.path or target.path.startswith(prefix + "/") or (not prefix and not target.path):
            return True
    return False


def _provider(runtime: Runtime, name: str) -> OAuth2Provider:
    provider = runtime.settings.oauth2_providers.get(name)
    if provider is None or provider.authorize_url is None or provider.imap is None:
        raise BadRequestError(
            f"{name!r} is not a provider this service can run a consent flow for", code="OAUTH2_PROVIDER_UNKNOWN"
        )
    return provider


def begin(runtime: Runtime, principal: Principal, provider_name: str, body: Mapping[str, Any]) -> Begun:
    provider = _provider(runtime, provider_name)
    if not return_url_allowed(body["returnUrl"], runtime.settings.oauth2_return_urls):
        raise BadRequestError("returnUrl is not on this service's allow-list", code="RETURN_URL_NOT_ALLOWED")
    email_address = accounts.canonical_email(body["emailAddress"])
    if body.get("accountId"):
        account = accounts.get_account(runtime.db, principal, body["accountId"])  # 404 unless the caller's own
        if account.protocol != "imap":
            # Found now, not after the user consented (whose grant would then be thrown away).
            # The request is well-formed; the account it names is the wrong kind: a conflict.
            raise ConflictError(
                "OAuth2 needs an IMAP account (POP3 logins with OAuth2 are not supported)", code="OAUTH2_NOT_SUPPORTED"
            )
    state, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(64)
    expires_at = datetime.now(UTC) + timedelta(seconds=runtime.settings.oauth2_state_seconds)
    wanted = {key: body[key] for key in ("accountName", "accountId", "isSyncEnabled", "syncInterval") if key in body}
    with runtime.db.tenant_session(principal) as session:
        session.add(
            OAuth2State(
                state_hash=_hash(state),
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                provider=provider.name,
                code_verifier_encrypted=runtime.cipher.encrypt(verifier),
                return_url=body["returnUrl"],
                account={"emailAddress": email_address, **wanted},
                expires_at=expires_at,
            )
        )
    client = provider.session(
        runtime.settings.oauth2_timeout_seconds, redirect_uri=callback_url(runtime), code_challenge_method="S256"
    )
    try:
        url, _ = client.create_authorization_url(
            provider.authorize_url, state=state, code_verifier=verifier, **dict(provider.authorize_params)
        )
    finally:
        client.close()
    return Begun(url, expires_at)


def _consume(runtime: Runtime, state: str | None) -> OAuth2State:
    """The flow's row, deleted as it is read: a second callback with the same state finds nothing."""
    if state:
        with runtime.db.maintenance_session() as session:
            row = session.scalars(
                delete(OAuth2State).where(OAuth2State.state_hash == _hash(state)).returning(OAuth2State)
            ).one_or_none()
            # Expired flows nobody finished go as well.
            session.execute(delete(OAuth2State).where(OAuth2State.expires_at < datetime.now(UTC)))
        if row is not None and row.expires_at > datetime.now(UTC):
            return row
    # The state is this request's only credential: one that proves nothing is refused like any other.
    raise ForbiddenError("the consent flow is unknown, expired or already finished", code="OAUTH2_STATE_INVALID")


def _back(flow: OAuth2State, **outcome: str) -> str:
    # Into the query, before any fragment: after a "#" the outcome would be part of the fragment,
    # which a page reading its query (or a server) never sees.
    target = urlsplit(flow.return_url)
    query = "&".join(part for part in (target.query, urlencode(outcome)) if part)
    return urlunsplit(target._replace(query=query))


def finish(runtime: Runtime, state: str | None, code: str | None, error: str | None) -> str:
    """Complete the flow; answers the URL to redirect the browser to."""
    flow = _consume(runtime, state)
    principal = Principal(flow.tenant_id, flow.user_id)
    provider = runtime.settings.oauth2_providers.get(flow.provider)
    if error or not code or provider is None:
        # The user declined (or the provider went away): only fixed words go back, never its text.
        return _back(flow, status="failed", reason="access_denied")
    client = provider.session(
        runtime.settings.oauth2_timeout_seconds, redirect_uri=callback_url(runtime), code_challenge_method="S256"
    )
    try:
        verifier = runtime.cipher.decrypt(flow.code_verifier_encrypted)
        token = within(
            runtime.settings.oauth2_timeout_seconds,
            lambda: client.fetch_token(provider.token_url, code=code, code_verifier=verifier),
        )
    except OAuthError as exc:
        # The provider's own text, made one bounded printable line before it reaches the log.
        refusal = reply_line(exc.error if isinstance(exc.error, str) else "error", 60)
        log.warning("consent flow for %s: the code exchange was refused (%s)", flow.provider, refusal)
        return _back(flow, status="failed", reason="exchange_failed")
    except (requests.RequestException, TimeoutError, *ANSWER_UNREADABLE):
        return _back(flow, status="failed", reason="provider_unreachable")
    finally:
        client.close()
    if not token.get("refresh_token") or not token.get("access_token"):
        return _back(flow, status="failed", reason="no_refresh_token")
    grant: dict[str, Any] = {
        "provider": provider.name,
        "refreshToken": token["refresh_token"],
        "accessToken": token["access_token"],
        "expiresAt": int((datetime.now(UTC).timestamp() + lifetime(token)) * 1000),
    }
    wanted = dict(flow.account)
    account_id = wanted.pop("accountId", None)
    try:
        if account_id:
            account = accounts.update_account(
                runtime.db,
                runtime.cipher,
                principal,
                account_id,
                {"authType": "oauth2", "oauth2": grant},
                runtime.settings.destinations,
                runtime.settings.oauth2_providers,
            )
        else:
            account = accounts.create_account(
                runtime.db,
                runtime.cipher,
                principal,
                _new_account(provider, wanted, grant),
                runtime.settings.destinations,
                runtime.settings.oauth2_providers,
            )
    except ConflictError:
        return _back(flow, status="failed", reason="email_duplicate")
    # The browser always goes back to the caller's page, with fixed words, whatever changed since
    # the flow began: the account deleted, or no longer one that takes tokens.
    except NotFoundError:
        return _back(flow, status="failed", reason="account_not_found")
    except BadRequestError:
        return _back(flow, status="failed", reason="account_not_usable")
    return _back(flow, status="connected", accountId=account.id)


def _new_account(provider: OAuth2Provider, wanted: Mapping[str, Any], grant: dict[str, Any]) -> dict[str, Any]:
    assert provider.imap is not None  # checked when the flow began
    address = wanted["emailAddress"]
    body: dict[str, Any] = {
        "accountName": wanted.get("accountName") or address,
        "emailAddress": address,
        "protocol": "imap",
        "hostname": provider.imap.host,
        "port": provider.imap.port,
        "encryption": provider.imap.encryption,
        "username": address,
        "authType": "oauth2",
        "oauth2": grant,
        "isSyncEnabled": wanted.get("isSyncEnabled", True),
        "syncInterval": wanted.get("syncInterval", 300),
    }
    if provider.smtp is not None:
        body.update(
            smtpHostname=provider.smtp.host, smtpPort=provider.smtp.port, smtpEncryption=provider.smtp.encryption
        )
    return body
