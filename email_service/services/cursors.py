"""Keyset positions in a folder's message list: the last item's sort key and id.

A cursor names a position in one of the list's orders (sort key, then id to break ties), so the
next page is an index range read that starts there: as cheap at the millionth message as at the
first, and stable while messages arrive or leave. It is bound to the sort and filter it was made
for, because a position in one order means nothing in another. The encoding is the service's one
cursor format (``email_service.cursors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from email_service import cursors


@dataclass(frozen=True)
class Position:
    key: datetime | str
    id: str


def _fingerprint(sort: str, filter_: str) -> str:
    return cursors.query_fingerprint("messages", sort, filter_)


def encode(sort: str, filter_: str, key: datetime | str, item_id: str) -> str:
    value: int | str = cursors.micros(key) if isinstance(key, datetime) else key
    return cursors.encode(_fingerprint(sort, filter_), [value, item_id])


def decode(cursor: str, sort: str, filter_: str, *, time_key: bool) -> Position:
    """The position ``cursor`` names; 409 ``INVALID_CURSOR`` if it is not one for this sort and filter.

    409, not 400: the cursor is well-formed by the contract (as getChanges answers a well-formed
    cursor it cannot use); it conflicts with the listing asked for.
    """
    value, item_id = cursors.decode(cursor, _fingerprint(sort, filter_), (int if time_key else str, str))
    return Position(cursors.from_micros(value) if time_key else value, item_id)
