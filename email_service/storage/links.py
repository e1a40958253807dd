"""HMAC-SHA256 signed, expiring download links for objects the service keeps on its own disk.

A link is ``{public_url}/storage/objects?key=..&expires=..&signature=..[&filename=..][&type=..]``.
The signature covers every parameter that changes what the answer is, so none can be altered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from urllib.parse import quote, urlencode

LINK_PATH = "/storage/objects"
_PURPOSE = "email-service storage link v1"


class LinkInvalid(Exception):
    """The signature does not match the link's parameters."""


class LinkExpired(Exception):
    """The link was genuine but its time is up."""


class LinkSigner:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("storage links need a signing key")
        self._secret = secret.encode()

    def signature(self, key: str, expires: int, filename: str | None, content_type: str | None) -> str:
        # A JSON array is an unambiguous encoding: no choice of values can make two different
        # parameter sets produce the same message (as plain concatenation could).
        message = json.dumps([_PURPOSE, key, expires, filename or None, content_type or None], separators=(",", ":"))
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def url(
        self, base_url: str, key: str, lifetime_seconds: float, filename: str | None, content_type: str | None
    ) -> str:
        expires = math.ceil(time.time() + lifetime_seconds)
        params = {
            "key": key,
            "expires": str(expires),
            "signature": self.signature(key, expires, filename, content_type),
        }
        if filename:
            params["filename"] = filename
        if content_type:
            params["type"] = content_type
        return f"{base_url.rstrip('/')}{LINK_PATH}?{urlencode(params, quote_via=quote)}"

    def verify(
        self,
        key: str,
        expires: int,
        signature: str,
        filename: str | None,
        content_type: str | None,
        now: float | None = None,
    ) -> None:
        """Raises ``LinkInvalid`` or ``LinkExpired``; the signature is checked first, in constant time."""
        expected = self.signature(key, expires, filename, content_type)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise LinkInvalid
        if (time.time() if now is None else now) > expires:
            raise LinkExpired
