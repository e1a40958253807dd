"""The changes feed: which messages and folders were created, updated or destroyed since a cursor.

Like JMAP's ``Email/changes``. A cursor is an account's change sequence number, opaque to
clients. Entries are read up to the account's sequence as committed when the request began, so a
page never shows part of a transaction, and a page ends where the next one starts. Within one
answer an id's entries collapse to what the client must do: fetch it (created or updated), drop
it (destroyed), or nothing (created and destroyed inside the window).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from email_service.db import Database
from email_service.errors import BadRequestError, ConflictError, NotFoundError, ServiceError
from email_service.models import Account, Change, ChangeEntity, ChangeKind
from email_service.tenancy import Principal

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
# First path segments of the API's fixed routes: ``/api/webhooks/changes`` must never name the
# changes of an account called "webhooks". Account ids are generated and never one of these.
RESERVED_ACCOUNT_IDS = frozenset({"accounts", "sync", "compose", "webhooks", "events", "changes"})
# A sequence number as decimal text, without sign or leading zeros, and within bigint.
_CURSOR = re.compile(r"0|[1-9][0-9]{0,17}")


class CursorExpiredError(ServiceError):
    """The log no longer holds every entry after the cursor: the client must resync."""

    status = 410
    error = "Gone"
    code = "CURSOR_EXPIRED"


@dataclass
class IdChanges:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChangesPage:
    account_id: str
    old_cursor: str
    new_cursor: str
    has_more: bool
    messages: IdChanges
    folders: IdChanges


def cursor_text(seq: int) -> str:
    return str(seq)


def parse_cursor(cursor: str) -> int:
    if not _CURSOR.fullmatch(cursor):
        raise BadRequestError("since is not a cursor this service gave out", code="INVALID_CURSOR")
    return int(cursor)


def _account(session: Session, account_id: str) -> tuple[int, int]:
    row = session.execute(
        select(Account.change_seq, Account.change_floor).where(Account.id == account_id, Account.deleted_at.is_(None))
    ).one_or_none()
    if row is None or account_id in RESERVED_ACCOUNT_IDS:
        raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
    return row.change_seq, row.change_floor


def _expired(since: int) -> CursorExpiredError:
    return CursorExpiredError(
        f"changes after cursor {since} are no longer kept; reload the account's folders and messages"
        " and start again from the cursor of GET /changes without since"
    )


def collapse(entries: list[tuple[str, ChangeKind]]) -> IdChanges:
    """What a client must do per id, from its entries in sequence order.

    Created then anything: created (the client fetches the current state), unless destroyed
    too, then nothing. Otherwise destroyed if the last entry destroys it, else updated. Ids are
    listed in the order of their first entry in the window.
    """
    first: dict[str, ChangeKind] = {}
    last: dict[str, ChangeKind] = {}
    for entity_id, kind in entries:
        first.setdefault(entity_id, kind)
        last[entity_id] = kind
    result = IdChanges()
    for entity_id, kind in first.items():
        if kind == ChangeKind.CREATED:
            if last[entity_id] != ChangeKind.DESTROYED:
                result.created.append(entity_id)
        elif last[entity_id] == ChangeKind.DESTROYED:
            result.destroyed.append(entity_id)
        else:
            result.updated.append(entity_id)
    return result


def changes_since(
    db: Database, principal: Principal, account_id: str, since: str | None, limit: int = DEFAULT_LIMIT
) -> ChangesPage:
    """The account's changes after ``since`` (at most ``limit`` log entries), or the current cursor."""
    limit = max(1, min(limit, MAX_LIMIT))
    with db.tenant_session(principal) as session:
        current, floor = _account(session, account_id)
        if since is None:
            # How a client starts: load the state, then follow the feed from this cursor.
            now = cursor_text(current)
            return ChangesPage(account_id, now, now, False, IdChanges(), IdChanges())
        start = parse_cursor(since)
        if start > current:
            # Well-formed, but not from this account's history (another account's, or a state this
            # service never reached): the client's copy disagrees with the account; it must reload.
            raise ConflictError(
                f"cursor {since} is ahead of the account's changes; reload the account and start again without since",
                code="CURSOR_UNKNOWN",
            )
        if start < floor:
            raise _expired(start)
        # An account's sequence numbers have no gaps (a rolled-back transaction gives its numbers
        # back), so the next ``limit`` entries are exactly this key range: a bounded scan of the
        # primary key, where ORDER BY .. LIMIT over the open range let the planner read and sort
        # every later entry when its statistics lagged (160 ms for 500 of 200,000 entries).
        end = min(current, start + limit)
        rows = session.execute(
            select(Change.seq, Change.entity, Change.entity_id, Change.kind)
            .where(Change.account_id == account_id, Change.seq > start, Change.seq <= end)
            .order_by(Change.seq)
        ).all()
        # Pruning deletes entries and raises the floor in one transaction; read after the entries,
        # the floor shows whether the pruner took any of them while this request read.
        if session.scalar(select(Account.change_floor).where(Account.id == account_id)) > start:
            raise _expired(start)
    messages = collapse([(r.entity_id, r.kind) for r in rows if r.entity == ChangeEntity.MESSAGE])
    folders = collapse([(r.entity_id, r.kind) for r in rows if r.entity == ChangeEntity.FOLDER])
    return ChangesPage(account_id, cursor_text(start), cursor_text(end), end < current, messages, folders)
