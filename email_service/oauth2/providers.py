"""OAuth2 providers, configured from the environment in this one place.

``EMAIL_SERVICE_OAUTH2_PROVIDERS`` names the providers (``google,microsoft,corp``); each one's
settings are ``EMAIL_SERVICE_OAUTH2_<NAME>_<SETTING>``. ``google`` and ``microsoft`` come with
their endpoints, scopes and mail servers, so a client id and secret are all they need; any other
name is a generic provider whose endpoints and scopes the operator gives. Adding a provider is a
settings change, never a code change.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from authlib.integrations.requests_client import OAuth2Session

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]"}


class ProviderConfigError(ValueError):
    """A provider setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class MailEndpoint:
    host: str
    port: int
    encryption: str  # "tls" or "starttls", as the account's settings spell it


@dataclass(frozen=True)
class OAuth2Provider:
    name: str
    client_id: str
    client_secret: str | None = field(repr=False)
    token_url: str
    authorize_url: str | None
    scopes: tuple[str, ...]
    # Extra parameters of the authorization request (Google returns a refresh token only with these).
    authorize_params: tuple[tuple[str, str], ...] = ()
    # The servers an account made through the consent flow uses.
    imap: MailEndpoint | None = None
    smtp: MailEndpoint | None = None

    def session(self, timeout: float, **kwargs: object) -> OAuth2Session:
        """An authlib client for this provider's token endpoint (the caller closes it)."""
        client = OAuth2Session(
            client_id=self.client_id,
            client_secret=self.client_secret,
            scope=" ".join(self.scopes),
            # A public client (no secret, e.g. a Microsoft "mobile and desktop" registration) sends its id only.
            token_endpoint_auth_method="client_secret_post" if self.client_secret else "none",
            default_timeout=timeout,
            **kwargs,
        )
        # A token request is never sent on: requests follows a 307 or 308 with the same body, and
        # the body holds the client secret and the refresh token (or the code and its verifier).
        # A redirect answers as an endpoint that cannot be reached does.
        client.max_redirects = 0
        return client


def within(timeout: float, exchange: Callable[[], T]) -> T:
    """``exchange()`` (a request to a token endpoint), given ``timeout`` seconds in all.

    requests' timeout bounds the connect and each read, not the answer: an endpoint (or a proxy)
    sending a byte every few seconds keeps a caller for as long as it likes, and a refresh holds
    the account's token lock meanwhile, so every sync, send and watcher of the account waits too.
    The exchange runs on a thread of its own; past the deadline the caller gets ``TimeoutError``
    and goes on, and the thread ends when the endpoint stops sending or a read times out.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(exchange())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=run, name="oauth2-token-request", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no complete answer in {timeout:g} s")
    if failure:
        raise failure[0]
    return outcome[0]


def _builtin(name: str, env: Mapping[str, str], prefix: str) -> dict:
    if name == "google":
        return {
            "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
            "token_url": "https://oauth2.googleapis.com/token",
            "scopes": ("https://mail.google.com/",),
            "authorize_params": (("access_type", "offline"), ("prompt", "consent")),
            "imap": MailEndpoint("imap.gmail.com", 993, "tls"),
            "smtp": MailEndpoint("smtp.gmail.com", 465, "tls"),
        }
    if name == "microsoft":
        tenant = env.get(prefix + "TENANT") or "common"
        if not re.match(r"^[A-Za-z0-9.-]{1,100}$", tenant):
            raise ProviderConfigError(f"{prefix}TENANT must be a tenant id, a domain, common or organizations")
        base = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
        return {
            "authorize_url": f"{base}/authorize",
            "token_url": f"{base}/token",
            "scopes": (
                "https://outlook.office.com/IMAP.AccessAsUser.All",
                "https://outlook.office.com/SMTP.Send",
                "offline_access",
            ),
            "imap": MailEndpoint("outlook.office365.com", 993, "tls"),
            "smtp": MailEndpoint("smtp.office365.com", 587, "starttls"),
        }
    return {}


def _url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = env.get(name) or default
    if raw is None:
        return None
    parts = urlsplit(raw)
    # Tokens travel over this URL: https only, except to the machine itself (a local test server).
    local = parts.scheme == "http" and parts.netloc.split(":")[0] in _LOOPBACK_HOSTS
    if not parts.hostname or not (parts.scheme == "https" or local):
        raise ProviderConfigError(f"{name} must be an https URL")
    return raw


def _endpoint(env: Mapping[str, str], name: str, default: MailEndpoint | None) -> MailEndpoint | None:
    raw = env.get(name)
    if not raw:
        return default
    match = re.match(r"^([A-Za-z0-9.-]+):([0-9]{1,5})(?:/(tls|starttls))?$", raw)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ProviderConfigError(f"{name} must be HOST:PORT or HOST:PORT/tls or HOST:PORT/starttls")
    port = int(match.group(2))
    return MailEndpoint(match.group(1), port, match.group(3) or ("starttls" if port == 587 else "tls"))


def load_providers(env: Mapping[str, str]) -> dict[str, OAuth2Provider]:
    """Every provider named in ``EMAIL_SERVICE_OAUTH2_PROVIDERS``, by name."""
    providers: dict[str, OAuth2Provider] = {}
    for raw_name in env.get("EMAIL_SERVICE_OAUTH2_PROVIDERS", "").split(","):
        name = raw_name.strip().lower()
        if not name:
            continue
        if not _NAME.match(name):
            raise ProviderConfigError(f"EMAIL_SERVICE_OAUTH2_PROVIDERS: {raw_name.strip()!r} is not a provider name")
        prefix = f"EMAIL_SERVICE_OAUTH2_{name.upper().replace('-', '_')}_"
        builtin = _builtin(name, env, prefix)
        client_id = env.get(prefix + "CLIENT_ID")
        if not client_id:
            raise ProviderConfigError(f"{prefix}CLIENT_ID is required for OAuth2 provider {name}")
        token_url = _url(env, prefix + "TOKEN_URL", builtin.get("token_url"))
        if token_url is None:
            raise ProviderConfigError(f"{prefix}TOKEN_URL is required for OAuth2 provider {name}")
        scopes = tuple(env[prefix + "SCOPES"].replace(",", " ").split()) if env.get(prefix + "SCOPES") else None
        providers[name] = OAuth2Provider(
            name=name,
            client_id=client_id,
            client_secret=env.get(prefix + "CLIENT_SECRET") or None,
            token_url=token_url,
            authorize_url=_url(env, prefix + "AUTHORIZE_URL", builtin.get("authorize_url")),
            scopes=scopes or builtin.get("scopes", ()),
            authorize_params=builtin.get("authorize_params", ()),
            imap=_endpoint(env, prefix + "IMAP", builtin.get("imap")),
            smtp=_endpoint(env, prefix + "SMTP", builtin.get("smtp")),
        )
    return providers


def allowed_return_urls(env: Mapping[str, str]) -> tuple[str, ...]:
    """``EMAIL_SERVICE_OAUTH2_RETURN_URLS``: where the consent flow may send the browser back to."""
    urls = tuple(u.strip() for u in env.get("EMAIL_SERVICE_OAUTH2_RETURN_URLS", "").split(",") if u.strip())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ProviderConfigError(f"EMAIL_SERVICE_OAUTH2_RETURN_URLS: {url!r} is not an http(s) URL")
    return urls
