"""The change log and the changes feed, against PostgreSQL, Dovecot, an SMTP server and a worker process.

Every writer (sync, PATCH, write-back, compose and delivery) must log its change in its own
transaction, once; the feed must hand the ids back in order, collapsed, page by page.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from datetime import timedelta

import pytest
from helpers import assert_error_shape
from mailservers import quote_mailbox
from messages import plain_message, to_bytes
from sqlalchemy import select, text
from syncing import create_account, folders_by_name, imap_account, messages, run_sync, smtp_account, wait_task
from test_sync_store import INBOX, incoming

from email_service.changes import feed as feed_service
from email_service.mailbox.changes import update_message
from email_service.mailbox.store import IncomingMessage, MailStore
from email_service.models import Account, Change, Message
from email_service.queue.scheduler import LEADER_KEY, Scheduler
from email_service.retention.changes import prune_changes
from email_service.services.accounts import create_account as create_account_row
from email_service.tenancy import Principal


@pytest.fixture
def client(sync_client):
    return sync_client


def feed(client, user, account_id, since=None, limit=None) -> dict:
    params = {k: v for k, v in (("since", since), ("limit", limit)) if v is not None}
    response = client.get(f"/api/{account_id}/changes", params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accountId"] == account_id
    return body


def synced(client, user, account_id) -> dict:
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "success", status
    return status["result"]


def nothing(body: dict) -> bool:
    lists = [body["created"], body["updated"], body["destroyed"], *body["folders"].values()]
    return body["oldCursor"] == body["newCursor"] and not any(lists) and body["hasMore"] is False


def log_entries(runtime, principal, account_id, after: str) -> list[Change]:
    """The raw log after a cursor, as the account's owner sees it under row-level security."""
    with runtime.db.tenant_session(principal) as session:
        return list(
            session.scalars(
                select(Change).where(Change.account_id == account_id, Change.seq > int(after)).order_by(Change.seq)
            )
        )


def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def server_change(dovecot, mail_user, subject: str, flags: str, *, expunge: bool = False) -> None:
    """Another IMAP client adds ``flags`` to the inbox message with ``subject`` (and expunges)."""
    with dovecot.imap(mail_user) as other:
        other.select("INBOX")
        _, found = other.uid("SEARCH", "HEADER", "Subject", f'"{subject}"')
        [uid] = found[0].decode().split()
        assert other.uid("STORE", uid, "+FLAGS", flags)[0] == "OK"
        if expunge:
            other.expunge()


def by_subject(client, user, account_id, folder_id) -> dict[str, str]:
    return {m["subject"]: m["id"] for m in messages(client, user, account_id, folder_id)["messages"]}


def test_every_writer_appears_in_the_feed_in_order_exactly_once(
    client, user, runtime, dovecot, mail_user, smtp_server, worker
):
    smtp = smtp_server("starttls")
    for subject in ("one", "two", "three"):
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message(subject)))
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    start = feed(client, user, account_id)
    assert nothing(start) and start["newCursor"] == "0"

    # A first sync: every folder and every message created, and nothing else.
    synced(client, user, account_id)
    folders = folders_by_name(client, user, account_id)
    inbox = folders["INBOX"]["id"]
    ids = by_subject(client, user, account_id, inbox)
    first = feed(client, user, account_id, since=start["newCursor"])
    assert sorted(first["created"]) == sorted(ids.values()) and len(first["created"]) == 3
    assert sorted(first["folders"]["created"]) == sorted(f["id"] for f in folders.values())
    assert first["updated"] == first["destroyed"] == [] and first["hasMore"] is False
    entries = log_entries(runtime, user.principal, account_id, start["newCursor"])
    assert len(entries) == 3 + len(folders) and entries[-1].seq == int(first["newCursor"])
    assert {e.folder_id for e in entries if e.entity == "message"} == {inbox}

    # A re-sync with nothing new on the server writes nothing.
    synced(client, user, account_id)
    cursor = first["newCursor"]
    assert nothing(feed(client, user, account_id, since=cursor))

    # Another client marks "one" read on the server: one update, saying which field.
    server_change(dovecot, mail_user, "one", "(\\Seen)")
    synced(client, user, account_id)
    step = feed(client, user, account_id, since=cursor)
    assert (step["created"], step["updated"], step["destroyed"]) == ([], [ids["one"]], [])
    [entry] = log_entries(runtime, user.principal, account_id, cursor)
    assert entry.detail == {"fields": ["isRead"]} and entry.folder_id == inbox
    cursor = step["newCursor"]

    # Another client expunges "two".
    server_change(dovecot, mail_user, "two", "(\\Deleted)", expunge=True)
    synced(client, user, account_id)
    step = feed(client, user, account_id, since=cursor)
    assert (step["created"], step["updated"], step["destroyed"]) == ([], [], [ids["two"]])
    cursor = step["newCursor"]

    # A PATCH: one entry; the same PATCH again changes nothing and logs nothing.
    url = f"/api/{account_id}/messages/{ids['three']}"
    assert client.patch(url, json={"isStarred": True, "labels": ["work"]}, headers=user.headers).status_code == 200
    step = feed(client, user, account_id, since=cursor)
    assert (step["created"], step["updated"], step["destroyed"]) == ([], [ids["three"]], [])
    [entry] = log_entries(runtime, user.principal, account_id, cursor)
    assert entry.detail == {"fields": ["isStarred", "labels"]}
    cursor = step["newCursor"]
    assert client.patch(url, json={"isStarred": True, "labels": ["work"]}, headers=user.headers).status_code == 200
    # The write-back of the first PATCH only confirms the row: it adds nothing either.
    assert eventually(lambda: not _pending(runtime, user.principal, ids["three"]))
    assert nothing(feed(client, user, account_id, since=cursor))

    # Spam: the PATCH (isSpam), then the write-back's move to Junk, "from" the inbox.
    assert client.patch(url, json={"isSpam": True}, headers=user.headers).status_code == 200
    junk = folders["Junk"]["id"]
    assert eventually(lambda: client.get(url, headers=user.headers).json()["folderId"] == junk)
    step = feed(client, user, account_id, since=cursor)
    assert (step["created"], step["updated"], step["destroyed"]) == ([], [ids["three"]], [])
    patched, moved = log_entries(runtime, user.principal, account_id, cursor)
    assert patched.detail == {"fields": ["isSpam"]} and patched.folder_id == inbox
    assert moved.detail == {"fields": ["folderId"], "from": inbox} and moved.folder_id == junk
    cursor = step["newCursor"]
    synced(client, user, account_id)  # the server agrees: the move is not logged again
    assert nothing(feed(client, user, account_id, since=cursor))

    # A sent message: created in Sent; its delivery status changes collapse into "created".
    sent = client.post(
        "/api/compose/send",
        json={"accountId": account_id, "to": ["bob@example.org"], "subject": "Hello", "body": "Hi Bob"},
        headers=user.headers,
    ).json()
    assert wait_task(client, user, sent["taskId"])["status"] == "success"
    step = feed(client, user, account_id, since=cursor)
    assert (step["created"], step["updated"], step["destroyed"]) == ([sent["messageId"]], [], [])
    kinds = [(e.kind, e.detail) for e in log_entries(runtime, user.principal, account_id, cursor)]
    assert kinds[0] == ("created", {})
    assert kinds[1:] == [("updated", {"fields": ["deliveryStatus"]})] * (len(kinds) - 1) and len(kinds) >= 2
    assert {e.folder_id for e in log_entries(runtime, user.principal, account_id, cursor)} == {folders["Sent"]["id"]}

    # The whole history at once: "two" was created and destroyed inside it, so it is in no list.
    whole = feed(client, user, account_id, since=start["newCursor"])
    assert whole["created"] == [ids["one"], ids["three"], sent["messageId"]]  # in the order of the log
    assert whole["updated"] == whole["destroyed"] == [] and ids["two"] not in str(whole)


def _pending(runtime, principal, message_id: str) -> bool:
    with runtime.db.tenant_session(principal) as session:
        return bool(session.scalar(select(Message.writeback_pending).where(Message.id == message_id)))


def test_updated_then_destroyed_is_destroyed_and_pages_follow_the_limit(
    client, user, runtime, dovecot, mail_user, worker
):
    subjects = [f"page {n}" for n in range(5)]
    for subject in subjects:
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message(subject)))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    start = feed(client, user, account_id)["newCursor"]
    synced(client, user, account_id)
    inbox = folders_by_name(client, user, account_id)["INBOX"]["id"]
    ids = by_subject(client, user, account_id, inbox)
    entries = log_entries(runtime, user.principal, account_id, start)

    # Pages of two log entries: every entry once, in log order, hasMore until the last page.
    pages, cursor = [], start
    while True:
        page = feed(client, user, account_id, since=cursor, limit=2)
        assert page["oldCursor"] == cursor
        pages.append(page)
        cursor = page["newCursor"]
        if not page["hasMore"]:
            break
    assert [int(p["newCursor"]) for p in pages] == [e.seq for e in entries][1::2] + (
        [entries[-1].seq] if len(entries) % 2 else []
    )
    listed = [i for p in pages for i in p["folders"]["created"] + p["created"]]
    assert listed == [e.entity_id for e in entries] and len(set(listed)) == len(listed)
    assert sorted(i for p in pages for i in p["created"]) == sorted(ids.values())

    # Updated (PATCH) then destroyed (expunged on the server): only destroyed.
    assert (
        client.patch(
            f"/api/{account_id}/messages/{ids['page 0']}", json={"isStarred": True}, headers=user.headers
        ).status_code
        == 200
    )
    assert eventually(lambda: not _pending(runtime, user.principal, ids["page 0"]))
    # Created then updated inside one window: created only.
    window = feed(client, user, account_id, since=start)
    assert window["updated"] == [] and ids["page 0"] in window["created"]
    server_change(dovecot, mail_user, "page 0", "(\\Deleted)", expunge=True)
    synced(client, user, account_id)
    step = feed(client, user, account_id, since=cursor)
    assert (step["created"], step["updated"], step["destroyed"]) == ([], [], [ids["page 0"]])
    assert [e.kind for e in log_entries(runtime, user.principal, account_id, cursor)] == ["updated", "destroyed"]
    whole = feed(client, user, account_id, since=start)
    assert ids["page 0"] not in whole["created"] + whole["updated"] + whole["destroyed"]
    assert sorted(whole["created"]) == sorted(i for s, i in ids.items() if s != "page 0")


def test_a_folder_rebuilt_or_gone_on_the_server_destroys_its_messages(client, user, dovecot, mail_user, worker):
    dovecot.create_folder(mail_user, "Projects")
    dovecot.append(mail_user, "Projects", to_bytes(plain_message("draft plan")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    synced(client, user, account_id)
    projects = folders_by_name(client, user, account_id)["Projects"]["id"]
    [old] = by_subject(client, user, account_id, projects).values()
    cursor = feed(client, user, account_id)["newCursor"]

    # A new UIDVALIDITY: every old row goes, the server's messages come back as new ones.
    dovecot.recreate_folder(mail_user, "Projects")
    dovecot.append(mail_user, "Projects", to_bytes(plain_message("plan")))
    synced(client, user, account_id)
    [plan] = by_subject(client, user, account_id, projects).values()
    step = feed(client, user, account_id, since=cursor)
    assert (step["created"], step["updated"], step["destroyed"]) == ([plan], [], [old])
    assert step["folders"] == {"created": [], "updated": [], "destroyed": []}
    cursor = step["newCursor"]

    # The folder deleted on the server: it and its messages are destroyed.
    with dovecot.imap(mail_user) as other:
        other.delete(quote_mailbox("Projects"))
    synced(client, user, account_id)
    step = feed(client, user, account_id, since=cursor)
    assert step["destroyed"] == [plan] and step["folders"]["destroyed"] == [projects]
    assert step["created"] == step["updated"] == [] and step["folders"]["created"] == []


class _NoObjects:
    """An object store that refuses every write: the batch's transaction must roll back whole."""

    def __init__(self, inner, *, batch_only: bool) -> None:
        self.inner, self.batch_only = inner, batch_only

    def put_many(self, objects) -> None:
        raise OSError("disk full")

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        if not self.batch_only:
            raise OSError("disk full")
        self.inner.put_bytes(key, data, content_type)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def _store(runtime, objects) -> tuple[MailStore, object]:
    principal = Principal(uuid.uuid4(), uuid.uuid4())
    account = create_account_row(
        runtime.db,
        runtime.cipher,
        principal,
        {
            "accountName": "log test",
            "emailAddress": f"{uuid.uuid4().hex[:12]}@example.com",
            "protocol": "imap",
            "hostname": "imap.example.com",
            "port": 993,
            "encryption": "tls",
            "username": "someone",
            "password": "secret",
            "isSyncEnabled": False,
        },
    )
    store = MailStore(runtime.db, objects, principal, account.id)
    folders, _ = store.reconcile_folders([INBOX])
    return store, folders["INBOX"]


def _state(store: MailStore) -> tuple[int, int, int]:
    """(messages, log entries, the account's sequence) as the account's owner sees them."""
    with store.db.tenant_session(store.principal) as session:
        rows = session.scalar(
            select(text("count(*)")).select_from(Message).where(Message.account_id == store.account_id)
        )
        logged = session.scalar(
            select(text("count(*)")).select_from(Change).where(Change.account_id == store.account_id)
        )
        seq = session.scalar(select(Account.change_seq).where(Account.id == store.account_id))
    return rows, logged, seq


def test_the_log_entry_commits_with_the_change_or_not_at_all(runtime):
    raws = [to_bytes(plain_message(f"m{n}")) for n in range(3)]
    # The batch transaction inserts rows and log entries, then fails on the objects: neither stays.
    store, folder = _store(runtime, _NoObjects(runtime.objects, batch_only=False))
    before = _state(store)
    assert before == (0, 1, 1)  # the inbox's "created"
    added, errors = store.add_messages(folder, incoming(raws))
    assert added == [] and len(errors) == 3
    assert _state(store) == before
    page = feed_service.changes_since(runtime.db, store.principal, store.account_id, "1")
    assert page.new_cursor == "1" and page.messages.created == []

    # The batch fails, then one message at a time succeeds: three entries, not six.
    store, folder = _store(runtime, _NoObjects(runtime.objects, batch_only=True))
    added, errors = store.add_messages(folder, incoming(raws))
    assert added == [1, 2, 3] and errors == []
    assert _state(store) == (3, 4, 4)
    page = feed_service.changes_since(runtime.db, store.principal, store.account_id, "1")
    assert len(page.messages.created) == 3 and page.new_cursor == "4"
    # The same messages offered again (a re-sync racing another): the conflict refuses them, no entries.
    store.objects = runtime.objects
    assert store.add_messages(folder, incoming(raws)) == ([], [])
    assert _state(store) == (3, 4, 4)


def test_a_reader_following_concurrent_writers_misses_nothing_and_sees_nothing_twice(runtime):
    # Messages without IMAP UIDs (as POP3 stores them): a PATCH changes only the row, no write-back job.
    store, folder = _store(runtime, runtime.objects)
    raws = [to_bytes(plain_message(f"c{n}")) for n in range(24)]
    store.add_messages(folder, [IncomingMessage(raw=raw, uidl=f"uidl-{n}") for n, raw in enumerate(raws)])
    with runtime.db.tenant_session(store.principal) as session:
        ids = list(session.scalars(select(Message.id).where(Message.account_id == store.account_id)))
    assert len(ids) == 24
    start = feed_service.changes_since(runtime.db, store.principal, store.account_id, None).new_cursor
    rounds = 6

    def writer(mine: list[str]) -> None:
        for n in range(rounds):
            for message_id in mine:
                update_message(runtime, store.principal, store.account_id, message_id, {"isRead": n % 2 == 0})

    pages: list[feed_service.ChangesPage] = []
    done = threading.Event()

    def reader() -> None:
        cursor = start
        while True:
            finished = done.is_set()
            page = feed_service.changes_since(runtime.db, store.principal, store.account_id, cursor, 5)
            pages.append(page)
            cursor = page.new_cursor
            if finished and not page.has_more:
                return

    threads = [threading.Thread(target=writer, args=(ids[n::4],)) for n in range(4)]
    follower = threading.Thread(target=reader)
    follower.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    follower.join(timeout=60)
    assert not follower.is_alive()
    # Every PATCH changed isRead, so each logged exactly one entry, numbered without gaps.
    entries = log_entries(runtime, store.principal, store.account_id, start)
    assert len(entries) == 24 * rounds
    assert [e.seq for e in entries] == list(range(int(start) + 1, int(start) + 1 + 24 * rounds))
    assert all(e.kind == "updated" and e.detail == {"fields": ["isRead"]} for e in entries)
    # The reader's pages, taken while the writers committed, follow each other without gap or
    # overlap, and each lists exactly the messages of the entries in its range, once.
    assert [p.old_cursor for p in pages] == [start] + [p.new_cursor for p in pages[:-1]]
    assert pages[-1].new_cursor == str(entries[-1].seq)
    for page in pages:
        assert page.messages.created == page.messages.destroyed == []
        in_range = {e.entity_id for e in entries if int(page.old_cursor) < e.seq <= int(page.new_cursor)}
        assert sorted(page.messages.updated) == sorted(in_range)


def test_a_cursor_older_than_the_log_keeps_is_gone(client, user, runtime, dovecot, mail_user, worker):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("old news")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    start = feed(client, user, account_id)["newCursor"]
    synced(client, user, account_id)
    current = feed(client, user, account_id)["newCursor"]
    assert feed(client, user, account_id, since=start)["created"]

    # Entries younger than the retention stay.
    assert prune_changes(runtime, timedelta(days=30)) == 0
    assert feed(client, user, account_id, since=start)["created"]
    # Age this account's entries past the retention; the scheduler's leader prunes them.
    with runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE changes SET created_at = now() - interval '31 days' WHERE account_id = :a"), {"a": account_id}
        )
    # A pass bounded to two entries per account raises the floor by two: older cursors are gone,
    # the floor itself is still served.
    assert prune_changes(runtime, timedelta(days=30), per_account=2) >= 2
    assert_error_shape(
        client.get(f"/api/{account_id}/changes", params={"since": "1"}, headers=user.headers), 410, "CURSOR_EXPIRED"
    )
    assert feed(client, user, account_id, since="2")["newCursor"] == current
    # Another test's scheduler may still hold the leader's lease; only a leader prunes.
    runtime.redis.delete(LEADER_KEY)
    counts = Scheduler(runtime, f"test-{uuid.uuid4().hex[:6]}").run_once()
    assert counts["changes pruned"] >= int(current) - 2
    with runtime.db.tenant_session(user.principal) as session:
        assert session.scalar(select(Account.change_floor).where(Account.id == account_id)) == int(current)

    expired = client.get(f"/api/{account_id}/changes", params={"since": start}, headers=user.headers)
    body = assert_error_shape(expired, 410, "CURSOR_EXPIRED")
    assert re.search(r"reload|resync", body["message"])
    # The current cursor is still served, and new changes follow it.
    assert nothing(feed(client, user, account_id, since=current))
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("fresh")))
    synced(client, user, account_id)
    assert len(feed(client, user, account_id, since=current)["created"]) == 1


def test_bad_cursors_other_users_and_reserved_ids(client, user, make_user, dovecot, mail_user, worker):
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    synced(client, user, account_id)
    current = int(feed(client, user, account_id)["newCursor"])
    assert current > 0
    for bad in ("abc", "-1", "01", "1.5", " 1", "9" * 30):
        response = client.get(f"/api/{account_id}/changes", params={"since": bad}, headers=user.headers)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]
    # Well-formed but never part of this account's history: the client's state is not this account's.
    ahead = client.get(f"/api/{account_id}/changes", params={"since": str(current + 1)}, headers=user.headers)
    assert "reload" in assert_error_shape(ahead, 409, "CURSOR_UNKNOWN")["message"]
    for limit in ("0", "5001", "x"):
        response = client.get(f"/api/{account_id}/changes", params={"limit": limit}, headers=user.headers)
        assert_error_shape(response, 400)
    # Another user's account does not exist for them, with or without a cursor.
    stranger = make_user()
    for params in ({}, {"since": "0"}):
        response = client.get(f"/api/{account_id}/changes", params=params, headers=stranger.headers)
        assert_error_shape(response, 404, "ACCOUNT_NOT_FOUND")
    # A fixed path segment is never an account id.
    for word in ("accounts", "sync", "compose", "webhooks", "events"):
        response = client.get(f"/api/{word}/changes", headers=user.headers)
        assert response.status_code in (400, 404, 405), (word, response.text)
        assert "newCursor" not in response.text
