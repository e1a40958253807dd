from __future__ import annotations

from flask import Response
from werkzeug.datastructures import FileStorage

from email_service.errors import BadRequestError
from email_service.handlers import principal, runtime
from email_service.handlers.messages import attachment_view
from email_service.services import mail as service
from email_service.services import uploads
from email_service.storage.disposition import file_headers
from email_service.storage.streams import closing_chunks


def download_attachment(account_id: str, attachment_id: str) -> Response:
    rt = runtime()
    attachment, reader = service.open_attachment(rt.db, rt.objects, principal(), account_id, attachment_id)
    # Streamed chunk by chunk: a large attachment is never held whole in memory.
    return Response(
        closing_chunks(reader),
        # A sender's file on the API's origin: served as the presigned link serves it, never run.
        headers={**file_headers(attachment.mime_type, attachment.filename), "Content-Length": str(reader.size)},
    )


def upload_attachment(account_id: str, file: FileStorage | None = None) -> tuple[dict, int]:
    if file is None:
        # A ``file`` part without a filename is a form field, not a file: the schema cannot tell.
        raise BadRequestError("file must be a file part (with a filename), not a text field")
    rt = runtime()
    attachment = uploads.store_upload(rt, principal(), account_id, file.stream, file.filename, file.mimetype)
    return attachment_view(attachment, rt.objects), 201
