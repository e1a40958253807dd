"""What is removed and when: a deleted account's files and rows, and uploads no message used."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from helpers import account_body, assert_error_shape
from messages import attachments_message, to_bytes
from sqlalchemy import text
from syncing import add_task, create_account, folders_by_name, imap_account, messages, run_sync, tasks_of

from email_service.models import TaskKind, TaskStatus
from email_service.queue import tasks
from email_service.queue.scheduler import LEADER_KEY, Scheduler
from email_service.retention.cleanup import account_prefix
from email_service.retention.uploads import remove_unused_uploads
from email_service.storage import ObjectNotFound


@pytest.fixture
def client(sync_client):
    return sync_client


def count(runtime, table: str, account_id: str) -> int:
    with runtime.db.maintenance_session() as session:
        return session.execute(
            text(f"SELECT count(*) FROM {table} WHERE account_id = :id"), {"id": account_id}
        ).scalar()


def object_exists(runtime, key: str) -> bool:
    try:
        with runtime.objects.open(key):
            return True
    except ObjectNotFound:
        return False


def test_a_deleted_account_loses_its_links_at_once_and_its_files_and_rows_soon(
    client, runtime, user, dovecot, mail_user, worker
):
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message("With files")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    upload = client.post(f"/api/{account_id}/attachments", files={"file": ("u.txt", b"mine")}, headers=user.headers)
    assert upload.status_code == 201
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    [listed] = messages(client, user, account_id, inbox["id"])["messages"]
    detail = client.get(f"/api/{account_id}/messages/{listed['id']}", headers=user.headers).json()
    link = urlsplit(detail["attachments"][0]["downloadUrl"])
    path = f"{link.path}?{link.query}"
    assert client.get(path).status_code == 200
    with runtime.db.maintenance_session() as session:
        keys = list(
            session.execute(
                text(
                    "SELECT object_key FROM attachments WHERE account_id = :id UNION ALL"
                    " SELECT raw_object_key FROM messages WHERE account_id = :id AND raw_object_key IS NOT NULL"
                ),
                {"id": account_id},
            ).scalars()
        )
    assert len(keys) >= 3 and all(k.startswith(account_prefix(user.principal.tenant_id, account_id)) for k in keys)

    assert client.delete(f"/api/accounts/{account_id}", headers=user.headers).status_code == 204
    assert client.get(path).status_code == 404  # the signed link stops working at once

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with runtime.db.maintenance_session() as session:
            left = session.execute(text("SELECT count(*) FROM accounts WHERE id = :id"), {"id": account_id}).scalar()
        if not left:
            break
        time.sleep(0.2)
    assert not left, "the deleted account's rows were not removed"
    for table in ("messages", "attachments", "folders"):
        assert count(runtime, table, account_id) == 0, table
    assert not any(object_exists(runtime, key) for key in keys)


def test_a_deleted_account_whose_clean_up_ran_out_of_tries_is_cleaned_up_later(
    client, runtime, user, dovecot, mail_user, worker
):
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    upload = client.post(f"/api/{account_id}/attachments", files={"file": ("u.txt", b"mine")}, headers=user.headers)
    assert upload.status_code == 201
    with runtime.db.maintenance_session() as session:
        key = session.execute(
            text("SELECT object_key FROM attachments WHERE id = :id"), {"id": upload.json()["id"]}
        ).scalar_one()
        # Deleted hours ago, while object storage was down for longer than its clean-up kept
        # trying: the account is hidden, and its clean-up task failed.
        session.execute(
            text("UPDATE accounts SET deleted_at = now() - interval '4 hours', is_sync_enabled = false WHERE id = :id"),
            {"id": account_id},
        )
    add_task(
        runtime,
        user,
        account_id,
        kind=TaskKind.CLEANUP,
        status=TaskStatus.FAILURE,
        attempts=6,
        error="object storage did not remove the account's files (ConnectionRefusedError)",
        finished_at=datetime.now(UTC) - timedelta(hours=2),
        carrier_id="done",
    )
    runtime.redis.delete(LEADER_KEY)
    try:
        Scheduler(runtime, "retention-test").run_once()
    finally:
        runtime.redis.delete(LEADER_KEY)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with runtime.db.maintenance_session() as session:
            left = session.execute(text("SELECT count(*) FROM accounts WHERE id = :id"), {"id": account_id}).scalar()
        if not left:
            break
        time.sleep(0.2)
    assert not left, "the deleted account's rows were kept after its clean-up failed"
    assert count(runtime, "attachments", account_id) == 0
    assert not object_exists(runtime, key)


def test_uploads_no_message_took_are_removed_after_the_retention_time(client, runtime, user, dovecot, mail_user):
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    old = client.post(f"/api/{account_id}/attachments", files={"file": ("old.txt", b"o")}, headers=user.headers)
    fresh = client.post(f"/api/{account_id}/attachments", files={"file": ("new.txt", b"n")}, headers=user.headers)
    used = client.post(f"/api/{account_id}/attachments", files={"file": ("used.txt", b"u")}, headers=user.headers)
    draft = client.post(
        "/api/compose/draft",
        json={
            "accountId": account_id,
            "to": ["a@example.org"],
            "subject": "s",
            "body": "b",
            "attachmentIds": [used.json()["id"]],
        },
        headers=user.headers,
    )
    assert draft.status_code == 201, draft.text
    ids = {name: r.json()["id"] for name, r in (("old", old), ("fresh", fresh), ("used", used))}
    with runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE attachments SET created_at = now() - interval '2 days' WHERE id IN (:old, :used)"), ids
        )
        keys = dict(
            session.execute(
                text("SELECT id, object_key FROM attachments WHERE account_id = :id"), {"id": account_id}
            ).all()
        )
    assert remove_unused_uploads(runtime, timedelta(hours=24)) >= 1
    with runtime.db.maintenance_session() as session:
        left = set(
            session.execute(text("SELECT id FROM attachments WHERE account_id = :id"), {"id": account_id}).scalars()
        )
    assert left == {ids["fresh"], ids["used"]}
    assert not object_exists(runtime, keys[ids["old"]])
    assert object_exists(runtime, keys[ids["fresh"]]) and object_exists(runtime, keys[ids["used"]])


def test_an_account_whose_clean_up_cannot_be_queued_is_not_deleted(client, runtime, user, monkeypatch):
    first = client.post("/api/accounts", json=account_body(), headers=user.headers).json()["id"]
    second = client.post("/api/accounts", json=account_body(), headers=user.headers).json()["id"]
    assert client.delete(f"/api/accounts/{first}", headers=user.headers).status_code == 204
    [taken] = [t.id for t in tasks_of(runtime, first)]
    # The clean-up task cannot be written (its id is taken): the account must not be left
    # deleted with nothing to remove its mail and files.
    monkeypatch.setattr(tasks, "new_task_id", lambda: taken)
    assert_error_shape(client.delete(f"/api/accounts/{second}", headers=user.headers), 500)
    monkeypatch.undo()
    assert client.get(f"/api/accounts/{second}", headers=user.headers).status_code == 200
    assert client.delete(f"/api/accounts/{second}", headers=user.headers).status_code == 204
    assert [t.kind for t in tasks_of(runtime, second)] == [TaskKind.CLEANUP]
