"""Changing a message through the API: the new state shows at once, a job takes it to the server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from email_service.changes import entries as changes
from email_service.changes.log import record
from email_service.errors import NotFoundError
from email_service.mailbox.moves import waits_for_server_move
from email_service.mailbox.writeback import WRITTEN_FIELDS
from email_service.models import Account, Message, TaskKind
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.services.mail import MessageDetail, get_message
from email_service.tenancy import Principal


def update_message(
    runtime: Runtime, principal: Principal, account_id: str, message_id: str, body: dict[str, Any]
) -> MessageDetail:
    with runtime.db.tenant_session(principal) as session:
        account = session.scalar(select(Account).where(Account.id == account_id, Account.deleted_at.is_(None)))
        message = session.scalar(
            select(Message).where(Message.id == message_id, Message.account_id == account_id).with_for_update()
        )
        if account is None or message is None:
            raise NotFoundError(f"Message with ID '{message_id}' does not exist", code="MESSAGE_NOT_FOUND")
        columns: list[str] = []
        for field, column in (("isRead", "is_read"), ("isStarred", "is_starred"), ("isSpam", "is_spam")):
            if field in body and getattr(message, column) != body[field]:
                setattr(message, column, body[field])
                columns.append(column)
        if "labels" in body and sorted(set(body["labels"])) != sorted(message.keywords):
            message.keywords = sorted(set(body["labels"]))
            columns.append("keywords")
        changed = bool(columns)
        if changed:
            # A message moved here and not yet on the server has no UID until the move is done;
            # its flags wait with it, and the move's end writes them (server_moves).
            moving = message.uid is None and waits_for_server_move(session, message.id)
            on_server = account.protocol == "imap" and (message.uid is not None or moving)
            message.updated_at = datetime.now(UTC)
            # A row pending with no fields listed (from before they were kept) waits to be written
            # whole: naming only this change's fields would drop the earlier one.
            waiting = WRITTEN_FIELDS if message.writeback_pending and not message.writeback_fields else set()
            # Never cleared here: a change still waiting for the server keeps waiting.
            message.writeback_pending = message.writeback_pending or on_server
            if on_server:
                # Only what changed here goes to the server: another client's flags stay.
                message.writeback_fields = sorted(set(message.writeback_fields or ()) | waiting | set(columns))
            # The flush runs the UPDATE, and with it the trigger that keeps the folder's counts.
            session.flush()
            if on_server and not moving:
                tasks.enqueue(
                    runtime,
                    TaskKind.WRITEBACK,
                    principal,
                    account_id=account_id,
                    message_id=message_id,
                    session=session,
                )
            # Last in the transaction: taking the account's sequence locks its row until commit.
            record(session, principal, account_id, [changes.message_updated(message.id, message.folder_id, columns)])
    return get_message(runtime.db, principal, account_id, message_id)
