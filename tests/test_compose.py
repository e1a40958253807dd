"""Sending and drafts end to end: API -> worker -> aiosmtpd / Dovecot, checked on arrival."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from email import message_from_bytes, policy

import pytest
from helpers import assert_error_shape
from mailservers import AnswerLosingProxy, quote_mailbox
from messages import attachments_message, plain_message, to_bytes
from sqlalchemy import text
from syncing import (
    create_account,
    eventually,
    folders_by_name,
    imap_account,
    messages,
    run_sync,
    smtp_account,
    tasks_of,
    wait_task,
)

from email_service.api.app import create_app
from email_service.mail.parse import parse_message
from email_service.models import TaskKind, TaskStatus
from email_service.outgoing import jobs
from email_service.protocols.smtp import SmtpSession
from email_service.queue import tasks
from email_service.queue.locks import AccountLock
from email_service.queue.runner import TaskContext, reap, run_failure_hook
from email_service.queue.tasks import TaskDeferred, TaskFailed, TaskRetry
from email_service.runtime import Runtime


@pytest.fixture
def client(sync_client):
    return sync_client


@pytest.fixture
def mailbox(client, user, dovecot, mail_user, smtp_server, worker):
    """An IMAP account with SMTP settings, synced once (so its folders are known)."""
    smtp = smtp_server("starttls")
    body = smtp_account(dovecot, mail_user, smtp, accountName="Alice Älvsjö")
    dovecot.append(mail_user, "INBOX", to_bytes(attachments_message("Files to forward")))
    account_id = create_account(client, user, body)
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    return account_id, smtp


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


WRITTEN_HTML = (
    "<html><head><style>.note { color: #c00 }</style></head><body>\n"
    '<p class="note">Hi <a href="https://example.org/r" target="_blank">Bob</a></p>\n'
    '<img src="data:image/png;base64,iVBORw0KGgo=" alt="dot">\n'
    "<script>track()</script></body></html>\n"
)


def _html_part(raw: bytes) -> str:
    arrived = message_from_bytes(raw, policy=policy.default)
    return arrived.get_body(preferencelist=("html",)).get_content()


def test_html_goes_out_and_into_drafts_as_written_and_is_shown_sanitised(client, user, dovecot, mail_user, mailbox):
    account_id, smtp = mailbox
    response = send(client, user, account_id, subject="Styled", isHtml=True, body=WRITTEN_HTML)
    assert wait_task(client, user, response.json()["taskId"])["status"] == "success"
    # The recipient gets every byte the user wrote (only line ends canonicalised by MIME).
    assert _html_part(smtp.wait_for(1)[0].data).replace("\r\n", "\n") == WRITTEN_HTML
    shown = client.get(f"/api/{account_id}/messages/{response.json()['messageId']}", headers=user.headers).json()
    for unsafe in ("<style", "<script", "track()", "data:image"):
        assert unsafe not in shown["bodyHtml"]
    assert "Bob</a>" in shown["bodyHtml"] and "Hi" in shown["body"]

    draft = client.post(
        "/api/compose/draft",
        json={
            "accountId": account_id,
            "to": ["bob@example.org"],
            "subject": "Styled draft",
            "body": WRITTEN_HTML,
            "isHtml": True,
        },
        headers=user.headers,
    )
    assert draft.status_code == 201, draft.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not server_subjects(dovecot, mail_user, "Drafts"):
        time.sleep(0.2)
    with dovecot.imap(mail_user) as other:
        other.select(quote_mailbox("Drafts"), readonly=True)
        _, data = other.uid("FETCH", "1:*", "(BODY.PEEK[])")
    [filed] = [item[1] for item in data if isinstance(item, tuple)]
    assert _html_part(filed).replace("\r\n", "\n") == WRITTEN_HTML
    shown_draft = client.get(f"/api/{account_id}/messages/{draft.json()['draftId']}", headers=user.headers).json()
    assert "<style" not in shown_draft["bodyHtml"] and "class=" not in shown_draft["bodyHtml"]


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


def test_a_reply_keeps_the_references_it_goes_out_with_not_the_whole_thread(client, user, mailbox, dovecot, mail_user):
    # Each reply stored every id of the original's References (anyone can send thousands, and a
    # long thread grows them), though only 30 go out: megabytes a reply, and more with each.
    account_id, smtp = mailbox
    thread = [f"<t{i}@example.com>" for i in range(2000)]
    dovecot.append(
        mail_user, "INBOX", to_bytes(plain_message("Long thread", message_id="<last@example.com>", references=thread))
    )
    run_sync(client, user, account_id)
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    last = next(m for m in messages(client, user, account_id, inbox["id"])["messages"] if m["subject"] == "Long thread")
    saved = client.post(
        "/api/compose/draft",
        json={
            "accountId": account_id,
            "to": ["bob@example.org"],
            "subject": "Re: Long thread",
            "body": "Yes",
            "inReplyTo": last["id"],
        },
        headers=user.headers,
    )
    assert saved.status_code == 201, saved.text
    stored = client.get(f"/api/{account_id}/messages/{saved.json()['draftId']}", headers=user.headers).json()
    references = stored["headers"]["References"].split()
    assert len(references) == 30 and references[0] == "<t0@example.com>" and references[-1] == "<last@example.com>"
    assert references[-2] == "<t1999@example.com>" and stored["headers"]["In-Reply-To"] == "<last@example.com>"
    raw = message_from_bytes(
        client.get(f"/api/{account_id}/messages/{saved.json()['draftId']}/raw", headers=user.headers).content
    )
    assert raw["References"].split() == references


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


def test_a_subject_typed_as_encoded_words_arrives_as_typed(client, user, dovecot, mail_user, mailbox):
    # Text that looks like an RFC 2047 encoded word is sent encoded itself: the recipient sees
    # what was typed, not its decoding, and nothing in it can become a header.
    account_id, smtp = mailbox
    typed = ["=?utf-8?q?caf=C3=A9?=", "=?utf-8?q?Hi=0D=0ABcc:_victim@example.com?="]
    for subject in typed:
        response = send(client, user, account_id, subject=subject)
        assert response.status_code == 202, response.text
        assert wait_task(client, user, response.json()["taskId"])["status"] == "success"
    received = smtp.wait_for(2)
    assert all(r.rcpt_tos == ["bob@example.org"] for r in received)
    arrived = [message_from_bytes(r.data, policy=policy.default) for r in received]
    assert sorted(str(m["Subject"]) for m in arrived) == sorted(typed)
    assert all(m["Bcc"] is None for m in arrived)
    assert sorted(s for s, _ in server_subjects(dovecot, mail_user, "Sent")) == sorted(typed)


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


@pytest.mark.parametrize("fail_at", ["mail", "rcpt", "data"])
def test_temporary_failures_are_retried_until_delivered_once(
    client, user, dovecot, mail_user, smtp_server, worker, fail_at
):
    # 451 to MAIL, to RCPT, or to the end of the data: each says the message was not accepted.
    smtp = smtp_server("starttls", temp_failures=2, fail_at=fail_at)
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


def test_a_message_written_here_downloads_as_it_goes_out(client, user, mailbox):
    account_id, smtp = mailbox
    saved = client.post(
        "/api/compose/draft",
        json={
            "accountId": account_id,
            "to": ["bob@example.org"],
            "bcc": ["hidden@example.org"],
            "subject": "Draft to save",
            "body": "Dear Bob,",
        },
        headers=user.headers,
    )
    assert saved.status_code == 201, saved.text
    draft_id = saved.json()["draftId"]
    raw = client.get(f"/api/{account_id}/messages/{draft_id}/raw", headers=user.headers)
    assert raw.status_code == 200 and raw.headers["content-type"] == "message/rfc822", raw.text
    written = message_from_bytes(raw.content, policy=policy.default)
    shown = client.get(f"/api/{account_id}/messages/{draft_id}", headers=user.headers).json()
    assert written["Subject"] == "Draft to save" and written["To"] == "bob@example.org"
    assert written["Bcc"] is None and "hidden@example.org" not in raw.text
    assert written.get_content().strip() == "Dear Bob," and shown["subject"] == written["Subject"]
    # The same message each time: the Message-ID it has and will go out with.
    again = client.get(f"/api/{account_id}/messages/{draft_id}/raw", headers=user.headers)
    assert written["Message-ID"] and message_from_bytes(again.content)["Message-ID"] == written["Message-ID"]


def test_a_draft_whose_append_answer_was_lost_is_filed_once(
    client, send_runtime, user, dovecot, mail_user, worker, monkeypatch
):
    # The server stored the draft, and the connection dropped before its answer: the retry
    # filed it again, and the next sync showed the draft twice.
    proxy = AnswerLosingProxy(dovecot.imap_port, b"APPEND")
    body = imap_account(dovecot, mail_user, hostname="127.0.0.1", port=proxy.port, encryption="none")
    account_id = create_account(client, user, body)
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    with monkeypatch.context() as held:
        held.setattr(tasks, "push", lambda *args, **kwargs: None)  # the test runs the draft's job itself
        saved = client.post(
            "/api/compose/draft",
            json={"accountId": account_id, "to": ["bob@example.org"], "subject": "Filed once", "body": "Hi"},
            headers=user.headers,
        )
    assert saved.status_code == 201, saved.text
    draft_id = saved.json()["draftId"]
    with send_runtime.db.maintenance_session() as session:
        task_id = session.scalar(text("SELECT id FROM tasks WHERE message_id = :id"), {"id": draft_id})
    context = TaskContext(
        runtime=send_runtime,
        task_id=task_id,
        kind=TaskKind.DRAFT,
        principal=user.principal,
        account_id=account_id,
        message_id=draft_id,
        params={},
        attempt=1,
        carrier_id="first",
    )
    with pytest.raises(TaskRetry):
        jobs.run_draft(context)
    assert proxy.lost.is_set()
    assert [subject for subject, _ in server_subjects(dovecot, mail_user, "Drafts")] == ["Filed once"]
    jobs.run_draft(replace(context, attempt=2, carrier_id="second"))
    proxy.close()
    assert [subject for subject, _ in server_subjects(dovecot, mail_user, "Drafts")] == ["Filed once"]
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    drafts = folders_by_name(client, user, account_id)["Drafts"]
    assert [m["id"] for m in messages(client, user, account_id, drafts["id"])["messages"]] == [draft_id]


def proxied_smtp_account(dovecot, mail_user, smtp, proxy) -> dict:
    """An account whose IMAP side goes through ``proxy`` (plain text) and which sends through ``smtp``."""
    return smtp_account(dovecot, mail_user, smtp, hostname="127.0.0.1", port=proxy.port, encryption="none")


def until_the_account_is_free(run, timeout: float = 30.0):
    """``run()`` again while it waits for the account (the sync's worker lets go of it just after its end)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return run()
        except TaskDeferred:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def sent_on_server(dovecot, mail_user, subject: str) -> int:
    return sum(1 for found, _ in server_subjects(dovecot, mail_user, "Sent") if found == subject)


def test_a_sent_copy_whose_append_answer_was_lost_is_filed_once_by_the_next_try(
    client, user, dovecot, mail_user, smtp_server, worker
):
    # The Sent copy's APPEND reached the server and its answer was lost: the task ended with
    # "not filed", and the copy the server had was never tied to the message.
    smtp = smtp_server("starttls", unknown_recipients=["ghost@example.org"])
    proxy = AnswerLosingProxy(dovecot.imap_port, b"APPEND")
    account_id = create_account(client, user, proxied_smtp_account(dovecot, mail_user, smtp, proxy))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    accepted = send(client, user, account_id, subject="Copied once", to=["bob@example.org", "ghost@example.org"])
    status = wait_task(client, user, accepted.json()["taskId"], timeout=90)
    proxy.close()
    assert proxy.lost.is_set()
    assert status["status"] == "success", status
    # The try that filed the copy reports what the delivering try learnt; nothing went out twice.
    assert status["result"] == {
        "delivered": True,
        "refusedRecipients": {"ghost@example.org": "550 5.1.1 No such user here"},
        "sentCopy": "filed in Sent",
    }
    assert len(smtp.messages) == 1 and sent_on_server(dovecot, mail_user, "Copied once") == 1


def test_a_sync_between_a_lost_append_answer_and_the_next_try_leaves_one_sent_copy(
    client, send_runtime, user, dovecot, mail_user, smtp_server, worker, monkeypatch
):
    smtp = smtp_server("starttls")
    proxy = AnswerLosingProxy(dovecot.imap_port, b"APPEND")
    account_id = create_account(client, user, proxied_smtp_account(dovecot, mail_user, smtp, proxy))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    with monkeypatch.context() as held:
        held.setattr(tasks, "push", lambda *args, **kwargs: None)  # the test runs the send's tries itself
        accepted = send(client, user, account_id, subject="Synced in between").json()
    first = run_as(send_runtime, user, accepted, "first")
    with pytest.raises(TaskRetry, match="delivered; the copy is not filed in Sent yet") as retry:
        jobs.run_send(first)
    assert retry.value.otherwise["delivered"] is True
    assert retry.value.otherwise["sentCopy"].startswith("not filed on the server")
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "sent"
    # A sync before the next try takes the server's copy for a new message.
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    sent = folders_by_name(client, user, account_id)["Sent"]["id"]
    assert len(messages(client, user, account_id, sent)["messages"]) == 2
    second = replace(run_as(send_runtime, user, accepted, "second"), attempt=2)
    assert until_the_account_is_free(lambda: jobs.run_send(second))["sentCopy"] == "filed in Sent"
    proxy.close()
    assert len(smtp.messages) == 1 and sent_on_server(dovecot, mail_user, "Synced in between") == 1
    listed = messages(client, user, account_id, sent)
    assert [m["id"] for m in listed["messages"]] == [accepted["messageId"]] and listed["pagination"]["total"] == 1
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    assert [m["id"] for m in messages(client, user, account_id, sent)["messages"]] == [accepted["messageId"]]


def lose_the_first_sent_copy_answer(
    client, send_runtime, user, dovecot, mail_user, smtp, monkeypatch, subject, *also_to
):
    """An account whose first APPEND answer is lost, and the first try of a send to it: delivered,
    its copy on the server but not tied to the message. Returns (proxy, account, accepted)."""
    proxy = AnswerLosingProxy(dovecot.imap_port, b"APPEND")
    account_id = create_account(client, user, proxied_smtp_account(dovecot, mail_user, smtp, proxy))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    with monkeypatch.context() as held:
        held.setattr(tasks, "push", lambda *args, **kwargs: None)  # the test runs the send's tries itself
        accepted = send(client, user, account_id, subject=subject, to=["bob@example.org", *also_to]).json()
    with pytest.raises(TaskRetry):
        jobs.run_send(run_as(send_runtime, user, accepted, "first"))
    assert len(smtp.messages) == 1 and proxy.lost.is_set()
    return proxy, account_id, accepted


def test_a_delivered_message_deleted_before_its_copy_is_filed_still_ends_its_task_delivered(
    client, send_runtime, user, dovecot, mail_user, smtp_server, worker, monkeypatch
):
    smtp = smtp_server("starttls", unknown_recipients=["ghost@example.org"])
    proxy, account_id, accepted = lose_the_first_sent_copy_answer(
        client, send_runtime, user, dovecot, mail_user, smtp, monkeypatch, "Deleted before filing", "ghost@example.org"
    )
    proxy.close()
    gone = client.delete(
        f"/api/{account_id}/messages/{accepted['messageId']}", params={"permanent": "true"}, headers=user.headers
    )
    assert gone.status_code in (200, 204), gone.text
    second = replace(run_as(send_runtime, user, accepted, "second"), attempt=2)
    # The message went out: the try that could not file its copy does not fail the send.
    result = until_the_account_is_free(lambda: jobs.run_send(second))
    assert result["delivered"] is True and result["refusedRecipients"] == {
        "ghost@example.org": "550 5.1.1 No such user here"
    }
    assert result["sentCopy"] == "not filed on the server: the message or its account no longer exists"
    assert len(smtp.messages) == 1


def test_a_copy_the_user_deleted_after_a_sync_took_it_does_not_take_the_sent_message_with_it(
    client, send_runtime, user, dovecot, mail_user, smtp_server, worker, monkeypatch
):
    smtp = smtp_server("starttls")
    proxy, account_id, accepted = lose_the_first_sent_copy_answer(
        client, send_runtime, user, dovecot, mail_user, smtp, monkeypatch, "Deleted duplicate"
    )
    # A sync takes the server's copy for a new message, and the user deletes that one for good
    # before the write-back tells the server (held back here).
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    sent = folders_by_name(client, user, account_id)["Sent"]["id"]
    [duplicate] = [
        m["id"] for m in messages(client, user, account_id, sent)["messages"] if m["id"] != accepted["messageId"]
    ]
    with monkeypatch.context() as held:
        held.setattr(tasks, "push", lambda *args, **kwargs: None)
        gone = client.delete(
            f"/api/{account_id}/messages/{duplicate}", params={"permanent": "true"}, headers=user.headers
        )
    assert gone.status_code in (200, 204), gone.text
    second = replace(run_as(send_runtime, user, accepted, "second"), attempt=2)
    until_the_account_is_free(lambda: jobs.run_send(second))
    # The deletion reaches the server, and the message written here stays: the UID deleted was
    # never given to it.
    for task in tasks_of(send_runtime, account_id):
        if task.kind == TaskKind.WRITEBACK and task.status.active:
            tasks.push(send_runtime, task.id, user.principal, task.kind)
    assert eventually(lambda: sent_on_server(dovecot, mail_user, "Deleted duplicate") == 0, 30)
    final = run_sync(client, user, account_id)[0]
    proxy.close()
    assert final["status"] == "success", final
    kept = client.get(f"/api/{account_id}/messages/{accepted['messageId']}", headers=user.headers)
    assert kept.status_code == 200, kept.text
    assert kept.json()["deliveryStatus"] == "sent" and kept.json()["folderId"] == sent


def test_refused_recipients_are_reported_when_the_copy_waited_for_a_running_sync(
    client, runtime, user, dovecot, mail_user, smtp_server, worker
):
    smtp = smtp_server("starttls", unknown_recipients=["ghost@example.org"])
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    lock = AccountLock(runtime.db, account_id)
    assert lock.acquire()  # as a running sync holds it: delivery goes ahead, the copy waits
    try:
        accepted = send(client, user, account_id, subject="Waited", to=["bob@example.org", "ghost@example.org"])
        assert eventually(lambda: len(smtp.messages) == 1, 60)
    finally:
        lock.release()
    status = wait_task(client, user, accepted.json()["taskId"], timeout=90)
    assert status["status"] == "success", status
    assert status["result"] == {
        "delivered": True,
        "refusedRecipients": {"ghost@example.org": "550 5.1.1 No such user here"},
        "sentCopy": "filed in Sent",
    }


def test_a_copy_that_cannot_be_filed_for_a_reason_of_its_own_leaves_the_send_delivered(
    client, send_runtime, user, dovecot, mail_user, smtp_server, worker, monkeypatch
):
    # The password stopped decrypting (its key was retired) between delivery and filing: the
    # message went out, and the task failed "the stored password cannot be decrypted".
    smtp = smtp_server("starttls")
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    with monkeypatch.context() as held:
        held.setattr(tasks, "push", lambda *args, **kwargs: None)  # the test runs the send's job itself
        accepted = send(client, user, account_id, subject="Filed or not").json()
    deliver = SmtpSession.send

    def deliver_then_retire_the_key(session, *args, **kwargs):
        outcome = deliver(session, *args, **kwargs)
        with send_runtime.db.maintenance_session() as db:
            db.execute(
                text("UPDATE accounts SET password_encrypted = :sealed WHERE id = :id"),
                {"sealed": b"sealed under a retired key", "id": account_id},
            )
        return outcome

    monkeypatch.setattr(SmtpSession, "send", deliver_then_retire_the_key)
    result = jobs.run_send(run_as(send_runtime, user, accepted, "only"))
    assert result["delivered"] is True and len(smtp.messages) == 1
    assert result["sentCopy"].startswith("not filed on the server: the stored password cannot be decrypted")
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "sent"


def test_a_pop3_accounts_sent_mail_and_drafts_outlive_its_syncs(client, user, dovecot, mail_user, smtp_server, worker):
    # The server has INBOX alone: each POP3 sync deleted the Sent and Drafts folders made here,
    # with every message in them.
    smtp = smtp_server("starttls")
    body = smtp_account(dovecot, mail_user, smtp, protocol="pop3", port=dovecot.pop3s_port)
    account_id = create_account(client, user, body)
    accepted = send(client, user, account_id, subject="Sent from POP3").json()
    assert wait_task(client, user, accepted["taskId"], timeout=60)["status"] == "success"
    draft = client.post(
        "/api/compose/draft",
        json={"accountId": account_id, "to": ["bob@example.org"], "subject": "Draft on POP3", "body": "Later"},
        headers=user.headers,
    )
    assert draft.status_code == 201, draft.text
    for _ in range(2):
        assert run_sync(client, user, account_id)[0]["status"] == "success"
    folders = folders_by_name(client, user, account_id)
    assert {"INBOX", "Sent", "Drafts"} <= set(folders)
    assert [m["id"] for m in messages(client, user, account_id, folders["Sent"]["id"])["messages"]] == [
        accepted["messageId"]
    ]
    assert [m["id"] for m in messages(client, user, account_id, folders["Drafts"]["id"])["messages"]] == [
        draft.json()["draftId"]
    ]


def sent_detail(client, user, account_id, message_id) -> dict:
    return client.get(f"/api/{account_id}/messages/{message_id}", headers=user.headers).json()


def test_no_reply_to_the_final_dot_is_ambiguous_and_only_an_explicit_retry_sends_again(
    client, user, make_user, dovecot, mail_user, smtp_server, worker
):
    # The test worker waits 4 s for the reply to the final dot; this server takes 6 s, then accepts.
    smtp = smtp_server("starttls", silent_after_data=6)
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    accepted = send(client, user, account_id, subject="Did it go?").json()
    status = wait_task(client, user, accepted["taskId"], timeout=60)
    assert status["status"] == "failure"
    assert "may or may not have been accepted" in status["error"] and status["attempts"] == 1
    detail = sent_detail(client, user, account_id, accepted["messageId"])
    assert detail["deliveryStatus"] == "ambiguous"
    assert smtp.wait_for(1, timeout=15)[0].rcpt_tos == ["bob@example.org"]  # it did arrive
    time.sleep(3)  # more than the first retry's wait: nothing is sent again on its own
    assert smtp.attempts == 1 and len(smtp.messages) == 1

    other = make_user()
    path = f"/api/{account_id}/messages/{accepted['messageId']}/send"
    assert_error_shape(client.post(path, headers=other.headers), 404)
    smtp.silent_after_data = 0
    again = client.post(path, headers=user.headers)
    assert again.status_code == 202, again.text
    assert again.json()["messageId"] == accepted["messageId"] and again.json()["taskId"] != accepted["taskId"]
    assert wait_task(client, user, again.json()["taskId"])["status"] == "success"
    assert len(smtp.messages) == 2  # the caller asked for it
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "sent"
    assert_error_shape(client.post(path, headers=user.headers), 409, "NOT_RETRYABLE")


def test_a_send_whose_worker_was_lost_after_the_data_went_out_is_ambiguous(
    client, runtime, user, dovecot, mail_user, smtp_server, worker
):
    smtp = smtp_server("starttls")
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    # What a worker killed between sending the data and reading the reply leaves behind: the
    # message marked as going out, and its task started with a heartbeat that stopped.
    with runtime.db.tenant_session(user.principal) as session:
        session.execute(text("UPDATE accounts SET smtp_port = 1 WHERE id = :id"), {"id": account_id})
    accepted = send(client, user, account_id, subject="Lost in flight").json()
    wait_task(client, user, accepted["taskId"], until=("retry", "failure"))
    with runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE messages SET delivery_status = 'sending' WHERE id = :id"), {"id": accepted["messageId"]}
        )
        session.execute(
            text(
                "UPDATE tasks SET status = 'started', heartbeat_at = now() - interval '2 minutes',"
                " carrier_id = 'dead', run_after = NULL WHERE id = :id"
            ),
            {"id": accepted["taskId"]},
        )
        session.execute(
            text("UPDATE accounts SET smtp_port = :port WHERE id = :id"), {"id": account_id, "port": smtp.port}
        )
    reap(runtime)
    status = wait_task(client, user, accepted["taskId"])
    assert status["status"] == "failure" and "may or may not have accepted it" in status["error"]
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "ambiguous"
    time.sleep(2)
    assert smtp.attempts == 0  # never sent again on a guess


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "line\u2028separator"},
        {"subject": "vertical\x0btab"},
        {"subject": "next\x85line"},
        {"to": ["jörg@example.org"]},
        {"bcc": ["zoë@example.org"]},
    ],
)
def test_what_the_builder_would_refuse_is_400_and_nothing_is_queued(client, user, mailbox, fields):
    account_id, smtp = mailbox
    sent = folders_by_name(client, user, account_id)["Sent"]["id"]
    before = messages(client, user, account_id, sent)["pagination"]["total"]
    body = assert_error_shape(send(client, user, account_id, **fields), 400)
    # The schema refuses what it can describe (the subject's characters); the builder's own
    # checks, run before queueing, refuse the rest (a local part that would need SMTPUTF8).
    assert re.search(r"subject contains characters|must not contain|non-ASCII local part", body["message"])
    assert messages(client, user, account_id, sent)["pagination"]["total"] == before
    time.sleep(0.5)
    assert smtp.attempts == 0


def test_an_account_name_that_cannot_be_a_header_is_refused(client, runtime, user, mailbox):
    account_id, smtp = mailbox
    renamed = client.put(f"/api/accounts/{account_id}", json={"accountName": "Alice\u2028Bcc"}, headers=user.headers)
    assert_error_shape(renamed, 400)
    # A name stored before that rule still cannot go out as a header: the send is refused, not queued.
    with runtime.db.tenant_session(user.principal) as session:
        session.execute(
            text("UPDATE accounts SET account_name = :n WHERE id = :id"), {"n": "Alice\u2028Bcc", "id": account_id}
        )
    body = assert_error_shape(send(client, user, account_id), 400, "INVALID_MESSAGE")
    assert "sender name" in body["message"]
    assert smtp.attempts == 0


def test_recipients_are_capped(client, user, mailbox):
    account_id, smtp = mailbox
    many = [f"r{n}@example.org" for n in range(101)]
    assert_error_shape(send(client, user, account_id, to=many), 400)
    body = assert_error_shape(send(client, user, account_id, to=many[:60], cc=many[60:]), 400, "TOO_MANY_RECIPIENTS")
    assert "100" in body["message"]
    assert send(client, user, account_id, to=many[:50], cc=many[50:100]).status_code == 202


def test_an_upload_whose_name_would_break_a_header_is_sent_with_a_safe_name(client, user, mailbox):
    account_id, smtp = mailbox
    upload = client.post(
        f"/api/{account_id}/attachments",
        files={"file": ("report\u2028final\x85.txt", b"numbers", "text/plain")},
        headers=user.headers,
    )
    assert upload.status_code == 201 and upload.json()["filename"] == "report_final_.txt"
    response = send(client, user, account_id, attachmentIds=[upload.json()["id"]])
    assert wait_task(client, user, response.json()["taskId"])["status"] == "success"
    arrived = message_from_bytes(smtp.wait_for(1)[0].data, policy=policy.default)
    assert [p.get_filename() for p in arrived.walk() if p.get_filename()] == ["report_final_.txt"]


def test_a_send_whose_attached_file_is_gone_fails_in_words(client, runtime, user, mailbox):
    account_id, smtp = mailbox
    upload = client.post(f"/api/{account_id}/attachments", files={"file": ("a.txt", b"abc")}, headers=user.headers)
    with runtime.db.tenant_session(user.principal) as session:
        key = session.scalar(text("SELECT object_key FROM attachments WHERE id = :id"), {"id": upload.json()["id"]})
    response = send(client, user, account_id, attachmentIds=[upload.json()["id"]])
    runtime.objects.delete(key)  # the stored file is gone before the worker builds the message
    status = wait_task(client, user, response.json()["taskId"])
    assert status["status"] == "failure" and status["error"] == "a file the message attaches is no longer stored"
    detail = sent_detail(client, user, account_id, response.json()["messageId"])
    assert detail["deliveryStatus"] == "failed"
    assert smtp.attempts == 0


def test_forwarding_an_attachment_whose_file_is_gone_is_404_and_queues_nothing(client, runtime, user, mailbox):
    # A clean-up (a rebuilt folder, a deleted message) may remove the bytes just after the row was
    # read: the attachment is gone, as its download says, and no message is left half made.
    account_id, smtp = mailbox
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    original = messages(client, user, account_id, inbox["id"])["messages"][0]
    detail = client.get(f"/api/{account_id}/messages/{original['id']}", headers=user.headers).json()
    forwarded = detail["attachments"][0]
    with runtime.db.tenant_session(user.principal) as session:
        key = session.scalar(text("SELECT object_key FROM attachments WHERE id = :id"), {"id": forwarded["id"]})
    runtime.objects.delete(key)
    sent = folders_by_name(client, user, account_id)["Sent"]["id"]
    before = messages(client, user, account_id, sent)["pagination"]["total"]
    response = send(client, user, account_id, attachmentIds=[forwarded["id"]])
    assert_error_shape(response, 404, "ATTACHMENT_NOT_FOUND")
    assert forwarded["id"] in response.json()["message"]
    assert messages(client, user, account_id, sent)["pagination"]["total"] == before
    assert smtp.attempts == 0


@pytest.fixture
def held_back(monkeypatch):
    """Tasks are written but not handed to the workers: the test runs the send job itself."""
    monkeypatch.setattr(tasks, "push", lambda *args, **kwargs: None)


@pytest.fixture
def send_runtime(backing, dovecot):
    """What a worker runs a send with: trusting the test servers' CA."""
    runtime = Runtime.build(replace(backing, ca_file=dovecot.ca_file))
    yield runtime
    runtime.close()


def run_as(runtime, user, accepted, carrier) -> TaskContext:
    """The context a worker's run of the message's send task gets, the task started by ``carrier``."""
    with runtime.db.maintenance_session() as session:
        session.execute(
            text(
                "UPDATE tasks SET status = 'started', carrier_id = :carrier, attempts = attempts + 1,"
                " heartbeat_at = now() WHERE id = :id"
            ),
            {"id": accepted["taskId"], "carrier": carrier},
        )
        task = session.execute(
            text("SELECT account_id, result FROM tasks WHERE id = :id"), {"id": accepted["taskId"]}
        ).one()
    return TaskContext(
        runtime=runtime,
        task_id=accepted["taskId"],
        kind=TaskKind.SEND,
        principal=user.principal,
        account_id=task.account_id,
        message_id=accepted["messageId"],
        params={},
        attempt=1,
        carrier_id=carrier,
        earlier_result=dict(task.result or {}),  # what an earlier try kept, as the runner reads it
    )


def test_a_message_whose_task_cannot_be_written_is_not_left_queued(
    client, runtime, user, dovecot, mail_user, smtp_server, held_back, monkeypatch
):
    smtp = smtp_server("starttls")
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    first = send(client, user, account_id, subject="First").json()
    # The next task's row cannot be written (its id is taken): the message must not stay behind,
    # queued for ever with nothing to send it.
    monkeypatch.setattr(tasks, "new_task_id", lambda: first["taskId"])
    assert_error_shape(send(client, user, account_id, subject="Orphan"), 500)
    with runtime.db.tenant_session(user.principal) as session:
        subjects = session.scalars(text("SELECT subject FROM messages WHERE account_id = :a"), {"a": account_id})
        assert list(subjects) == ["First"]
    [task] = tasks_of(runtime, account_id)
    assert task.message_id == first["messageId"] and task.status == TaskStatus.PENDING


def test_a_run_that_lost_its_task_to_another_worker_sends_nothing(
    client, send_runtime, user, dovecot, mail_user, smtp_server, held_back
):
    smtp = smtp_server("starttls")
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    accepted = send(client, user, account_id, subject="Only once").json()
    stalled = run_as(send_runtime, user, accepted, "stalled")
    # Its worker stalled past the heartbeat, and the reaper gave the task to another carrier.
    with send_runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE tasks SET status = 'pending', carrier_id = 'successor' WHERE id = :id"),
            {"id": accepted["taskId"]},
        )
    with pytest.raises(TaskFailed, match="no longer waiting to be sent by this run"):
        jobs.run_send(stalled)
    assert smtp.messages == []
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "queued"
    result = jobs.run_send(run_as(send_runtime, user, accepted, "successor"))
    assert result["delivered"] is True and len(smtp.messages) == 1
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "sent"


def test_a_retry_asked_for_once_a_send_failed_is_not_undone_by_the_failed_run(
    client, send_runtime, user, dovecot, mail_user, smtp_server, held_back
):
    smtp = smtp_server("starttls", reject=True)
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    accepted = send(client, user, account_id, subject="Refused, then retried").json()
    context = run_as(send_runtime, user, accepted, "first")
    with pytest.raises(TaskFailed, match="550") as failure:
        jobs.run_send(context)
    # Until the run's failure is recorded, the message cannot be sent again.
    path = f"/api/{account_id}/messages/{accepted['messageId']}/send"
    assert_error_shape(client.post(path, headers=user.headers), 409, "NOT_RETRYABLE")
    run_failure_hook(send_runtime, TaskKind.SEND, context, failure.value.message, True)
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "failed"
    again = client.post(path, headers=user.headers)
    assert again.status_code == 202, again.text
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "queued"


def test_a_message_moved_while_it_is_sent_keeps_its_place_and_its_copy_follows(
    client, send_runtime, user, dovecot, mail_user, mailbox, monkeypatch
):
    account_id, smtp = mailbox
    folders = folders_by_name(client, user, account_id)
    with monkeypatch.context() as held:
        held.setattr(tasks, "push", lambda *args, **kwargs: None)
        accepted = send(client, user, account_id, subject="Moved while sending").json()
    deliver = SmtpSession.send

    def deliver_then_move(session, *args, **kwargs):
        outcome = deliver(session, *args, **kwargs)
        # The user files the message in the inbox while the job is still to store the copy.
        moved = client.post(
            f"/api/{account_id}/messages/{accepted['messageId']}/move",
            json={"folderId": folders["INBOX"]["id"]},
            headers=user.headers,
        )
        assert moved.status_code == 200, moved.text
        return outcome

    monkeypatch.setattr(SmtpSession, "send", deliver_then_move)
    result = jobs.run_send(run_as(send_runtime, user, accepted, "only"))
    assert result["delivered"] is True and result["sentCopy"] == "filed in Sent"

    def on_server(folder):
        return [
            subject for subject, _ in server_subjects(dovecot, mail_user, folder) if subject == "Moved while sending"
        ]

    assert eventually(lambda: on_server("INBOX") and not on_server("Sent"), 30)
    assert run_sync(client, user, account_id)[0]["status"] == "success"
    detail = sent_detail(client, user, account_id, accepted["messageId"])
    assert detail["folderId"] == folders["INBOX"]["id"] and detail["deliveryStatus"] == "sent"
    everywhere = [
        m
        for folder in folders.values()
        for m in messages(client, user, account_id, folder["id"])["messages"]
        if m["subject"] == "Moved while sending"
    ]
    assert [m["id"] for m in everywhere] == [accepted["messageId"]]


def test_html_too_deep_to_show_in_time_is_refused(client, user, mailbox):
    account_id, smtp = mailbox
    # 1,500 nested elements, written as the self-closed "<div/>" an HTML5 parser opens all the same.
    answer = send(client, user, account_id, body="<p>hi</p>" + "<div/>" * 1500, isHtml=True)
    body = assert_error_shape(answer, 400, "INVALID_MESSAGE")
    assert "nests deeper than 1000" in body["message"]
    assert send(client, user, account_id, body="<div>" * 50 + "fine" + "</div>" * 50, isHtml=True).status_code == 202


def test_a_reply_keeps_ancestors_however_the_original_spelt_its_references(client, user, mailbox, dovecot, mail_user):
    account_id, smtp = mailbox
    original = to_bytes(plain_message("Spelt oddly", message_id="<q-2@example.com>", references=["<root@example.com>"]))
    # Upper-case, and a second References header (stored joined by ", ").
    original = original.replace(
        b"References: <root@example.com>\r\n",
        b"REFERENCES: <root@example.com>\r\nreferences: <middle@example.com>\r\n",
        1,
    )
    assert b"REFERENCES" in original
    dovecot.append(mail_user, "INBOX", original)
    run_sync(client, user, account_id)
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    [question] = [
        m for m in messages(client, user, account_id, inbox["id"])["messages"] if m["subject"] == "Spelt oddly"
    ]
    response = send(client, user, account_id, subject="Re: Spelt oddly", inReplyTo=question["id"])
    assert wait_task(client, user, response.json()["taskId"])["status"] == "success"
    arrived = message_from_bytes(smtp.wait_for(1)[0].data, policy=policy.default)
    assert arrived["References"].split() == ["<root@example.com>", "<middle@example.com>", "<q-2@example.com>"]


def test_a_send_that_cannot_read_its_message_for_a_moment_is_tried_again(
    client, send_runtime, user, dovecot, mail_user, smtp_server, held_back, monkeypatch
):
    smtp = smtp_server("starttls")
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    upload = client.post(f"/api/{account_id}/attachments", files={"file": ("a.txt", b"abc")}, headers=user.headers)
    accepted = send(client, user, account_id, attachmentIds=[upload.json()["id"]]).json()

    def storage_down(key):
        raise ConnectionRefusedError("object storage is down")

    with monkeypatch.context() as outage:
        outage.setattr(send_runtime.objects, "open", storage_down)
        with pytest.raises(TaskRetry, match="could not be read now"):
            jobs.run_send(run_as(send_runtime, user, accepted, "first"))
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "queued"
    assert jobs.run_send(run_as(send_runtime, user, accepted, "second"))["delivered"] is True
    assert len(smtp.messages) == 1


def test_a_disabled_account_sends_nothing_until_it_is_enabled_and_asked_again(
    client, send_runtime, user, dovecot, mail_user, smtp_server, held_back
):
    smtp = smtp_server("starttls")
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    accepted = send(client, user, account_id, subject="Queued, then disabled").json()

    def set_enabled(on: bool) -> None:
        answer = client.put(f"/api/accounts/{account_id}", json={"isEnabled": on}, headers=user.headers)
        assert answer.status_code == 200, answer.text

    set_enabled(False)
    assert_error_shape(send(client, user, account_id, subject="While disabled"), 409, "ACCOUNT_DISABLED")
    draft = {"accountId": account_id, "to": ["bob@example.org"], "subject": "Draft", "body": "Later"}
    assert_error_shape(client.post("/api/compose/draft", json=draft, headers=user.headers), 409, "ACCOUNT_DISABLED")
    # What was queued before goes nowhere, and says why.
    context = run_as(send_runtime, user, accepted, "first")
    with pytest.raises(TaskFailed, match="disabled") as failure:
        jobs.run_send(context)
    run_failure_hook(send_runtime, TaskKind.SEND, context, failure.value.message, True)
    assert smtp.messages == []
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "failed"
    path = f"/api/{account_id}/messages/{accepted['messageId']}/send"
    assert_error_shape(client.post(path, headers=user.headers), 409, "ACCOUNT_DISABLED")

    set_enabled(True)
    again = client.post(path, headers=user.headers)
    assert again.status_code == 202, again.text
    assert jobs.run_send(run_as(send_runtime, user, again.json(), "second"))["delivered"] is True
    assert len(smtp.messages) == 1
    assert sent_detail(client, user, account_id, accepted["messageId"])["deliveryStatus"] == "sent"


def test_attachments_go_out_and_are_listed_in_the_order_asked_for(client, user, mailbox):
    # The recipient sees the files in the order the user chose them, forwarded ones included.
    account_id, smtp = mailbox
    uploads = [
        client.post(
            f"/api/{account_id}/attachments", files={"file": (f"file{n}.txt", f"n{n}".encode())}, headers=user.headers
        ).json()
        for n in range(6)
    ]
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    original = messages(client, user, account_id, inbox["id"])["messages"][0]
    forwarded = client.get(f"/api/{account_id}/messages/{original['id']}", headers=user.headers).json()
    pdf = next(a for a in forwarded["attachments"] if a["mimeType"] == "application/pdf")
    chosen = [uploads[4], uploads[1], pdf, uploads[5], uploads[0], uploads[3], uploads[2]]
    response = send(client, user, account_id, attachmentIds=[a["id"] for a in chosen])
    assert wait_task(client, user, response.json()["taskId"])["status"] == "success"
    arrived = [a.filename for a in parse_message(smtp.wait_for(1)[0].data).attachments]
    assert arrived == [a["filename"] for a in chosen]
    shown = client.get(f"/api/{account_id}/messages/{response.json()['messageId']}", headers=user.headers).json()
    assert [a["filename"] for a in shown["attachments"]] == arrived


def test_forwarding_an_attachment_while_object_storage_is_down_is_503_and_queues_nothing(
    client, storage_down_client, user, mailbox
):
    account_id, smtp = mailbox
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    original = messages(client, user, account_id, inbox["id"])["messages"][0]
    forwarded = client.get(f"/api/{account_id}/messages/{original['id']}", headers=user.headers).json()
    sent = folders_by_name(client, user, account_id)["Sent"]["id"]
    before = messages(client, user, account_id, sent)["pagination"]["total"]
    response = send(storage_down_client, user, account_id, attachmentIds=[forwarded["attachments"][0]["id"]])
    body = assert_error_shape(response, 503, "DEPENDENCY_UNAVAILABLE")
    assert body["message"] == "object storage unreachable; try again later"
    assert messages(client, user, account_id, sent)["pagination"]["total"] == before
    assert smtp.attempts == 0


def stored_attachment_files(runtime, user, account_id) -> set[str]:
    """The keys of the account's attachment objects in the (filesystem) store."""
    prefix = f"{user.principal.tenant_id}/{account_id}/attachments"
    directory = runtime.objects.root / "data" / prefix
    return {f"{prefix}/{path.name}" for path in directory.iterdir()} if directory.exists() else set()


def test_a_compose_that_fails_after_copying_attachments_leaves_no_copies(client, runtime, user, mailbox):
    # A copy made for a message that was never stored is nobody's: nothing would ever remove it.
    account_id, smtp = mailbox
    inbox = folders_by_name(client, user, account_id)["INBOX"]
    original = messages(client, user, account_id, inbox["id"])["messages"][0]
    files = client.get(f"/api/{account_id}/messages/{original['id']}", headers=user.headers).json()["attachments"]
    with runtime.db.tenant_session(user.principal) as session:
        key = session.scalar(text("SELECT object_key FROM attachments WHERE id = :id"), {"id": files[-1]["id"]})
    runtime.objects.delete(key)
    before = stored_attachment_files(runtime, user, account_id)
    response = send(client, user, account_id, attachmentIds=[f["id"] for f in files])
    assert_error_shape(response, 404, "ATTACHMENT_NOT_FOUND")
    assert stored_attachment_files(runtime, user, account_id) == before


def test_two_sends_of_a_never_synced_account_at_once_share_one_sent_folder(
    client, runtime, user, dovecot, mail_user, smtp_server, held_back
):
    # Each send of an account never synced makes its Sent folder; when two do so at the same
    # moment, the second must take the first's folder, not fail on its name.
    smtp = smtp_server("starttls")
    account_id = create_account(client, user, smtp_account(dovecot, mail_user, smtp))
    answers = []
    with runtime.db.tenant_session(user.principal) as first:
        # The first send's folder, written but not yet committed.
        first.execute(
            text(
                "INSERT INTO folders (id, tenant_id, user_id, account_id, name, display_name, type, attributes)"
                " VALUES ('first-sent', :tenant, :user, :account, 'Sent', 'Sent', 'sent', ARRAY['\\Sent'])"
            ),
            {"tenant": user.principal.tenant_id, "user": user.principal.user_id, "account": account_id},
        )
        second = threading.Thread(target=lambda: answers.append(send(client, user, account_id, subject="Second")))
        second.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the second send waits on the folder's name
            with runtime.db.maintenance_session() as look:
                waiting = look.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"))
            if waiting:
                break
            time.sleep(0.05)
    second.join(timeout=30)
    assert answers and answers[0].status_code == 202, answers and answers[0].text
    sent = [f for f in client.get(f"/api/{account_id}/folders", headers=user.headers).json()["folders"]]
    assert [f["id"] for f in sent if f["type"] == "sent"] == ["first-sent"]
    detail = sent_detail(client, user, account_id, answers[0].json()["messageId"])
    assert detail["folderId"] == "first-sent"
