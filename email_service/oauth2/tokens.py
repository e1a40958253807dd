"""An OAuth2 account's access token: handed out while fresh, refreshed once at a time across workers.

Whoever opens a session to an OAuth2 account's server asks its ``TokenSource`` for a token. A
token that expires within ``REFRESH_MARGIN`` is refreshed first. Refreshes of one account are
serialised by a PostgreSQL advisory lock, so any number of workers, watchers and API processes
make one request to the provider; the others wait, then find the new token in the row. A rotated
refresh token is committed before the lock is released: a crash after the provider rotated it
cannot leave the account holding the old, now spent, one.

When the provider refuses to refresh (``invalid_grant``: revoked, expired, password changed) or
the mail server refuses a token just refreshed, the account's token state becomes
``refresh_failed`` and ``TokenRefreshFailed`` (a permanent ``AuthenticationFailed``) is raised:
sync backs off as after any refused login, and nothing asks the provider again until the user
gives new tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import requests
from authlib.integrations.base_client import OAuthError
from sqlalchemy import ColumnElement, and_, select, text, update
from sqlalchemy.orm import Session

from email_service.config import Settings
from email_service.crypto import CredentialCipher
from email_service.db import Database
from email_service.models import Account, AuthType, TokenState
from email_service.oauth2.providers import OAuth2Provider, within
from email_service.protocols.errors import AuthenticationFailed, ConnectionFailed, MailServerError, reply_line
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
REFRESH_MARGIN = timedelta(seconds=60)
DEFAULT_LIFETIME = 3600.0
MAX_LIFETIME = 366 * 24 * 3600.0  # no provider issues access tokens for longer than a year
# The token endpoint's error codes (RFC 6749 5.2) that refuse the grant or the client for good;
# any other error (a throttled or busy provider) is worth trying again with the same grant.
REFUSALS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
    }
)

# What authlib raises on a token response it cannot read (it converts members such as
# expires_in with int() before the caller sees them).
ANSWER_UNREADABLE = (ValueError, TypeError, OverflowError)


class TokenRefreshFailed(AuthenticationFailed):
    """The account's OAuth2 login is gone until the user gives new tokens."""


@dataclass(frozen=True)
class _Stored:
    state: str | None
    error: str | None
    provider: str
    refresh_token: str
    access_token: str | None
    expires_at: datetime | None

    def fresh(self, now: datetime) -> bool:
        return self.access_token is not None and self.expires_at is not None and self.expires_at - REFRESH_MARGIN > now


def lifetime(token: Mapping[str, object]) -> float:
    """Seconds the token endpoint says its access token lives, within what a date can hold.

    RFC 6749 makes ``expires_in`` optional (an hour is assumed then); a value that is no number,
    not finite or beyond ``MAX_LIFETIME`` is taken as the nearest sensible one instead of
    failing the login after the provider has already rotated the refresh token.
    """
    raw = token.get("expires_in", DEFAULT_LIFETIME)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return DEFAULT_LIFETIME
    try:
        seconds = float(raw)
    except ValueError:
        return DEFAULT_LIFETIME
    if math.isnan(seconds):
        return DEFAULT_LIFETIME
    return min(max(seconds, 0.0), MAX_LIFETIME)


def hold_refresh(session: Session, account_id: str) -> None:
    """Take the account's token lock until ``session``'s transaction ends.

    A refresh holds it from reading the tokens until its new ones are committed; new tokens given
    through the API take it too, so a refresh under way cannot overwrite them with its own.
    """
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"oauth2-refresh:{account_id}"}
    )


class TokenSource:
    """The access token of one account; ``repr`` shows no secret."""

    def __init__(
        self,
        db: Database,
        cipher: CredentialCipher,
        principal: Principal,
        account_id: str,
        providers: Mapping[str, OAuth2Provider] | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.db, self.cipher, self.principal, self.account_id = db, cipher, principal, account_id
        self.providers: Mapping[str, OAuth2Provider] = providers or {}
        self.timeout = timeout

    def with_settings(self, settings: Settings) -> TokenSource:
        """The same account's tokens, refreshed with the providers and timeout of ``settings``."""
        return TokenSource(
            self.db,
            self.cipher,
            self.principal,
            self.account_id,
            settings.oauth2_providers,
            settings.oauth2_timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"TokenSource(account={self.account_id})"

    def access_token(self) -> str:
        """A token valid for at least ``REFRESH_MARGIN``."""
        stored = self._load()
        if stored.state == TokenState.REFRESH_FAILED:
            raise TokenRefreshFailed(self._failed_message(stored.error))
        if stored.fresh(datetime.now(UTC)):
            assert stored.access_token is not None
            return stored.access_token
        return self._refresh(refused=None)

    def refused(self, token: str) -> str:
        """The server refused ``token``: a new one, refreshed unless another process refreshed it already."""
        return self._refresh(refused=token)

    def server_refused_refreshed(self, where: str, token: str) -> MailServerError:
        """The server refused even the freshly refreshed ``token``: mark the account, and the error to raise.

        Under the token lock, and only while ``token`` is still the account's: new tokens given
        through the API or the consent flow meanwhile (the usual answer to such a refusal) are
        the next login's to try, not marked failed along with the old ones.
        """
        reason = f"{where} refused the refreshed OAuth2 token"
        with self.db.tenant_session(self.principal) as session:
            hold_refresh(session, self.account_id)
            current = session.scalar(select(Account.oauth2_access_token_encrypted).where(Account.id == self.account_id))
            if current is None or self.cipher.decrypt(current) != token:
                return ConnectionFailed(f"the OAuth2 tokens changed while logging in to {where}; tried again later")
            self._write_failed(session, reason)
        return TokenRefreshFailed(self._failed_message(reason))

    # ---- internals

    def _failed_message(self, reason: str | None) -> str:
        return f"OAuth2 login failed: {reason or 'the token could not be refreshed'}; sign in again to give new tokens"

    def _load(self) -> _Stored:
        with self.db.tenant_session(self.principal) as session:
            account = session.scalars(select(Account).where(Account.id == self.account_id)).one_or_none()
            if account is None or account.oauth2_refresh_token_encrypted is None or account.oauth2_provider is None:
                raise TokenRefreshFailed("the account has no OAuth2 tokens")
            return _Stored(
                state=account.oauth2_token_state,
                error=account.oauth2_token_error,
                provider=account.oauth2_provider,
                refresh_token=self.cipher.decrypt(account.oauth2_refresh_token_encrypted),
                access_token=(
                    self.cipher.decrypt(account.oauth2_access_token_encrypted)
                    if account.oauth2_access_token_encrypted
                    else None
                ),
                expires_at=account.oauth2_expires_at,
            )

    def _refresh(self, refused: str | None) -> str:
        # The lock lives in a transaction of its own, held across the provider's answer and the
        # committed write of the new tokens, and released when that transaction ends.
        with self.db.tenant_session(self.principal) as lock:
            hold_refresh(lock, self.account_id)
            stored = self._load()
            if stored.state == TokenState.REFRESH_FAILED:
                raise TokenRefreshFailed(self._failed_message(stored.error))
            if stored.fresh(datetime.now(UTC)) and stored.access_token != refused:
                assert stored.access_token is not None
                return stored.access_token  # refreshed by someone else while this one waited
            provider = self.providers.get(stored.provider)
            if provider is None:
                reason = f"the OAuth2 provider {stored.provider!r} is not configured"
                self._mark_failed(reason)
                raise TokenRefreshFailed(self._failed_message(reason))
            token = self._request(provider, stored.refresh_token)
            access = token.get("access_token")
            if not isinstance(access, str) or not access:
                raise ConnectionFailed(f"the {provider.name} token endpoint answered without an access token")
            expires_at = datetime.now(UTC) + timedelta(seconds=lifetime(token))
            rotated = token.get("refresh_token")
            self._store(access, expires_at, rotated if isinstance(rotated, str) and rotated else None)
            log.info("refreshed the OAuth2 token of account %s (%s)", self.account_id, provider.name)
            return access

    def _request(self, provider: OAuth2Provider, refresh_token: str) -> dict:
        client = provider.session(self.timeout)
        try:
            return dict(
                within(self.timeout, lambda: client.refresh_token(provider.token_url, refresh_token=refresh_token))
            )
        except OAuthError as exc:
            # The error member is the provider's JSON: anything, not always the string RFC 6749 asks for.
            error = exc.error if isinstance(exc.error, str) else None
            code = reply_line(error or "error", 60)
            if error not in REFUSALS:
                # Throttled (429, "temporarily_unavailable", "slow_down") or another passing
                # trouble: the grant may be fine, so the account keeps it and tries again later.
                raise ConnectionFailed(f"the {provider.name} token endpoint is not answering now ({code})") from None
            # The provider refused the grant itself (RFC 6749 5.2): only new tokens help.
            reason = f"{provider.name} refused to refresh the token ({code})"
            self._mark_failed(reason)
            raise TokenRefreshFailed(self._failed_message(reason)) from None
        except TimeoutError:
            # Answering too slowly to finish (a byte at a time): tried again later, like a busy one.
            raise ConnectionFailed(f"the {provider.name} token endpoint did not answer in time") from None
        except requests.RequestException:
            # Unreachable or a 5xx: temporary, tried again later.
            raise ConnectionFailed(f"the {provider.name} token endpoint could not be reached") from None
        except ANSWER_UNREADABLE:
            # Not JSON (a proxy's HTML page), or a member authlib cannot read (an expires_in of
            # 1e400 or a list): the grant may be fine, so it is tried again later.
            raise ConnectionFailed(f"the {provider.name} token endpoint gave an answer that is not a token") from None
        finally:
            client.close()

    def _store(self, access: str, expires_at: datetime, refresh_token: str | None) -> None:
        values: dict = {
            "oauth2_access_token_encrypted": self.cipher.encrypt(access),
            "oauth2_expires_at": expires_at,
            "oauth2_token_state": TokenState.VALID.value,
            "oauth2_token_error": None,
        }
        if refresh_token is not None:
            values["oauth2_refresh_token_encrypted"] = self.cipher.encrypt(refresh_token)
        with self.db.tenant_session(self.principal) as session:
            session.execute(update(Account).where(self._still_oauth2()).values(**values))

    def _still_oauth2(self) -> ColumnElement[bool]:
        # A switch to a password while a refresh or a login was under way cleared the tokens (it
        # does not wait for the token lock): what the refresh learnt is not written back onto a
        # password account, where nothing would ever read or remove it.
        return and_(Account.id == self.account_id, Account.auth_type == AuthType.OAUTH2.value)

    def _mark_failed(self, reason: str) -> None:
        with self.db.tenant_session(self.principal) as session:
            self._write_failed(session, reason)

    def _write_failed(self, session: Session, reason: str) -> None:
        log.warning("OAuth2 token of account %s: %s", self.account_id, reason)
        session.execute(
            update(Account)
            .where(self._still_oauth2())
            .values(
                oauth2_token_state=TokenState.REFRESH_FAILED.value,
                oauth2_token_error=reason,
                oauth2_access_token_encrypted=None,
                oauth2_expires_at=None,
            )
        )
