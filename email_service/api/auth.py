"""JWT verification for both of the spec's schemes (Bearer and X-Auth-Token headers).

Connexion calls these by the dotted names in the spec's ``x-bearerInfoFunc`` /
``x-apikeyInfoFunc``. Every rejection is the same 401 to the client; the reason goes to the log.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from connexion.exceptions import OAuthProblem
from connexion.lifecycle import ConnexionRequest

from email_service.api.errors import UNAUTHORIZED_MESSAGE
from email_service.config import Settings

log = logging.getLogger(__name__)
ALGORITHM = "HS256"
LEEWAY_SECONDS = 30
# Tokens whose signature and claims were checked, so a client's next request with the same token
# skips the decoding (a measurable share of a small request's CPU); only expiry is checked again.
VERIFIED_TOKENS = 4096
RUNTIME_SCOPE_KEY = "email_service.token_verifier"


@dataclass(frozen=True)
class TokenVerifier:
    secret: str
    issuer: str | None = None
    audience: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        return cls(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)

    def verify(self, token: str) -> dict[str, Any]:
        try:
            info, expires = _verified(self, token)
        except (jwt.PyJWTError, ValueError) as exc:
            log.info("token rejected: %s", type(exc).__name__)
            raise OAuthProblem(detail=UNAUTHORIZED_MESSAGE) from None
        if time.time() >= expires + LEEWAY_SECONDS:  # as PyJWT decides "expired"
            log.info("token rejected: ExpiredSignatureError")
            raise OAuthProblem(detail=UNAUTHORIZED_MESSAGE)
        return dict(info)  # each request its own: the kept one is never handed out to be changed

    def _decode(self, token: str) -> tuple[dict[str, Any], float]:
        claims = jwt.decode(
            token,
            self.secret,
            algorithms=[ALGORITHM],
            audience=self.audience,
            issuer=self.issuer,
            # PyJWT refuses a token that names an audience when none is configured: a token
            # issued for another service is never accepted here by default.
            options={"require": ["exp", "sub", "tenant_id"], "verify_aud": True},
            leeway=LEEWAY_SECONDS,
        )
        user_id = uuid.UUID(str(claims["sub"]))
        tenant_id = uuid.UUID(str(claims["tenant_id"]))
        return {"sub": str(user_id), "tenant_id": str(tenant_id), "claims": claims}, float(claims["exp"])

    def issue(self, tenant_id: uuid.UUID, user_id: uuid.UUID, ttl_seconds: int, now: float) -> str:
        claims: dict[str, Any] = {
            "sub": str(user_id),
            "tenant_id": str(tenant_id),
            "iat": int(now),
            "exp": int(now) + ttl_seconds,
        }
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM)


@functools.lru_cache(maxsize=VERIFIED_TOKENS)
def _verified(verifier: TokenVerifier, token: str) -> tuple[dict[str, Any], float]:
    # Only tokens that passed are kept (a raising call is not cached), keyed by the verifier too:
    # another secret, issuer or audience checks the token afresh.
    return verifier._decode(token)


def _verifier(request: ConnexionRequest) -> TokenVerifier:
    return request.scope["extensions"][RUNTIME_SCOPE_KEY]


IDENTITY_HEADERS = (("X-Tenant-ID", "tenant_id"), ("X-User-ID", "sub"))


def _require_same_identity(info: dict[str, Any], request: ConnexionRequest, *, required: bool) -> None:
    """Refuse identity headers that name anyone but the token's tenant and user.

    A gateway or a client that sends a token for one user with headers for another is confused
    or hostile; serving either identity would hide that, so the request is refused.
    """
    for header, claim in IDENTITY_HEADERS:
        given = request.headers.get(header)
        if given is None and not required:
            continue
        try:
            matches = given is not None and uuid.UUID(given) == uuid.UUID(info[claim])
        except ValueError:
            matches = False
        if not matches:
            log.info("token rejected: %s does not match the token", header)
            raise OAuthProblem(detail=UNAUTHORIZED_MESSAGE)


def _require_same_other_token(info: dict[str, Any], other: str | None, request: ConnexionRequest) -> None:
    """A request carrying both schemes' tokens is served only when both name the same user."""
    if other is None:
        return
    other_info = _verifier(request).verify(other)
    if (other_info["tenant_id"], other_info["sub"]) != (info["tenant_id"], info["sub"]):
        log.info("token rejected: the bearer token and X-Auth-Token name different users")
        raise OAuthProblem(detail=UNAUTHORIZED_MESSAGE)


def bearer_token_info(token: str, request: ConnexionRequest) -> dict[str, Any]:
    info = _verifier(request).verify(token)
    # The headers are optional with a bearer token, but when present they must agree with it.
    _require_same_identity(info, request, required=False)
    _require_same_other_token(info, request.headers.get("X-Auth-Token"), request)
    return info


def header_token_info(apikey: str, request: ConnexionRequest) -> dict[str, Any]:
    info = _verifier(request).verify(apikey)
    _require_same_identity(info, request, required=True)
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    _require_same_other_token(info, bearer if scheme.lower() == "bearer" else None, request)
    return info
