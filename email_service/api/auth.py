"""JWT verification for both of the spec's schemes (Bearer and X-Auth-Token headers).

Connexion calls these by the dotted names in the spec's ``x-bearerInfoFunc`` /
``x-apikeyInfoFunc``. Every rejection is the same 401 to the client; the reason goes to the log.
"""

from __future__ import annotations

import logging
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
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub", "tenant_id"], "verify_aud": self.audience is not None},
                leeway=30,
            )
            user_id = uuid.UUID(str(claims["sub"]))
            tenant_id = uuid.UUID(str(claims["tenant_id"]))
        except (jwt.PyJWTError, ValueError) as exc:
            log.info("token rejected: %s", type(exc).__name__)
            raise OAuthProblem(detail=UNAUTHORIZED_MESSAGE) from None
        return {"sub": str(user_id), "tenant_id": str(tenant_id), "claims": claims}

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


def _verifier(request: ConnexionRequest) -> TokenVerifier:
    return request.scope["extensions"][RUNTIME_SCOPE_KEY]


def bearer_token_info(token: str, request: ConnexionRequest) -> dict[str, Any]:
    return _verifier(request).verify(token)


def header_token_info(apikey: str, request: ConnexionRequest) -> dict[str, Any]:
    info = _verifier(request).verify(apikey)
    for header, claim in (("X-Tenant-ID", "tenant_id"), ("X-User-ID", "sub")):
        given = request.headers.get(header)
        try:
            matches = given is not None and uuid.UUID(given) == uuid.UUID(info[claim])
        except ValueError:
            matches = False
        if not matches:
            log.info("token rejected: %s does not match the token", header)
            raise OAuthProblem(detail=UNAUTHORIZED_MESSAGE)
    return info
