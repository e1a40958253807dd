"""Objects kept in a directory, for the embedded default; the service itself serves their links.

Layout under the root: ``data/<key>`` holds each object, ``tmp/`` holds writes in progress.
Each object file starts with one line of JSON metadata (its content type) followed by its bytes,
so an object and its metadata appear together in one rename and can never disagree.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import suppress
from datetime import timedelta
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from email_service.storage import (
    CHUNK_SIZE,
    ObjectNotFound,
    ObjectReader,
    check_link_headers,
    check_link_lifetime,
    check_prefix,
)
from email_service.storage.links import LinkSigner

MAX_KEY_BYTES = 1024
MAX_NAME_BYTES = 255  # NAME_MAX of common Linux filesystems
_MAX_HEADER_BYTES = 4096
_STALE_TEMP_SECONDS = 24 * 3600
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class InvalidKey(ValueError):
    """The key could name a path outside the store, or one the filesystem cannot hold."""


def _key_parts(key: str, *, prefix: bool = False) -> list[str]:
    """The path components of a key; every check that keeps a key inside the root is here."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("an object key must be a non-empty string")
    if "\x00" in key:
        raise InvalidKey("an object key must not contain NUL")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"an object key must be at most {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidKey("an object key must be relative")
    parts = key.split("/")
    # A prefix may end with "/" (everything below a "directory"), so its last part may be empty.
    checked = parts[:-1] if prefix and parts[-1] == "" else parts
    for part in checked:
        if part in ("", ".", ".."):
            raise InvalidKey("an object key must not have empty, '.' or '..' segments")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidKey(f"each segment of an object key must be at most {MAX_NAME_BYTES} bytes")
    return parts


class FilesystemStore:
    def __init__(self, root: Path, public_url: str, signing_key: str) -> None:
        self.root = Path(root).resolve()
        self.public_url = public_url.rstrip("/")
        self.links = LinkSigner(signing_key)
        self._data = self.root / "data"
        self._tmp = self.root / "tmp"

    def _path(self, key: str) -> Path:
        path = self._data.joinpath(*_key_parts(key))
        # Belt and braces: the segment checks above already make escaping impossible.
        if not Path(os.path.normpath(path)).is_relative_to(self._data):
            raise InvalidKey("an object key must stay inside the store")
        return path

    def ensure_bucket(self) -> None:
        self._data.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Writes interrupted by a crash leave their temp file behind; none still running is this old.
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for entry in os.scandir(self._tmp):
            with suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)

    def put(self, key: str, data: BinaryIO, length: int, content_type: str) -> None:
        target = self._path(key)
        if length < -1:
            raise ValueError("length must be -1 (unknown) or at least 0")
        header = json.dumps({"v": 1, "content_type": content_type}).encode() + b"\n"
        if len(header) > _MAX_HEADER_BYTES:
            raise ValueError("the content type is too long")
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(header)
                _copy(data, out, length)
                out.flush()
                # The bytes must be on disk before the rename publishes them, or a crash could
                # leave a complete-looking but empty or partial object.
                os.fsync(out.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp_name, target)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.put(key, BytesIO(data), len(data), content_type)

    def open(self, key: str) -> ObjectReader:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except _MISSING:
            raise ObjectNotFound(key) from None
        try:
            header = handle.readline(_MAX_HEADER_BYTES)
            if not header.endswith(b"\n"):
                raise OSError(f"stored object {key!r} has no metadata line")
            content_type = json.loads(header).get("content_type")
            size = os.fstat(handle.fileno()).st_size - len(header)
        except BaseException:
            handle.close()
            raise
        return ObjectReader(
            iter(partial(handle.read, CHUNK_SIZE), b""), size=size, content_type=content_type, close=handle.close
        )

    def size(self, key: str) -> int:
        with self.open(key) as reader:
            return reader.size

    def presigned_url(
        self, key: str, expires: timedelta, *, filename: str | None = None, content_type: str | None = None
    ) -> str:
        _key_parts(key)
        check_link_lifetime(expires)
        check_link_headers(filename, content_type)
        return self.links.url(self.public_url, key, expires.total_seconds(), filename, content_type)

    def delete(self, key: str) -> None:
        with suppress(*_MISSING):
            os.unlink(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        check_prefix(prefix)
        *parents, stem = _key_parts(prefix, prefix=True)
        try:
            entries = list(os.scandir(self._data.joinpath(*parents)))
        except _MISSING:
            return
        # Like S3, a prefix matches on characters, not whole segments: "t/a" covers "t/a1/x" too.
        for entry in entries:
            if not entry.name.startswith(stem):
                continue
            # A concurrent delete of the same objects is not an error.
            with suppress(FileNotFoundError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)


def _copy(source: BinaryIO, out: BinaryIO, length: int) -> None:
    if length == -1:
        shutil.copyfileobj(source, out, CHUNK_SIZE)
        return
    remaining = length
    while remaining:
        chunk = source.read(min(CHUNK_SIZE, remaining))
        if not chunk:
            raise ValueError(f"the stream ended {remaining} bytes short of the announced length {length}")
        out.write(chunk)
        remaining -= len(chunk)
