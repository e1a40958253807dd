"""Serving objects through the signed links the filesystem store hands out."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from email_service.db import Database
from email_service.errors import ForbiddenError, NotFoundError
from email_service.storage import ObjectNotFound, ObjectReader, ObjectStore, unavailable_if_unreachable
from email_service.storage.filesystem import FilesystemStore
from email_service.storage.links import LinkExpired, LinkInvalid

DEFAULT_CONTENT_TYPE = "application/octet-stream"


def _account_live(db: Database, key: str) -> bool:
    """Whether the account a key belongs to (``tenant/account/...``) still exists."""
    tenant_id, _, rest = key.partition("/")
    account_id = rest.partition("/")[0]
    if not account_id:
        return False
    # The link itself is the credential (no token): the look-up crosses tenants, by exact id.
    with db.maintenance_session() as session:
        return bool(
            session.execute(
                text("SELECT 1 FROM accounts WHERE id = :id AND tenant_id::text = :tenant AND deleted_at IS NULL"),
                {"id": account_id, "tenant": tenant_id},
            ).first()
        )


@dataclass
class LinkedObject:
    reader: ObjectReader  # the caller closes it
    content_type: str
    filename: str | None


def open_linked_object(
    store: ObjectStore,
    db: Database,
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
    if not _account_live(db, key):
        # The account was deleted: its links stop working at once, before its files are removed.
        raise NotFoundError("The linked object no longer exists")
    try:
        with unavailable_if_unreachable():
            reader = store.open(key)
    except ObjectNotFound:
        raise NotFoundError("The linked object no longer exists") from None
    return LinkedObject(reader, content_type or reader.content_type or DEFAULT_CONTENT_TYPE, filename or None)
