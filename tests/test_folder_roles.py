"""Folder roles against real Dovecot mailboxes, checked with an independent IMAP client (imaplib)."""

from __future__ import annotations

import time

import pytest
from mailservers import imap_utf7_decode, quote_mailbox
from syncing import create_account, folders_by_name, imap_account, imap_session, messages, run_sync

from email_service.folders.roles import role_folder_on_server
from email_service.mail.folders import parse_list_response


@pytest.fixture
def client(sync_client):
    return sync_client


def server_folders(server, mail_user) -> dict[str, set[str]]:
    """Decoded folder name -> attributes, as another IMAP client lists them."""
    with server.imap(mail_user) as other:
        _, lines = other._simple_command("LIST", '""', '"*"', "RETURN", "(SPECIAL-USE)")
        _, lines = other._untagged_response("OK", lines, "LIST")
    found = {}
    for line in lines:
        entry = parse_list_response(line)
        found[imap_utf7_decode(entry.name)] = {a.lower() for a in entry.attributes}
    return found


def server_subjects(server, mail_user, folder: str) -> list[str]:
    with server.imap(mail_user) as other:
        other.select(quote_mailbox(folder), readonly=True)
        _, data = other.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return [item[1].decode().split(":", 1)[1].strip() for item in data if isinstance(item, tuple)]


def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def save_draft(client, user, account_id, subject: str) -> dict:
    response = client.post(
        "/api/compose/draft",
        json={"accountId": account_id, "to": ["bob@example.org"], "subject": subject, "body": "Lieber Bob,"},
        headers=user.headers,
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_drafts_go_to_the_folder_the_server_marks_not_to_a_localised_name(client, user, dovecot, mail_user, worker):
    # A \Noselect "Entwürfe" above "Entwürfe/Ärger", and the server's Drafts marked \Drafts.
    dovecot.create_folder(mail_user, "Entwürfe/Ärger")
    assert "\\noselect" in server_folders(dovecot, mail_user)["Entwürfe"]
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    folders = folders_by_name(client, user, account_id)
    assert folders["Drafts"]["type"] == "drafts"
    assert folders["Entw&APw-rfe"]["type"] == "custom"
    assert folders["Entw&APw-rfe/&AMQ-rger"]["type"] == "custom"
    assert [f["name"] for f in folders.values() if f["type"] == "drafts"] == ["Drafts"]

    draft = save_draft(client, user, account_id, "Ein Entwurf")
    listed = messages(client, user, account_id, folders["Drafts"]["id"])["messages"]
    assert [m["id"] for m in listed] == [draft["draftId"]]
    assert eventually(lambda: server_subjects(dovecot, mail_user, "Drafts")) == ["Ein Entwurf"]
    # Nothing was made of the hierarchy node: still \Noselect, and no mail in it.
    after = server_folders(dovecot, mail_user)
    assert "\\noselect" in after["Entwürfe"]
    assert server_subjects(dovecot, mail_user, "Entwürfe/Ärger") == []


def test_german_mailbox_roles_come_from_special_use(client, user, german_dovecot, worker):
    mail_user = german_dovecot.add_user()
    # Folders with English role names exist too, unmarked: the server's marks decide.
    german_dovecot.create_folder(mail_user, "Drafts")
    german_dovecot.create_folder(mail_user, "Trash")
    account_id = create_account(client, user, imap_account(german_dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    folders = folders_by_name(client, user, account_id)
    roles = {f["displayName"]: f["type"] for f in folders.values()}
    assert roles == {
        "Inbox": "inbox",
        "Entwürfe": "drafts",
        "Gesendet": "sent",
        "Papierkorb": "trash",
        "Spam": "spam",
        "Drafts": "custom",
        "Trash": "custom",
    }


def test_a_draft_before_the_first_sync_finds_the_servers_drafts_folder(client, user, german_dovecot, worker):
    mail_user = german_dovecot.add_user()
    account_id = create_account(client, user, imap_account(german_dovecot, mail_user))
    save_draft(client, user, account_id, "Vor dem Abgleich")
    assert eventually(lambda: server_subjects(german_dovecot, mail_user, "Entwürfe")) == ["Vor dem Abgleich"]
    # No "Drafts" was created beside the server's own drafts folder.
    assert "Drafts" not in server_folders(german_dovecot, mail_user)
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    folders = folders_by_name(client, user, account_id)
    drafts = [f for f in folders.values() if f["type"] == "drafts"]
    assert [f["displayName"] for f in drafts] == ["Entwürfe"]
    assert [m["subject"] for m in messages(client, user, account_id, drafts[0]["id"])["messages"]] == [
        "Vor dem Abgleich"
    ]


def test_a_role_folder_is_created_with_its_use_where_the_server_offers_it(german_dovecot):
    mail_user = german_dovecot.add_user()
    with imap_session(german_dovecot, mail_user) as session:
        # Dovecot 2.3 parses CREATE ... (USE (...)) but does not advertise CREATE-SPECIAL-USE: the
        # command is sent only where a server offers it, and then the server must accept it.
        assert "CREATE-SPECIAL-USE" not in session.capabilities
        assert role_folder_on_server(session, "drafts", "Drafts") == "Entw&APw-rfe"  # exists: nothing created
        session.capabilities = session.capabilities | {"CREATE-SPECIAL-USE"}
        session.create_folder("Vorlagen", "\\Drafts")
    assert "Vorlagen" in server_folders(german_dovecot, mail_user)
    assert "Drafts" not in server_folders(german_dovecot, mail_user)
