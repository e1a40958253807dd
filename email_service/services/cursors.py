"""Opaque keyset positions for message pages: the last item's sort key and id.

A cursor names a position in one of the list's orders (sort key, then id to break ties), so the
next page is an index range read that starts there: as cheap at the millionth message as at the
first, and stable while messages arrive or leave. It carries the sort and filter it was made for,
because a position in one order means nothing in another. It is not secret (it holds what the
caller was just shown) and need not be signed: a forged one only moves the start of a page
within the caller's own rows.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from email_service.errors import ConflictError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
# PostgreSQL timestamps span 4713 BC to 294276 AD; Python's datetime 1 to 9999: stay inside both.
MIN_MICROS = (datetime(1, 1, 2, tzinfo=UTC) - EPOCH) // MICROSECOND
MAX_MICROS = (datetime(9999, 12, 30, tzinfo=UTC) - EPOCH) // MICROSECOND


@dataclass(frozen=True)
class Position:
    key: datetime | str
    id: str


def encode(sort: str, filter_: str, key: datetime | str, item_id: str) -> str:
    value: int | str = (key - EPOCH) // MICROSECOND if isinstance(key, datetime) else key
    raw = json.dumps([sort, filter_, value, item_id], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def decode(cursor: str, sort: str, filter_: str, *, time_key: bool) -> Position:
    """The position ``cursor`` names; 409 ``INVALID_CURSOR`` if it is not one for this sort and filter.

    409, not 400: the cursor is well-formed by the contract (as getChanges answers a well-formed
    cursor it cannot use); it conflicts with the listing asked for.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        made_for_sort, made_for_filter, value, item_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise _invalid("cursor is not one this service issued") from None
    if (made_for_sort, made_for_filter) != (sort, filter_):
        raise _invalid("cursor was issued for another sort or filter; start again without it")
    if not _storable(item_id):
        raise _invalid("cursor is not one this service issued")
    if time_key:
        if not isinstance(value, int) or isinstance(value, bool) or not MIN_MICROS <= value <= MAX_MICROS:
            raise _invalid("cursor is not one this service issued")
        return Position(EPOCH + value * MICROSECOND, item_id)
    if not _storable(value):
        raise _invalid("cursor is not one this service issued")
    return Position(value, item_id)


def _storable(value: object) -> bool:
    """Text PostgreSQL can compare: no NUL, no lone surrogate (which JSON can spell)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _invalid(message: str) -> ConflictError:
    return ConflictError(message, code="INVALID_CURSOR")
