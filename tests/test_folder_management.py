"""Creating, renaming and deleting folders through the API, checked on Dovecot with imaplib."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import assert_error_shape
from mailservers import ScriptedImapServer, imap_utf7_decode, quote_mailbox
from messages import plain_message, to_bytes
from sqlalchemy import text
from syncing import create_account, folders_by_name, imap_account, messages, run_sync, scripted_account

from email_service.api.app import create_app
from email_service.folders import service as folder_service
from email_service.mail.folders import parse_list_response
from email_service.mailbox import moves
from email_service.mailbox.imap_sync import remote_folders
from email_service.mailbox.store import MailStore
from email_service.queue.locks import AccountLock
from email_service.runtime import Runtime


@pytest.fixture(scope="module")
def client(backing, dovecot):
    """Folder requests reach the mail server from the API itself: its runtime trusts the test CA."""
    runtime = Runtime.build(replace(backing, rate_limits_enabled=False, ca_file=dovecot.ca_file))
    with create_app(runtime).test_client() as test_client:
        yield test_client
    runtime.close()


def server_folders(dovecot, mail_user) -> set[str]:
    """Decoded folder names as another IMAP client lists them."""
    with dovecot.imap(mail_user) as other:
        _, lines = other.list('""', '"*"')
    return {imap_utf7_decode(parse_list_response(line).name) for line in lines}


def server_count(dovecot, mail_user, folder: str) -> int:
    with dovecot.imap(mail_user) as other:
        _, data = other.select(quote_mailbox(folder), readonly=True)
    return int(data[0])


@pytest.fixture
def account(client, user, dovecot, mail_user, worker):
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    return account_id


def create(client, user, account_id, **body):
    return client.post(f"/api/{account_id}/folders", json=body, headers=user.headers)


def test_create_rename_with_children_and_delete_stay_in_step_with_the_server(client, user, dovecot, mail_user, account):
    made = create(client, user, account, name="Kunden & Partner")
    assert made.status_code == 201, made.text
    parent = made.json()
    assert parent["name"] == "Kunden &- Partner" and parent["displayName"] == "Kunden & Partner"
    assert parent["type"] == "custom"
    child = create(client, user, account, name="Größere Aufträge", parentId=parent["id"]).json()
    assert child["name"] == "Kunden &- Partner/Gr&APYA3w-ere Auftr&AOQ-ge" and child["parentId"] == parent["id"]
    assert {"Kunden & Partner", "Kunden & Partner/Größere Aufträge"} <= server_folders(dovecot, mail_user)
    dovecot.append(mail_user, "Kunden & Partner/Größere Aufträge", to_bytes(plain_message("Auftrag")))
    run_sync(client, user, account)
    [message] = messages(client, user, account, child["id"])["messages"]

    renamed = client.patch(f"/api/{account}/folders/{parent['id']}", json={"name": "Clients"}, headers=user.headers)
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "Clients" and renamed.json()["id"] == parent["id"]
    on_server = server_folders(dovecot, mail_user)
    assert {"Clients", "Clients/Größere Aufträge"} <= on_server and "Kunden & Partner" not in on_server
    folders = folders_by_name(client, user, account)
    assert folders["Clients/Gr&APYA3w-ere Auftr&AOQ-ge"]["id"] == child["id"]  # same folder, new name
    status, _ = run_sync(client, user, account)
    assert status["result"]["messagesAdded"] == 0 and status["result"]["messagesRemoved"] == 0
    assert [m["id"] for m in messages(client, user, account, child["id"])["messages"]] == [message["id"]]

    # A folder with sub-folders is not deleted; its sub-folder, mail and all, is.
    assert_error_shape(client.delete(f"/api/{account}/folders/{parent['id']}", headers=user.headers), 409)
    gone = client.delete(f"/api/{account}/folders/{child['id']}", headers=user.headers)
    assert gone.status_code == 204, gone.text
    assert "Clients/Größere Aufträge" not in server_folders(dovecot, mail_user)
    assert_error_shape(client.get(f"/api/{account}/messages/{message['id']}", headers=user.headers), 404)
    assert client.delete(f"/api/{account}/folders/{parent['id']}", headers=user.headers).status_code == 204
    run_sync(client, user, account)
    assert not {"Clients", "Clients/Gr&APYA3w-ere Auftr&AOQ-ge"} & set(folders_by_name(client, user, account))


def test_inbox_and_role_folders_are_protected(client, user, dovecot, mail_user, account):
    folders = folders_by_name(client, user, account)
    for name in ("INBOX", "Drafts", "Sent", "Trash", "Junk"):
        folder_id = folders[name]["id"]
        assert_error_shape(client.delete(f"/api/{account}/folders/{folder_id}", headers=user.headers), 409)
        renamed = client.patch(f"/api/{account}/folders/{folder_id}", json={"name": "X"}, headers=user.headers)
        assert_error_shape(renamed, 409)
    assert {"INBOX", "Drafts", "Sent", "Trash", "Junk"} <= server_folders(dovecot, mail_user)


def test_bad_folder_requests_are_refused_cleanly(client, user, make_user, dovecot, mail_user, account):
    assert_error_shape(create(client, user, account, name="a/b"), 400)
    assert_error_shape(create(client, user, account, name="   "), 400)
    assert_error_shape(create(client, user, account, name="Tab\there"), 400)
    assert_error_shape(create(client, user, account, name="Drafts"), 409)
    assert_error_shape(create(client, user, account, name="inbox"), 409)
    assert_error_shape(create(client, user, account, name="x", parentId="nope"), 404)
    assert_error_shape(create(client, make_user(), account, name="Mine"), 404)
    made = create(client, user, account, name="Eins").json()
    assert_error_shape(
        client.patch(f"/api/{account}/folders/{made['id']}", json={"parentId": made["id"]}, headers=user.headers), 400
    )
    assert_error_shape(client.patch(f"/api/{account}/folders/{made['id']}", json={}, headers=user.headers), 400)
    stranger = make_user()
    assert_error_shape(client.delete(f"/api/{account}/folders/{made['id']}", headers=stranger.headers), 404)
    assert "Eins" in server_folders(dovecot, mail_user)


def test_pop3_accounts_have_no_server_folders(client, user, dovecot, mail_user, worker):
    body = imap_account(dovecot, mail_user, protocol="pop3", port=dovecot.pop3s_port)
    account_id = create_account(client, user, body)
    assert_error_shape(create(client, user, account_id, name="Archiv"), 409)


def test_folder_rows_change_while_the_account_is_held(client, user, dovecot, mail_user, account, backing, monkeypatch):
    # A sync that took the account between the server's change and the rows' would see folders
    # the rows do not know yet (and take a renamed folder for a deleted one, with its mail).
    runtime = Runtime.build(backing)
    held_while_written: list[bool] = []
    retype = folder_service._retype

    def retype_and_check(session, account_id, logged):
        probe = AccountLock(runtime.db, account_id)
        free = probe.acquire()
        if free:
            probe.release()
        held_while_written.append(not free)
        return retype(session, account_id, logged)

    monkeypatch.setattr(folder_service, "_retype", retype_and_check)
    try:
        made = create(client, user, account, name="Held")
        assert made.status_code == 201, made.text
        path = f"/api/{account}/folders/{made.json()['id']}"
        assert client.patch(path, json={"name": "Still held"}, headers=user.headers).status_code == 200
        assert client.delete(path, headers=user.headers).status_code == 204
    finally:
        runtime.close()
    assert held_while_written == [True, True, True]


def test_deleting_a_folder_keeps_mail_moved_out_of_it_before_the_server_moved_it(
    client, user, dovecot, mail_user, account, monkeypatch
):
    # A message moved out of a folder stays there on the server until the write-back runs (a
    # busy queue): deleting the folder meanwhile must not take the message with it.
    made = create(client, user, account, name="Alt")
    assert made.status_code == 201, made.text
    folder = made.json()
    for subject in ("Keep me", "Goes with the folder"):
        dovecot.append(mail_user, "Alt", to_bytes(plain_message(subject)))
    run_sync(client, user, account)
    ids = {m["subject"]: m["id"] for m in messages(client, user, account, folder["id"])["messages"]}
    inbox = folders_by_name(client, user, account)["INBOX"]
    monkeypatch.setattr(moves, "enqueue_server_moves", lambda *args: None)
    moved = client.post(
        f"/api/{account}/messages/{ids['Keep me']}/move", json={"folderId": inbox["id"]}, headers=user.headers
    )
    assert moved.status_code == 200, moved.text

    gone = client.delete(f"/api/{account}/folders/{folder['id']}", headers=user.headers)
    assert gone.status_code == 204, gone.text
    assert "Alt" not in server_folders(dovecot, mail_user)
    kept = client.get(f"/api/{account}/messages/{ids['Keep me']}", headers=user.headers)
    assert kept.status_code == 200, kept.text
    assert kept.json()["folderId"] == inbox["id"]
    assert_error_shape(client.get(f"/api/{account}/messages/{ids['Goes with the folder']}", headers=user.headers), 404)
    assert server_count(dovecot, mail_user, "INBOX") == 1
    status, _ = run_sync(client, user, account)
    assert status["result"]["messagesAdded"] == 0 and status["result"]["messagesRemoved"] == 0
    assert [m["id"] for m in messages(client, user, account, inbox["id"])["messages"]] == [ids["Keep me"]]


def test_a_folder_rebuilt_on_the_server_is_not_deleted_before_its_moves_are_settled(
    client, user, dovecot, mail_user, account, runtime, monkeypatch
):
    # Its stored UIDs name other mail now, so the moves out of it cannot be made: deleting it
    # anyway destroyed the message the user had just moved out of it.
    made = create(client, user, account, name="Rebuilt")
    assert made.status_code == 201, made.text
    folder = made.json()
    dovecot.append(mail_user, "Rebuilt", to_bytes(plain_message("Moved to safety")))
    run_sync(client, user, account)
    [kept] = messages(client, user, account, folder["id"])["messages"]
    inbox = folders_by_name(client, user, account)["INBOX"]
    monkeypatch.setattr(moves, "enqueue_server_moves", lambda *args: None)
    moved = client.post(
        f"/api/{account}/messages/{kept['id']}/move", json={"folderId": inbox["id"]}, headers=user.headers
    )
    assert moved.status_code == 200, moved.text
    with runtime.db.maintenance_session() as session:  # as after the server gave it a new UIDVALIDITY
        session.execute(text("UPDATE folders SET uidvalidity = uidvalidity + 1 WHERE id = :id"), {"id": folder["id"]})
    refused = client.delete(f"/api/{account}/folders/{folder['id']}", headers=user.headers)
    assert_error_shape(refused, 409, "ACCOUNT_BUSY")
    assert "Rebuilt" in server_folders(dovecot, mail_user) and server_count(dovecot, mail_user, "Rebuilt") == 1


def test_deleting_a_folder_deletes_mail_moved_into_it_before_the_server_moved_it(
    client, user, dovecot, mail_user, account, monkeypatch
):
    # The user moved a message into the folder, then deleted the folder and its mail: the message
    # must not come back in the folder it was moved from.
    made = create(client, user, account, name="Weg")
    assert made.status_code == 201, made.text
    folder = made.json()
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Into the bin folder")))
    run_sync(client, user, account)
    inbox = folders_by_name(client, user, account)["INBOX"]
    [message] = messages(client, user, account, inbox["id"])["messages"]
    monkeypatch.setattr(moves, "enqueue_server_moves", lambda *args: None)
    moved = client.post(
        f"/api/{account}/messages/{message['id']}/move", json={"folderId": folder["id"]}, headers=user.headers
    )
    assert moved.status_code == 200, moved.text

    assert client.delete(f"/api/{account}/folders/{folder['id']}", headers=user.headers).status_code == 204
    run_sync(client, user, account)
    assert messages(client, user, account, inbox["id"])["messages"] == []
    assert server_count(dovecot, mail_user, "INBOX") == 0


def test_a_name_taken_on_the_server_since_the_last_sync_is_said_to_exist(client, user, dovecot, mail_user, account):
    # Another client made these folders after the last sync: the server refuses the name, and
    # the answer says why, as for a folder the service knows.
    dovecot.create_folder(mail_user, "Extern")
    dovecot.create_folder(mail_user, "Übrig")
    made = create(client, user, account, name="Extern")
    assert_error_shape(made, 409)
    assert made.json()["code"] == "FOLDER_EXISTS"
    mine = create(client, user, account, name="Meins").json()
    renamed = client.patch(f"/api/{account}/folders/{mine['id']}", json={"name": "Übrig"}, headers=user.headers)
    assert_error_shape(renamed, 409)
    assert renamed.json()["code"] == "FOLDER_EXISTS"
    assert {"Extern", "Übrig", "Meins"} <= server_folders(dovecot, mail_user)


def test_a_server_without_hierarchy_puts_no_folder_under_another(client, user, runtime):
    # LIST gives the delimiter NIL: the server has no hierarchy. A "sub-folder" made there was a
    # top-level folder called "Projekte/Neu", which the next sync showed as such.
    def answer(tag: bytes, command: bytes) -> bytes:
        untagged = b""
        if command == b"CAPABILITY":
            untagged = b"* CAPABILITY IMAP4rev1\r\n"
        elif command == b"LIST":
            untagged = b"".join(b"* LIST () NIL %s\r\n" % name for name in (b"INBOX", b"Projekte", b"Alt"))
        elif command == b"LOGOUT":
            untagged = b"* BYE\r\n"
        return untagged + tag + b" OK done\r\n"

    server = ScriptedImapServer(answer)
    try:
        account = create_account(client, user, scripted_account(server.port, "Flat folders"))
        store = MailStore(runtime.db, runtime.objects, user.principal, account)
        folders, _ = store.reconcile_folders(
            remote_folders([b"(\\HasNoChildren) NIL " + name for name in (b"INBOX", b"Projekte", b"Alt")])
        )
        made = create(client, user, account, name="Neu", parentId=folders["Projekte"].id)
        assert_error_shape(made, 400)
        assert made.json()["code"] == "INVALID_FOLDER_PARENT"
        path = f"/api/{account}/folders/{folders['Alt'].id}"
        moved = client.patch(path, json={"parentId": folders["Projekte"].id}, headers=user.headers)
        assert_error_shape(moved, 400)
        assert moved.json()["code"] == "INVALID_FOLDER_PARENT"
        assert not [line for line in server.lines if line.split()[1].upper() in (b"CREATE", b"RENAME")]
    finally:
        server.close()
