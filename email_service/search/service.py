"""Searching an account's messages: full text ranked by ts_rank, filters, keyset pages.

The words are matched against each message's tsvector through ``email_search()`` (see
migration 0012), which uses the GIN index and returns only the caller's own matches; the
filters on sender, recipients and subject are prefix queries restricted to the vector's weight
for that field, so they use the same index. The matches are joined to ``messages`` in the
caller's tenant session, under its row-level security like every other read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime

from sqlalchemy import REAL, ColumnElement, Float, and_, any_, cast, func, literal_column, select, tuple_
from sqlalchemy.dialects.postgresql import REGCONFIG, TSQUERY
from sqlalchemy.orm import Session

from email_service import cursors
from email_service.db import Database
from email_service.errors import NotFoundError
from email_service.models import Folder, Message
from email_service.services.mail import _require_account
from email_service.tenancy import Principal

_SIMPLE = literal_column("'simple'::regconfig", REGCONFIG)
_LANGUAGE = func.email_search_language(type_=REGCONFIG)
_WORD_FIELDS = ("text", "sender", "recipient", "subject")
# Weights the migration gives each field.
SUBJECT_WEIGHT, SENDER_WEIGHT, RECIPIENT_WEIGHT = "A", "B", "C"


@dataclass(frozen=True)
class SearchQuery:
    """What to look for; None means "any"."""

    text: str | None = None
    sender: str | None = None
    recipient: str | None = None
    subject: str | None = None
    after: datetime | None = None
    before: datetime | None = None
    has_attachment: bool | None = None
    is_read: bool | None = None
    is_starred: bool | None = None
    label: str | None = None
    folder_id: str | None = None


@dataclass(frozen=True)
class Hit:
    message: Message
    rank: float | None


@dataclass(frozen=True)
class SearchPage:
    hits: list[Hit]
    next_cursor: str | None


def has_words(value: str | None) -> bool:
    """Whether a text has anything to search for (letters or digits), not just punctuation."""
    return value is not None and any(ch.isalnum() for ch in value)


def _words_query(text: str) -> ColumnElement:
    # As written, or stemmed in the configured language: either finds the message.
    return func.websearch_to_tsquery(_SIMPLE, text, type_=TSQUERY).op("||")(
        func.websearch_to_tsquery(_LANGUAGE, text, type_=TSQUERY)
    )


def _field_query(value: str, weight: str) -> ColumnElement:
    """Every word of ``value`` begins a word of the field stored with ``weight``."""
    return func.email_search_prefixes(value, weight, type_=TSQUERY)


def _text_query(query: SearchQuery) -> ColumnElement | None:
    """The tsquery every match must satisfy: the words and the field filters; None for neither."""
    parts = [_words_query(query.text or "")] if has_words(query.text) else []
    for value, weight in (
        (query.sender, SENDER_WEIGHT),
        (query.recipient, RECIPIENT_WEIGHT),
        (query.subject, SUBJECT_WEIGHT),
    ):
        if has_words(value):
            parts.append(_field_query(value or "", weight))
    if not parts:
        return None
    combined = parts[0]
    for part in parts[1:]:
        combined = combined.op("&&")(part)
    return combined


def _conditions(account_id: str, query: SearchQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [Message.account_id == account_id]
    if query.after is not None:
        conditions.append(Message.received_at >= query.after)
    if query.before is not None:
        conditions.append(Message.received_at < query.before)
    if query.has_attachment is not None:
        conditions.append(Message.attachment_count > 0 if query.has_attachment else Message.attachment_count == 0)
    if query.is_read is not None:
        conditions.append(Message.is_read.is_(query.is_read))
    if query.is_starred is not None:
        conditions.append(Message.is_starred.is_(query.is_starred))
    if query.label is not None:
        conditions.append(any_(Message.keywords) == query.label)
    if query.folder_id is not None:
        conditions.append(Message.folder_id == query.folder_id)
    return conditions


def _require(session: Session, account_id: str, folder_id: str | None) -> None:
    _require_account(session, account_id)
    if folder_id is not None:
        found = session.scalar(select(Folder.id).where(Folder.id == folder_id, Folder.account_id == account_id))
        if found is None:
            raise NotFoundError(f"Folder with ID '{folder_id}' does not exist", code="FOLDER_NOT_FOUND")


def search(
    db: Database, principal: Principal, account_id: str, query: SearchQuery, *, limit: int, cursor: str | None
) -> SearchPage:
    fingerprint = cursors.query_fingerprint("search", account_id, asdict(query))
    # PostgreSQL text cannot hold NUL: in words it means nothing; no label or folder id has one.
    query = replace(
        query,
        **{name: value.replace("\x00", "") for name in _WORD_FIELDS if (value := getattr(query, name)) is not None},
    )
    if "\x00" in (query.folder_id or ""):
        raise NotFoundError(f"Folder with ID '{query.folder_id}' does not exist", code="FOLDER_NOT_FOUND")
    if "\x00" in (query.label or ""):
        return SearchPage(hits=[], next_cursor=None)
    ranked = has_words(query.text)
    conditions = _conditions(account_id, query)
    newest_first = (Message.received_at.desc(), Message.id.desc())
    statement = select(Message)
    rank: ColumnElement = literal_column("NULL::real", Float)
    order = newest_first
    text_query = _text_query(query)
    if text_query is not None:
        matches = func.email_search(account_id, text_query).table_valued("message_id", "rank").alias("matches")
        statement = statement.join(matches, matches.c.message_id == Message.id)
        if ranked:
            rank = matches.c.rank
            order = (rank.desc(), *newest_first)
    if cursor is not None:
        if ranked:
            after_rank, when, last_id = cursors.decode(cursor, fingerprint, ((int, float), int, str))
            conditions.append(
                tuple_(rank, Message.received_at, Message.id)
                # ts_rank is a real; the cursor holds its shortest decimal, which is exact only as a real.
                < tuple_(cast(float(after_rank), REAL), cursors.from_micros(when), last_id)
            )
        else:
            when, last_id = cursors.decode(cursor, fingerprint, (int, str))
            conditions.append(tuple_(Message.received_at, Message.id) < tuple_(cursors.from_micros(when), last_id))
    with db.tenant_session(principal) as session:
        _require(session, account_id, query.folder_id)
        rows = session.execute(
            statement.add_columns(rank.label("rank")).where(and_(*conditions)).order_by(*order).limit(limit + 1)
        ).all()
    hits = [Hit(message=row.Message, rank=row.rank) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = hits[-1]
        key = [cursors.micros(last.message.received_at), last.message.id]
        next_cursor = cursors.encode(fingerprint, [last.rank, *key] if ranked else key)
    return SearchPage(hits=hits, next_cursor=next_cursor)
