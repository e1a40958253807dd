"""Small conversions shared by the API views."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from flask import Response

from email_service.storage import ObjectReader


def ms(moment: datetime | None) -> int | None:
    """Milliseconds since the epoch, as the spec's timestamps are."""
    return None if moment is None else int(moment.timestamp() * 1000)


def streamed(reader: ObjectReader, headers: Mapping[str, str]) -> Response:
    """A stored object streamed chunk by chunk, never whole in memory; closed when the response
    is, also when no chunk was read (a HEAD, a client gone)."""
    response = Response(iter(reader), status=200, direct_passthrough=True)
    response.headers.update(headers)
    response.headers["Content-Length"] = str(reader.size)
    response.call_on_close(reader.close)
    return response
