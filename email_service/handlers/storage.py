from __future__ import annotations

from flask import Response

from email_service.handlers import runtime
from email_service.handlers.views import streamed
from email_service.services import stored_objects
from email_service.storage.disposition import file_headers


def get_stored_object(
    key: str, expires: int, signature: str, filename: str | None = None, type_: str | None = None
) -> Response:
    rt = runtime()
    linked = stored_objects.open_linked_object(
        rt.objects, rt.db, key=key, expires=expires, signature=signature, filename=filename, content_type=type_
    )
    # The bytes are users' content served from the API's origin: never let a browser run them.
    return streamed(linked.reader, file_headers(linked.content_type, linked.filename))
