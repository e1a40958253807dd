"""Small conversions shared by the API views."""

from __future__ import annotations

from datetime import datetime


def ms(moment: datetime | None) -> int | None:
    """Milliseconds since the epoch, as the spec's timestamps are."""
    return None if moment is None else int(moment.timestamp() * 1000)
