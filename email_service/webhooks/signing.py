"""Secrets and signatures of the Standard Webhooks convention (webhook-id, -timestamp, -signature)."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES = 32  # HMAC-SHA256 keys gain nothing past the hash's block of entropy


def new_secret() -> str:
    """A fresh endpoint secret in the ``whsec_<base64>`` form every Standard Webhooks library reads."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def headers(secret: str, message_id: str, moment: datetime, body: str, previous: str | None = None) -> dict[str, str]:
    """The three headers that let a receiver verify ``body`` and drop replays and duplicates.

    With ``previous`` (a rotated-out secret still in its grace period) the signature header
    carries one signature under each, space-separated as the convention allows: a receiver
    accepts the delivery when any of them matches its secret.
    """
    # The library signs and verifies; writing the HMAC by hand here could drift from receivers'.
    signatures = [Webhook(key).sign(message_id, moment, body) for key in (secret, previous) if key is not None]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
