"""Changes made through the API reach the IMAP server, seen by an independent client."""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
from helpers import TEST_DESTINATIONS, assert_error_shape
from mailservers import ScriptedImapServer, quote_mailbox
from messages import plain_message, to_bytes
from sqlalchemy import text
from syncing import (
    create_account,
    folders_by_name,
    imap_account,
    imap_session,
    messages,
    run_sync,
    scripted_account,
)

from email_service.mailbox.imap_sync import ImapSync, remote_folders
from email_service.mailbox.live import refresh_folder
from email_service.mailbox.server_moves import write_moves
from email_service.mailbox.store import IncomingMessage, MailStore
from email_service.mailbox.writeback import load_pending, write_back
from email_service.protocols.imap import ImapSession
from email_service.queue import tasks
from email_service.queue.locks import AccountLock
from email_service.runtime import Runtime
from email_service.services.servers import load_servers

SUBJECT = "Write me back"


@pytest.fixture
def client(sync_client):
    return sync_client


def server_flags(dovecot, mail_user, folder: str, subject: str = SUBJECT) -> set[str] | None:
    """The message's flags as another IMAP client sees them; None when it is not in ``folder``."""
    with dovecot.imap(mail_user) as other:
        other.select(quote_mailbox(folder), readonly=True)
        _, found = other.uid("SEARCH", "HEADER", "Subject", f'"{subject}"')
        uids = found[0].split()
        if not uids:
            return None
        _, data = other.uid("FETCH", uids[0].decode(), "(FLAGS)")
    return set(re.search(rb"FLAGS \(([^)]*)\)", data[0]).group(1).decode().split())


def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.fixture
def message(client, user, dovecot, mail_user, worker):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message(SUBJECT)))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    found = messages(client, user, account_id, inbox["id"])["messages"][0]
    return account_id, found["id"]


def patch(client, user, account_id, message_id, body):
    response = client.patch(f"/api/{account_id}/messages/{message_id}", json=body, headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_read_and_starred_reach_the_server_and_sync_keeps_them(client, user, dovecot, mail_user, message):
    account_id, message_id = message
    changed = patch(client, user, account_id, message_id, {"isRead": True, "isStarred": True})
    assert changed["isRead"] is True and changed["isStarred"] is True  # at once, before the server knows
    assert eventually(lambda: {"\\Seen", "\\Flagged"} <= (server_flags(dovecot, mail_user, "INBOX") or set()))
    status, _ = run_sync(client, user, account_id)
    assert status["result"]["messagesUpdated"] == 0
    detail = client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()
    assert detail["isRead"] is True and detail["isStarred"] is True
    assert folders_by_name(client, user, account_id)["INBOX"]["unreadCount"] == 0

    patch(client, user, account_id, message_id, {"isRead": False})
    assert eventually(lambda: "\\Seen" not in (server_flags(dovecot, mail_user, "INBOX") or {"\\Seen"}))
    assert "\\Flagged" in server_flags(dovecot, mail_user, "INBOX")


def test_a_change_here_keeps_what_another_client_changed_there(client, user, dovecot, mail_user, message):
    account_id, message_id = message
    # Another client stars it and tags it after the last sync; the row here knows neither.
    with dovecot.imap(mail_user) as other:
        other.select("INBOX")
        _, found = other.uid("SEARCH", "HEADER", "Subject", f'"{SUBJECT}"')
        other.uid("STORE", found[0].split()[0], "+FLAGS", "(\\Flagged $Forwarded)")
    patch(client, user, account_id, message_id, {"isRead": True})
    assert eventually(lambda: "\\Seen" in (server_flags(dovecot, mail_user, "INBOX") or set()))
    assert {"\\Flagged", "$Forwarded"} <= server_flags(dovecot, mail_user, "INBOX")
    run_sync(client, user, account_id)
    detail = client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()
    assert detail["isRead"] is True and detail["isStarred"] is True


def test_labels_become_keywords(client, user, dovecot, mail_user, message):
    account_id, message_id = message
    changed = patch(client, user, account_id, message_id, {"labels": ["work", "2026-q1"]})
    assert sorted(changed["labels"]) == ["2026-q1", "work"]
    assert eventually(lambda: {"work", "2026-q1"} <= (server_flags(dovecot, mail_user, "INBOX") or set()))
    patch(client, user, account_id, message_id, {"labels": ["work"]})
    assert eventually(lambda: "2026-q1" not in (server_flags(dovecot, mail_user, "INBOX") or {"2026-q1"}))
    assert "work" in server_flags(dovecot, mail_user, "INBOX")


def test_labels_with_imap_special_characters_are_refused(client, user, message):
    account_id, message_id = message
    for label in ("two words", "paren(", "star*", 'quote"'):
        response = client.patch(
            f"/api/{account_id}/messages/{message_id}", json={"labels": [label]}, headers=user.headers
        )
        assert_error_shape(response, 400)


def test_spam_moves_to_the_spam_folder_and_back(client, user, dovecot, mail_user, message):
    account_id, message_id = message
    folders = folders_by_name(client, user, account_id)
    assert patch(client, user, account_id, message_id, {"isSpam": True})["isSpam"] is True
    assert eventually(lambda: server_flags(dovecot, mail_user, "Junk") is not None)
    assert server_flags(dovecot, mail_user, "INBOX") is None
    moved = eventually(
        lambda: (
            client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()["folderId"]
            == folders["Junk"]["id"]
        )
    )
    assert moved
    assert patch(client, user, account_id, message_id, {"isSpam": False})["isSpam"] is False
    assert eventually(lambda: server_flags(dovecot, mail_user, "INBOX") is not None)
    assert server_flags(dovecot, mail_user, "Junk") is None
    status, _ = run_sync(client, user, account_id)
    inbox = messages(client, user, account_id, folders["INBOX"]["id"])["messages"]
    junk = messages(client, user, account_id, folders["Junk"]["id"])["messages"]
    assert [m["subject"] for m in inbox] == [SUBJECT] and junk == []
    assert status["result"]["messagesAdded"] == 0


def test_a_sync_before_the_write_back_does_not_undo_the_change(client, user, dovecot, mail_user, message, runtime):
    account_id, message_id = message
    # Hold the account as a running sync would: the write-back job has to wait and retry.
    blocker = AccountLock(runtime.db, account_id)
    assert blocker.acquire()
    try:
        patch(client, user, account_id, message_id, {"isRead": True})
        time.sleep(1)
        assert "\\Seen" not in server_flags(dovecot, mail_user, "INBOX")
        with imap_session(dovecot, mail_user) as session:
            store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
            result = ImapSync(store, session, lambda _: None, force=True).run()
        assert result.messages_updated == 0
        assert client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()["isRead"] is True
    finally:
        blocker.release()
    # The job's retry comes back after the lock is gone and finishes the change.
    assert eventually(lambda: "\\Seen" in (server_flags(dovecot, mail_user, "INBOX") or set()), timeout=60)


def test_a_change_pending_from_before_fields_were_kept_is_still_written_whole(
    client, user, dovecot, mail_user, message, runtime, monkeypatch
):
    # A row pending with no fields listed (from before migration 0020) stands for every field.
    # The next edit listed only its own, so the earlier change (here: the star) was never written.
    account_id, message_id = message
    with runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE messages SET is_starred = true, writeback_pending = true WHERE id = :id"), {"id": message_id}
        )
    patch(client, user, account_id, message_id, {"isRead": True})
    assert eventually(lambda: {"\\Seen", "\\Flagged"} <= (server_flags(dovecot, mail_user, "INBOX") or set()))


def give_up_write_backs(runtime, account_id) -> int:
    """Fail the account's waiting write-backs as their last retry does when the server stays down."""
    with runtime.db.maintenance_session() as session:
        return session.execute(
            text(
                "UPDATE tasks SET status = 'failure', finished_at = now(), error = 'connection lost'"
                " WHERE account_id = :account AND kind = 'writeback' AND status IN ('pending', 'retry')"
            ),
            {"account": account_id},
        ).rowcount


def test_a_change_whose_write_back_gave_up_reaches_the_server_after_the_next_sync(
    client, user, dovecot, mail_user, message, runtime, monkeypatch
):
    # The row stays marked as waiting, so sync leaves its flags alone; nothing else ever wrote it.
    account_id, message_id = message
    with monkeypatch.context() as quiet:
        quiet.setattr(tasks, "push", lambda *args, **kwargs: None)  # the worker never gets it in time
        patch(client, user, account_id, message_id, {"isRead": True})
    assert give_up_write_backs(runtime, account_id) == 1
    assert "\\Seen" not in server_flags(dovecot, mail_user, "INBOX")
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    assert eventually(lambda: "\\Seen" in (server_flags(dovecot, mail_user, "INBOX") or set()))
    assert client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()["isRead"] is True


def test_a_watched_accounts_look_at_every_folder_also_resumes_a_write_back_that_gave_up(
    client, user, dovecot, mail_user, message, runtime, backing, monkeypatch
):
    # A watched account's automatic sync is the watcher's look at every folder, not a sync job.
    account_id, message_id = message
    with monkeypatch.context() as quiet:
        quiet.setattr(tasks, "push", lambda *args, **kwargs: None)
        patch(client, user, account_id, message_id, {"isStarred": True})
    assert give_up_write_backs(runtime, account_id) == 1
    watcher_runtime = Runtime.build(replace(backing, ca_file=dovecot.ca_file))
    try:
        assert refresh_folder(watcher_runtime, user.principal, account_id, None) is not None
    finally:
        watcher_runtime.close()
    assert eventually(lambda: "\\Flagged" in (server_flags(dovecot, mail_user, "INBOX") or set()))


def test_a_move_whose_write_back_gave_up_reaches_the_server_after_the_next_sync(
    client, user, dovecot, mail_user, message, runtime, monkeypatch
):
    account_id, message_id = message
    trash = folders_by_name(client, user, account_id)["Trash"]
    with monkeypatch.context() as quiet:
        quiet.setattr(tasks, "push", lambda *args, **kwargs: None)
        moved = client.post(
            f"/api/{account_id}/messages/{message_id}/move", json={"folderId": trash["id"]}, headers=user.headers
        )
        assert moved.status_code == 200, moved.text
    assert give_up_write_backs(runtime, account_id) == 1
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    assert eventually(lambda: server_flags(dovecot, mail_user, "Trash") is not None)
    assert server_flags(dovecot, mail_user, "INBOX") is None
    # And the row follows it there: the next sync shows the message once, in Trash.
    run_sync(client, user, account_id)
    folders = folders_by_name(client, user, account_id)
    assert [m["id"] for m in messages(client, user, account_id, folders["Trash"]["id"])["messages"]] == [message_id]
    assert messages(client, user, account_id, folders["INBOX"]["id"])["messages"] == []


def test_pop3_changes_stay_local(client, user, dovecot, mail_user, worker):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message(SUBJECT)))
    account_id = create_account(
        client, user, imap_account(dovecot, mail_user, protocol="pop3", port=dovecot.pop3s_port)
    )
    run_sync(client, user, account_id)
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    message_id = messages(client, user, account_id, inbox["id"])["messages"][0]["id"]
    assert patch(client, user, account_id, message_id, {"isRead": True, "isStarred": True})["isStarred"] is True
    run_sync(client, user, account_id)
    detail = client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()
    assert detail["isRead"] is True and detail["isStarred"] is True


def test_other_users_cannot_change_a_message(client, user, make_user, verifier, message):
    account_id, message_id = message
    for stranger in (user.colleague(verifier), make_user()):
        response = client.patch(
            f"/api/{account_id}/messages/{message_id}", json={"isRead": True}, headers=stranger.headers
        )
        assert_error_shape(response, 404)
    assert client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()["isRead"] is False


def read_only_server() -> ScriptedImapServer:
    """A server on which this login may only read its folders (a shared mailbox)."""

    def answer(tag: bytes, command: bytes) -> bytes:
        if command == b"CAPABILITY":
            return b"* CAPABILITY IMAP4rev1 UIDPLUS MOVE\r\n" + tag + b" OK done\r\n"
        if command == b"SELECT":
            return (
                b"* 1 EXISTS\r\n* OK [UIDVALIDITY 5] ok\r\n* OK [READ-ONLY] shared\r\n"
                + tag
                + b" OK [READ-ONLY] done\r\n"
            )
        if command == b"LOGOUT":
            return b"* BYE\r\n" + tag + b" OK done\r\n"
        return tag + b" OK done\r\n"

    return ScriptedImapServer(answer)


def test_a_folder_the_server_lets_us_only_read_is_not_a_lost_connection(client, runtime, user, monkeypatch):
    # imaplib says READ-ONLY with an exception it derives from "connection lost": write-backs were
    # retried as lost connections until they gave up, and a move out of such a folder stopped
    # every move of the account behind it.
    monkeypatch.setattr(tasks, "push", lambda *args, **kwargs: None)  # this test runs the jobs itself
    server = read_only_server()
    account_id = create_account(client, user, scripted_account(server.port, "Shared mailbox"))
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    folders, _ = store.reconcile_folders(
        remote_folders([b'(\\HasNoChildren) "/" INBOX', b'(\\HasNoChildren \\Archive) "/" Archive'])
    )
    store.save_folder_state(folders["INBOX"], uidvalidity=5, uidnext=2, highestmodseq=None)
    store.add_messages(folders["INBOX"], [IncomingMessage(raw=to_bytes(plain_message("Shared")), uid=1)])
    [listed] = messages(client, user, account_id, folders["INBOX"].id)["messages"]
    patch(client, user, account_id, listed["id"], {"isStarred": True})

    login = ("127.0.0.1", server.port, "none", "someone", "secret-password")
    with ImapSession(*login, destinations=TEST_DESTINATIONS) as session:
        outcome = write_back(
            runtime.db, user.principal, session, load_pending(runtime.db, user.principal, listed["id"])
        )
    server.close()
    assert outcome == "not written: the server lets this account only read the folder"
    assert not [line for line in server.lines if b"STORE" in line.upper()]
    # Nothing waits any more: the next sync shows the flags the server has.
    assert load_pending(runtime.db, user.principal, listed["id"]) is None

    # A move out of it cannot be made either: the message is back where the server keeps it.
    moved = client.post(
        f"/api/{account_id}/messages/{listed['id']}/move",
        json={"folderId": folders["Archive"].id},
        headers=user.headers,
    )
    assert moved.status_code == 200, moved.text
    server = read_only_server()
    with runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE accounts SET port = :port WHERE id = :id"), {"port": server.port, "id": account_id}
        )
    servers = load_servers(runtime.db, runtime.cipher, user.principal, account_id)
    write_moves(runtime, user.principal, account_id, servers)
    server.close()
    assert not [line for line in server.lines if b"MOVE" in line.upper() or b"COPY" in line.upper()]
    shown = client.get(f"/api/{account_id}/messages/{listed['id']}", headers=user.headers).json()
    assert shown["folderId"] == folders["INBOX"].id
