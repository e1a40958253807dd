"""Serving objects through the signed links the filesystem store hands out."""

from __future__ import annotations

from dataclasses import dataclass

from email_service.errors import ForbiddenError, NotFoundError
from email_service.storage import ObjectNotFound, ObjectReader, ObjectStore
from email_service.storage.filesystem import FilesystemStore
from email_service.storage.links import LinkExpired, LinkInvalid

DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass
class LinkedObject:
    reader: ObjectReader  # the caller closes it
    content_type: str
    filename: str | None


def open_linked_object(
    store: ObjectStore,
    *,
    key: str,
    expires: int,
    signature: str,
    filename: str | None = None,
    content_type: str | None = None,
) -> LinkedObject:
    """The object a link names, once its signature and expiry hold; 403 otherwise, 404 if it is gone."""
    if not isinstance(store, FilesystemStore):
        # With MinIO/S3 every link points at the object store itself, so none here can be genuine.
        raise ForbiddenError("This link is not valid", code="LINK_INVALID")
    try:
        store.links.verify(key, expires, signature, filename, content_type)
    except LinkInvalid:
        raise ForbiddenError("This link is not valid", code="LINK_INVALID") from None
    except LinkExpired:
        raise ForbiddenError("This link has expired", code="LINK_EXPIRED") from None
    try:
        reader = store.open(key)
    except ObjectNotFound:
        raise NotFoundError("The linked object no longer exists") from None
    return LinkedObject(reader, content_type or reader.content_type or DEFAULT_CONTENT_TYPE, filename or None)
