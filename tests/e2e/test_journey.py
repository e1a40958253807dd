"""A user's whole journey through the deployed service, driven only by the generated Python SDK.

The steps run in order and share one mailbox, as a person's session would: what one step leaves
(an account, a synced message, a sent reply) is what the next one works on.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from urllib.parse import parse_qs, urlsplit

import email_service_client as sdk
import httpx
import pytest
from email_service_client.exceptions import ApiException
from httpx_sse import connect_sse
from mailservers import SmtpServer, _Behaviour, quote_mailbox
from messages import attachments_message, html_message, plain_message, to_bytes
from oauth2server import PROVIDER, RETURN_URL, SERVICE_CALLBACK
from standardwebhooks import Webhook

INBOX_FILLER = 1200  # enough that the first sync takes several progress reports
CRASH_MAILBOX = 3000  # enough that a sync is still running when its worker is killed
REPORT = ("Report Q3 – final.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(range(256)) * 64 + b"\n%%EOF\n")
UPLOAD = ("minutes.csv", "text/csv", b"item,owner\r\nbudget,alice\r\nhiring,bob\r\n")
TRACKING_PIXEL = "https://track.example/open.gif?id=journey"
NEWSLETTER = (
    f'<p>This week\'s <a href="https://shop.example/news">news</a></p><img src="{TRACKING_PIXEL}" width="1" height="1">'
)


@dataclass
class Journey:
    """What the steps learn and hand on."""

    tenant: uuid.UUID = field(default_factory=uuid.uuid4)
    user: uuid.UUID = field(default_factory=uuid.uuid4)
    api: sdk.ApiClient | None = None
    imap_account: str = ""
    pop3_account: str = ""
    folders: dict[str, sdk.Folder] = field(default_factory=dict)
    original: sdk.MessageDetail | None = None
    task_ids: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def journey() -> Journey:
    return Journey()


@pytest.fixture(scope="module")
def imap_user(dovecot):
    """A Dovecot user with a message carrying attachments, a thread and enough filler to page through."""
    user = dovecot.add_user()
    dovecot.append(
        user,
        "INBOX",
        to_bytes(
            attachments_message(
                "Board pack",
                message_id="<board-pack@example.com>",
                attachments=[REPORT, ("notes.txt", "text/plain", b"n\r\n")],
            )
        ),
        internaldate=time.time() + 3600,  # newest, so it heads the default order
    )
    dovecot.append_many(
        user, "INBOX", (to_bytes(plain_message(f"Filler {i:04d}", f"Body {i}\n")) for i in range(INBOX_FILLER))
    )
    dovecot.create_folder(user, "Archive")
    dovecot.append_many(user, "Archive", (to_bytes(plain_message(f"Archived {i}")) for i in range(2)))
    dovecot.append(user, "Archive", to_bytes(html_message("Weekly newsletter", NEWSLETTER)))
    return user


@pytest.fixture(scope="module")
def pop3_user(dovecot):
    user = dovecot.add_user()
    dovecot.append_many(user, "INBOX", (to_bytes(plain_message(f"Pop {i}")) for i in range(3)))
    return user


@pytest.fixture(scope="module")
def smtp(mail_tls):
    """An aiosmtpd server for the whole journey (the function-scoped factory would stop it between steps)."""
    server = SmtpServer(
        mail_tls, "starttls", auth_required=True, username="smtp-e2e", password=uuid.uuid4().hex, behaviour=_Behaviour()
    )
    server.start()
    yield server
    server.stop()


def _dovecot_account(dovecot, user, protocol: str, **fields) -> sdk.CreateAccountRequest:
    """An account for a Dovecot user over implicit TLS, synced only when asked."""
    return sdk.CreateAccountRequest(
        email_address=f"{user.name}@example.com",
        protocol=protocol,
        hostname=dovecot.host,
        port=dovecot.imaps_port if protocol == "imap" else dovecot.pop3s_port,
        encryption="tls",
        username=user.name,
        password=user.password,
        **{"is_sync_enabled": False, **fields},
    )


def _accounts(api: sdk.ApiClient) -> sdk.AccountsApi:
    return sdk.AccountsApi(api)


def _wait_task(api: sdk.ApiClient, task_id: str, timeout: float = 120, every: float = 1.3) -> tuple[object, list[int]]:
    """Poll a task to its end; every poll stays under the per-user limit of 50 a minute."""
    sync = sdk.SyncApi(api)
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sync.get_sync_status(task_id)
        seen.append(status.progress)
        if status.status in ("success", "failure"):
            return status, seen
        time.sleep(every)
    raise AssertionError(f"task {task_id} did not finish in {timeout}s: {status}")


def _all_messages(api: sdk.ApiClient, account_id: str, folder_id: str, page: int = 500) -> list[sdk.Message]:
    found: list[sdk.Message] = []
    while True:
        listed = sdk.MessagesApi(api).list_messages(account_id, folder_id, limit=page, offset=len(found))
        found.extend(listed.messages)
        if len(found) >= listed.pagination.total or not listed.messages:
            return found


def _search_all(api: sdk.ApiClient, account_id: str, **query) -> list[sdk.MessageSummary]:
    """Every hit of a search, one per page, following nextCursor until it is null.

    A page may hold fewer hits than asked for, even none, while nextCursor leads on.
    """
    hits: list[sdk.MessageSummary] = []
    cursor = None
    for _ in range(50):
        page = sdk.SearchApi(api).search_messages(account_id, limit=1, cursor=cursor, **query)
        hits += page.messages
        cursor = page.next_cursor
        if cursor is None:
            return hits
    raise AssertionError("the search's cursor never ended")


def _folders(api: sdk.ApiClient, account_id: str) -> dict[str, sdk.Folder]:
    return {folder.name: folder for folder in sdk.FoldersApi(api).list_folders(account_id).folders}


def _wait_for(condition, timeout: float = 60, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not true after {timeout}s: {condition.__doc__ or condition}")


def _server_flags(dovecot, user, folder: str, subject: str) -> set[str]:
    with dovecot.imap(user) as client:
        client.select(f'"{folder}"', readonly=True)
        _, data = client.uid("SEARCH", "SUBJECT", f'"{subject}"')
        uids = data[0].split()
        if not uids:
            return set()
        _, fetched = client.uid("FETCH", uids[0], "(FLAGS)")
        return set(fetched[0].decode().split("FLAGS (", 1)[1].split(")", 1)[0].split())


def test_0_the_running_service_serves_its_interactive_docs_and_spec(deployment):
    page = httpx.get(deployment.api.url + "/docs/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in page.text
    spec = httpx.get(deployment.api.url + "/openapi.json", timeout=30).json()
    assert spec["info"]["title"] == "Email Service API"
    assert spec["paths"]["/api/accounts"]["get"]["operationId"] == "listAccounts"


def test_1_a_token_from_the_cli_creates_imap_and_pop3_accounts(
    deployment, journey, dovecot, imap_user, pop3_user, smtp
):
    journey.api = deployment.client(deployment.mint_token(journey.tenant, journey.user))
    accounts = _accounts(journey.api)
    imap = accounts.create_account(
        _dovecot_account(
            dovecot,
            imap_user,
            "imap",
            account_name="Work",
            smtp_hostname=smtp.host,
            smtp_port=smtp.port,
            smtp_encryption="starttls",
            smtp_username=smtp.username,
            smtp_password=smtp.password,
        )
    )
    pop3 = accounts.create_account(_dovecot_account(dovecot, pop3_user, "pop3", account_name="Old mailbox"))
    journey.imap_account, journey.pop3_account = imap.id, pop3.id
    assert str(imap.tenant_id) == str(journey.tenant) and imap.protocol == "imap" and imap.smtp_port == smtp.port
    listed = accounts.list_accounts()
    assert {a.id for a in listed.accounts} == {imap.id, pop3.id}
    # The password went in and never comes back out, in any field.
    raw = accounts.get_account_with_http_info(imap.id).raw_data.decode()
    assert imap_user.password not in raw and smtp.password not in raw


def test_2_sync_progress_folders_paging_and_an_attachment_byte_identical(journey, imap_user):
    api = journey.api
    started = sdk.SyncApi(api).sync_account(journey.imap_account)
    assert started.status in ("pending", "started")
    journey.task_ids.append(started.task_id)
    status, progress = _wait_task(api, started.task_id, every=0.4)
    assert status.status == "success", status.error
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    assert any(0 < p < 100 for p in progress), f"no progress between start and end was seen: {progress}"
    assert status.progress == 100 and status.result["messagesAdded"] == INBOX_FILLER + 1 + 3

    journey.folders = folders = _folders(api, journey.imap_account)
    assert {"INBOX", "Archive", "Sent", "Drafts"} <= set(folders)
    assert folders["INBOX"].message_count == INBOX_FILLER + 1 and folders["INBOX"].type == "inbox"
    assert folders["Archive"].message_count == 3

    messages = sdk.MessagesApi(api)
    first = messages.list_messages(journey.imap_account, folders["INBOX"].id, limit=50)
    second = messages.list_messages(journey.imap_account, folders["INBOX"].id, limit=50, offset=50)
    assert first.pagination.total == INBOX_FILLER + 1 and len(first.messages) == len(second.messages) == 50
    assert not {m.id for m in first.messages} & {m.id for m in second.messages}
    everything = _all_messages(api, journey.imap_account, folders["INBOX"].id)
    assert len({m.id for m in everything}) == INBOX_FILLER + 1

    summary = first.messages[0]
    assert summary.subject == "Board pack" and summary.attachment_count >= 2 and not summary.is_read
    assert (summary.var_from, summary.from_name) == ("alice@example.com", "Alice Example")
    assert summary.to == ["bob@example.org"] and summary.recipient_names == {"bob@example.org": "Bob Example"}
    journey.original = detail = messages.get_message(journey.imap_account, summary.id)
    as_sent = bytes(messages.get_raw_message(journey.imap_account, summary.id))
    original = message_from_bytes(as_sent, policy=policy.default)
    assert original["Subject"] == "Board pack" and original["Message-ID"] == "<board-pack@example.com>"
    report = next(a for a in detail.attachments if a.filename == REPORT[0])
    assert report.mime_type == REPORT[1] and report.size == len(REPORT[2])

    # A newsletter's tracking pixel is held back when the reader asks, and the answer says there
    # was something to hold back (the reader can then choose to show it).
    archived = _all_messages(api, journey.imap_account, folders["Archive"].id)
    newsletter = next(m for m in archived if m.subject == "Weekly newsletter")
    shown = messages.get_message(journey.imap_account, newsletter.id)
    assert TRACKING_PIXEL in shown.body_html and shown.has_remote_content is True
    held_back = messages.get_message(journey.imap_account, newsletter.id, remote_content="block")
    assert TRACKING_PIXEL not in held_back.body_html and held_back.has_remote_content is True
    assert 'href="https://shop.example/news"' in held_back.body_html
    # Marking it read answers with the message the reader is looking at: held back too.
    marked = messages.update_message(
        journey.imap_account, newsletter.id, sdk.UpdateMessageRequest(is_read=True), remote_content="block"
    )
    assert marked.is_read and TRACKING_PIXEL not in marked.body_html and marked.has_remote_content is True

    by_link = httpx.get(report.download_url, timeout=30)
    assert by_link.status_code == 200
    by_operation = sdk.AttachmentsApi(api).download_attachment(journey.imap_account, report.id)
    assert hashlib.sha256(by_link.content).digest() == hashlib.sha256(REPORT[2]).digest()
    assert bytes(by_operation) == REPORT[2]

    # The POP3 account syncs its inbox too.
    pop3_task = sdk.SyncApi(api).sync_account(journey.pop3_account)
    status, _ = _wait_task(api, pop3_task.task_id)
    assert status.status == "success", status.error
    inbox = _folders(api, journey.pop3_account)["INBOX"]
    assert sorted(m.subject for m in _all_messages(api, journey.pop3_account, inbox.id)) == ["Pop 0", "Pop 1", "Pop 2"]


def test_3_read_and_starred_reach_the_imap_server(journey, dovecot, imap_user):
    updated = sdk.MessagesApi(journey.api).update_message(
        journey.imap_account, journey.original.id, sdk.UpdateMessageRequest(is_read=True, is_starred=True)
    )
    assert updated.is_read and updated.is_starred

    def flags_on_server():
        """\\Seen and \\Flagged set on the server"""
        return {"\\Seen", "\\Flagged"} <= _server_flags(dovecot, imap_user, "INBOX", "Board pack")

    _wait_for(flags_on_server)


def test_4_a_reply_with_an_upload_is_threaded_and_filed_once_in_sent(journey, smtp):
    api = journey.api
    uploaded = sdk.AttachmentsApi(api).upload_attachment(journey.imap_account, (UPLOAD[0], UPLOAD[2]))
    assert uploaded.filename == UPLOAD[0] and uploaded.size == len(UPLOAD[2])
    sent = sdk.ComposeApi(api).send_email(
        sdk.SendEmailRequest(
            account_id=journey.imap_account,
            to=["alice@example.com"],
            subject="Re: Board pack",
            body="Minutes attached.",
            attachment_ids=[uploaded.id],
            in_reply_to=journey.original.id,
        )
    )
    status, _ = _wait_task(api, sent.task_id)
    assert status.status == "success", status.error

    received = smtp.wait_for(1)[0]
    arrived = message_from_bytes(received.data, policy=policy.default)
    assert received.rcpt_tos == ["alice@example.com"] and received.tls
    assert arrived["In-Reply-To"] == "<board-pack@example.com>"
    assert arrived["References"].split()[-1] == "<board-pack@example.com>"
    part = next(p for p in arrived.iter_attachments() if p.get_filename() == UPLOAD[0])
    assert part.get_payload(decode=True) == UPLOAD[2]

    resync = sdk.SyncApi(api).sync_account(journey.imap_account)
    assert _wait_task(api, resync.task_id)[0].status == "success"
    sent_folder = _folders(api, journey.imap_account)["Sent"]
    copies = [m for m in _all_messages(api, journey.imap_account, sent_folder.id) if m.subject == "Re: Board pack"]
    assert len(copies) == 1 and copies[0].delivery_status == "sent"


def test_4c_search_finds_the_reply_and_the_conversation_spans_inbox_and_sent(journey):
    api, account = journey.api, journey.imap_account
    search = sdk.SearchApi(api)
    # Found by its attachment's name alone, and by words across folders.
    by_attachment = search.search_messages(account, q="csv")  # minutes.csv
    assert [m.subject for m in by_attachment.messages] == ["Re: Board pack"]
    # Page by page through the cursor: each match once.
    found = _search_all(api, account, q="board pack")
    assert len({m.id for m in found}) == len(found)
    assert {m.subject for m in found} >= {"Board pack", "Re: Board pack"}
    sent_folder = _folders(api, account)["Sent"]
    only_sent = _search_all(api, account, q='"board pack"', folder_id=sent_folder.id)
    assert [m.subject for m in only_sent] == ["Re: Board pack"]

    conversation = sdk.ConversationsApi(api).get_conversation(account, journey.original.conversation_id)
    assert {(m.subject, m.folder_id) for m in conversation.messages} == {
        ("Board pack", journey.original.folder_id),
        ("Re: Board pack", sent_folder.id),
    }
    received = [m.received_at for m in conversation.messages]
    assert len(received) == 2 and received == sorted(received)
    listed = sdk.ConversationsApi(api).list_conversations(account, journey.original.folder_id, limit=200)
    assert journey.original.conversation_id in {c.id for c in listed.conversations}


def test_4b_an_unanswered_send_is_ambiguous_and_sent_again_only_when_asked(journey, smtp):
    api = journey.api
    compose = sdk.ComposeApi(api)
    smtp.silent_after_data = 6  # longer than the deployment waits for the reply to the final dot
    try:
        sent = compose.send_email(
            sdk.SendEmailRequest(
                account_id=journey.imap_account, to=["carol@example.com"], subject="Did it arrive?", body="?"
            )
        )
        status, _ = _wait_task(api, sent.task_id)
    finally:
        smtp.silent_after_data = 0
    assert status.status == "failure" and "may or may not have been accepted" in status.error
    message = sdk.MessagesApi(api).get_message(journey.imap_account, sent.message_id)
    assert message.delivery_status == "ambiguous"
    arrived = [m for m in smtp.messages if b"Did it arrive?" in m.data]
    assert len(arrived) == 1  # the server had it; the service cannot know that, so it did not resend

    again = compose.retry_send(journey.imap_account, sent.message_id)
    assert _wait_task(api, again.task_id)[0].status == "success"
    assert len([m for m in smtp.messages if b"Did it arrive?" in m.data]) == 2
    assert sdk.MessagesApi(api).get_message(journey.imap_account, sent.message_id).delivery_status == "sent"
    with pytest.raises(ApiException) as refused:
        compose.retry_send(journey.imap_account, sent.message_id)
    assert refused.value.status == 409


def test_5_a_draft_is_saved_here_and_on_the_server(journey, dovecot, imap_user):
    api = journey.api
    draft = sdk.ComposeApi(api).save_draft(
        sdk.SendEmailRequest(
            account_id=journey.imap_account,
            to=["bob@example.org"],
            subject="Unfinished thoughts",
            body="To be continued",
        )
    )
    assert draft.account_id == journey.imap_account
    drafts = _folders(api, journey.imap_account)["Drafts"]
    subjects = [m.subject for m in _all_messages(api, journey.imap_account, drafts.id)]
    assert subjects.count("Unfinished thoughts") == 1

    def draft_on_server():
        """the draft is in the server's Drafts with \\Draft"""
        return "\\Draft" in _server_flags(dovecot, imap_user, "Drafts", "Unfinished thoughts")

    _wait_for(draft_on_server)


def _server_subjects(dovecot, user, folder: str) -> list[str]:
    """Subjects in a server folder as another IMAP client sees them (\\Deleted ones left out)."""
    with dovecot.imap(user) as client:
        client.select(quote_mailbox(folder), readonly=True)
        _, found = client.uid("SEARCH", "UNDELETED")
        uids = found[0].split()
        if not uids:
            return []
        _, data = client.uid("FETCH", b",".join(uids).decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return sorted(item[1].decode().split(":", 1)[1].strip() for item in data if isinstance(item, tuple))


def test_5b_a_new_folder_moves_and_deletes_reach_the_server_and_sync_shows_each_once(journey, dovecot, imap_user):
    api = journey.api
    account = journey.imap_account
    messages = sdk.MessagesApi(api)
    folders = _folders(api, account)
    inbox, trash = folders["INBOX"], folders["Trash"]
    inbox_before = messages.list_messages(account, inbox.id, limit=1).pagination.total
    by_subject = {m.subject: m.id for m in _all_messages(api, account, inbox.id) if m.subject.startswith("Filler 000")}

    projects = sdk.FoldersApi(api).create_folder(account, sdk.CreateFolderRequest(name="Projekte Ärger"))
    assert projects.display_name == "Projekte Ärger" and projects.type == "custom"
    moved = messages.move_messages(
        account,
        sdk.BulkMoveRequest(message_ids=[by_subject["Filler 0000"], by_subject["Filler 0001"]], folder_id=projects.id),
    )
    assert moved.message_ids == [by_subject["Filler 0000"], by_subject["Filler 0001"]] and moved.not_found == []
    one = messages.move_message(account, by_subject["Filler 0002"], sdk.MoveMessageRequest(folder_id=projects.id))
    assert one.folder_id == projects.id
    trashed = messages.delete_message(account, by_subject["Filler 0003"])
    assert trashed.folder_id == trash.id and trashed.deleted_for_good == []
    gone = messages.delete_message(account, by_subject["Filler 0004"], permanent=True)
    assert gone.deleted_for_good == [by_subject["Filler 0004"]]
    # At once, before the server knows.
    at_once = sorted(m.subject for m in _all_messages(api, account, projects.id))
    assert at_once == ["Filler 0000", "Filler 0001", "Filler 0002"]
    assert messages.list_messages(account, inbox.id, limit=1).pagination.total == inbox_before - 5

    def on_the_server():
        """the moves and deletions are on the server (another IMAP client looks)"""
        return (
            _server_subjects(dovecot, imap_user, "Projekte Ärger") == ["Filler 0000", "Filler 0001", "Filler 0002"]
            and "Filler 0003" in _server_subjects(dovecot, imap_user, "Trash")
            and not {"Filler 0000", "Filler 0003", "Filler 0004"} & set(_server_subjects(dovecot, imap_user, "INBOX"))
        )

    _wait_for(on_the_server)
    task = sdk.SyncApi(api).sync_account(account)
    status, _ = _wait_task(api, task.task_id)
    assert status.status == "success" and status.result["messagesAdded"] == 0, status
    in_projects = {m.subject: m.id for m in _all_messages(api, account, projects.id)}
    assert in_projects == {f"Filler 000{i}": by_subject[f"Filler 000{i}"] for i in range(3)}  # same ids, once each
    assert [m.id for m in _all_messages(api, account, trash.id) if m.subject == "Filler 0003"] == [
        by_subject["Filler 0003"]
    ]
    assert messages.list_messages(account, inbox.id, limit=1).pagination.total == inbox_before - 5

    renamed = sdk.FoldersApi(api).update_folder(account, projects.id, sdk.UpdateFolderRequest(name="Projekte"))
    assert renamed.id == projects.id and renamed.name == "Projekte"
    assert _server_subjects(dovecot, imap_user, "Projekte") == ["Filler 0000", "Filler 0001", "Filler 0002"]
    with pytest.raises(ApiException) as protected:
        sdk.FoldersApi(api).delete_folder(account, inbox.id)
    assert protected.value.status == 409


def test_6_another_tenant_sees_nothing_and_limits_answer_429(deployment, journey):
    stranger = deployment.client(deployment.mint_token(uuid.uuid4(), uuid.uuid4()))
    report = next(a for a in journey.original.attachments if a.filename == REPORT[0])
    attempts = [
        lambda: sdk.AccountsApi(stranger).get_account(journey.imap_account),
        lambda: sdk.FoldersApi(stranger).list_folders(journey.imap_account),
        lambda: sdk.MessagesApi(stranger).get_message(journey.imap_account, journey.original.id),
        lambda: sdk.MessagesApi(stranger).update_message(
            journey.imap_account, journey.original.id, sdk.UpdateMessageRequest(is_read=False)
        ),
        lambda: sdk.AttachmentsApi(stranger).download_attachment(journey.imap_account, report.id),
        lambda: sdk.SyncApi(stranger).sync_account(journey.imap_account),
        lambda: sdk.SyncApi(stranger).get_sync_status(journey.task_ids[0]),
    ]
    for attempt in attempts:
        with pytest.raises(ApiException) as refused:
            attempt()
        assert refused.value.status == 404, refused.value.body
    assert sdk.AccountsApi(stranger).list_accounts().accounts == []
    # The owner's message is as it was: the stranger's PATCH changed nothing.
    assert sdk.MessagesApi(journey.api).get_message(journey.imap_account, journey.original.id).is_read

    # Creating accounts is limited to 10 a minute per user; the 11th is refused with the limit's headers.
    accounts = sdk.AccountsApi(stranger)
    statuses = []
    for i in range(11):
        body = sdk.CreateAccountRequest(
            account_name=f"A{i}",
            email_address=f"a{i}@example.com",
            protocol="imap",
            hostname="imap.example.com",
            port=993,
            encryption="tls",
            username=f"a{i}",
            password=f"password-{i}",
            is_sync_enabled=False,
        )
        try:
            statuses.append(accounts.create_account_with_http_info(body).status_code)
        except ApiException as exc:
            statuses.append(exc.status)
            limited = exc
    assert statuses == [201] * 10 + [429]
    assert limited.headers["X-RateLimit-Limit"] == "10" and limited.headers["X-RateLimit-Remaining"] == "0"
    assert int(limited.headers["Retry-After"]) >= 1
    assert sdk.ErrorResponse.from_json(limited.body).code == "RATE_LIMITED"


def test_7_a_sync_whose_worker_is_killed_completes_on_another_exactly(deployment, journey, dovecot):
    api = journey.api
    user = dovecot.add_user()
    subjects = [f"Bulk {i:05d}" for i in range(CRASH_MAILBOX)]
    dovecot.append_many(user, "INBOX", (to_bytes(plain_message(s, f"{s}\n" * 40)) for s in subjects))
    account = _accounts(api).create_account(_dovecot_account(dovecot, user, "imap", account_name="Big"))
    task = sdk.SyncApi(api).sync_account(account.id)

    def stored() -> int:
        inbox = _folders(api, account.id).get("INBOX")
        if inbox is None:
            return 0
        return sdk.MessagesApi(api).list_messages(account.id, inbox.id, limit=1).pagination.total

    def half_way():
        """the sync has stored some messages but not all"""
        status = sdk.SyncApi(api).get_sync_status(task.task_id)
        assert status.status in ("pending", "started"), f"sync ended before the kill: {status}"
        return 0 < stored() < CRASH_MAILBOX

    _wait_for(half_way, timeout=120, every=0.5)
    deployment.worker.kill()
    stored_at_kill = stored()
    assert stored_at_kill < CRASH_MAILBOX
    at_kill = sdk.SyncApi(api).get_sync_status(task.task_id)
    assert at_kill.status == "started"

    deployment.start_worker()
    # RQ notices the lost worker once its heartbeat lapses, then the same task runs again.
    status, progress = _wait_task(api, task.task_id, timeout=300, every=2)
    assert status.status == "success", f"{status}\n{deployment.logs()}"
    assert progress == sorted(progress) and progress[0] >= at_kill.progress, (at_kill.progress, progress)

    inbox = _folders(api, account.id)["INBOX"]
    synced = [m.subject for m in _all_messages(api, account.id, inbox.id)]
    assert inbox.message_count == CRASH_MAILBOX
    assert sorted(synced) == subjects, f"{len(synced)} stored, {len(set(synced))} distinct, {stored_at_kill} at kill"


def test_8_mail_appended_on_the_server_arrives_with_no_sync_requested(deployment, journey, dovecot):
    api = journey.api
    user = dovecot.add_user()
    dovecot.append(user, "INBOX", to_bytes(plain_message("Already there")))
    account = _accounts(api).create_account(
        _dovecot_account(dovecot, user, "imap", account_name="Live", is_sync_enabled=True, sync_interval=604800)
    )

    def subjects() -> set[str]:
        inbox = _folders(api, account.id).get("INBOX")
        return {m.subject for m in _all_messages(api, account.id, inbox.id)} if inbox else set()

    # The watcher takes the new account and catches up; nobody asks for a sync. Polled under the
    # per-user limit of 50 a minute per operation.
    _wait_for(lambda: "Already there" in subjects(), timeout=60, every=1.3)
    token = deployment.mint_token(journey.tenant, journey.user)
    with WebhookReceiver() as receiver, EventsClient(deployment.api.url, token, account.id) as events:
        hook = sdk.WebhooksApi(api).create_webhook(
            sdk.CreateWebhookRequest(url=receiver.url, event_types=["message.created"], account_id=account.id)
        )
        events.wait_ready()
        time.sleep(1)
        dovecot.append(user, "INBOX", to_bytes(plain_message("Arrived just now")))
        appended = time.monotonic()
        created = events.wait_for("message.created", timeout=30)
        streamed_after = time.monotonic() - appended
        delivered = receiver.wait(timeout=30)
        delivered_after = time.monotonic() - appended
        # The user rotates the secret (on a schedule, or after a leak) and keeps the endpoint: for
        # the grace period the old secret signs beside the new one, so the receiver can switch over.
        rotated = sdk.WebhooksApi(api).rotate_webhook_secret(
            hook.id, sdk.RotateWebhookSecretRequest(grace_seconds=3600)
        )
        dovecot.append(user, "INBOX", to_bytes(plain_message("After the rotation")))
        after_rotation = receiver.wait(timeout=60)
    # The account syncs once a week: arriving at all shows the push. How fresh it is (about half
    # a second) is bench/realtime.py's to measure; on a loaded machine the watcher may still be
    # taking the new account over when the mail lands, and catches up as it does.
    assert created["accountId"] == account.id and streamed_after < 20, deployment.logs()
    message = sdk.MessagesApi(api).get_message(account.id, created["id"])
    assert message.subject == "Arrived just now"
    assert "Arrived just now" in subjects()
    # The receiver got the same change, signed with the secret shown once at creation.
    payload = Webhook(hook.secret).verify(delivered["body"], delivered["headers"])
    assert payload["type"] == "message.created" and payload["data"]["id"] == created["id"]
    assert delivered_after < 25, deployment.logs()
    assert rotated.id == hook.id and rotated.secret.startswith("whsec_") and rotated.secret != hook.secret
    assert rotated.previous_secret_expires_at > (time.time() + 3500) * 1000
    assert sdk.WebhooksApi(api).get_webhook(hook.id).previous_secret_expires_at == rotated.previous_secret_expires_at
    assert after_rotation["headers"]["webhook-id"] != delivered["headers"]["webhook-id"]
    for secret in (hook.secret, rotated.secret):
        assert Webhook(secret).verify(after_rotation["body"], after_rotation["headers"])["type"] == "message.created"
    # The second attempt is recorded just after the receiver has answered it.
    _wait_for(lambda: len(sdk.WebhooksApi(api).list_webhook_deliveries(hook.id).deliveries) == 2, timeout=10)
    attempts = sdk.WebhooksApi(api).list_webhook_deliveries(hook.id)
    assert all(a.status_code == 200 for a in attempts.deliveries)


def test_9_a_mailbox_connected_through_oauth2_consent_syncs_with_its_tokens(
    deployment, journey, oauth2_server, oauth2_dovecot
):
    address = f"j{uuid.uuid4().hex[:10]}@example.com"
    # The POP3 mailbox cannot log in with tokens: refused before the user is sent to the provider.
    with pytest.raises(ApiException) as not_imap:
        sdk.OAuth2Api(journey.api).authorize_oauth2(
            PROVIDER,
            sdk.OAuth2AuthorizeRequest(return_url=RETURN_URL, email_address=address, account_id=journey.pop3_account),
        )
    assert not_imap.value.status == 409 and json.loads(not_imap.value.body)["code"] == "OAUTH2_NOT_SUPPORTED"
    oauth2_dovecot.append(oauth2_dovecot.add_user(address), "INBOX", to_bytes(plain_message("Over OAuth2")))
    begun = sdk.OAuth2Api(journey.api).authorize_oauth2(
        PROVIDER, sdk.OAuth2AuthorizeRequest(return_url=RETURN_URL, email_address=address)
    )
    # The user's browser: the provider's consent page (the user signs in and agrees), then back.
    consented = httpx.get(f"{begun.authorization_url}&test_user={address}", timeout=30)
    assert consented.status_code == 302
    callback = consented.headers["location"].replace(SERVICE_CALLBACK, deployment.api.url + "/api/oauth2/callback")
    back = httpx.get(callback, timeout=30)
    assert back.status_code == 303 and back.headers["location"].startswith(RETURN_URL + "?status=connected")
    account_id = parse_qs(urlsplit(back.headers["location"]).query)["accountId"][0]
    # The same redirect twice connects nothing more.
    assert httpx.get(callback, timeout=30).status_code == 403

    account = _accounts(journey.api).get_account(account_id)
    assert account.auth_type == "oauth2" and account.oauth2.token_state == "valid"
    started = sdk.SyncApi(journey.api).sync_account(account_id)
    status, _ = _wait_task(journey.api, started.task_id)
    assert status.status == "success", deployment.logs()
    inbox = _folders(journey.api, account_id)["INBOX"]
    assert [m.subject for m in _all_messages(journey.api, account_id, inbox.id)] == ["Over OAuth2"]
    raw = _accounts(journey.api).get_account_with_http_info(account_id).raw_data.decode()
    issued = [t for t in oauth2_server.tokens if t.user == address]
    assert issued and not any(t.access_token in raw or (t.refresh_token or "-") in raw for t in issued)


class WebhookReceiver:
    """An HTTP endpoint on 127.0.0.1 (the deployment's allow-list opens it) recording deliveries."""

    def __init__(self) -> None:
        received: queue.Queue = queue.Queue()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                received.put({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, timeout: float) -> dict:
        return self.received.get(timeout=timeout)


class EventsClient:
    """GET /api/events read by an SSE client in a thread of its own, as a web client would."""

    def __init__(self, url: str, token: str, account_id: str) -> None:
        self.url, self.token, self.account_id = url, token, account_id
        self.events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=60)) as client,
            connect_sse(
                client, "GET", self.url + "/api/events", params={"accountId": self.account_id}, headers=headers
            ) as source,
        ):
            for event in source.iter_sse():
                self.events.put((event.event, event.json()))
                if self._stop.is_set():
                    return

    def __enter__(self) -> EventsClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.events.get(timeout=timeout)[0] == "ready"

    def wait_for(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event, data = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event == name:
                return data
