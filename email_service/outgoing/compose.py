"""Sending mail and saving drafts: checked in full before anything is queued.

A sent message shows at once in the account's Sent folder (delivery status "queued"), a draft
in its Drafts folder; a job then delivers it over SMTP and files the copy on the IMAP server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cuid2 import Cuid
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from email_service.addresses import InvalidAddress, normalize
from email_service.changes import entries as changes
from email_service.changes.log import record
from email_service.errors import BadRequestError, ConflictError, NotFoundError, ServiceError
from email_service.mail.htmltext import html_to_text
from email_service.mail.parse import conversation_of_new_thread
from email_service.mailbox import moves
from email_service.models import Account, Attachment, DeliveryStatus, Folder, Message, TaskKind
from email_service.outgoing.build import Original, check_composition, check_html, new_message_id, reply_threading
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.storage import ObjectNotFound, unavailable_if_unreachable
from email_service.storage.streams import ChunkStream
from email_service.tenancy import Principal

new_id = Cuid().generate
PREVIEW_LENGTH = 200
# The spec caps to, cc and bcc at 100 each (maxItems); the envelope as a whole gets the same cap,
# the RCPT limit RFC 5321 4.5.3.1.8 asks servers to accept at least.
MAX_RECIPIENTS = 100
DISABLED_MESSAGE = "the account is disabled; enable it to send or save drafts"


class PayloadTooLargeError(ServiceError):
    status = 413
    error = "Payload too large"
    code = "PAYLOAD_TOO_LARGE"


@dataclass(frozen=True)
class Composed:
    message: Message
    task_id: str | None


def _single_line(value: str, field: str) -> str:
    if "\r" in value or "\n" in value:
        raise BadRequestError(f"{field} must not contain line breaks", code="HEADER_INJECTION")
    return value


def _addresses(values: list[str] | None, field: str) -> list[str]:
    result = []
    for value in values or []:
        _single_line(value, field)
        try:
            result.append(normalize(value))
        except InvalidAddress as exc:
            raise BadRequestError(f"{field} has an invalid address: {exc}", code="INVALID_EMAIL_FORMAT") from None
    return result


def _folder(
    session: Session, principal: Principal, account: Account, folder_type: str, name: str
) -> tuple[Folder, bool]:
    """The account's folder of ``folder_type``, and whether it was made just now."""
    # Sync gives each role to one folder; the order only makes the choice stable while it catches up.
    folder = session.scalar(
        select(Folder)
        .where(Folder.account_id == account.id, Folder.type == folder_type)
        .order_by(Folder.uidvalidity.is_(None), Folder.name, Folder.id)
        .limit(1)
    )
    if folder is not None:
        return folder, False
    # Never synced yet: the folder is made here and on the server when the job files the copy.
    # Another send, draft or sync of the account may be making one of that name at this moment:
    # its row is then waited for and taken, rather than failing on the unique name.
    made = session.scalar(
        insert(Folder)
        .values(
            id=new_id(),
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            account_id=account.id,
            name=name,
            display_name=name,
            type=folder_type,
            attributes=[f"\\{name}"],
        )
        .on_conflict_do_nothing(index_elements=[Folder.account_id, Folder.name])
        .returning(Folder.id)
    )
    # Inserted just now, or committed by the other writer (ON CONFLICT waited for it).
    folder = session.scalars(select(Folder).where(Folder.account_id == account.id, Folder.name == name)).one()
    return folder, made is not None


def _attachments(session: Session, account_id: str, ids: list[str]) -> list[Attachment]:
    found = {
        a.id: a
        for a in session.scalars(
            select(Attachment)
            .where(Attachment.id.in_(ids or []), Attachment.account_id == account_id)
            # Locked, so the sweep of unused uploads cannot remove one this message is taking.
            .with_for_update()
        )
    }
    missing = [i for i in ids or [] if i not in found]
    if missing:
        raise NotFoundError(f"Attachment with ID '{missing[0]}' does not exist", code="ATTACHMENT_NOT_FOUND")
    return [found[i] for i in ids]


def compose(runtime: Runtime, principal: Principal, body: dict[str, Any], *, draft: bool) -> Composed:
    for reference in [body["accountId"], body.get("inReplyTo") or "", *(body.get("attachmentIds") or [])]:
        if "\x00" in reference:
            # PostgreSQL text cannot hold NUL, so no stored id has one: nothing by that id exists.
            raise NotFoundError("No resource has an id with a NUL character")
    # NUL means nothing in mail text and PostgreSQL cannot store it.
    body = {**body, "subject": body["subject"].replace("\x00", ""), "body": body["body"].replace("\x00", "")}
    with runtime.db.tenant_session(principal) as session:
        account = session.scalar(select(Account).where(Account.id == body["accountId"], Account.deleted_at.is_(None)))
    if account is None:
        raise NotFoundError(f"Account with ID '{body['accountId']}' does not exist", code="ACCOUNT_NOT_FOUND")
    _require_enabled(account.is_enabled)
    subject = _single_line(body["subject"], "subject")
    to = _addresses(body.get("to"), "to")
    cc = _addresses(body.get("cc"), "cc")
    bcc = _addresses(body.get("bcc"), "bcc")
    reply_to = _addresses([body["replyTo"]], "replyTo")[0] if body.get("replyTo") else None
    if len(set(to) | set(cc) | set(bcc)) > MAX_RECIPIENTS:
        raise BadRequestError(
            f"to, cc and bcc together must not exceed {MAX_RECIPIENTS} recipients", code="TOO_MANY_RECIPIENTS"
        )
    try:
        # The very checks the message builder makes in the worker: what it would refuse is a 400 now.
        check_composition(
            from_address=account.email_address,
            from_name=account.account_name,
            to=to,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            subject=subject,
        )
        if body.get("isHtml"):
            # Shown sanitised on every read, and turned into text now: bounded work, however written.
            check_html(body["body"])
    except ValueError as exc:
        raise BadRequestError(str(exc), code="INVALID_MESSAGE") from None
    # Stored as written: what goes out (and into Drafts) is what the user wrote. The API sanitises
    # this HTML when it shows it (handlers/messages.py), as received mail is sanitised when stored.
    text, html = (html_to_text(body["body"]), body["body"]) if body.get("isHtml") else (body["body"], None)
    with _copies_removed_on_failure(runtime) as copied, runtime.db.tenant_session(principal) as session:
        if not draft and not account.smtp_hostname:
            raise ConflictError("the account has no SMTP server configured", code="SMTP_NOT_CONFIGURED")
        chosen = _attachments(session, account.id, body.get("attachmentIds") or [])
        total = len(body["body"].encode()) + sum(a.size for a in chosen)
        limit = runtime.settings.max_message_bytes
        if total > limit:
            raise PayloadTooLargeError(f"the message would be {total} bytes, above the limit of {limit}")
        headers: dict[str, str] = {}
        message_id_header = new_message_id(account.email_address.rpartition("@")[2])
        conversation_id = conversation_of_new_thread(message_id_header)
        if body.get("inReplyTo"):
            original = session.scalar(
                select(Message).where(Message.id == body["inReplyTo"], Message.account_id == account.id)
            )
            if original is None:
                raise NotFoundError(f"Message with ID '{body['inReplyTo']}' does not exist", code="MESSAGE_NOT_FOUND")
            # A reply joins the conversation of what it answers, whatever that conversation's root.
            conversation_id = original.conversation_id or original.id
            if original.message_id_header:
                # Stored as they go out (the send job builds from these): a thread's References may
                # hold thousands of ids, and each reply kept them all, megabytes a message.
                parent, references = reply_threading(
                    Original(
                        message_id=original.message_id_header,
                        references=_message_ids(_header(original.headers, "References")),
                    )
                )
                if parent is not None:
                    headers["In-Reply-To"] = parent
                    headers["References"] = " ".join(references)
        if reply_to:
            headers["Reply-To"] = reply_to
        folder, folder_is_new = _folder(
            session, principal, account, "drafts" if draft else "sent", "Drafts" if draft else "Sent"
        )
        now = datetime.now(UTC)
        message = Message(
            id=new_id(),
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            account_id=account.id,
            folder_id=folder.id,
            message_id_header=message_id_header,
            conversation_id=conversation_id,
            subject=subject,
            from_address=account.email_address,
            from_name=account.account_name,
            to_addresses=to,
            cc_addresses=cc,
            bcc_addresses=bcc,
            preview=" ".join(text.split())[:PREVIEW_LENGTH],
            body_text=text,
            body_html=html,
            headers=headers,
            received_at=now,
            is_read=True,
            is_draft=draft,
            delivery_status=str(DeliveryStatus.DRAFT if draft else DeliveryStatus.QUEUED),
            attachment_count=len(chosen),
            created_at=now,
            updated_at=now,
        )
        session.add(message)
        session.flush()
        for position, attachment in enumerate(chosen):
            _attach(runtime, session, principal, account.id, message.id, attachment, position, copied)
        logged = [changes.folder_created(folder.id)] if folder_is_new else []
        # In the message's transaction: a message queued to send always has its task.
        enqueued = tasks.enqueue(
            runtime,
            TaskKind.DRAFT if draft else TaskKind.SEND,
            principal,
            account_id=account.id,
            message_id=message.id,
            session=session,
        )
        # Last in the transaction: taking the account's sequence locks its row until commit.
        record(session, principal, account.id, [*logged, changes.message_created(message.id, folder.id)])
    return Composed(message=message, task_id=enqueued.task_id)


def _header(headers: dict[str, str], name: str) -> str:
    """A stored header by name, however the message spelt it ("REFERENCES", "references")."""
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), "")


def _message_ids(value: str) -> list[str]:
    """The <ids> in a header value, whatever separates them (repeated headers are stored joined by ", ")."""
    return re.findall(r"<[^<>\s]+>", value)


def _require_enabled(is_enabled: bool) -> None:
    # A disabled account talks to no server: nothing is sent or filed through it (as folders refuse).
    if not is_enabled:
        raise ConflictError(DISABLED_MESSAGE, code="ACCOUNT_DISABLED")


def retry_send(runtime: Runtime, principal: Principal, account_id: str, message_id: str) -> Composed:
    """Send again a message whose delivery failed or whose outcome is unknown, because the caller asks.

    An ambiguous message may already have reached its recipients; asking again is the caller's
    decision to risk a duplicate, which the service never takes on its own.
    """
    retryable = (str(DeliveryStatus.FAILED), str(DeliveryStatus.AMBIGUOUS))
    with runtime.db.tenant_session(principal) as session:
        row = session.execute(
            select(Message, Account.is_enabled)
            .join(Account, Account.id == Message.account_id)
            .where(Message.id == message_id, Message.account_id == account_id, Account.deleted_at.is_(None))
            .with_for_update(of=Message)
        ).one_or_none()
        if row is None:
            raise NotFoundError(f"Message with ID '{message_id}' does not exist", code="MESSAGE_NOT_FOUND")
        message = row.Message
        _require_enabled(row.is_enabled)
        if message.delivery_status not in retryable:
            state = message.delivery_status or "received mail"
            raise ConflictError(
                f"only a failed or ambiguous send can be sent again; this message is {state}", code="NOT_RETRYABLE"
            )
        message.delivery_status = str(DeliveryStatus.QUEUED)
        message.delivery_error = None
        message.updated_at = datetime.now(UTC)
        enqueued = tasks.enqueue(
            runtime, TaskKind.SEND, principal, account_id=account_id, message_id=message_id, session=session
        )
        record(
            session,
            principal,
            account_id,
            [changes.message_updated(message.id, message.folder_id, ["delivery_status"])],
        )
    return Composed(message=message, task_id=enqueued.task_id)


@contextmanager
def _copies_removed_on_failure(runtime: Runtime) -> Iterator[list[str]]:
    """Keys of attachment copies written for a message; removed if its transaction does not commit.

    The copies are written before the rows that point at them commit: a compose that fails after
    some (another attachment gone, storage or the database down, the commit refused) would leave
    objects no row names, which nothing would ever remove.
    """
    copied: list[str] = []
    try:
        yield copied
    except BaseException:
        moves.delete_objects(runtime, copied)
        raise


def _attach(
    runtime: Runtime,
    session: Session,
    principal: Principal,
    account_id: str,
    message_id: str,
    source: Attachment,
    position: int,
    copied: list[str],
) -> None:
    # ``position``: its place in the request's list, the order the files go out and are shown in.
    # ``copied`` gets the key of each copy made, before it is written, for removal on failure.
    if source.message_id is None:
        source.message_id = message_id  # an upload: the new message takes it
        source.position = position
        return
    # An attachment of another message: the new message gets its own copy, so deleting either
    # message never takes the other's bytes.
    copy_id = new_id()
    key = f"{principal.tenant_id}/{account_id}/attachments/{copy_id}"
    copied.append(key)
    # Raised inside the transaction, like the 404 below: no message is stored without its copy.
    with unavailable_if_unreachable():
        try:
            reader = runtime.objects.open(source.object_key)
        except ObjectNotFound:
            # Its row was read just before a clean-up (a rebuilt folder, a deleted message) removed
            # the bytes: gone, as its download says.
            raise NotFoundError(
                f"Attachment with ID '{source.id}' does not exist", code="ATTACHMENT_NOT_FOUND"
            ) from None
        with reader:
            runtime.objects.put(key, ChunkStream(reader), source.size, source.mime_type)
    session.add(
        Attachment(
            id=copy_id,
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            account_id=account_id,
            message_id=message_id,
            filename=source.filename,
            mime_type=source.mime_type,
            size=source.size,
            content_id=source.content_id,
            is_inline=source.is_inline,
            object_key=key,
            position=position,
        )
    )
