"""Mailbox sync against a real Dovecot, run by a real RQ worker process on the real Redis."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
from helpers import TEST_DESTINATIONS, assert_error_shape, free_port, service_env
from mailservers import CapabilityHidingProxy, ScriptedImapServer, ScriptedPop3Server, make_tls_files
from messages import (
    ATTACHMENT_NAME,
    attachments_message,
    html_message,
    international_message,
    long_line_message,
    malformed_message,
    plain_message,
    realistic_mix,
    thread,
    to_bytes,
)
from sqlalchemy import text
from syncing import (
    create_account,
    folders_by_name,
    imap_account,
    imap_session,
    messages,
    run_sync,
    scripted_account,
    wait_task,
)

from email_service.mailbox import imap_sync
from email_service.mailbox.imap_sync import ImapSync
from email_service.mailbox.pop3_sync import Pop3Sync
from email_service.mailbox.schedule import due_for_sync
from email_service.mailbox.store import MailStore
from email_service.protocols import pop3
from email_service.protocols.imap import ImapSession, quote
from email_service.protocols.pop3 import Pop3Session
from email_service.queue.locks import AccountLock
from email_service.queue.scheduler import Scheduler


@pytest.fixture
def client(sync_client):
    return sync_client


@pytest.fixture
def synced(client, user, dovecot, mail_user, worker):
    """A mailbox with folders and varied mail, synced once."""
    for folder in ("Projects", "Projects/2026", "Archiv/Größe"):
        dovecot.create_folder(mail_user, folder)
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Plain one")), flags=["\\Seen"])
    dovecot.append(mail_user, "INBOX", to_bytes(html_message()))
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message()), flags=["\\Flagged"])
    dovecot.append(mail_user, "INBOX", to_bytes(international_message()))
    for message in thread(3):
        dovecot.append(mail_user, "Projects", to_bytes(message))
    dovecot.append(mail_user, "Sent", to_bytes(plain_message("Sent by me")), flags=["\\Seen"])
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    status, progress = run_sync(client, user, account_id)
    return account_id, status, progress


def test_initial_sync_brings_folders_with_types_hierarchy_and_counts(client, user, synced):
    account_id, status, _ = synced
    assert status["status"] == "success", status
    assert status["progress"] == 100
    assert status["result"]["messagesAdded"] == 8 and status["result"]["errors"] == []
    folders = folders_by_name(client, user, account_id)
    # "Archiv" only exists as the parent of "Archiv/Größe" (\Noselect): listed, nothing to sync.
    assert status["result"]["foldersSync"] == len(folders) - 1 and "syncedAt" not in folders["Archiv"]
    types = {name: f["type"] for name, f in folders.items()}
    assert types["INBOX"] == "inbox" and types["Sent"] == "sent" and types["Drafts"] == "drafts"
    assert types["Junk"] == "spam" and types["Trash"] == "trash" and types["Projects"] == "custom"
    assert folders["INBOX"]["displayName"] == "Inbox"
    nested = folders["Projects/2026"]
    assert nested["displayName"] == "2026" and nested["parentId"] == folders["Projects"]["id"]
    assert folders["Projects"]["parentId"] is None
    umlaut = next(f for f in folders.values() if f["displayName"] == "Größe")
    assert umlaut["name"] != "Archiv/Größe"  # the raw name stays modified UTF-7, as on the server
    assert umlaut["parentId"] == folders["Archiv"]["id"]
    inbox = folders["INBOX"]
    assert inbox["messageCount"] == 4 and inbox["unreadCount"] == 3 and inbox["syncedAt"] > 0
    account = client.get(f"/api/accounts/{account_id}", headers=user.headers).json()
    assert account["lastSyncAt"] is not None and account["isSyncing"] is False


def test_message_details_attachments_and_sanitised_html(client, user, synced):
    account_id, _, _ = synced
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    listed = {m["subject"]: m for m in messages(client, user, account_id, inbox["id"])["messages"]}
    with_files = client.get(
        f"/api/{account_id}/messages/{listed['Photos and the contract']['id']}", headers=user.headers
    )
    detail = with_files.json()
    assert detail["isStarred"] is True and detail["isRead"] is False and detail["attachmentCount"] == 3
    by_name = {a["filename"]: a for a in detail["attachments"]}
    assert set(by_name) == {ATTACHMENT_NAME, "notes.txt", "logo.png"}
    assert by_name["logo.png"]["isInline"] is True and by_name["logo.png"]["contentId"] == "logo-1@example.com"
    pdf = by_name[ATTACHMENT_NAME]
    assert pdf["isInline"] is False and pdf["mimeType"] == "application/pdf"
    expected = b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"
    assert pdf["size"] == len(expected)
    download = client.get(f"/api/{account_id}/attachments/{pdf['id']}/download", headers=user.headers)
    assert download.status_code == 200 and download.content == expected
    assert download.headers["content-type"] == "application/pdf"
    assert "filename*=UTF-8''" in download.headers["content-disposition"]
    link = urlsplit(pdf["downloadUrl"])
    presigned = client.get(f"{link.path}?{link.query}")
    assert presigned.status_code == 200 and presigned.content == expected

    html = client.get(f"/api/{account_id}/messages/{listed['Your invoice']['id']}", headers=user.headers).json()
    assert html["bodyHtml"] and "<script" not in html["bodyHtml"].lower()
    assert "onclick" not in html["bodyHtml"].lower() and "javascript:" not in html["bodyHtml"].lower()
    assert "invoice" in html["body"].lower() and len(html["preview"]) <= 200

    international = next(m for s, m in listed.items() if s.startswith("Grüße aus Zürich"))
    assert international["subject"] == "Grüße aus Zürich – 東京の会議 📅"


def test_replies_share_a_conversation(client, user, synced):
    account_id, _, _ = synced
    projects = folders_by_name(client, user, account_id)["Projects"]
    ids = [m["id"] for m in messages(client, user, account_id, projects["id"])["messages"]]
    conversations = {
        client.get(f"/api/{account_id}/messages/{i}", headers=user.headers).json()["conversationId"] for i in ids
    }
    assert len(ids) == 3 and len(conversations) == 1 and None not in conversations


def test_incremental_sync_fetches_new_mail_flag_changes_and_expunges(client, user, dovecot, mail_user, synced):
    account_id, _, _ = synced
    unchanged, _ = run_sync(client, user, account_id)
    assert unchanged["status"] == "success"
    assert {k: unchanged["result"][k] for k in ("messagesAdded", "messagesUpdated", "messagesRemoved")} == {
        "messagesAdded": 0,
        "messagesUpdated": 0,
        "messagesRemoved": 0,
    }
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Arrived later")))
    with dovecot.imap(mail_user) as other:
        other.select("INBOX")
        _, data = other.uid("SEARCH", "HEADER", "Subject", '"Plain one"')
        plain_uid = data[0].decode()
        _, data = other.uid("SEARCH", "HEADER", "Subject", '"Your invoice"')
        invoice_uid = data[0].decode()
        other.uid("STORE", plain_uid, "-FLAGS", "(\\Seen)")
        other.uid("STORE", invoice_uid, "+FLAGS", "(\\Seen \\Flagged)")
        _, data = other.uid("SEARCH", "HEADER", "Subject", '"Photos"')
        other.uid("STORE", data[0].decode(), "+FLAGS", "(\\Deleted)")
        other.expunge()
    status, _ = run_sync(client, user, account_id)
    result = status["result"]
    assert (result["messagesAdded"], result["messagesUpdated"], result["messagesRemoved"]) == (1, 2, 1), result
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    listed = {m["subject"]: m for m in messages(client, user, account_id, inbox["id"])["messages"]}
    assert "Photos and the contract" not in listed and "Arrived later" in listed
    assert listed["Plain one"]["isRead"] is False
    assert listed["Your invoice"]["isRead"] is True and listed["Your invoice"]["isStarred"] is True
    assert inbox["messageCount"] == 4 and inbox["unreadCount"] == 3


def test_uidvalidity_change_rebuilds_the_folder(client, user, dovecot, mail_user, synced):
    account_id, _, _ = synced
    before = folders_by_name(client, user, account_id)["Projects"]
    dovecot.recreate_folder(mail_user, "Projects")
    dovecot.append(mail_user, "Projects", to_bytes(plain_message("After the rebuild")))
    status, _ = run_sync(client, user, account_id)
    assert status["result"]["messagesRemoved"] == 3 and status["result"]["messagesAdded"] == 1
    after = folders_by_name(client, user, account_id)["Projects"]
    assert after["id"] == before["id"]
    subjects = [m["subject"] for m in messages(client, user, account_id, after["id"])["messages"]]
    assert subjects == ["After the rebuild"]


def test_a_folder_another_client_renamed_keeps_its_id_and_its_messages(client, user, dovecot, mail_user, synced):
    # Another client renames "Projects" (and with it "Projects/2026") on the server. The server
    # keeps the UIDVALIDITY across RENAME, so the rows follow: same ids, nothing downloaded again.
    account_id, _, _ = synced
    dovecot.append(mail_user, "Projects/2026", to_bytes(plain_message("Planned for 2026")))
    run_sync(client, user, account_id)
    before = folders_by_name(client, user, account_id)
    projects, nested = before["Projects"], before["Projects/2026"]
    ids = {m["subject"]: m["id"] for m in messages(client, user, account_id, projects["id"])["messages"]}
    nested_ids = [m["id"] for m in messages(client, user, account_id, nested["id"])["messages"]]
    cursor = client.get(f"/api/{account_id}/changes", headers=user.headers).json()["newCursor"]
    with dovecot.imap(mail_user) as other:
        assert other.rename("Projects", "Work")[0] == "OK"
        other.select("Work/2026")
        assert other.uid("STORE", "1", "+FLAGS", "(\\Flagged)")[0] == "OK"
    dovecot.append(mail_user, "Work", to_bytes(plain_message("Filed after the rename")))
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "success", status
    result = status["result"]
    assert (result["messagesAdded"], result["messagesUpdated"], result["messagesRemoved"]) == (1, 1, 0), result
    after = folders_by_name(client, user, account_id)
    assert "Projects" not in after and "Projects/2026" not in after
    work, work_nested = after["Work"], after["Work/2026"]
    assert work["id"] == projects["id"] and work["displayName"] == "Work" and work["parentId"] is None
    assert work_nested["id"] == nested["id"] and work_nested["parentId"] == work["id"]
    assert work_nested["displayName"] == "2026" and work["messageCount"] == 4
    listed = {m["subject"]: m["id"] for m in messages(client, user, account_id, work["id"])["messages"]}
    assert {s: listed[s] for s in ids} == ids and "Filed after the rename" in listed
    [planned] = messages(client, user, account_id, work_nested["id"])["messages"]
    assert [planned["id"]] == nested_ids and planned["isStarred"] is True
    # Readers of the changes feed see the folders updated, the new and the starred message, nothing destroyed.
    step = client.get(f"/api/{account_id}/changes", params={"since": cursor}, headers=user.headers).json()
    assert step["destroyed"] == [] and step["created"] == [listed["Filed after the rename"]]
    assert step["updated"] == nested_ids
    assert step["folders"]["created"] == step["folders"]["destroyed"] == []
    assert sorted(step["folders"]["updated"]) == sorted([work["id"], work_nested["id"]])


def test_sort_filter_and_pages(client, user, dovecot, mail_user, worker):
    base = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
    senders = ["carol@example.com", "alice@example.com", "eve@example.com", "bob@example.com", "dave@example.com"]
    for i, sender in enumerate(senders):
        dovecot.append(
            mail_user,
            "INBOX",
            to_bytes(plain_message(f"Message {i}", sender=sender)),
            flags=["\\Seen"] if i % 2 == 0 else [],
            internaldate=base + dt.timedelta(hours=i),
        )
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    inbox = folders_by_name(client, user, account_id)["INBOX"]["id"]

    def subjects(**query):
        return [m["subject"] for m in messages(client, user, account_id, inbox, **query)["messages"]]

    assert subjects() == [f"Message {i}" for i in (4, 3, 2, 1, 0)]
    assert subjects(sort="receivedAt:asc") == [f"Message {i}" for i in range(5)]
    assert subjects(sort="from:asc") == ["Message 1", "Message 3", "Message 0", "Message 4", "Message 2"]
    assert subjects(sort="from:desc") == ["Message 2", "Message 4", "Message 0", "Message 3", "Message 1"]
    assert subjects(filter="read") == ["Message 4", "Message 2", "Message 0"]
    assert subjects(filter="unread") == ["Message 3", "Message 1"]
    page = messages(client, user, account_id, inbox, limit=2, offset=1)
    assert [m["subject"] for m in page["messages"]] == ["Message 3", "Message 2"]
    assert page["pagination"] == {"total": 5, "limit": 2, "offset": 1, "nextCursor": page["pagination"]["nextCursor"]}
    after = messages(client, user, account_id, inbox, limit=2, cursor=page["pagination"]["nextCursor"])
    assert [m["subject"] for m in after["messages"]] == ["Message 1", "Message 0"]
    assert after["pagination"]["nextCursor"] is None
    assert messages(client, user, account_id, inbox, filter="unread", limit=1)["pagination"]["total"] == 2


def test_malformed_message_is_stored_and_the_rest_syncs(client, user, dovecot, mail_user, worker):
    dovecot.append(mail_user, "INBOX", malformed_message())
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Fine")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "success" and status["result"]["messagesAdded"] == 2
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    for message in messages(client, user, account_id, inbox["id"])["messages"]:
        assert client.get(f"/api/{account_id}/messages/{message['id']}", headers=user.headers).status_code == 200


def test_mail_without_a_usable_from_shows_the_unknown_sender_and_split_words_decode(
    client, user, dovecot, mail_user, worker
):
    dovecot.append(
        mail_user,
        "INBOX",
        b'From: "System" <>\r\nSender: relay@lists.example.org\r\nTo: bob@example.org\r\n'
        # "Привет мир" with the bytes of "р" split across the two words.
        b"Subject: =?utf-8?B?0J/R?= =?utf-8?B?gNC40LLQtdGCINC80LjRgA==?=\r\n"
        b"Message-ID: <report-1@example.org>\r\nDate: Tue, 02 Jan 2024 10:30:00 +0000\r\n\r\nAll green.\r\n",
    )
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    [listed] = messages(client, user, account_id, inbox["id"])["messages"]
    assert listed["from"] == "unknown@unknown.invalid"
    assert listed["fromName"] is None  # "System" names no address: no name to put beside a guess
    assert listed["subject"] == "Привет мир"


def test_the_senders_name_is_listed_decoded_on_one_line(client, user, dovecot, mail_user, worker):
    dovecot.append(
        mail_user,
        "INBOX",
        # "Jürgen Müller", encoded and folded over two lines as a mail program sends it.
        b"From: =?utf-8?q?J=C3=BCrgen?=\r\n =?utf-8?q?_M=C3=BCller?= <jm@Example.ORG>\r\n"
        b"To: Bob <bob@example.org>\r\nSubject: Hallo\r\nMessage-ID: <name-1@example.org>\r\n"
        b"Date: Tue, 02 Jan 2024 10:30:00 +0000\r\n\r\nHallo Bob.\r\n",
    )
    dovecot.append(mail_user, "INBOX", b"From: bare@example.org\r\nSubject: No name\r\n\r\nHi.\r\n")
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    listed = {m["subject"]: m for m in messages(client, user, account_id, inbox["id"])["messages"]}
    assert (listed["Hallo"]["from"], listed["Hallo"]["fromName"]) == ("jm@example.org", "Jürgen Müller")
    assert (listed["No name"]["from"], listed["No name"]["fromName"]) == ("bare@example.org", None)
    detail = client.get(f"/api/{account_id}/messages/{listed['Hallo']['id']}", headers=user.headers).json()
    assert detail["fromName"] == "Jürgen Müller"


def test_a_messages_files_are_listed_in_the_order_it_carries_them(client, user, dovecot, mail_user, worker):
    # They were listed by their random ids, so the order changed from message to message.
    files = [(f"{n}-part.txt", "text/plain", f"part {n}\r\n".encode()) for n in (6, 5, 4, 3, 2, 1)]
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message("Six files", attachments=files)))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    [listed] = messages(client, user, account_id, inbox["id"])["messages"]
    detail = client.get(f"/api/{account_id}/messages/{listed['id']}", headers=user.headers).json()
    assert [a["filename"] for a in detail["attachments"]] == ["logo.png", *(name for name, _, _ in files)]


def test_a_message_downloads_as_the_server_gave_it(client, user, synced, dovecot, mail_user, make_user):
    account_id, _, _ = synced
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    listed = {m["subject"]: m for m in messages(client, user, account_id, inbox["id"])["messages"]}
    path = f"/api/{account_id}/messages/{listed['Photos and the contract']['id']}/raw"
    raw = client.get(path, headers=user.headers)
    assert raw.status_code == 200, raw.text
    with dovecot.imap(mail_user) as other:
        other.select("INBOX", readonly=True)
        _, found = other.uid("SEARCH", "HEADER", "Subject", '"Photos and the contract"')
        _, data = other.uid("FETCH", found[0].split()[0].decode(), "(BODY.PEEK[])")
    assert raw.content == data[0][1]
    assert raw.headers["content-type"] == "message/rfc822"
    assert 'filename="Photos and the contract.eml"' in raw.headers["content-disposition"]
    assert_error_shape(client.get(path, headers=make_user().headers), 404)
    assert_error_shape(client.get(f"/api/{account_id}/messages/nope/raw", headers=user.headers), 404)


def test_html_and_svg_attachments_are_never_run_from_the_api_origin(client, user, dovecot, mail_user, worker):
    # A sender's HTML or SVG file, downloaded from the API's own origin, must not be able to run
    # script there: every route that serves it says nosniff and sandboxes it.
    page = b"<html><body><script>alert(document.domain)</script></body></html>"
    drawing = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script></svg>'
    dovecot.append(
        mail_user,
        "INBOX",
        to_bytes(
            attachments_message(
                "Active files",
                attachments=[("page.html", "text/html", page), ("drawing.svg", "image/svg+xml", drawing)],
            )
        ),
    )
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "success", status
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    [listed] = messages(client, user, account_id, inbox["id"])["messages"]
    detail = client.get(f"/api/{account_id}/messages/{listed['id']}", headers=user.headers).json()
    by_name = {a["filename"]: a for a in detail["attachments"]}
    for name, mime_type, data in (("page.html", "text/html", page), ("drawing.svg", "image/svg+xml", drawing)):
        attachment = by_name[name]
        link = urlsplit(attachment["downloadUrl"])
        served = (
            client.get(f"/api/{account_id}/attachments/{attachment['id']}/download", headers=user.headers),
            client.get(f"{link.path}?{link.query}"),
        )
        for response in served:
            assert response.status_code == 200 and response.content.strip() == data
            assert response.headers["content-type"].startswith(mime_type)
            assert response.headers["content-disposition"] == f'attachment; filename="{name}"'
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["content-security-policy"] == "sandbox"
    raw = client.get(f"/api/{account_id}/messages/{listed['id']}/raw", headers=user.headers)
    assert raw.status_code == 200 and b"<script>" in raw.content
    assert raw.headers["x-content-type-options"] == "nosniff"
    assert raw.headers["content-security-policy"] == "sandbox"


def test_recipients_names_are_listed_by_address(client, user, dovecot, mail_user, worker):
    dovecot.append(
        mail_user,
        "INBOX",
        b'To: "Bob Example" <bob@example.org>, carol@example.org\r\n'
        b"Cc: =?utf-8?q?Zo=C3=AB?= <zoe@Example.NET>, Bob Again <bob@example.org>\r\n"
        b"From: alice@example.com\r\nSubject: Team\r\nDate: Tue, 02 Jan 2024 10:30:00 +0000\r\n\r\nHi.\r\n",
    )
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    [listed] = messages(client, user, account_id, inbox["id"])["messages"]
    assert listed["to"] == ["bob@example.org", "carol@example.org"]
    assert listed["cc"] == ["zoe@example.net", "bob@example.org"]
    # The first name an address is given counts; an address with none has no entry.
    assert listed["recipientNames"] == {"bob@example.org": "Bob Example", "zoe@example.net": "Zoë"}
    detail = client.get(f"/api/{account_id}/messages/{listed['id']}", headers=user.headers).json()
    assert detail["recipientNames"] == listed["recipientNames"]


def test_a_broken_folder_is_reported_and_does_not_stop_the_others(client, user, dovecot, mail_user, worker):
    dovecot.create_folder(mail_user, "Broken")
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Still synced")))
    # The mail processes run as nobody: a folder they cannot read fails on the server alone.
    broken = dovecot.maildir(mail_user) / "Broken"
    broken.chmod(0o000)
    try:
        account_id = create_account(client, user, imap_account(dovecot, mail_user))
        status, _ = run_sync(client, user, account_id)
    finally:
        broken.chmod(0o700)
    assert status["status"] == "success", status
    assert any("Broken" in error for error in status["result"]["errors"]), status["result"]
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    assert [m["subject"] for m in messages(client, user, account_id, inbox["id"])["messages"]] == ["Still synced"]


def test_starttls_and_plain_imap(client, user, dovecot, mail_user, worker):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Over STARTTLS")))
    body = imap_account(dovecot, mail_user, port=dovecot.imap_port, encryption="starttls")
    account_id = create_account(client, user, body)
    assert run_sync(client, user, account_id)[0]["result"]["messagesAdded"] == 1


def test_progress_moves_and_is_syncing_tells_the_truth(client, user, dovecot, mail_user, worker):
    dovecot.append_many(mail_user, "INBOX", list(realistic_mix(400, seed=3)))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    started = client.post(f"/api/sync/{account_id}", json={}, headers=user.headers).json()
    again = client.post(f"/api/sync/{account_id}", json={}, headers=user.headers).json()
    assert again["taskId"] == started["taskId"]  # one sync per account at a time
    seen_syncing = False
    progress = []
    while True:
        status = client.get(f"/api/sync/task/{started['taskId']}", headers=user.headers).json()
        progress.append(status["progress"])
        if status["status"] == "started":
            seen_syncing |= client.get(f"/api/accounts/{account_id}", headers=user.headers).json()["isSyncing"]
        if status["status"] in ("success", "failure"):
            break
        time.sleep(0.05)
    assert status["status"] == "success" and status["result"]["messagesAdded"] == 400
    assert any(0 < p < 100 for p in progress), progress
    assert progress == sorted(progress)
    assert seen_syncing
    assert client.get(f"/api/accounts/{account_id}", headers=user.headers).json()["isSyncing"] is False


def test_pop3_downloads_each_message_once_and_deletes_nothing(client, user, dovecot, mail_user, worker):
    for i in range(3):
        dovecot.append(mail_user, "INBOX", to_bytes(plain_message(f"POP {i}")))
    body = imap_account(dovecot, mail_user, protocol="pop3", port=dovecot.pop3s_port)
    account_id = create_account(client, user, body)
    first, _ = run_sync(client, user, account_id)
    assert first["status"] == "success" and first["result"]["messagesAdded"] == 3
    assert run_sync(client, user, account_id)[0]["result"]["messagesAdded"] == 0
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message("POP with files")))
    third, _ = run_sync(client, user, account_id)
    assert third["result"]["messagesAdded"] == 1
    folders = client.get(f"/api/{account_id}/folders", headers=user.headers).json()["folders"]
    assert [(f["name"], f["type"]) for f in folders] == [("INBOX", "inbox")]
    listed = messages(client, user, account_id, folders[0]["id"])
    assert sorted(m["subject"] for m in listed["messages"]) == ["POP 0", "POP 1", "POP 2", "POP with files"]
    pop = dovecot.pop3(mail_user)
    try:
        assert pop.stat()[0] == 4
    finally:
        pop.quit()
    stls = create_account(
        client,
        user,
        imap_account(
            dovecot,
            mail_user,
            protocol="pop3",
            port=dovecot.pop3_port,
            encryption="starttls",
            emailAddress=f"stls-{mail_user.name}@example.com",
        ),
    )
    assert run_sync(client, user, stls)[0]["result"]["messagesAdded"] == 4


def test_pop3_brings_a_message_with_a_10000_character_line_and_the_ones_after_it(
    client, user, dovecot, mail_user, worker
):
    # Unwrapped HTML or base64 has lines far over poplib's 2,048 bytes; messages are fetched in
    # server order, so such a message used to stop every sync at the same place.
    line = "0123456789" * 1000
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Before the long line")))
    dovecot.append(mail_user, "INBOX", long_line_message("One long line", line))
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("After the long line")))
    body = imap_account(dovecot, mail_user, protocol="pop3", port=dovecot.pop3s_port)
    account_id = create_account(client, user, body)
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "success", status
    assert status["result"]["messagesAdded"] == 3 and status["result"]["errors"] == []
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    listed = {m["subject"]: m for m in messages(client, user, account_id, inbox["id"])["messages"]}
    assert set(listed) == {"Before the long line", "One long line", "After the long line"}
    detail = client.get(f"/api/{account_id}/messages/{listed['One long line']['id']}", headers=user.headers).json()
    assert line in detail["bodyHtml"]


def test_pop3_message_over_the_limits_is_reported_and_the_others_arrive(client, runtime, user, monkeypatch):
    # Small limits so the test need not send 16 MB lines: one message has a line over the line
    # limit, one is over the whole-message limit; both are read to their end and skipped, the
    # session stays in step with the server, and the messages around them are stored exactly.
    monkeypatch.setattr(pop3, "MAX_POP3_LINE", 1000)
    monkeypatch.setattr(pop3, "MAX_POP3_MESSAGE", 10_000)
    fits = to_bytes(plain_message("Fits", "A line with a dot next.\n.starts with a dot\n"))
    stuffed = fits.replace(b"\r\n.starts", b"\r\n..starts")
    bare_lf = to_bytes(plain_message("Bare line ends")).replace(b"\r\n", b"\n")
    server = ScriptedPop3Server(
        [
            long_line_message("Line too long", "x" * 5000),
            stuffed,
            long_line_message("Too large", ("y" * 900 + "\r\n") * 20),
            bare_lf,
        ]
    )
    body = {
        "accountName": "Scripted POP3",
        "emailAddress": "scripted-pop3@example.com",
        "protocol": "pop3",
        "hostname": "127.0.0.1",
        "port": server.port,
        "encryption": "none",
        "username": "someone",
        "password": "secret-password",
        "isSyncEnabled": False,
    }
    account_id = create_account(client, user, body)
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    session = Pop3Session(
        "127.0.0.1", server.port, "none", "someone", "secret-password", destinations=TEST_DESTINATIONS
    )
    with session:
        result = Pop3Sync(store, session, lambda _progress: None).run()
    server.close()
    assert result.messages_added == 2
    # This server has no TOP (it is optional): the message LIST says is too large cannot be shown
    # by its headers, and is said and skipped without being downloaded.
    assert result.errors == [
        f"message 1 at 127.0.0.1:{server.port} is over 9 KB or has a line over 0 KB; it was not downloaded",
        "message 3 is 17 KB, over 9 KB; it was not downloaded and its headers could not be fetched:"
        f" 127.0.0.1:{server.port} refused the request: -ERR not here",
    ]
    assert b"RETR 3" not in server.commands and b"TOP 3 0" in server.commands
    assert b"RETR 4" in server.commands and server.commands[-1] == b"QUIT"
    inbox = store.folders()["INBOX"]
    stored = {m["subject"]: m for m in messages(client, user, account_id, inbox.id)["messages"]}
    assert set(stored) == {"Fits", "Bare line ends"}
    detail = client.get(f"/api/{account_id}/messages/{stored['Fits']['id']}", headers=user.headers).json()
    assert "\n.starts with a dot" in detail["body"]


def _pop3_sync(store, dovecot, mail_user) -> tuple:
    """One POP3 sync of ``mail_user``'s mailbox through a proxy; the result and what the client sent."""
    proxy = CapabilityHidingProxy(dovecot.pop3_port, hide=["X-NOTHING-HIDDEN"])
    login = (dovecot.ip, proxy.port, "none", mail_user.name, mail_user.password)
    with Pop3Session(*login, destinations=TEST_DESTINATIONS) as session:
        result = Pop3Sync(store, session, lambda _progress: None).run()
    proxy.close()
    return result, b"".join(proxy.sent)


@pytest.fixture
def pop3_huge(client, runtime, user, dovecot, mail_user, monkeypatch):
    """A POP3 mailbox with a message over a small download limit between two that fit, synced once."""
    monkeypatch.setattr(pop3, "MAX_POP3_MESSAGE", 20_000)
    small = [to_bytes(plain_message("Small before")), to_bytes(attachments_message("Small after"))]
    dovecot.append(mail_user, "INBOX", small[0])
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message("Huge", attachments=[LARGE_FILE])))
    dovecot.append(mail_user, "INBOX", small[1])
    account_id = create_account(
        client, user, imap_account(dovecot, mail_user, protocol="pop3", port=dovecot.pop3s_port)
    )
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    result, sent = _pop3_sync(store, dovecot, mail_user)
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    listed = {m["subject"]: m for m in messages(client, user, account_id, inbox["id"])["messages"]}
    return account_id, store, result, sent, listed, small


def test_pop3_message_over_the_size_limit_is_shown_by_its_headers_and_not_downloaded_again(
    client, user, dovecot, mail_user, pop3_huge
):
    # It used to be downloaded whole at every sync, thrown away, and never shown.
    account_id, store, result, sent, listed, _ = pop3_huge
    assert result.messages_added == 3
    assert result.errors == ["Inbox: 1 message(s) over 19 KB not downloaded, shown by their headers (message 2)"]
    assert b"RETR 2" not in sent and b"TOP 2 0" in sent and sent.count(b"LIST") == 1
    assert sorted(listed) == ["Huge", "Small after", "Small before"]
    huge = client.get(f"/api/{account_id}/messages/{listed['Huge']['id']}", headers=user.headers).json()
    assert (huge["from"], huge["fromName"]) == ("alice@example.com", "Alice Example")
    assert huge["attachments"] == [] and "only its headers are shown" in huge["body"]
    assert "more than the 19 KB this service downloads" in huge["body"] and "eHh4eHh4" not in huge["body"]
    # Known by its UIDL: the next sync neither downloads it nor says it again.
    again, sent = _pop3_sync(store, dovecot, mail_user)
    assert again.messages_added == 0 and again.errors == []
    assert b"RETR" not in sent and b"TOP" not in sent


def test_pop3_messages_beside_one_over_the_size_limit_arrive_whole(client, user, pop3_huge):
    # Fetched whole, in the same session as the header section of the one between them.
    account_id, _, _, sent, listed, small = pop3_huge
    fetches = [line for line in sent.split(b"\r\n") if line.startswith((b"RETR", b"TOP"))]
    assert fetches == [b"RETR 1", b"TOP 2 0", b"RETR 3"]
    for subject, original in zip(["Small before", "Small after"], small, strict=True):
        raw = client.get(f"/api/{account_id}/messages/{listed[subject]['id']}/raw", headers=user.headers)
        assert raw.status_code == 200 and raw.content == original
    detail = client.get(f"/api/{account_id}/messages/{listed['Small after']['id']}", headers=user.headers).json()
    assert {a["filename"] for a in detail["attachments"]} == {ATTACHMENT_NAME, "notes.txt", "logo.png"}


def test_pop3_message_larger_than_its_listed_size_is_shown_by_its_headers(client, runtime, user, monkeypatch):
    # A server whose LIST says less than a message is: RETR's own limit still holds, and the
    # message, read once to its end, is then stored by its headers instead of read at every sync.
    monkeypatch.setattr(pop3, "MAX_POP3_MESSAGE", 10_000)
    listed_small = [to_bytes(plain_message("Fits")), long_line_message("Too large", ("y" * 900 + "\r\n") * 20)]
    server = ScriptedPop3Server(listed_small, listed_sizes=[len(listed_small[0]), 900], top=True)
    account_id = create_account(client, user, scripted_account(server.port, "Scripted POP3", protocol="pop3"))
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    login = ("127.0.0.1", server.port, "none", "someone", "secret-password")
    with Pop3Session(*login, destinations=TEST_DESTINATIONS) as session:
        result = Pop3Sync(store, session, lambda _progress: None).run()
    server.close()
    assert result.messages_added == 2
    assert result.errors == ["Inbox: 1 message(s) over 9 KB not downloaded, shown by their headers (message 2)"]
    assert b"RETR 2" in server.commands and b"TOP 2 0" in server.commands
    inbox = store.folders()["INBOX"]
    stored = {m["subject"]: m for m in messages(client, user, account_id, inbox.id)["messages"]}
    detail = client.get(f"/api/{account_id}/messages/{stored['Too large']['id']}", headers=user.headers).json()
    assert "This message is 17 KB, more than the 9 KB" in detail["body"] and "yyyy" not in detail["body"]
    again = ScriptedPop3Server(listed_small, listed_sizes=[len(listed_small[0]), 900], top=True)
    with Pop3Session("127.0.0.1", again.port, *login[2:], destinations=TEST_DESTINATIONS) as session:
        assert Pop3Sync(store, session, lambda _progress: None).run().messages_added == 0
    again.close()
    assert not any(command.startswith((b"RETR", b"TOP")) for command in again.commands)


LOGINS = {
    # A non-ASCII password goes as AUTHENTICATE PLAIN in UTF-8, where the server offers it.
    "non-ascii-password": ("", "Pässwort123", False),
    "non-ascii-user-name": ("jörg-", "Pässwort123", False),
    # User names and passwords with a backslash, a space or a quote go as escaped quoted strings.
    "user-name-needing-quotes": ('domain\\ "first" last-', 'pa"ss\\word 123', False),
    # Without AUTH=PLAIN a non-ASCII password goes in LOGIN as a literal.
    "literal-without-auth-plain": ("domain\\jörg-", "Pässwort123", True),
}


@pytest.mark.parametrize("case", LOGINS)
def test_imap_logs_in_with_any_user_name_and_password(client, user, dovecot, worker, case):
    # imaplib's login() sent the user name unquoted (BAD, reported as a refused login) and
    # encoded the password as ASCII (UnicodeEncodeError, "unexpected failure talking to host").
    prefix, password, hide_plain = LOGINS[case]
    mail_user = dovecot.add_user(f"{prefix}{secrets.token_hex(4)}", password)
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message(f"For {case}")))
    body = imap_account(dovecot, mail_user, emailAddress=f"login-{case}-{secrets.token_hex(4)}@example.com")
    proxy = None
    if hide_plain:
        proxy = CapabilityHidingProxy(dovecot.imap_port, hide=["AUTH=PLAIN"])
        body.update(hostname="127.0.0.1", port=proxy.port, encryption="none")
    account_id = create_account(client, user, body)
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "success", status
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    assert [m["subject"] for m in messages(client, user, account_id, inbox["id"])["messages"]] == [f"For {case}"]
    if proxy is not None:
        proxy.close()
        sent = b"".join(proxy.sent)
        assert b" LOGIN {" in sent and b"AUTHENTICATE" not in sent


def test_wrong_password_fails_in_words(client, runtime, user, dovecot, mail_user, worker):
    body = imap_account(dovecot, mail_user, password="definitely-wrong", isSyncEnabled=True, syncInterval=604800)
    account_id = create_account(client, user, body)
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "failure"
    assert status["error"].startswith("authentication failed") and "definitely-wrong" not in status["error"]
    account = client.get(f"/api/accounts/{account_id}", headers=user.headers).json()
    assert account["lastSyncAt"] is None and account["isSyncing"] is False
    # The account says why, and its automatic sync backs off hard: a refused login stays refused.
    assert account["lastSyncError"] == status["error"]
    assert account["nextSyncAt"] - account["lastSyncErrorAt"] >= 14 * 60 * 1000
    # A sync that failed is not run again by the task machinery.
    time.sleep(1.5)
    again = client.get(f"/api/sync/task/{status['taskId']}", headers=user.headers).json()
    assert again["status"] == "failure" and again["error"] == status["error"] and again["attempts"] == 1


def test_a_sync_that_fails_while_the_password_is_fixed_does_not_back_the_account_off(client, user, worker):
    # The server holds the login until the user has put the right password in, then refuses it:
    # the refusal is of the password just replaced.
    logging_in, password_fixed = threading.Event(), threading.Event()

    def answer(tag: bytes, command: bytes) -> bytes:
        if command == b"CAPABILITY":
            return b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n"
        if command == b"LOGIN":
            logging_in.set()
            password_fixed.wait(60)
            return tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        return tag + b" OK done\r\n"

    server = ScriptedImapServer(answer)
    body = scripted_account(server.port, "Being fixed", password="the-old-one", isSyncEnabled=True, syncInterval=604800)
    account_id = create_account(client, user, body)
    started = client.post(f"/api/sync/{account_id}", json={}, headers=user.headers)
    assert started.status_code == 202, started.text
    try:
        assert logging_in.wait(60)
        fixed = client.put(f"/api/accounts/{account_id}", json={"password": "the-new-one"}, headers=user.headers)
        assert fixed.status_code == 200, fixed.text
    finally:
        password_fixed.set()
    status = wait_task(client, user, started.json()["taskId"])
    assert status["status"] == "failure" and status["error"].startswith("authentication failed")
    # The task tells how that run ended; the account is not backed off for the old password.
    account = client.get(f"/api/accounts/{account_id}", headers=user.headers).json()
    assert account["lastSyncError"] is None
    assert account["nextSyncAt"] <= time.time() * 1000
    server.close()


def test_unreachable_server_fails_in_words(client, user, dovecot, mail_user, worker):
    port = free_port()
    account_id = create_account(client, user, imap_account(dovecot, mail_user, port=port))
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "failure" and status["error"] == f"connection refused by localhost:{port}"


@pytest.fixture
def untrusted_tls_server(tmp_path):
    """A TLS listener whose certificate comes from a CA the worker does not trust."""
    context = make_tls_files(tmp_path).server_context()
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"* OK untrusted\r\n")
            except (ssl.SSLError, OSError):
                pass

    thread_ = threading.Thread(target=serve, daemon=True)
    thread_.start()
    yield listener.getsockname()[1]
    stop.set()
    thread_.join()
    listener.close()


def test_untrusted_certificate_fails_in_words(client, user, dovecot, mail_user, worker, untrusted_tls_server):
    account_id = create_account(client, user, imap_account(dovecot, mail_user, port=untrusted_tls_server))
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "failure" and "certificate verify failed" in status["error"]


class CuttingProxy:
    """A TCP relay that drops the connection after ``limit`` bytes from the server, once armed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.limit: int | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            server = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.limit
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, limit), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while chunk := source.recv(65536):
                if limit is not None and sent + len(chunk) > limit:
                    break
                sink.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop.set()
        time.sleep(0.3)  # let the accept loop see the stop before its socket goes
        self.listener.close()


def test_server_gone_mid_sync_then_next_sync_is_exact(client, user, dovecot, mail_user, worker):
    mail = list(realistic_mix(300, seed=7))
    uids = dovecot.append_many(mail_user, "INBOX", mail)
    proxy = CuttingProxy(dovecot.imaps_port)
    try:
        account_id = create_account(client, user, imap_account(dovecot, mail_user, port=proxy.port))
        # Past the first batches of bodies (a batch is at most 8 MB), well before the end.
        proxy.limit = int(sum(len(raw) for raw in mail) * 0.75)
        broken, _ = run_sync(client, user, account_id)
        assert broken["status"] == "failure" and "localhost" in broken["error"], broken
        inbox = folders_by_name(client, user, account_id)["INBOX"]
        partial = messages(client, user, account_id, inbox["id"], limit=500)["pagination"]["total"]
        assert 0 < partial < len(uids)
        proxy.limit = None
        healed, _ = run_sync(client, user, account_id)
    finally:
        proxy.close()
    assert healed["status"] == "success" and healed["result"]["messagesAdded"] == len(uids) - partial
    listed = messages(client, user, account_id, inbox["id"], limit=500)
    assert listed["pagination"]["total"] == len(uids)
    assert len({m["subject"] for m in listed["messages"]}) == len(uids)


def test_tasks_folders_messages_and_attachments_are_invisible_to_others(client, user, synced, make_user, verifier):
    account_id, _, _ = synced
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    message = next(m for m in messages(client, user, account_id, inbox["id"])["messages"] if m["attachmentCount"])
    attachment = client.get(f"/api/{account_id}/messages/{message['id']}", headers=user.headers).json()["attachments"][
        0
    ]
    task = client.post(f"/api/sync/{account_id}", json={}, headers=user.headers).json()["taskId"]
    for stranger in (user.colleague(verifier), make_user()):
        for path in (
            f"/api/{account_id}/folders",
            f"/api/{account_id}/folders/{inbox['id']}/messages",
            f"/api/{account_id}/messages/{message['id']}",
            f"/api/{account_id}/attachments/{attachment['id']}/download",
            f"/api/sync/task/{task}",
        ):
            assert_error_shape(client.get(path, headers=stranger.headers), 404)
        assert_error_shape(client.post(f"/api/sync/{account_id}", json={}, headers=stranger.headers), 404)


LOCK_HOLDER = """
import sys, time
from email_service.db import Database
from email_service.queue.locks import AccountLock
lock = AccountLock(Database(sys.argv[1], sys.argv[2]), "crash-test")
assert lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_crashed_sync_does_not_hold_its_account_a_moment_longer(runtime, backing):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, backing.database_url, backing.db_app_role], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert not AccountLock(runtime.db, "crash-test").acquire()
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
        deadline = time.monotonic() + 5
        successor = AccountLock(runtime.db, "crash-test")
        while not successor.acquire():
            assert time.monotonic() < deadline, "the dead holder's lock was not released"
            time.sleep(0.05)
        successor.release()
    finally:
        holder.kill()


def test_scheduler_syncs_due_accounts_and_skips_disabled_ones(client, runtime, dovecot, make_user, worker):
    owner = make_user()
    enabled_user, disabled_user = dovecot.add_user(), dovecot.add_user()
    dovecot.append(enabled_user, "INBOX", to_bytes(plain_message("Scheduled")))
    enabled = create_account(client, owner, imap_account(dovecot, enabled_user, isSyncEnabled=True, syncInterval=60))
    disabled = create_account(client, owner, imap_account(dovecot, disabled_user, isSyncEnabled=False))
    scheduler = Scheduler(runtime, f"test-{os.getpid()}")
    runtime.redis.delete("email_service:scheduler-leader")
    scheduler.run_once()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        account = client.get(f"/api/accounts/{enabled}", headers=owner.headers).json()
        if account["lastSyncAt"]:
            break
        time.sleep(0.2)
    assert account["lastSyncAt"], "the scheduler did not sync the due account"
    assert client.get(f"/api/accounts/{disabled}", headers=owner.headers).json()["lastSyncAt"] is None
    # Synced just now: not due again until its interval has passed.
    due = {a.id for a in due_for_sync(runtime.db)}
    assert enabled not in due and disabled not in due
    client.put(f"/api/accounts/{enabled}", json={"isSyncEnabled": False}, headers=owner.headers)
    with runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE accounts SET next_sync_at = now() - interval '1 day' WHERE id = :id"), {"id": enabled}
        )
    assert enabled not in {a.id for a in due_for_sync(runtime.db)}


def test_worker_runs_the_scheduler_beside_it(backing, dovecot, tmp_path):
    env = service_env(backing, EMAIL_SERVICE_CA_FILE=str(dovecot.ca_file), EMAIL_SERVICE_DATA_DIR=str(backing.data_dir))
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        started = time.time() - 1
        proc = subprocess.Popen([sys.executable, "-m", "email_service", "worker"], env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "scheduler started" not in log.read_text():
                time.sleep(0.2)
        finally:
            # Stopped while it is still starting its pool: none of the pool's processes may stay behind.
            proc.terminate()
            proc.wait(timeout=20)
    assert "scheduler started" in Path(log).read_text()

    def left_behind() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline", "create_time", "status"])
            if (p.info["cmdline"] or [])[1:] == ["-m", "email_service", "worker"]
            and p.info["create_time"] >= started
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ]

    deadline = time.monotonic() + 15
    while left_behind() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left_behind() == []


def test_folder_names_sent_as_literals_come_through_exactly(client, runtime, user):
    # A server may send any folder name as a literal. Joined back into a line, a backslash in it
    # was read as an escape: "Work\\Q1" became "WorkQ1", and "C:\\" did not parse at all, so
    # the next sync removed that folder and its messages.
    names = ["Work\\Q1", "C:\\", 'Say "hi"', "Back\\\\slashes\\"]

    def answer(tag: bytes, command: bytes) -> bytes:
        untagged = b""
        if command == b"CAPABILITY":
            untagged = b"* CAPABILITY IMAP4rev1\r\n"
        elif command == b"LIST":
            untagged = b'* LIST (\\HasNoChildren) "/" INBOX\r\n' + b"".join(
                b'* LIST (\\HasNoChildren) "/" {%d}\r\n%s\r\n' % (len(name.encode()), name.encode()) for name in names
            )
        elif command == b"STATUS":
            untagged = b"* STATUS INBOX (MESSAGES 0 UIDNEXT 1 UIDVALIDITY 1 UNSEEN 0)\r\n"
        elif command == b"EXAMINE":
            untagged = b"* 0 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n* OK [UIDNEXT 1] ok\r\n"
        elif command == b"UID":
            untagged = b"* SEARCH\r\n"
        elif command == b"LOGOUT":
            untagged = b"* BYE\r\n"
        return untagged + tag + b" OK done\r\n"

    server = ScriptedImapServer(answer)
    body = scripted_account(server.port, "Literal folder names")
    account_id = create_account(client, user, body)
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    login = ("127.0.0.1", server.port, "none", "someone", "secret-password")
    with ImapSession(*login, destinations=TEST_DESTINATIONS) as session:
        result = ImapSync(store, session, lambda _progress: None).run()
    server.close()
    assert result.errors == [] and result.folders_synced == len(names) + 1
    assert sorted(store.folders()) == sorted(["INBOX", *names])
    # Every later command names each folder as the server listed it.
    examined = [line.split(b" ", 2)[2] for line in server.lines if line.split()[1].upper() == b"EXAMINE"]
    assert sorted(examined) == sorted(quote(name).encode() for name in ["INBOX", *names])


def searching_server(count: int) -> ScriptedImapServer:
    """One folder of ``count`` messages, whose UID SEARCH answers on one line."""
    uids = b" ".join(str(uid).encode() for uid in range(1, count + 1))
    untagged = {
        b"EXAMINE": b"* %d EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n* OK [UIDNEXT %d] ok\r\n" % (count, count + 1),
        b"UID": b"* SEARCH " + uids + b"\r\n",
        b"CAPABILITY": b"* CAPABILITY IMAP4rev1\r\n",
    }
    return ScriptedImapServer(lambda tag, command: untagged.get(command, b"") + tag + b" OK done\r\n")


def test_a_folder_of_200000_messages_lists_its_uids_and_the_session_goes_on():
    # One line of 1.3 MB: more than imaplib reads by default, which failed the folder and left
    # the rest of the line to be read as the next command's answer.
    server = searching_server(200_000)
    session = ImapSession(
        "127.0.0.1", server.port, "none", "user", "secret", timeout=10, destinations=TEST_DESTINATIONS
    )
    with session:
        session.examine("INBOX")
        uids = session.search_uids()
        assert len(uids) == 200_000 and uids[0] == 1 and uids[-1] == 200_000
        assert session.examine("INBOX").uidnext == 200_001
    server.close()


def test_a_fetch_the_server_answers_only_in_part_stores_the_rest_and_says_so(client, runtime, user):
    # A server that cannot read one message answers NO after sending the others (Gmail: "Some
    # messages could not be FETCHed"). That failed the whole folder, at the same message each time.
    raws = {uid: to_bytes(plain_message(f"Message {uid}")) for uid in (1, 2, 3)}

    def answer(tag: bytes, command: bytes) -> bytes:
        line = server.lines[-1].upper()
        untagged, done = b"", tag + b" OK done\r\n"
        if command == b"CAPABILITY":
            untagged = b"* CAPABILITY IMAP4rev1\r\n"
        elif command == b"LIST":
            untagged = b'* LIST (\\HasNoChildren) "/" INBOX\r\n'
        elif command == b"STATUS":
            untagged = b"* STATUS INBOX (MESSAGES 3 UIDNEXT 4 UIDVALIDITY 9 UNSEEN 3)\r\n"
        elif command == b"EXAMINE":
            untagged = b"* 3 EXISTS\r\n* OK [UIDVALIDITY 9] ok\r\n* OK [UIDNEXT 4] ok\r\n"
        elif b" SEARCH" in line:
            untagged = b"* SEARCH 1 2 3\r\n"
        elif b"RFC822.SIZE" in line:
            untagged = b"".join(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (u, u, len(r)) for u, r in raws.items())
        elif b"BODY.PEEK[]" in line:
            for uid in (3, 1):  # the broken message 2 is left out
                untagged += b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n" % (uid, uid, len(raws[uid]))
                untagged += raws[uid] + b")\r\n"
            done = tag + b" NO Some messages could not be FETCHed (Failure)\r\n"
        elif b" FLAGS" in line:
            untagged = b""
        elif command == b"LOGOUT":
            untagged = b"* BYE\r\n"
        return untagged + done

    server = ScriptedImapServer(answer)
    body = scripted_account(server.port, "Partial fetch")
    account_id = create_account(client, user, body)
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    login = ("127.0.0.1", server.port, "none", "someone", "secret-password")
    with ImapSession(*login, destinations=TEST_DESTINATIONS) as session:
        result = ImapSync(store, session, lambda _progress: None).run()
    server.close()
    assert result.messages_added == 2 and result.folders_synced == 1, result
    assert result.errors == [
        "Inbox: 1 new message(s) not given by the server this time (Some messages could not be FETCHed (Failure))"
    ]
    [inbox] = store.folders().values()
    assert store.uids(inbox) == {1, 3}
    assert inbox.uidnext is None  # the next sync looks again, and asks for message 2 once more


LARGE_FILE = ("big.bin", "application/octet-stream", b"x" * 60_000)


def test_a_message_over_the_size_limit_is_shown_by_its_headers_and_not_downloaded(
    client, runtime, user, dovecot, mail_user, monkeypatch
):
    # A message larger than a worker can hold would fail its folder's sync every time (and, out of
    # memory, the other jobs of its worker): it is not downloaded, the rest arrives, and it is
    # shown by its headers, where it used to be left out altogether.
    monkeypatch.setattr(imap_sync, "MAX_FETCHED_MESSAGE", 20_000)
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Small before")))
    huge = to_bytes(attachments_message("Huge", attachments=[LARGE_FILE]))
    dovecot.append(mail_user, "INBOX", huge, flags=["\\Flagged"])
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Small after")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    with imap_session(dovecot, mail_user) as session:
        result = ImapSync(store, session, lambda _progress: None, only_folders=["INBOX"]).run()
    assert result.messages_added == 3
    assert [e for e in result.errors if "not downloaded" in e] == [
        "Inbox: 1 message(s) over 19 KB not downloaded, shown by their headers (UID 2)"
    ]
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    listed = {m["subject"]: m for m in messages(client, user, account_id, inbox["id"])["messages"]}
    assert sorted(listed) == ["Huge", "Small after", "Small before"]
    huge = client.get(f"/api/{account_id}/messages/{listed['Huge']['id']}", headers=user.headers).json()
    assert (huge["from"], huge["fromName"], huge["isStarred"]) == ("alice@example.com", "Alice Example", True)
    assert huge["attachments"] == [] and "only its headers are shown" in huge["body"]
    assert "more than the 19 KB this service downloads" in huge["body"] and "eHh4eHh4" not in huge["body"]
    # Stored by its UID: not new at the next sync, and not said again.
    with imap_session(dovecot, mail_user) as session:
        again = ImapSync(store, session, lambda _progress: None, only_folders=["INBOX"]).run()
    assert again.messages_added == 0 and again.errors == []


def test_a_folder_listed_twice_keeps_its_role_and_is_synced_once(client, runtime, user):
    # Some servers list a folder more than once (and INBOX in another case besides): each is one
    # folder, and the later listing did not take away the role the first one was given.
    listing = [
        b'(\\HasNoChildren) "/" INBOX',
        b'(\\HasNoChildren \\Sent) "/" Sent',
        b'(\\HasNoChildren) "/" Archive',
        b'(\\HasNoChildren \\Sent) "/" Sent',
        b'(\\HasNoChildren) "/" Inbox',
        b'(\\HasNoChildren) "/" INBOX',
    ]

    def answer(tag: bytes, command: bytes) -> bytes:
        untagged = b""
        if command == b"CAPABILITY":
            untagged = b"* CAPABILITY IMAP4rev1\r\n"
        elif command == b"LIST":
            untagged = b"".join(b"* LIST " + line + b"\r\n" for line in listing)
        elif command == b"STATUS":
            untagged = b"* STATUS INBOX (MESSAGES 0 UIDNEXT 1 UIDVALIDITY 1 UNSEEN 0)\r\n"
        elif command == b"EXAMINE":
            untagged = b"* 0 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n* OK [UIDNEXT 1] ok\r\n"
        elif command == b"UID":
            untagged = b"* SEARCH\r\n"
        elif command == b"LOGOUT":
            untagged = b"* BYE\r\n"
        return untagged + tag + b" OK done\r\n"

    server = ScriptedImapServer(answer)
    account_id = create_account(client, user, scripted_account(server.port, "Folders listed twice"))
    store = MailStore(runtime.db, runtime.objects, user.principal, account_id)
    login = ("127.0.0.1", server.port, "none", "someone", "secret-password")
    with ImapSession(*login, destinations=TEST_DESTINATIONS) as session:
        result = ImapSync(store, session, lambda _progress: None).run()
    server.close()
    assert result.errors == [] and result.folders_synced == 3
    assert {name: folder.type for name, folder in store.folders().items()} == {
        "INBOX": "inbox",
        "Sent": "sent",
        "Archive": "custom",
    }
