"""Object storage for attachments and raw messages: one interface, a MinIO/S3 and a filesystem backend.

Keys look like ``{tenant_id}/{account_id}/attachments/{id}``. Services code against
``ObjectStore`` only; ``object_store(settings)`` picks the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, BinaryIO, Protocol

import urllib3

from email_service.errors import DependencyUnavailableError

if TYPE_CHECKING:
    from email_service.config import Settings

CHUNK_SIZE = 64 * 1024
# S3 refuses presigned URLs that live longer than a week; the filesystem store keeps the same bound
# so code that works against one backend works against the other.
MAX_LINK_LIFETIME = timedelta(days=7)


class ObjectNotFound(Exception):
    """No object is stored under the key."""


# What a store raises when it cannot be reached for now (the filesystem's OS errors, the S3
# client's transport errors after its own retries): worth trying again later, unlike the rest.
UNREACHABLE: tuple[type[Exception], ...] = (OSError, urllib3.exceptions.HTTPError)
UNREACHABLE_MESSAGE = "object storage unreachable; try again later"
log = logging.getLogger(__name__)


@contextmanager
def unavailable_if_unreachable() -> Iterator[None]:
    """For a request: a store that cannot be reached is a 503 ``DependencyUnavailableError``.

    The caller may simply try again later; a 500 would say the service itself is at fault. The
    reason (a host, a port) goes to the log only.
    """
    try:
        yield
    except UNREACHABLE as exc:
        log.warning("object storage unreachable: %s: %s", type(exc).__name__, exc)
        raise DependencyUnavailableError(UNREACHABLE_MESSAGE) from None


class ObjectReader:
    """An open stored object: iterate it for its bytes in chunks, and close it (or use ``with``)."""

    def __init__(
        self, chunks: Iterator[bytes], *, size: int, content_type: str | None, close: Callable[[], None]
    ) -> None:
        self.size = size
        self.content_type = content_type
        self._chunks = chunks
        self._close = close
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ObjectStore(Protocol):
    def ensure_bucket(self) -> None:
        """Create the bucket or directory if it is missing; safe to call again and from many processes."""

    def put(self, key: str, data: BinaryIO, length: int, content_type: str) -> None:
        """Store ``length`` bytes read from ``data`` in chunks (``-1``: read to the end)."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    def open(self, key: str) -> ObjectReader:
        """Raises ``ObjectNotFound``."""

    def size(self, key: str) -> int:
        """Raises ``ObjectNotFound``."""

    def presigned_url(
        self, key: str, expires: timedelta, *, filename: str | None = None, content_type: str | None = None
    ) -> str:
        """A link anyone may GET until it expires; it downloads as ``filename`` with ``content_type``."""

    def delete(self, key: str) -> None:
        """Deleting a missing object is not an error."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with ``prefix`` (a non-empty string)."""


def check_link_lifetime(expires: timedelta) -> None:
    if not timedelta(seconds=1) <= expires <= MAX_LINK_LIFETIME:
        raise ValueError("a presigned link must live between one second and seven days")


def check_link_headers(filename: str | None, content_type: str | None) -> None:
    """Refuse what could not travel in the link (the spec's limits) or in a response header."""
    if filename is not None and len(filename) > 1024:
        raise ValueError("a link's filename must be at most 1024 characters")
    if content_type is not None and (
        len(content_type) > 255 or not content_type.isascii() or not content_type.isprintable()
    ):
        raise ValueError("a link's content type must be at most 255 printable ASCII characters")


def check_prefix(prefix: str) -> None:
    # An empty prefix would delete every tenant's objects: always a bug in the caller.
    if not prefix:
        raise ValueError("delete_prefix needs a non-empty prefix")


def object_store(settings: Settings) -> ObjectStore:
    """MinIO/S3 when MINIO_ENDPOINT is set, else a directory beside the embedded default's data."""
    # Imported here: both backends import this module's base classes.
    if settings.minio_endpoint:
        from email_service.storage.minio_store import MinioStore

        return MinioStore.from_settings(settings)

    from email_service.storage.filesystem import FilesystemStore

    if not settings.storage_signing_key:
        raise ValueError("a storage signing key is required for self-served links")
    return FilesystemStore(settings.data_dir / "objects", settings.public_url, settings.storage_signing_key)
