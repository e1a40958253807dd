from __future__ import annotations

from typing import Any

from email_service.handlers import principal, runtime
from email_service.handlers.views import ms
from email_service.oauth2 import consent


def authorize_oauth2(provider: str, body: dict[str, Any]) -> tuple[dict, int]:
    begun = consent.begin(runtime(), principal(), provider, body)
    return {"authorizationUrl": begun.authorization_url, "expiresAt": ms(begun.expires_at)}, 200


def oauth2_callback(
    state: str | None = None, code: str | None = None, error: str | None = None
) -> tuple[None, int, dict]:
    target = consent.finish(runtime(), state, code, error)
    # 303: the browser follows with a GET, and nothing of this request (the code) is resent.
    return None, 303, {"Location": target, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
