"""Objects in MinIO or any S3-compatible store, through the ``minio`` SDK."""

from __future__ import annotations

from datetime import timedelta
from io import BytesIO
from typing import TYPE_CHECKING, BinaryIO

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from email_service.storage import (
    CHUNK_SIZE,
    ObjectNotFound,
    ObjectReader,
    check_link_headers,
    check_link_lifetime,
    check_prefix,
)
from email_service.storage.disposition import content_disposition

if TYPE_CHECKING:
    from email_service.config import Settings

# S3 needs a part size for a stream of unknown length; each part is buffered, so keep it modest.
UNKNOWN_LENGTH_PART_SIZE = 16 * 1024 * 1024
_NOT_FOUND = {"NoSuchKey", "NoSuchObject"}
_BUCKET_EXISTS = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}


class MinioStore:
    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> MinioStore:
        http_client = None
        if settings.ca_file is not None:
            # The SDK's own pool, but trusting the operator's CA instead of the public ones.
            http_client = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=30, read=300),
                maxsize=10,
                cert_reqs="CERT_REQUIRED",
                ca_certs=str(settings.ca_file),
                retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            )
        client = Minio(
            settings.minio_endpoint,
            access_key=settings.minio_access_key,
            secret_key=settings.minio_secret_key,
            secure=settings.minio_secure,
            region=settings.minio_region,
            http_client=http_client,
        )
        return cls(client, settings.minio_bucket)

    def ensure_bucket(self) -> None:
        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as exc:
            # Another replica starting at the same moment made it first.
            if exc.code not in _BUCKET_EXISTS:
                raise

    def put(self, key: str, data: BinaryIO, length: int, content_type: str) -> None:
        part_size = UNKNOWN_LENGTH_PART_SIZE if length == -1 else 0
        self.client.put_object(self.bucket, key, data, length, content_type=content_type, part_size=part_size)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.put(key, BytesIO(data), len(data), content_type)

    def open(self, key: str) -> ObjectReader:
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            raise

        def close() -> None:
            response.close()
            response.release_conn()

        return ObjectReader(
            response.stream(CHUNK_SIZE),
            size=int(response.headers["Content-Length"]),
            content_type=response.headers.get("Content-Type"),
            close=close,
        )

    def size(self, key: str) -> int:
        try:
            return self.client.stat_object(self.bucket, key).size
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            raise

    def presigned_url(
        self, key: str, expires: timedelta, *, filename: str | None = None, content_type: str | None = None
    ) -> str:
        check_link_lifetime(expires)
        check_link_headers(filename, content_type)
        # S3 answers with these instead of the stored headers, so a browser saves the right name.
        response_headers = {"response-content-disposition": content_disposition(filename)}
        if content_type:
            response_headers["response-content-type"] = content_type
        return self.client.presigned_get_object(self.bucket, key, expires=expires, response_headers=response_headers)

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> None:
        check_prefix(prefix)
        listed = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
        # remove_objects is lazy: the deletes happen while its error iterator is consumed.
        errors = list(self.client.remove_objects(self.bucket, (DeleteObject(o.object_name) for o in listed)))
        if errors:
            raise RuntimeError(f"could not delete {len(errors)} objects under a prefix: {errors[0].code}")
