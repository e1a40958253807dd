"""Conversations: a folder's messages grouped by conversation, and one conversation across folders.

A message's ``conversation_id`` is computed when it is stored (from References, In-Reply-To,
its own Message-ID, else subject and sender; see ``mail/parse.py``) and, for mail written
through the API, from the message it replies to (``outgoing/compose.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, func, or_, select, tuple_
from sqlalchemy.orm import aliased

from email_service import cursors
from email_service.db import Database
from email_service.errors import NotFoundError
from email_service.models import Folder, Message
from email_service.services.mail import _require_account
from email_service.tenancy import Principal

# A message stored before it had a conversation stands alone, under its own id.
CONVERSATION = func.coalesce(Message.conversation_id, Message.id)


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    latest: Message
    latest_received_at: datetime
    message_count: int
    unread_count: int
    participants: list[str]


@dataclass(frozen=True)
class ConversationPage:
    conversations: list[ConversationSummary]
    next_cursor: str | None


@dataclass(frozen=True)
class ConversationMessages:
    id: str
    messages: list[Message]
    next_cursor: str | None


def list_conversations(
    db: Database, principal: Principal, account_id: str, folder_id: str, *, limit: int, cursor: str | None
) -> ConversationPage:
    """The folder's conversations, the one with the newest message first.

    A conversation stands in the folder's order where its newest message there does: the folder
    is walked newest first (its received_at index) keeping the messages no newer message of the
    same conversation follows, so a page reads about as many rows as it shows instead of grouping
    the whole folder. The cursor is the last shown conversation's newest message.
    """
    fingerprint = cursors.query_fingerprint("conversations", account_id, folder_id)
    newer = aliased(Message)
    newest_of_its_conversation = ~exists().where(
        newer.account_id == Message.account_id,
        newer.conversation_id == Message.conversation_id,
        newer.folder_id == Message.folder_id,
        tuple_(newer.received_at, newer.id) > tuple_(Message.received_at, Message.id),
    )
    heads = select(Message).where(Message.folder_id == folder_id, newest_of_its_conversation)
    if cursor is not None:
        when, last_id = cursors.decode(cursor, fingerprint, (int, str))
        heads = heads.where(tuple_(Message.received_at, Message.id) < tuple_(cursors.from_micros(when), last_id))
    heads = heads.order_by(Message.received_at.desc(), Message.id.desc()).limit(limit + 1)
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        folder = session.scalar(select(Folder.id).where(Folder.id == folder_id, Folder.account_id == account_id))
        if folder is None:
            raise NotFoundError(f"Folder with ID '{folder_id}' does not exist", code="FOLDER_NOT_FOUND")
        found = list(session.scalars(heads))
        page = found[:limit]
        ids = [m.conversation_id or m.id for m in page]
        in_page = and_(
            Message.account_id == account_id,
            Message.folder_id == folder_id,
            or_(Message.conversation_id.in_(ids), and_(Message.conversation_id.is_(None), Message.id.in_(ids))),
        )
        counts = {
            row.conversation: (row.total, row.unread)
            for row in session.execute(
                select(
                    CONVERSATION.label("conversation"),
                    func.count().label("total"),
                    func.count().filter(Message.is_read.is_(False)).label("unread"),
                )
                .where(in_page)
                .group_by(CONVERSATION)
            )
        }
        senders: dict[str, list[str]] = {conversation: [] for conversation in ids}
        for row in session.execute(
            select(CONVERSATION.label("conversation"), Message.from_address)
            .where(in_page, Message.from_address != "")
            .group_by(CONVERSATION, Message.from_address)
            .order_by(func.min(Message.received_at), Message.from_address)
        ):
            senders[row.conversation].append(row.from_address)
    summaries = [
        ConversationSummary(
            id=head.conversation_id or head.id,
            latest=head,
            latest_received_at=head.received_at,
            message_count=counts[head.conversation_id or head.id][0],
            unread_count=counts[head.conversation_id or head.id][1],
            participants=senders[head.conversation_id or head.id],
        )
        for head in page
    ]
    next_cursor = None
    if len(found) > limit:
        last = page[-1]
        next_cursor = cursors.encode(fingerprint, [cursors.micros(last.received_at), last.id])
    return ConversationPage(conversations=summaries, next_cursor=next_cursor)


def get_conversation(
    db: Database, principal: Principal, account_id: str, conversation_id: str, *, limit: int, cursor: str | None
) -> ConversationMessages:
    """Every message of the conversation in the account, whatever its folder, oldest first."""
    fingerprint = cursors.query_fingerprint("conversation", account_id, conversation_id)
    conditions = [
        Message.account_id == account_id,
        or_(
            Message.conversation_id == conversation_id,
            and_(Message.conversation_id.is_(None), Message.id == conversation_id),
        ),
    ]
    if cursor is not None:
        when, last_id = cursors.decode(cursor, fingerprint, (int, str))
        conditions.append(tuple_(Message.received_at, Message.id) > tuple_(cursors.from_micros(when), last_id))
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        rows = list(
            session.scalars(
                select(Message)
                .where(*conditions)
                .order_by(Message.received_at.asc(), Message.id.asc())
                .limit(limit + 1)
            )
        )
    if not rows and cursor is None:
        raise NotFoundError(f"Conversation with ID '{conversation_id}' does not exist", code="CONVERSATION_NOT_FOUND")
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = cursors.encode(fingerprint, [cursors.micros(page[-1].received_at), page[-1].id])
    return ConversationMessages(id=conversation_id, messages=page, next_cursor=next_cursor)
