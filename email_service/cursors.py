"""Opaque page cursors for keyset paging: the sort key of a page's last row, bound to its query.

A cursor is base64url of a small JSON document. It carries no secret and needs none: it only
says where to resume, and every read still runs under the caller's row-level security. It names
the query it was given out for, so a cursor reused with other parameters is refused instead of
silently skipping or repeating rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from email_service.errors import ConflictError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A key is a few numbers and an id; anything longer was not made here.
_MAX_CURSOR_CHARS = 1000


def query_fingerprint(*parts: object) -> str:
    """A short digest of the parameters that decide a query's order and rows."""
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def micros(moment: datetime) -> int:
    """A timestamp as whole microseconds since the epoch (PostgreSQL's resolution), exact in JSON."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    """The timestamp of a cursor's key; out of range means the cursor was not made here."""
    try:
        return _EPOCH + timedelta(microseconds=value)
    except OverflowError:
        raise ConflictError("cursor is not one this service gave out", code="INVALID_CURSOR") from None


def encode(fingerprint: str, key: Sequence[Any]) -> str:
    document = json.dumps({"q": fingerprint, "k": list(key)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(document.encode()).decode().rstrip("=")


def decode(cursor: str, fingerprint: str, shape: Sequence[type | tuple[type, ...]]) -> list[Any]:
    """The key in ``cursor``, whose items must have the types of ``shape``; 409 otherwise.

    The spec lets any base64url text through as a cursor, so one that was not made here is a
    conflict with the service's state (as the changes feed answers), not a malformed request.
    """
    try:
        if len(cursor) > _MAX_CURSOR_CHARS:
            raise ValueError
        document = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        key = document["k"]
        if not isinstance(key, list) or len(key) != len(shape):
            raise ValueError
        for value, kind in zip(key, shape, strict=True):
            # bool is an int to Python; no key here holds one.
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError
            if isinstance(value, str) and not _storable(value):
                raise ValueError
        matches = document["q"] == fingerprint
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise ConflictError("cursor is not one this service gave out", code="INVALID_CURSOR") from None
    if not matches:
        raise ConflictError("cursor was given out for other query parameters", code="INVALID_CURSOR")
    return key


def _storable(value: str) -> bool:
    """Text PostgreSQL can compare: no NUL, no lone surrogate (which JSON can spell)."""
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
