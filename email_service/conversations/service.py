"""Conversations: a folder's messages grouped by conversation, and one conversation across folders.

A message's ``conversation_id`` is computed when it is stored (from References, In-Reply-To,
its own Message-ID, else subject and sender; see ``mail/parse.py``) and, for mail written
through the API, from the message it replies to (``outgoing/compose.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select, tuple_
from sqlalchemy.dialects.postgresql import distinct_on

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
    """The folder's conversations, the one with the newest message first."""
    fingerprint = cursors.query_fingerprint("conversations", account_id, folder_id)
    latest = func.max(Message.received_at)
    grouped = (
        select(
            CONVERSATION.label("conversation"),
            latest.label("latest"),
            func.count().label("total"),
            func.count().filter(Message.is_read.is_(False)).label("unread"),
        )
        .where(Message.folder_id == folder_id)
        .group_by(CONVERSATION)
    )
    if cursor is not None:
        when, last_id = cursors.decode(cursor, fingerprint, (int, str))
        grouped = grouped.having(tuple_(latest, CONVERSATION) < tuple_(cursors.from_micros(when), last_id))
    grouped = grouped.order_by(latest.desc(), CONVERSATION.desc()).limit(limit + 1)
    with db.tenant_session(principal) as session:
        _require_account(session, account_id)
        folder = session.scalar(select(Folder.id).where(Folder.id == folder_id, Folder.account_id == account_id))
        if folder is None:
            raise NotFoundError(f"Folder with ID '{folder_id}' does not exist", code="FOLDER_NOT_FOUND")
        groups = session.execute(grouped).all()[: limit + 1]
        page = groups[:limit]
        ids = [g.conversation for g in page]
        in_page = and_(Message.folder_id == folder_id, CONVERSATION.in_(ids))
        newest = {
            m.conversation_id or m.id: m
            for m in session.scalars(
                select(Message)
                .where(in_page)
                .ext(distinct_on(CONVERSATION))
                .order_by(CONVERSATION, Message.received_at.desc(), Message.id.desc())
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
            id=g.conversation,
            latest=newest[g.conversation],
            latest_received_at=g.latest,
            message_count=g.total,
            unread_count=g.unread,
            participants=senders[g.conversation],
        )
        for g in page
    ]
    next_cursor = None
    if len(groups) > limit:
        last = summaries[-1]
        next_cursor = cursors.encode(fingerprint, [cursors.micros(last.latest_received_at), last.id])
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
