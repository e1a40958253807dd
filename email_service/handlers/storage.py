from __future__ import annotations

from flask import Response

from email_service.handlers import runtime
from email_service.services import stored_objects
from email_service.storage.disposition import file_headers


def get_stored_object(
    key: str, expires: int, signature: str, filename: str | None = None, type_: str | None = None
) -> Response:
    rt = runtime()
    linked = stored_objects.open_linked_object(
        rt.objects, rt.db, key=key, expires=expires, signature=signature, filename=filename, content_type=type_
    )
    reader = linked.reader
    # Streamed chunk by chunk: an attachment never sits whole in memory.
    response = Response(iter(reader), status=200, direct_passthrough=True)
    # The bytes are users' content served from the API's origin: never let a browser run them.
    response.headers.update(file_headers(linked.content_type, linked.filename))
    response.headers["Content-Length"] = str(reader.size)
    response.call_on_close(reader.close)
    return response
