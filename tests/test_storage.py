"""Object storage: both backends pass the same tests, against real servers and real HTTP.

The MinIO backend talks to a real S3-compatible server (ministack, see ``s3server.py``) that checks
presigned signatures and expiry; the filesystem backend's links are fetched from the service's own
``/storage/objects`` route through the Connexion test client.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from helpers import account_body, assert_error_shape
from minio import Minio
from werkzeug.http import parse_options_header

from email_service.api.app import create_app
from email_service.runtime import Runtime
from email_service.services.accounts import create_account
from email_service.storage import ObjectNotFound, ObjectStore, filesystem, object_store
from email_service.storage.disposition import content_disposition
from email_service.storage.filesystem import FilesystemStore
from email_service.storage.minio_store import MinioStore
from email_service.tenancy import Principal

LINK_KEY = "storage-link-test-key-" + "k" * 32
BUCKET = "email-service-test"
LARGE = 20 * 1024 * 1024
FILENAME = 'Rapport d’été 报告 "final".pdf'


@dataclass
class Backend:
    name: str
    store: ObjectStore
    fetch: Callable[[str], httpx.Response]
    tamper: Callable[[str, str], str]


# --- the two backends ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_runtime(backing, tmp_path_factory) -> Iterator[Runtime]:
    """A runtime whose store is a FilesystemStore in a directory of this module's own."""
    settings = replace(
        backing,
        data_dir=tmp_path_factory.mktemp("storage"),
        storage_signing_key=LINK_KEY,
        rate_limits_enabled=False,
    )
    runtime = Runtime.build(settings)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def storage_client(storage_runtime):
    with create_app(storage_runtime).test_client() as client:
        yield client


@pytest.fixture(scope="module")
def validating_client(storage_runtime):
    """The same store behind an app that validates every response against the spec, as the suite does."""
    runtime = replace(storage_runtime, settings=replace(storage_runtime.settings, validate_responses=True))
    with create_app(runtime).test_client() as client:
        yield client


@pytest.fixture(scope="module")
def filesystem_store(storage_runtime) -> FilesystemStore:
    settings = storage_runtime.settings
    store = FilesystemStore(settings.data_dir / "objects", settings.public_url, LINK_KEY)
    store.ensure_bucket()
    return store


@pytest.fixture(scope="module")
def minio_store(s3_server) -> MinioStore:
    client = Minio(
        s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        secure=False,
        region=s3_server.region,
    )
    store = MinioStore(client, BUCKET)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    return store


def _service_path(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(("", "", parts.path, parts.query, ""))


def _with_query(url: str, change: Callable[[dict[str, str]], None]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    change(query)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _flip(hex_digest: str) -> str:
    return hex_digest[:-1] + ("0" if hex_digest[-1] != "0" else "1")


def _tamper_filesystem_link(url: str, part: str) -> str:
    def change(query: dict[str, str]) -> None:
        if part == "signature":
            query["signature"] = _flip(query["signature"])
        elif part == "expires":
            query["expires"] = str(int(query["expires"]) + 3600)
        elif part == "filename":
            query["filename"] = "other.pdf"
        elif part == "key":
            query["key"] = query["key"].replace("/one", "/two")

    return _with_query(url, change)


def _tamper_s3_link(url: str, part: str) -> str:
    if part == "key":
        return url.replace("/one?", "/two?", 1)

    def change(query: dict[str, str]) -> None:
        if part == "signature":
            query["X-Amz-Signature"] = _flip(query["X-Amz-Signature"])
        elif part == "expires":
            query["X-Amz-Expires"] = str(int(query["X-Amz-Expires"]) + 3600)
        elif part == "filename":
            query["response-content-disposition"] = content_disposition("other.pdf")

    return _with_query(url, change)


@pytest.fixture(params=["filesystem", "minio"])
def backend(request) -> Backend:
    if request.param == "filesystem":
        client = request.getfixturevalue("storage_client")
        store = request.getfixturevalue("filesystem_store")
        return Backend("filesystem", store, lambda url: client.get(_service_path(url)), _tamper_filesystem_link)
    store = request.getfixturevalue("minio_store")
    return Backend("minio", store, lambda url: httpx.get(url, timeout=30), _tamper_s3_link)


@pytest.fixture
def prefix(runtime) -> str:
    """Keys shaped like the service's: under a live account of a tenant of the test's own.

    Signed links serve only objects of accounts that still exist, so the account is real.
    """
    principal = Principal(uuid.uuid4(), uuid.uuid4())
    account = create_account(runtime.db, runtime.cipher, principal, account_body(hostname="imap.example.com"))
    return f"{principal.tenant_id}/{account.id}/attachments/"


class GeneratedStream(io.RawIOBase):
    """``size`` deterministic pseudo-random bytes, generated as they are read; hashes what it gave."""

    def __init__(self, size: int, seed: int = 7, fail_after: int | None = None) -> None:
        self.remaining = size
        self.given = 0
        self.fail_after = fail_after
        self.random = random.Random(seed)
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.fail_after is not None and self.given >= self.fail_after:
            raise OSError("the client went away")
        count = min(len(buffer), self.remaining, 256 * 1024)
        chunk = self.random.randbytes(count)
        buffer[:count] = chunk
        self.digest.update(chunk)
        self.remaining -= count
        self.given += count
        return count


def _read_all(store: ObjectStore, key: str) -> bytes:
    with store.open(key) as reader:
        return b"".join(reader)


# --- the same tests for both backends -----------------------------------------------------------


def test_small_object_round_trips(backend, prefix):
    key = prefix + "one"
    backend.store.put_bytes(key, b"hello, world", "text/plain")
    with backend.store.open(key) as reader:
        assert reader.size == 12
        assert reader.content_type == "text/plain"
        assert b"".join(reader) == b"hello, world"
    assert backend.store.size(key) == 12


def test_empty_object_round_trips(backend, prefix):
    backend.store.put_bytes(prefix + "empty", b"", "application/octet-stream")
    assert backend.store.size(prefix + "empty") == 0
    assert _read_all(backend.store, prefix + "empty") == b""


@pytest.mark.parametrize("known_length", [True, False], ids=["known-length", "unknown-length"])
def test_large_object_streams_in_and_out_unchanged(backend, prefix, known_length):
    key = prefix + "large"
    source = GeneratedStream(LARGE)
    backend.store.put(key, io.BufferedReader(source), LARGE if known_length else -1, "application/octet-stream")
    assert source.remaining == 0
    assert backend.store.size(key) == LARGE

    read_back = hashlib.sha256()
    chunk_sizes = []
    with backend.store.open(key) as reader:
        assert reader.size == LARGE
        for chunk in reader:
            chunk_sizes.append(len(chunk))
            read_back.update(chunk)
    assert sum(chunk_sizes) == LARGE
    assert max(chunk_sizes) <= 1024 * 1024, "objects are read in chunks"
    assert read_back.hexdigest() == source.digest.hexdigest()


def test_a_put_that_fails_midway_leaves_the_previous_object(backend, prefix):
    key = prefix + "one"
    backend.store.put_bytes(key, b"version 1", "text/plain")
    with pytest.raises(OSError, match="went away"):
        backend.store.put(key, GeneratedStream(300_000, fail_after=100_000), 300_000, "text/plain")
    assert _read_all(backend.store, key) == b"version 1"
    with pytest.raises(OSError, match="went away"):
        backend.store.put(prefix + "new", GeneratedStream(300_000, fail_after=100_000), 300_000, "text/plain")
    with pytest.raises(ObjectNotFound):
        backend.store.open(prefix + "new")


def test_put_replaces_an_object_and_its_type(backend, prefix):
    backend.store.put_bytes(prefix + "one", b"first", "text/plain")
    backend.store.put_bytes(prefix + "one", b"<p>second</p>", "text/html")
    with backend.store.open(prefix + "one") as reader:
        assert (b"".join(reader), reader.content_type) == (b"<p>second</p>", "text/html")


def test_missing_objects_raise_object_not_found(backend, prefix):
    with pytest.raises(ObjectNotFound):
        backend.store.open(prefix + "missing")
    with pytest.raises(ObjectNotFound):
        backend.store.size(prefix + "missing")
    backend.store.delete(prefix + "missing")  # not an error


def test_delete_removes_one_object(backend, prefix):
    backend.store.put_bytes(prefix + "one", b"1", "text/plain")
    backend.store.put_bytes(prefix + "two", b"2", "text/plain")
    backend.store.delete(prefix + "one")
    with pytest.raises(ObjectNotFound):
        backend.store.open(prefix + "one")
    assert _read_all(backend.store, prefix + "two") == b"2"


def test_delete_prefix_matches_characters_like_s3(backend, prefix):
    tenant = prefix.split("/")[0]
    keys = {
        name: f"{tenant}/{name}"
        for name in ("acc1/attachments/a", "acc1/raw/b", "acc10/attachments/c", "acc2/attachments/d")
    }
    for key in keys.values():
        backend.store.put_bytes(key, key.encode(), "text/plain")

    backend.store.delete_prefix(f"{tenant}/acc1/")
    gone = {name for name, key in keys.items() if not _exists(backend.store, key)}
    assert gone == {"acc1/attachments/a", "acc1/raw/b"}

    backend.store.delete_prefix(f"{tenant}/acc")
    assert not any(_exists(backend.store, key) for key in keys.values())
    backend.store.delete_prefix(f"{tenant}/nothing-here/")  # not an error


def test_delete_prefix_refuses_an_empty_prefix(backend):
    with pytest.raises(ValueError, match="non-empty"):
        backend.store.delete_prefix("")


def _exists(store: ObjectStore, key: str) -> bool:
    try:
        store.size(key)
    except ObjectNotFound:
        return False
    return True


def test_presigned_url_downloads_with_name_and_type(backend, prefix):
    key = prefix + "one"
    body = os.urandom(200_000)
    backend.store.put_bytes(key, body, "application/octet-stream")
    url = backend.store.presigned_url(key, timedelta(minutes=5), filename=FILENAME, content_type="application/pdf")

    response = backend.fetch(url)
    assert response.status_code == 200, response.text
    assert response.content == body
    assert response.headers["content-type"] == "application/pdf"
    assert int(response.headers["content-length"]) == len(body)
    disposition = response.headers["content-disposition"]
    assert disposition == content_disposition(FILENAME)
    assert disposition.isascii()
    assert parse_options_header(disposition) == ("attachment", {"filename": FILENAME})


def test_presigned_url_without_name_answers_the_stored_type(backend, prefix):
    backend.store.put_bytes(prefix + "one", b"plain words", "text/plain")
    response = backend.fetch(backend.store.presigned_url(prefix + "one", timedelta(minutes=5)))
    assert response.status_code == 200
    assert response.content == b"plain words"
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["content-disposition"] == "attachment"


@pytest.mark.parametrize("part", ["signature", "key", "expires", "filename"])
def test_tampered_presigned_url_is_refused(backend, prefix, part):
    # The other key exists too, so a refusal cannot be a mere 404.
    backend.store.put_bytes(prefix + "one", b"secret one", "text/plain")
    backend.store.put_bytes(prefix + "two", b"secret two", "text/plain")
    url = backend.store.presigned_url(prefix + "one", timedelta(minutes=5), filename="one.txt")
    assert backend.fetch(url).status_code == 200

    tampered = backend.tamper(url, part)
    assert tampered != url
    response = backend.fetch(tampered)
    assert response.status_code == 403
    assert b"secret" not in response.content


def test_expired_presigned_url_is_refused(backend, prefix):
    backend.store.put_bytes(prefix + "one", b"short-lived", "text/plain")
    made = time.time()
    url = backend.store.presigned_url(prefix + "one", timedelta(seconds=2))
    assert backend.fetch(url).status_code == 200
    # S3 dates a link to the whole second, so two seconds may end up to one second early.
    time.sleep(max(0.0, made + 3.2 - time.time()))
    response = backend.fetch(url)
    assert response.status_code == 403
    assert b"short-lived" not in response.content


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(days=7, seconds=1)])
def test_presigned_url_lifetime_is_bounded(backend, prefix, lifetime):
    with pytest.raises(ValueError, match="seven days"):
        backend.store.presigned_url(prefix + "one", lifetime)


def test_presigned_url_refuses_a_type_that_cannot_be_a_header(backend, prefix):
    with pytest.raises(ValueError, match="content type"):
        backend.store.presigned_url(prefix + "one", timedelta(minutes=1), content_type="text/html\r\nX-Evil: 1")


# --- the filesystem store's own guarantees ------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "t/../../escape",
        "t/a/..",
        "/etc/passwd",
        "t//double",
        "t/./dot",
        "t/trailing/",
        "nul\x00byte",
        "",
        "x" * 256,
        "a/" * 600,
    ],
)
def test_filesystem_store_refuses_keys_that_could_escape(filesystem_store, key):
    for attempt in (
        lambda: filesystem_store.put_bytes(key, b"x", "text/plain"),
        lambda: filesystem_store.open(key),
        lambda: filesystem_store.size(key),
        lambda: filesystem_store.delete(key),
        lambda: filesystem_store.presigned_url(key, timedelta(minutes=1)),
    ):
        with pytest.raises(ValueError):
            attempt()
    assert not (filesystem_store.root.parent / "escape").exists()
    assert not (filesystem_store.root / "escape").exists()


@pytest.mark.parametrize("prefix_", ["../", "t/../", "..", "/", "t//"])
def test_filesystem_store_refuses_prefixes_that_could_escape(filesystem_store, prefix_):
    with pytest.raises(ValueError):
        filesystem_store.delete_prefix(prefix_)


def test_filesystem_writes_leave_no_temporary_files(filesystem_store, prefix):
    filesystem_store.put_bytes(prefix + "one", b"x", "text/plain")
    with pytest.raises(OSError):
        filesystem_store.put(prefix + "two", GeneratedStream(1000, fail_after=0), 1000, "text/plain")
    with pytest.raises(ValueError, match="short"):
        filesystem_store.put(prefix + "two", io.BytesIO(b"abc"), 10, "text/plain")
    assert list((filesystem_store.root / "tmp").iterdir()) == []


def test_filesystem_store_keeps_keys_that_s3_allows(filesystem_store, prefix):
    for name in ("name with spaces", "ünïcødé", "semi;colon&amp=", "..dots..", "%2e%2e"):
        filesystem_store.put_bytes(prefix + name, name.encode(), "text/plain")
        assert _read_all(filesystem_store, prefix + name) == name.encode()


def test_filesystem_put_many_round_trips_and_leaves_no_temporary_files(filesystem_store, prefix, monkeypatch):
    monkeypatch.setattr(filesystem, "_OPEN_AT_ONCE", 3)  # several groups of temp files
    objects = [(f"{prefix}{n}/object", bytes([n]) * n * 1000, f"application/x-{n}") for n in range(8)]
    objects.append((prefix + "empty", b"", "text/plain"))
    objects.append((prefix + "big", random.Random(3).randbytes(LARGE // 4), "application/octet-stream"))
    filesystem_store.put_many(objects)
    for key, data, content_type in objects:
        with filesystem_store.open(key) as reader:
            assert (b"".join(reader), reader.content_type, reader.size) == (data, content_type, len(data))
    filesystem_store.put_many([(prefix + "empty", b"replaced", "text/html")])
    assert _read_all(filesystem_store, prefix + "empty") == b"replaced"
    filesystem_store.put_many([])
    assert list((filesystem_store.root / "tmp").iterdir()) == []


def test_filesystem_put_many_makes_bytes_durable_before_publishing_them(filesystem_store, prefix, monkeypatch):
    synced: list[str] = []
    published: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    def replace(source: str, target: os.PathLike) -> None:
        # The temp file's bytes were synced before it is renamed into place.
        assert source in synced
        published.append((source, str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    filesystem_store.put_many([(prefix + "a/one", b"1", "text/plain"), (prefix + "b/two", b"2", "text/plain")])
    assert len(published) == 2
    # ... and the directories holding the new names afterwards, so the renames are durable too.
    directories = {os.path.dirname(target) for _source, target in published}
    assert directories <= set(synced[-len(directories) :])


def test_filesystem_put_many_checks_everything_before_writing(filesystem_store, prefix):
    good = (prefix + "fine", b"x", "text/plain")
    for bad in ((prefix + "../escape", b"x", "text/plain"), (prefix + "long-type", b"x", "x/" + "y" * 5000)):
        with pytest.raises(ValueError):
            filesystem_store.put_many([good, bad])
        with pytest.raises(ObjectNotFound):
            filesystem_store.open(good[0])
    assert list((filesystem_store.root / "tmp").iterdir()) == []


def test_filesystem_put_many_that_fails_leaves_no_temporary_files(filesystem_store, prefix, monkeypatch):
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        filesystem_store.put_many([(f"{prefix}{n}", b"data", "text/plain") for n in range(5)])
    assert list((filesystem_store.root / "tmp").iterdir()) == []
    for n in range(5):  # nothing of the failed group was published
        with pytest.raises(ObjectNotFound):
            filesystem_store.open(f"{prefix}{n}")


# --- the service's /storage/objects route -------------------------------------------------------


def test_route_answers_the_spec_for_a_valid_link(validating_client, filesystem_store, prefix):
    filesystem_store.put_bytes(prefix + "one", b"%PDF-1.7 ...", "application/octet-stream")
    url = filesystem_store.presigned_url(prefix + "one", timedelta(minutes=5), filename="report.pdf")
    assert url.startswith("http://127.0.0.1:5000/storage/objects?key=")
    response = validating_client.get(_service_path(url))
    assert response.status_code == 200, response.text
    assert response.content == b"%PDF-1.7 ..."
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == "12"
    assert response.headers["content-disposition"] == 'attachment; filename="report.pdf"'
    assert response.headers["x-content-type-options"] == "nosniff"


def test_route_closes_the_object_once_the_response_is_sent(storage_client, filesystem_store, prefix):
    data = os.urandom(3 * 1024 * 1024)
    filesystem_store.put_bytes(prefix + "one", data, "application/octet-stream")
    url = filesystem_store.presigned_url(prefix + "one", timedelta(minutes=5))
    # Larger than what the API holds back to send whole: the chunks arrive complete and in order.
    assert storage_client.get(_service_path(url)).content == data
    assert not [fd for fd in _open_files() if fd.endswith(prefix + "one")]


def _open_files() -> list[str]:
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


def test_route_refuses_tampered_and_expired_links_with_error_responses(validating_client, filesystem_store, prefix):
    key = prefix + "one"
    filesystem_store.put_bytes(key, b"x", "application/octet-stream")
    url = filesystem_store.presigned_url(key, timedelta(minutes=5))
    invalid = validating_client.get(_service_path(_tamper_filesystem_link(url, "signature")))
    assert_error_shape(invalid, 403, "LINK_INVALID")

    # A genuine link whose time is up: signed here with an expiry in the past, so no waiting.
    past = int(time.time()) - 1
    signature = filesystem_store.links.signature(key, past, None, None)
    expired = validating_client.get("/storage/objects", params={"key": key, "expires": past, "signature": signature})
    assert_error_shape(expired, 403, "LINK_EXPIRED")

    # A forged signature on an expired link says invalid, not expired: nothing is confirmed.
    forged = validating_client.get(
        "/storage/objects", params={"key": key, "expires": past, "signature": _flip(signature)}
    )
    assert_error_shape(forged, 403, "LINK_INVALID")


def test_route_answers_404_for_a_valid_link_to_a_deleted_object(validating_client, filesystem_store, prefix):
    filesystem_store.put_bytes(prefix + "one", b"x", "application/octet-stream")
    url = filesystem_store.presigned_url(prefix + "one", timedelta(minutes=5))
    filesystem_store.delete(prefix + "one")
    assert_error_shape(validating_client.get(_service_path(url)), 404, "NOT_FOUND")


def test_route_validates_its_parameters(validating_client):
    response = validating_client.get("/storage/objects", params={"key": "k", "expires": 1, "signature": "nothex"})
    assert_error_shape(response, 400, "VALIDATION_ERROR")
    assert_error_shape(validating_client.get("/storage/objects"), 400, "VALIDATION_ERROR")


def test_route_needs_no_token(validating_client, filesystem_store, prefix):
    filesystem_store.put_bytes(prefix + "one", b"x", "application/octet-stream")
    url = filesystem_store.presigned_url(prefix + "one", timedelta(minutes=5))
    assert validating_client.get(_service_path(url), headers={"Authorization": "Bearer nonsense"}).status_code == 200


# --- wiring: settings pick the backend ----------------------------------------------------------


def test_runtime_uses_a_filesystem_store_without_minio_endpoint(runtime, backing):
    assert isinstance(runtime.objects, FilesystemStore)
    assert runtime.objects.root == (backing.data_dir / "objects").resolve()
    assert (runtime.objects.root / "data").is_dir()


def test_settings_with_a_minio_endpoint_make_a_minio_store(backing, s3_server, tmp_path):
    settings = replace(
        backing,
        data_dir=tmp_path,
        minio_endpoint=s3_server.endpoint,
        minio_access_key=s3_server.access_key,
        minio_secret_key=s3_server.secret_key,
        minio_bucket="runtime-made-bucket",
        minio_secure=False,
        minio_region=s3_server.region,
    )
    assert isinstance(object_store(settings), MinioStore)
    runtime = Runtime.build(settings)  # creates the bucket
    try:
        assert runtime.objects.client.bucket_exists("runtime-made-bucket")
        runtime.objects.put_bytes("t/a/attachments/x", b"stored in s3", "text/plain")
        assert _read_all(runtime.objects, "t/a/attachments/x") == b"stored in s3"
        assert not (tmp_path / "objects").exists()
        # The service's own route serves no link when objects live in S3.
        with create_app(runtime).test_client() as client:
            response = client.get(
                "/storage/objects", params={"key": "t/a/attachments/x", "expires": 1, "signature": "0" * 64}
            )
            assert_error_shape(response, 403, "LINK_INVALID")
    finally:
        runtime.close()


def test_links_are_never_signed_with_an_empty_key(backing, tmp_path):
    with pytest.raises(ValueError, match="signing key"):
        object_store(replace(backing, data_dir=tmp_path, storage_signing_key=""))


# --- Content-Disposition ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        (None, "attachment"),
        ("", "attachment"),
        ("report.pdf", 'attachment; filename="report.pdf"'),
        ("my report (1).pdf", 'attachment; filename="my report (1).pdf"'),
        ('say "hi".txt', "attachment; filename=\"say _hi_.txt\"; filename*=UTF-8''say%20%22hi%22.txt"),
        ("back\\slash.txt", "attachment; filename=\"back_slash.txt\"; filename*=UTF-8''back%5Cslash.txt"),
        ("bell\x07\r\nX-Evil: 1.txt", 'attachment; filename="bellX-Evil: 1.txt"'),
        ("résumé.pdf", "attachment; filename=\"resume.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"),
        ("報告.pdf", "attachment; filename=\"download.pdf\"; filename*=UTF-8''%E5%A0%B1%E5%91%8A.pdf"),
        ("100%.txt", "attachment; filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"),
    ],
)
def test_content_disposition(filename, expected):
    assert content_disposition(filename) == expected


@pytest.mark.parametrize("filename", ["report.pdf", FILENAME, 'q"uote\\s.txt', "日本語のファイル.docx", "a/b.txt"])
def test_content_disposition_round_trips_through_a_parser(filename):
    value = content_disposition(filename, inline=True)
    assert value.isascii() and "\r" not in value and "\n" not in value
    assert parse_options_header(value) == ("inline", {"filename": filename})
