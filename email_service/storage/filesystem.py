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
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
# put_many keeps this many temp files open at once, well below the usual 1024 descriptors.
_OPEN_AT_ONCE = 128
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

    def put_many(self, objects: Sequence[tuple[str, bytes, str]]) -> None:
        """Store several ``(key, data, content_type)`` objects; all are durable when it returns.

        Each object gets what ``put`` gives it (a temp file, fsynced, then renamed into place),
        but the fsyncs of the batch are issued together, from a few threads, so the filesystem
        commits them in a handful of journal transactions instead of one each, and every target
        directory is fsynced once afterwards so the renames survive a crash as well. Nothing is
        written unless every key and content type is valid. If it raises, no temp file is left;
        objects already renamed into place stay (they are complete) and a retry replaces them.
        """
        if not objects:
            return
        plan = []
        for key, data, content_type in objects:
            header = json.dumps({"v": 1, "content_type": content_type}).encode() + b"\n"
            if len(header) > _MAX_HEADER_BYTES:
                raise ValueError("the content type is too long")
            plan.append((self._path(key), header, data))
        self._tmp.mkdir(parents=True, exist_ok=True)
        directories: dict[Path, None] = {}
        for start in range(0, len(plan), _OPEN_AT_ONCE):
            self._put_group(plan[start : start + _OPEN_AT_ONCE], directories)
        _fsync_directories(directories)

    def _put_group(self, plan: Sequence[tuple[Path, bytes, bytes]], directories: dict[Path, None]) -> None:
        temps: list[tuple[int, str]] = []
        try:
            for _target, header, data in plan:
                fd, temp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
                temps.append((fd, temp_name))
                _write_all(fd, header, data)
            # The bytes must be on disk before the renames publish them (see ``put``).
            _fsync_all([fd for fd, _name in temps])
            for (_fd, temp_name), (target, _header, _data) in zip(temps, plan, strict=True):
                if target.parent not in directories:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    directories[target.parent] = None
                os.replace(temp_name, target)
        finally:
            for fd, temp_name in temps:
                os.close(fd)
                with suppress(FileNotFoundError):
                    os.unlink(temp_name)  # only still there when something failed before its rename

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


def _write_all(fd: int, header: bytes, data: bytes) -> None:
    # writev spares copying the data behind the header; a short write (signal, huge object) resumes.
    view = memoryview(data)
    written = os.writev(fd, [header, view])
    if written < len(header):
        os.write(fd, header[written:])  # practically never: a header is a few dozen bytes
        written = len(header)
    offset = written - len(header)
    while offset < len(view):
        offset += os.write(fd, view[offset:])


# Concurrent fsyncs let ext4/xfs fold many files into one journal commit; more threads stop paying.
_FSYNC_THREADS = 8


def _fsync_all(fds: Sequence[int]) -> None:
    if len(fds) == 1:
        os.fsync(fds[0])
        return
    with ThreadPoolExecutor(max_workers=min(_FSYNC_THREADS, len(fds)), thread_name_prefix="fsync") as pool:
        # list() re-raises the first failure (EIO, ENOSPC) here.
        list(pool.map(os.fsync, fds))


def _fsync_directories(directories: Iterable[Path]) -> None:
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
