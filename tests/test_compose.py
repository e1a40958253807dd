"""Sending and drafts end to end: API -> worker -> aiosmtpd / Dovecot, checked on arrival."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from email import message_from_bytes, policy

import pytest
from helpers import assert_error_shape
from mailservers import quote_mailbox
from messages import attachments_message, plain_message, to_bytes
from syncing import create_account, folders_by_name, imap_account, messages, run_sync

from email_service.api.app import create_app
from email_service.mail.parse import parse_message
from email_service.runtime import Runtime


@pytest.fixture
def client(sync_client):
    return sync_client


def smtp_account(dovecot, mail_user, smtp, **overrides) -> dict:
    """An IMAP account on Dovecot that sends through ``smtp`` (STARTTLS with AUTH)."""
    return imap_account(
        dovecot,
        mail_user,
        smtpHostname=dovecot.host,
        smtpPort=smtp.port,
        smtpEncryption="starttls",
        smtpUsername=smtp.username,
        smtpPassword=smtp.password,
        **overrides,
    )


@pytest.fixture
def mailbox(client, user, dovecot, mail_user, smtp_server, worker):
    """An IMAP account with SMTP settings, synced once (so its folders are known)."""
    smtp = smtp_server("starttls")
    body = smtp_account(dovecot, mail_user, smtp, accountName="Alice Älvsjö")
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message("Files to forward")))
    account_id = create_account(client, user, body)
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    return account_id, smtp


def wait_task(client, user, task_id, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/sync/task/{task_id}", headers=user.headers).json()
        if status["status"] in ("success", "failure"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"task still {status}")


def send(client, user, account_id, **fields):
    body = {"accountId": account_id, "to": ["bob@example.org"], "subject": "Hello", "body": "Hi Bob"}
    body.update(fields)
    return client.post("/api/compose/send", json=body, headers=user.headers)


def server_subjects(dovecot, mail_user, folder) -> list[tuple[str, set[str]]]:
    with dovecot.imap(mail_user) as other:
        other.select(quote_mailbox(folder), readonly=True)
        _, data = other.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    found = []
    for item in data:
        if isinstance(item, tuple):
            flags = set(re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode().split())
            subject = message_from_bytes(item[1], policy=policy.default)["Subject"]
            found.append((str(subject), flags))
    return found


def test_a_sent_message_arrives_correctly_and_sync_shows_one_sent_copy(client, user, dovecot, mail_user, mailbox):
    account_id, smtp = mailbox
    response = send(
        client,
        user,
        account_id,
        to=["bob@example.org"],
        cc=["carol@example.org"],
        bcc=["secret@example.org"],
        replyTo="replies@example.com",
        subject="Grüße – status",
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "pending"
    queued = client.get(f"/api/{account_id}/messages/{accepted['messageId']}", headers=user.headers).json()
    sent_folder = folders_by_name(client, user, account_id)["Sent"]
    assert queued["folderId"] == sent_folder["id"] and queued["deliveryStatus"] in ("queued", "sent")
    status = wait_task(client, user, accepted["taskId"])
    assert status["status"] == "success", status
    received = smtp.wait_for(1)[0]
    assert sorted(received.rcpt_tos) == ["bob@example.org", "carol@example.org", "secret@example.org"]
    arrived = message_from_bytes(received.data, policy=policy.default)
    assert arrived["Bcc"] is None and b"secret@example.org" not in received.data
    assert arrived["To"] == "bob@example.org" and arrived["Cc"] == "carol@example.org"
    assert arrived["From"].addresses[0].display_name == "Alice Älvsjö"
    assert arrived["Reply-To"] == "replies@example.com" and arrived["Subject"] == "Grüße – status"
    assert arrived["Message-ID"] and arrived["Date"]
    assert received.auth_login == smtp.username and received.tls
    detail = client.get(f"/api/{account_id}/messages/{accepted['messageId']}", headers=user.headers).json()
    assert detail["deliveryStatus"] == "sent"
    assert [s for s, _ in server_subjects(dovecot, mail_user, "Sent")] == ["Grüße – status"]
    run_sync(client, user, account_id)
    listed = messages(client, user, account_id, sent_folder["id"])["messages"]
    assert [m["subject"] for m in listed] == ["Grüße – status"]


def test_html_with_uploaded_and_forwarded_attachments_arrives_byte_identical(client, user, mailbox):
    account_id, smtp = mailbox
    data = bytes(range(256)) * 100
    upload = client.post(
        f"/api/{account_id}/attachments",
        files={"file": ("Übersicht.bin", data, "application/x-test")},
        headers=user.headers,
    ).json()
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    original = messages(client, user, account_id, inbox["id"])["messages"][0]
    received_files = client.get(f"/api/{account_id}/messages/{original['id']}", headers=user.headers).json()
    pdf = next(a for a in received_files["attachments"] if a["mimeType"] == "application/pdf")
    pdf_bytes = client.get(f"/api/{account_id}/attachments/{pdf['id']}/download", headers=user.headers).content
    response = send(
        client,
        user,
        account_id,
        subject="With files",
        isHtml=True,
        body="<p>See <b>attached</b></p><script>alert(1)</script>",
        attachmentIds=[upload["id"], pdf["id"]],
    )
    assert wait_task(client, user, response.json()["taskId"])["status"] == "success"
    parsed = parse_message(smtp.wait_for(1)[0].data)
    files = {a.filename: a.data for a in parsed.attachments}
    assert files["Übersicht.bin"] == data and files[pdf["filename"]] == pdf_bytes
    assert "attached" in parsed.text_body and "<b>attached</b>" in (parsed.html_body or "")
    shown = client.get(f"/api/{account_id}/messages/{response.json()['messageId']}", headers=user.headers).json()
    assert "<script" not in (shown["bodyHtml"] or "") and shown["attachmentCount"] == 2


def test_a_reply_carries_threading_headers(client, user, mailbox, dovecot, mail_user):
    account_id, smtp = mailbox
    dovecot.append(
        mail_user,
        "INBOX",
        to_bytes(plain_message("Question", message_id="<q-1@example.com>", references=["<root@example.com>"])),
    )
    run_sync(client, user, account_id)
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    question = next(
        m for m in messages(client, user, account_id, inbox["id"])["messages"] if m["subject"] == "Question"
    )
    response = send(client, user, account_id, subject="Re: Question", inReplyTo=question["id"])
    assert wait_task(client, user, response.json()["taskId"])["status"] == "success"
    arrived = message_from_bytes(smtp.wait_for(1)[0].data, policy=policy.default)
    assert arrived["In-Reply-To"] == "<q-1@example.com>"
    assert arrived["References"].split() == ["<root@example.com>", "<q-1@example.com>"]


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "Hi\r\nBcc: victim@example.com"},
        {"to": ["bob@example.org\r\nBcc: victim@example.com"]},
        {"cc": ["carol@example.org\nX-Injected: yes"]},
        {"replyTo": "a@example.com\r\nBcc: victim@example.com"},
    ],
)
def test_header_injection_is_refused_and_nothing_is_queued(client, user, mailbox, fields):
    account_id, smtp = mailbox
    sent = folders_by_name(client, user, account_id)["Sent"]["id"]
    before = messages(client, user, account_id, sent)["pagination"]["total"]
    assert_error_shape(send(client, user, account_id, **fields), 400)
    assert messages(client, user, account_id, sent)["pagination"]["total"] == before
    time.sleep(0.5)
    assert smtp.messages == []


def test_bad_sends_are_refused_before_queueing(client, user, mailbox, make_user, verifier):
    account_id, _ = mailbox
    assert_error_shape(send(client, user, account_id, to=["two@at@example.com"]), 400, "INVALID_EMAIL_FORMAT")
    assert_error_shape(send(client, user, account_id, attachmentIds=["nope"]), 404, "ATTACHMENT_NOT_FOUND")
    assert_error_shape(send(client, user, account_id, inReplyTo="nope"), 404, "MESSAGE_NOT_FOUND")
    for stranger in (user.colleague(verifier), make_user()):
        assert_error_shape(send(client, stranger, account_id), 404)
        draft = {"accountId": account_id, "to": ["bob@example.org"], "subject": "Mine?", "body": "x"}
        assert_error_shape(client.post("/api/compose/draft", json=draft, headers=stranger.headers), 404)
        upload = client.post(f"/api/{account_id}/attachments", files={"file": ("x", b"x")}, headers=user.headers)
        own = create_account(
            client,
            stranger,
            {
                "accountName": "S",
                "emailAddress": f"s-{stranger.principal.user_id}@example.com",
                "protocol": "imap",
                "hostname": "imap.example.com",
                "port": 993,
                "encryption": "tls",
                "username": "s",
                "password": "password1",
                "smtpHostname": "smtp.example.com",
            },
        )
        taken = send(client, stranger, own, attachmentIds=[upload.json()["id"]])
        assert_error_shape(taken, 404, "ATTACHMENT_NOT_FOUND")
    no_smtp = create_account(
        client,
        user,
        {
            "accountName": "N",
            "emailAddress": "nosmtp@example.com",
            "protocol": "imap",
            "hostname": "imap.example.com",
            "port": 993,
            "encryption": "tls",
            "username": "n",
            "password": "password1",
        },
    )
    assert_error_shape(send(client, user, no_smtp), 409, "SMTP_NOT_CONFIGURED")


def test_a_message_above_the_size_limit_is_413(backing, user, mailbox):
    account_id, _ = mailbox
    small = Runtime.build(replace(backing, max_message_bytes=100, rate_limits_enabled=False))
    try:
        with create_app(small).test_client() as limited:
            response = send(limited, user, account_id, body="x" * 200)
            assert_error_shape(response, 413, "PAYLOAD_TOO_LARGE")
    finally:
        small.close()


def test_temporary_failures_are_retried_until_delivered_once(client, user, dovecot, mail_user, smtp_server, worker):
    smtp = smtp_server("starttls", temp_failures=2)
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    response = send(client, user, account_id, subject="Try again")
    status = wait_task(client, user, response.json()["taskId"], timeout=90)
    assert status["status"] == "success", status
    assert smtp.attempts == 3 and len(smtp.messages) == 1


def test_permanent_failure_fails_at_once_with_the_servers_reply(client, user, dovecot, mail_user, smtp_server, worker):
    smtp = smtp_server("starttls", reject=True)
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    response = send(client, user, account_id, subject="Rejected")
    status = wait_task(client, user, response.json()["taskId"])
    assert status["status"] == "failure" and "550" in status["error"]
    time.sleep(2)
    assert smtp.attempts == 1 and smtp.messages == []
    detail = client.get(f"/api/{account_id}/messages/{response.json()['messageId']}", headers=user.headers).json()
    assert detail["deliveryStatus"] == "failed"


def test_a_draft_is_stored_and_filed_on_the_server_with_the_draft_flag(client, user, dovecot, mail_user, mailbox):
    account_id, smtp = mailbox
    response = client.post(
        "/api/compose/draft",
        json={"accountId": account_id, "to": ["bob@example.org"], "subject": "Half written", "body": "Dear Bob,"},
        headers=user.headers,
    )
    assert response.status_code == 201, response.text
    draft = response.json()
    assert draft["accountId"] == account_id and draft["createdAt"] > 0
    drafts = folders_by_name(client, user, account_id)["Drafts"]
    listed = messages(client, user, account_id, drafts["id"])["messages"]
    assert [m["id"] for m in listed] == [draft["draftId"]]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not server_subjects(dovecot, mail_user, "Drafts"):
        time.sleep(0.2)
    [(subject, flags)] = server_subjects(dovecot, mail_user, "Drafts")
    assert subject == "Half written" and "\\Draft" in flags
    run_sync(client, user, account_id)
    assert len(messages(client, user, account_id, drafts["id"])["messages"]) == 1
    assert smtp.messages == []
