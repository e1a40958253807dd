"""Files uploaded for compose: streamed into object storage, kept as attachments without a message."""

from __future__ import annotations

import re
from typing import BinaryIO

from cuid2 import Cuid
from sqlalchemy import select

from email_service.errors import NotFoundError
from email_service.models import Account, Attachment
from email_service.outgoing.build import safe_filename
from email_service.runtime import Runtime
from email_service.storage import unavailable_if_unreachable
from email_service.tenancy import Principal

new_id = Cuid().generate
MIME_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


def clean_filename(name: str | None) -> str:
    """The name as a mail client shows it: no path, nothing that breaks a header line, not empty."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    return safe_filename(base[:255])


def store_upload(
    runtime: Runtime,
    principal: Principal,
    account_id: str,
    stream: BinaryIO,
    filename: str | None,
    content_type: str | None,
) -> Attachment:
    with runtime.db.tenant_session(principal) as session:
        live = session.scalar(select(Account.id).where(Account.id == account_id, Account.deleted_at.is_(None)))
    if live is None:
        raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
    mime_type = (content_type or "").split(";")[0].strip().lower()
    if not MIME_TYPE.match(mime_type):
        mime_type = "application/octet-stream"
    attachment_id = new_id()
    key = f"{principal.tenant_id}/{account_id}/uploads/{attachment_id}"
    with unavailable_if_unreachable():
        # Length unknown up front (a multipart part): the store streams it in chunks.
        runtime.objects.put(key, stream, -1, mime_type)
        size = runtime.objects.size(key)
    attachment = Attachment(
        id=attachment_id,
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        account_id=account_id,
        message_id=None,
        filename=clean_filename(filename),
        mime_type=mime_type,
        size=size,
        content_id=None,
        is_inline=False,
        object_key=key,
    )
    try:
        with runtime.db.tenant_session(principal) as session:
            session.add(attachment)
    except Exception:
        runtime.objects.delete(key)
        raise
    return attachment
