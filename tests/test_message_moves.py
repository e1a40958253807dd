"""Moving and deleting messages: at once in the API, then on the server (checked with imaplib/poplib)."""

from __future__ import annotations

import time

import pytest
from helpers import assert_error_shape
from mailservers import quote_mailbox
from messages import plain_message, to_bytes
from syncing import create_account, folders_by_name, imap_account, imap_session, messages, run_sync

from email_service.mailbox.imap_sync import ImapSync
from email_service.mailbox.store import MailStore
from email_service.queue.locks import AccountLock


@pytest.fixture
def client(sync_client):
    return sync_client


def server_subjects(dovecot, mail_user, folder: str) -> list[str]:
    """Subjects in a server folder as another IMAP client sees them, \\Deleted ones left out."""
    with dovecot.imap(mail_user) as other:
        other.select(quote_mailbox(folder), readonly=True)
        _, found = other.uid("SEARCH", "UNDELETED")
        uids = found[0].split()
        if not uids:
            return []
        _, data = other.uid("FETCH", b",".join(uids).decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return sorted(item[1].decode().split(":", 1)[1].strip() for item in data if isinstance(item, tuple))


def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def subjects(client, user, account_id, folder) -> list[str]:
    return sorted(m["subject"] for m in messages(client, user, account_id, folder["id"])["messages"])


@pytest.fixture
def mailbox(client, user, dovecot, mail_user, worker):
    """An IMAP account with three messages in its inbox and a folder "Projekte/Ärger", synced."""
    for subject in ("One", "Two", "Three"):
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message(subject)))
    dovecot.create_folder(mail_user, "Projekte/Ärger")
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    folders = folders_by_name(client, user, account_id)
    ids = {m["subject"]: m["id"] for m in messages(client, user, account_id, folders["INBOX"]["id"])["messages"]}
    return account_id, folders, ids


def move(client, user, account_id, message_id, folder_id):
    response = client.post(
        f"/api/{account_id}/messages/{message_id}/move", json={"folderId": folder_id}, headers=user.headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_move_shows_at_once_reaches_the_server_and_the_next_sync_shows_it_once(
    client, user, dovecot, mail_user, mailbox
):
    account_id, folders, ids = mailbox
    target = folders["Projekte/&AMQ-rger"]
    moved = move(client, user, account_id, ids["One"], target["id"])
    assert moved["folderId"] == target["id"] and moved["id"] == ids["One"]
    assert subjects(client, user, account_id, target) == ["One"]  # at once, before the server knows
    assert subjects(client, user, account_id, folders["INBOX"]) == ["Three", "Two"]
    assert folders_by_name(client, user, account_id)["Projekte/&AMQ-rger"]["messageCount"] == 1
    assert eventually(lambda: server_subjects(dovecot, mail_user, "Projekte/Ärger") == ["One"])
    assert server_subjects(dovecot, mail_user, "INBOX") == ["Three", "Two"]
    status, _ = run_sync(client, user, account_id)
    assert status["result"]["messagesAdded"] == 0 and status["result"]["messagesRemoved"] == 0
    listed = messages(client, user, account_id, target["id"])["messages"]
    assert [(m["id"], m["subject"]) for m in listed] == [(ids["One"], "One")]  # the same message, once
    assert subjects(client, user, account_id, folders["INBOX"]) == ["Three", "Two"]


def test_delete_goes_to_trash_then_for_good_and_never_comes_back(client, user, dovecot, mail_user, mailbox):
    account_id, folders, ids = mailbox
    response = client.delete(f"/api/{account_id}/messages/{ids['Two']}", headers=user.headers)
    assert response.status_code == 200, response.text
    assert response.json()["folderId"] == folders["Trash"]["id"] and response.json()["deletedForGood"] == []
    assert subjects(client, user, account_id, folders["Trash"]) == ["Two"]
    assert eventually(lambda: server_subjects(dovecot, mail_user, "Trash") == ["Two"])

    # In Trash already: deleting again deletes for good, here at once and on the server.
    again = client.delete(f"/api/{account_id}/messages/{ids['Two']}", headers=user.headers)
    assert again.status_code == 200 and again.json()["deletedForGood"] == [ids["Two"]]
    assert again.json()["folderId"] is None
    assert_error_shape(client.get(f"/api/{account_id}/messages/{ids['Two']}", headers=user.headers), 404)
    assert subjects(client, user, account_id, folders["Trash"]) == []
    assert eventually(lambda: server_subjects(dovecot, mail_user, "Trash") == [] or None) is not None
    with dovecot.imap(mail_user) as other:
        other.select(quote_mailbox("Trash"), readonly=True)
        assert other.uid("SEARCH", "ALL")[1] == [b""]  # expunged, not just marked \Deleted
    status, _ = run_sync(client, user, account_id)
    assert status["result"]["messagesAdded"] == 0
    assert subjects(client, user, account_id, folders["Trash"]) == []

    # permanent=true skips Trash.
    gone = client.delete(f"/api/{account_id}/messages/{ids['Three']}?permanent=true", headers=user.headers)
    assert gone.json()["deletedForGood"] == [ids["Three"]]
    assert eventually(lambda: server_subjects(dovecot, mail_user, "INBOX") == ["One"])
    assert server_subjects(dovecot, mail_user, "Trash") == []


def test_bulk_move_and_delete(client, user, dovecot, mail_user, mailbox):
    account_id, folders, ids = mailbox
    target = folders["Projekte/&AMQ-rger"]
    response = client.post(
        f"/api/{account_id}/messages/move",
        json={"messageIds": [ids["One"], ids["Two"], "no-such-message"], "folderId": target["id"]},
        headers=user.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["messageIds"] == [ids["One"], ids["Two"]]
    assert response.json()["notFound"] == ["no-such-message"]
    assert eventually(lambda: server_subjects(dovecot, mail_user, "Projekte/Ärger") == ["One", "Two"])
    response = client.post(
        f"/api/{account_id}/messages/delete",
        json={"messageIds": [ids["One"], ids["Two"], ids["Three"]], "permanent": True},
        headers=user.headers,
    )
    assert response.status_code == 200 and len(response.json()["deletedForGood"]) == 3, response.text
    assert eventually(
        lambda: (
            not server_subjects(dovecot, mail_user, "INBOX")
            and not server_subjects(dovecot, mail_user, "Projekte/Ärger")
        )
    )
    run_sync(client, user, account_id)
    assert all(not subjects(client, user, account_id, f) for f in folders_by_name(client, user, account_id).values())
    too_many = client.post(f"/api/{account_id}/messages/delete", json={"messageIds": ["x"] * 501}, headers=user.headers)
    assert_error_shape(too_many, 400)


def test_a_sync_before_the_server_moves_neither_duplicates_nor_loses(
    client, user, dovecot, mail_user, mailbox, runtime
):
    account_id, folders, ids = mailbox
    target = folders["Projekte/&AMQ-rger"]
    blocker = AccountLock(runtime.db, account_id)  # as a running sync would: the job has to wait
    assert blocker.acquire()
    try:
        move(client, user, account_id, ids["One"], target["id"])
        client.delete(f"/api/{account_id}/messages/{ids['Two']}?permanent=true", headers=user.headers)
        time.sleep(1)
        assert server_subjects(dovecot, mail_user, "INBOX") == ["One", "Three", "Two"]
        with imap_session(dovecot, mail_user) as session:
            store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
            result = ImapSync(store, session, lambda _: None, force=True).run()
        assert result.messages_added == 0 and result.messages_removed == 0
        assert subjects(client, user, account_id, folders["INBOX"]) == ["Three"]
        assert subjects(client, user, account_id, target) == ["One"]
    finally:
        blocker.release()
    assert eventually(lambda: server_subjects(dovecot, mail_user, "INBOX") == ["Three"], timeout=60)
    assert server_subjects(dovecot, mail_user, "Projekte/Ärger") == ["One"]
    run_sync(client, user, account_id)
    assert [m["id"] for m in messages(client, user, account_id, target["id"])["messages"]] == [ids["One"]]
    assert subjects(client, user, account_id, folders["INBOX"]) == ["Three"]


def test_move_without_the_move_extension_copies_and_expunges(dovecot, mail_user):
    for subject in ("Alpha", "Beta"):
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message(subject)))
    with imap_session(dovecot, mail_user) as session:
        session.capabilities = session.capabilities - {"MOVE"}  # as a server without RFC 6851
        session.select("INBOX")
        uids = session.search_uids()
        moved = session.move_uids(uids, "Trash")
    assert sorted(moved) == uids and len(set(moved.values())) == 2
    assert server_subjects(dovecot, mail_user, "Trash") == ["Alpha", "Beta"]
    with dovecot.imap(mail_user) as other:
        other.select("INBOX", readonly=True)
        assert other.uid("SEARCH", "ALL")[1] == [b""]
        other.select("Trash", readonly=True)
        assert sorted(int(u) for u in other.uid("SEARCH", "ALL")[1][0].split()) == sorted(moved.values())


def test_moves_refused_cleanly(client, user, make_user, verifier, dovecot, mail_user, mailbox):
    account_id, folders, ids = mailbox
    for stranger in (user.colleague(verifier), make_user()):
        response = client.post(
            f"/api/{account_id}/messages/{ids['One']}/move",
            json={"folderId": folders["Trash"]["id"]},
            headers=stranger.headers,
        )
        assert_error_shape(response, 404)
        assert_error_shape(client.delete(f"/api/{account_id}/messages/{ids['One']}", headers=stranger.headers), 404)
    unknown = client.post(
        f"/api/{account_id}/messages/{ids['One']}/move", json={"folderId": "nope"}, headers=user.headers
    )
    assert_error_shape(unknown, 404)
    # "Projekte" is a \Noselect hierarchy node on this server: it cannot hold mail.
    node = client.post(
        f"/api/{account_id}/messages/{ids['One']}/move",
        json={"folderId": folders["Projekte"]["id"]},
        headers=user.headers,
    )
    assert_error_shape(node, 409)
    assert subjects(client, user, account_id, folders["INBOX"]) == ["One", "Three", "Two"]


def pop3_uidls(dovecot, mail_user) -> int:
    client = dovecot.pop3(mail_user)
    try:
        return len(client.uidl()[1])
    finally:
        client.quit()


@pytest.mark.parametrize("delete_on_server", [False, True])
def test_pop3_delete_on_the_server_only_when_the_account_says_so(
    client, user, dovecot, mail_user, worker, delete_on_server
):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Pop")))
    body = imap_account(dovecot, mail_user, protocol="pop3", port=dovecot.pop3s_port)
    account_id = create_account(client, user, {**body, "pop3DeleteOnServer": delete_on_server})
    run_sync(client, user, account_id)
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    [message] = messages(client, user, account_id, inbox["id"])["messages"]
    response = client.delete(f"/api/{account_id}/messages/{message['id']}", headers=user.headers)
    assert response.status_code == 200 and response.json()["deletedForGood"] == [message["id"]]  # no Trash in POP3
    if delete_on_server:
        assert eventually(lambda: pop3_uidls(dovecot, mail_user) == 0 or None) is not None
    else:
        time.sleep(1)
        assert pop3_uidls(dovecot, mail_user) == 1
    run_sync(client, user, account_id)
    assert messages(client, user, account_id, inbox["id"])["messages"] == []  # not downloaded again


def test_a_message_another_client_deletes_before_the_server_moves_it_is_gone_not_stuck(
    client, user, dovecot, mail_user, mailbox, runtime
):
    account_id, folders, ids = mailbox
    target = folders["Projekte/&AMQ-rger"]
    blocker = AccountLock(runtime.db, account_id)
    assert blocker.acquire()
    try:
        move(client, user, account_id, ids["One"], target["id"])
        with dovecot.imap(mail_user) as other:  # another client deletes it from the inbox meanwhile
            other.select("INBOX")
            _, found = other.uid("SEARCH", "HEADER", "Subject", '"One"')
            other.uid("STORE", found[0].decode(), "+FLAGS.SILENT", r"(\Deleted)")
            other.expunge()
        with imap_session(dovecot, mail_user) as session:
            store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
            result = ImapSync(store, session, lambda _: None, force=True).run()
        assert result.messages_removed == 1 and result.messages_added == 0
        assert_error_shape(client.get(f"/api/{account_id}/messages/{ids['One']}", headers=user.headers), 404)
        assert subjects(client, user, account_id, target) == []
    finally:
        blocker.release()
    run_sync(client, user, account_id)
    assert subjects(client, user, account_id, target) == []
    assert subjects(client, user, account_id, folders["INBOX"]) == ["Three", "Two"]
    assert server_subjects(dovecot, mail_user, "Projekte/Ärger") == []


def server_flags(dovecot, mail_user, folder: str) -> set[str]:
    """The flags of the messages in a server folder (none: empty), as another IMAP client sees them."""
    with dovecot.imap(mail_user) as other:
        other.select(quote_mailbox(folder), readonly=True)
        _, data = other.uid("FETCH", "1:*", "(FLAGS)")
    lines = [item.decode() for item in data if isinstance(item, bytes)]
    return {flag for line in lines for flag in line.split("FLAGS (", 1)[1].split(")", 1)[0].split()}


def test_flags_changed_while_a_move_waits_for_the_server_reach_it_after_the_move(
    client, user, dovecot, mail_user, mailbox, runtime
):
    account_id, folders, ids = mailbox
    target = folders["Projekte/&AMQ-rger"]
    # A running sync holds the account, so the move waits; meanwhile the user reads and stars it.
    held = AccountLock(runtime.db, account_id)
    assert held.acquire()
    try:
        move(client, user, account_id, ids["One"], target["id"])
        patched = client.patch(
            f"/api/{account_id}/messages/{ids['One']}", json={"isRead": True, "isStarred": True}, headers=user.headers
        )
        assert patched.status_code == 200 and patched.json()["isRead"] and patched.json()["isStarred"]
    finally:
        held.release()
    assert eventually(lambda: {"\\Seen", "\\Flagged"} <= server_flags(dovecot, mail_user, "Projekte/Ärger"), 60)
    run_sync(client, user, account_id)
    shown = client.get(f"/api/{account_id}/messages/{ids['One']}", headers=user.headers).json()
    assert shown["folderId"] == target["id"] and shown["isRead"] and shown["isStarred"]


def test_nothing_is_written_to_a_folder_the_server_renumbered(client, user, dovecot, mail_user, mailbox):
    account_id, folders, _ = mailbox
    target = folders["Projekte/&AMQ-rger"]
    for subject in ("Ours 1", "Ours 2"):
        dovecot.append(mail_user, "Projekte/Ärger", to_bytes(plain_message(subject)))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    ours = {m["subject"]: m["id"] for m in messages(client, user, account_id, target["id"])["messages"]}
    # The server rebuilds the folder: a new UIDVALIDITY, and the UIDs of ours name other mail.
    dovecot.recreate_folder(mail_user, "Projekte/Ärger")
    for subject in ("Stranger 1", "Stranger 2"):
        dovecot.append(mail_user, "Projekte/Ärger", to_bytes(plain_message(subject)))

    patched = client.patch(
        f"/api/{account_id}/messages/{ours['Ours 1']}", json={"isRead": True, "isStarred": True}, headers=user.headers
    )
    assert patched.status_code == 200, patched.text
    gone = client.delete(f"/api/{account_id}/messages/{ours['Ours 2']}?permanent=true", headers=user.headers)
    assert gone.status_code == 200, gone.text

    # The write-backs find the folder renumbered, write nothing, and have the folder synced again.
    assert eventually(lambda: subjects(client, user, account_id, target) == ["Stranger 1", "Stranger 2"], 60)
    assert server_subjects(dovecot, mail_user, "Projekte/Ärger") == ["Stranger 1", "Stranger 2"]
    assert not {"\\Seen", "\\Flagged"} & server_flags(dovecot, mail_user, "Projekte/Ärger")
