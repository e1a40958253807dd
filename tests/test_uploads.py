"""Uploading attachments for compose: streamed to storage, limited in size, owned by their uploader."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from urllib.parse import urlsplit

import pytest
from helpers import account_body, assert_error_shape
from sqlalchemy import text

from email_service.api.app import create_app
from email_service.runtime import Runtime


@pytest.fixture
def account_id(client, user):
    response = client.post("/api/accounts", json=account_body(), headers=user.headers)
    return response.json()["id"]


def upload(client, user, account_id, name, data, content_type="application/pdf"):
    return client.post(
        f"/api/{account_id}/attachments", files={"file": (name, data, content_type)}, headers=user.headers
    )


def test_an_upload_becomes_an_attachment_whose_bytes_come_back(client, user, account_id):
    data = os.urandom(3 * 1024 * 1024 + 17)
    response = upload(client, user, account_id, "Prüfbericht 2026.pdf", data)
    assert response.status_code == 201, response.text
    attachment = response.json()
    assert attachment["filename"] == "Prüfbericht 2026.pdf" and attachment["mimeType"] == "application/pdf"
    assert attachment["size"] == len(data) and attachment["isInline"] is False and "messageId" not in attachment
    link = urlsplit(attachment["downloadUrl"])
    fetched = client.get(f"{link.path}?{link.query}")
    assert fetched.status_code == 200
    assert hashlib.sha256(fetched.content).digest() == hashlib.sha256(data).digest()


def test_an_attachment_whose_object_is_gone_answers_404(client, user, account_id, runtime):
    # A clean-up (a deleted account, a rebuilt folder) may remove the bytes just after the row was read.
    attachment = upload(client, user, account_id, "gone.pdf", b"%PDF-1.4 soon gone").json()
    path = f"/api/{account_id}/attachments/{attachment['id']}/download"
    assert client.get(path, headers=user.headers).content == b"%PDF-1.4 soon gone"
    with runtime.db.tenant_session(user.principal) as session:
        found = session.execute(text("SELECT object_key FROM attachments WHERE id = :i"), {"i": attachment["id"]})
        key = found.scalar()
    runtime.objects.delete(key)
    assert_error_shape(client.get(path, headers=user.headers), 404, "ATTACHMENT_NOT_FOUND")


def test_names_lose_paths_and_odd_types_become_octet_stream(client, user, account_id):
    attachment = upload(client, user, account_id, "../../etc/passwd", b"x", "not a type").json()
    assert attachment["filename"] == "passwd" and attachment["mimeType"] == "application/octet-stream"
    # A bidirectional override would show "report\u202efdp.exe" as "reportexe.pdf".
    assert upload(client, user, account_id, "report\u202efdp.exe", b"x").json()["filename"] == "reportfdp.exe"


def test_uploads_above_the_limit_are_413_and_store_nothing(backing, user, account_id, runtime):
    small = Runtime.build(replace(backing, max_upload_bytes=1024, rate_limits_enabled=False))
    try:
        with create_app(small).test_client() as client:
            response = upload(client, user, account_id, "big.bin", b"\0" * 4096)
            assert_error_shape(response, 413, "PAYLOAD_TOO_LARGE")
            assert upload(client, user, account_id, "small.bin", b"\0" * 100).status_code == 201
    finally:
        small.close()
    with runtime.db.tenant_session(user.principal) as session:
        names = session.execute(text("SELECT filename FROM attachments WHERE account_id = :a"), {"a": account_id})
        assert [n for (n,) in names] == ["small.bin"]


def test_an_upload_needs_a_file_and_an_owned_account(client, user, account_id, make_user, verifier):
    wrong_field = client.post(
        f"/api/{account_id}/attachments", files={"other": ("x.txt", b"x", "text/plain")}, headers=user.headers
    )
    assert_error_shape(wrong_field, 400)
    # A text field named file (curl -F 'file=hello'): a part without a filename.
    text_field = client.post(
        f"/api/{account_id}/attachments", files={"file": (None, b"hello", "text/plain")}, headers=user.headers
    )
    assert_error_shape(text_field, 400)
    not_multipart = client.post(f"/api/{account_id}/attachments", data={"file": "x"}, headers=user.headers)
    assert_error_shape(not_multipart, 415)
    for stranger in (user.colleague(verifier), make_user()):
        assert_error_shape(upload(client, stranger, account_id, "x.pdf", b"%PDF"), 404)
    assert_error_shape(upload(client, user, "no-such-account", "x.pdf", b"%PDF"), 404)


@pytest.mark.parametrize("name", ["..", ".", "a/..", "C:\\Users\\x\\..", " .. ", "..."])
def test_a_name_that_names_a_directory_becomes_attachment(client, user, account_id, name):
    # "." and ".." are no file's name: a client that saves attachments by name would write
    # into the directory above its own.
    response = upload(client, user, account_id, name, b"x")
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "attachment"


def test_an_upload_while_object_storage_is_down_is_503_and_stores_nothing(
    storage_down_client, user, account_id, runtime
):
    # The caller can tell "try again later" from a fault of the service; no row without its bytes.
    response = upload(storage_down_client, user, account_id, "later.pdf", b"%PDF-1.4 later")
    body = assert_error_shape(response, 503, "DEPENDENCY_UNAVAILABLE")
    assert body["message"] == "object storage unreachable; try again later"
    assert "127.0.0.1" not in response.text
    with runtime.db.tenant_session(user.principal) as session:
        count = session.scalar(text("SELECT count(*) FROM attachments WHERE account_id = :a"), {"a": account_id})
    assert count == 0


def test_a_download_while_object_storage_is_down_is_503(client, storage_down_client, user, account_id):
    attachment = upload(client, user, account_id, "kept.pdf", b"%PDF-1.4 kept").json()
    response = storage_down_client.get(
        f"/api/{account_id}/attachments/{attachment['id']}/download", headers=user.headers
    )
    assert_error_shape(response, 503, "DEPENDENCY_UNAVAILABLE")


def test_a_download_nobody_reads_still_closes_its_stored_object(client, user, account_id, runtime, monkeypatch):
    # The object was closed by the response's generator, which a HEAD (or a client gone before
    # the first chunk) never starts: each such request left an object, on S3 a connection, open.
    attachment = upload(client, user, account_id, "head.pdf", b"%PDF-1.4 looked at, not read").json()
    opened = []
    open_object = runtime.objects.open

    def tracked(key):
        opened.append(open_object(key))
        return opened[-1]

    monkeypatch.setattr(runtime.objects, "open", tracked)
    head = client.head(f"/api/{account_id}/attachments/{attachment['id']}/download", headers=user.headers)
    assert head.status_code == 200 and head.content == b""
    assert len(opened) == 1 and opened[0]._closed
