from __future__ import annotations

from flask import Response
from werkzeug.datastructures import FileStorage

from email_service.errors import BadRequestError
from email_service.handlers import principal, runtime
from email_service.handlers.messages import attachment_view
from email_service.handlers.views import streamed
from email_service.services import mail as service
from email_service.services import uploads
from email_service.storage.disposition import file_headers


def download_attachment(account_id: str, attachment_id: str) -> Response:
    rt = runtime()
    attachment, reader = service.open_attachment(rt.db, rt.objects, principal(), account_id, attachment_id)
    # A sender's file on the API's origin: served as the presigned link serves it, never run.
    return streamed(reader, file_headers(attachment.mime_type, attachment.filename))


def upload_attachment(account_id: str, file: FileStorage | None = None) -> tuple[dict, int]:
    if file is None:
        # A ``file`` part without a filename is a form field, not a file: the schema cannot tell.
        raise BadRequestError("file must be a file part (with a filename), not a text field")
    rt = runtime()
    attachment = uploads.store_upload(rt, principal(), account_id, file.stream, file.filename, file.mimetype)
    return attachment_view(attachment, rt.objects), 201
