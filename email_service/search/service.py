"""Searching an account's messages: full text ranked by ts_rank, filters, keyset pages.

The words are matched against each message's tsvector through ``email_search_range()`` (see
migrations 0012 and 0014) and, for a window found afresh, ``email_search_window()`` (0018), which
return only the caller's own matches, newest first, between keyset bounds; the filters on
sender, recipients and subject are prefix queries restricted to the vector's weight for that
field, so they are part of the same match. The folder and the star are kept beside each vector
too (migration 0017), so the functions walk one folder's or the starred matches alone.
Filters on the message's other columns (read, label, attachments) are applied by joining the
matches to ``messages`` in the caller's tenant session, under its row-level security like every
other read; when they drop matches the walk continues below the last match it read (or walks
the messages that pass them instead, see ``_matches``), so a filter never hides an older
message that passes it.

A word query ranks windows, newest first: each holds the newest matches below the window
before it that pass every filter, at most ``RANKED_WINDOW``, ranked by ``ts_rank``, ties newest
first. A window found afresh is also bounded by the work it takes: each read of matches takes
at most ``SCANNED_ROWS`` rows (see migration 0018), and with filters on messages the walks stop
after ``WINDOW_SECONDS``; so a phrase of common words that rarely stand together costs one
bounded read per page instead of a read of the whole account, and the window ends where the
reading stopped. A cursor keeps the window's oldest key, so later pages rank the same window
(plus, in the first window, mail that arrived since) and nothing is skipped when new mail pushes
older matches out of it; when a window is done, the next page begins the window below it. A
page ends with its window, so it may hold fewer hits than asked for, and still have a cursor.
Without words to rank (the field filters alone) pages are bounded the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime

from sqlalchemy import (
    REAL,
    Boolean,
    ColumnElement,
    DateTime,
    Integer,
    Text,
    and_,
    any_,
    cast,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, REGCONFIG, TSQUERY
from sqlalchemy.orm import Session

from email_service import cursors
from email_service.db import Database
from email_service.errors import ConflictError, NotFoundError
from email_service.models import Folder, Message
from email_service.services.mail import _require_account
from email_service.tenancy import Principal

_LANGUAGE = func.email_search_language(type_=REGCONFIG)
_WORD_FIELDS = ("text", "sender", "recipient", "subject")
# Weights the migration gives each field.
SUBJECT_WEIGHT, SENDER_WEIGHT, RECIPIENT_WEIGHT = "A", "B", "C"
# A word query ranks windows of at most this many matches (that pass the filters): ranking reads
# every ranked match's vector, and a common word matches most of a mailbox.
RANKED_WINDOW = 1000
# A window found by walking the account's rows reads at most this many (about 10-20 ms here): a
# phrase of common words, or a word minus a common one, may match few of the rows that hold its words.
SCANNED_ROWS = 4000
# With filters on messages, a window (or a page of words without ranking) is found by passes of
# walks (a bounded read takes 10-20 ms); no pass begins that the time left is not expected to
# hold, and once it has gone the window ends where the furthest walk got to.
WINDOW_SECONDS = 0.015
# Rows read by the first pass of a walk when filters on messages may drop matches (small enough
# for both walks' first passes to fit in WINDOW_SECONDS); later passes are sized for what is
# missing at the pace so far, up to the largest.
FIRST_PASS, LARGEST_PASS = 250, 16_000
# The largest finite value of PostgreSQL's real (float4), the type of ts_rank.
REAL_MAX = 3.4028234663852886e38


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
    # Stemmed in the configured language, each word also as written (migration 0024): either
    # form finds a message, and a word excluded with "-" excludes one that holds it in either.
    return func.email_search_words(text, type_=TSQUERY)


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


def _message_filters(query: SearchQuery) -> list[ColumnElement[bool]]:
    """The filters on a message's own columns that the search index does not hold."""
    conditions: list[ColumnElement[bool]] = []
    if query.has_attachment is not None:
        conditions.append(Message.attachment_count > 0 if query.has_attachment else Message.attachment_count == 0)
    if query.is_read is not None:
        conditions.append(Message.is_read.is_(query.is_read))
    if query.label is not None:
        conditions.append(any_(Message.keywords) == query.label)
    return conditions


def _conditions(account_id: str, query: SearchQuery) -> list[ColumnElement[bool]]:
    """Every filter, on ``messages``: for reading the messages that pass them."""
    conditions: list[ColumnElement[bool]] = [Message.account_id == account_id]
    if query.after is not None:
        conditions.append(Message.received_at >= query.after)
    if query.before is not None:
        conditions.append(Message.received_at < query.before)
    if query.is_starred is not None:
        conditions.append(Message.is_starred.is_(query.is_starred))
    if query.folder_id is not None:
        conditions.append(Message.folder_id == query.folder_id)
    return conditions + _message_filters(query)


@dataclass(frozen=True)
class _Match:
    message_id: str
    received_at: datetime
    rank: float

    @property
    def key(self) -> tuple[datetime, str]:
        return (self.received_at, self.message_id)


class _Walk:
    """Matches that pass the filters, newest first, found a pass at a time below where the last pass stopped.

    Complete down to the last key it read: ``found`` holds every match there that passes.
    """

    def __init__(
        self,
        session: Session,
        account_id: str,
        text_query: ColumnElement,
        query: SearchQuery,
        floor: tuple[datetime, str] | None,
        older_than: tuple[datetime, str] | None,
    ) -> None:
        self.session, self.account_id, self.text_query, self.query = session, account_id, text_query, query
        self.floor, self.older_than = floor, older_than
        self.filters = _message_filters(query)
        self.found: list[_Match] = []
        self.exhausted = False
        self.size = 0  # rows the last pass asked for
        self.read = 0  # rows read so far: matches, or messages that passed the filters
        self.seconds = 0.0

    def done(self, want: int | None) -> bool:
        return self.exhausted or (want is not None and len(self.found) >= want)

    def step(self, size: int | None) -> None:
        """One pass of at most ``size`` rows (None: to the end)."""
        start = time.perf_counter()
        self.read += self._read(size)
        self.seconds += time.perf_counter() - start
        self.size = size or 0

    def _read(self, size: int | None) -> int:
        raise NotImplementedError

    def cost_of_the_rest(self, want: int | None) -> float:
        """The time the missing matches should take at this walk's pace so far."""
        if self.exhausted:
            return 0.0
        missing = RANKED_WINDOW if want is None else want - len(self.found)
        return missing * self.seconds / max(len(self.found), 0.5)

    def next_size(self, want: int | None, seconds_left: float | None) -> int:
        """Enough rows for the missing matches at the share of rows that passed so far, with a margin,
        and no more than this walk's pace reads in ``seconds_left`` (None: no limit)."""
        if want is None or not self.found:
            size = min(LARGEST_PASS, 4 * self.size)
        else:
            missing = want - len(self.found)
            size = max(10, min(LARGEST_PASS, missing * self.read * 5 // (4 * len(self.found)) + 10))
        if seconds_left is not None and self.seconds > 0:
            size = max(10, min(size, int(seconds_left * self.read / self.seconds)))
        return size

    def _range(self, size: int | None):  # noqa: ANN202 - a SQLAlchemy table-valued function
        at = DateTime(timezone=True)
        floor, older = self.floor, self.older_than
        return (
            func.email_search_range(
                literal(self.account_id, Text),
                self.text_query,
                literal(self.query.after, at),
                literal(self.query.before, at),
                literal(floor[0] if floor else None, at),
                literal(floor[1] if floor else None, Text),
                literal(older[0] if older else None, at),
                literal(older[1] if older else None, Text),
                literal(size, Integer),
                literal(self.query.folder_id, Text),
                literal(self.query.is_starred, Boolean),
            )
            .table_valued("message_id", "received_at", "rank", with_ordinality="n")
            .render_derived(name="matches")
        )

    def _bounded(self, size: int | None):  # noqa: ANN202 - a SQLAlchemy table-valued function
        """At most ``size`` matches below ``older_than``, from a read of at most ``SCANNED_ROWS`` rows.

        When the read stops at its bound, its last row is the last row read (``last_read``, with
        a NULL rank if it does not match): the matches are complete down to it (migration 0018).
        """
        at = DateTime(timezone=True)
        older = self.older_than
        return (
            func.email_search_window(
                literal(self.account_id, Text),
                self.text_query,
                literal(self.query.after, at),
                literal(self.query.before, at),
                literal(older[0] if older else None, at),
                literal(older[1] if older else None, Text),
                literal(size, Integer),
                literal(self.query.folder_id, Text),
                literal(self.query.is_starred, Boolean),
                literal(SCANNED_ROWS, Integer),
            )
            .table_valued("message_id", "received_at", "rank", "last_read", with_ordinality="n")
            .render_derived(name="matches")
        )


class _WordWalk(_Walk):
    """Reads the matches of the words, then keeps those whose message passes the filters.

    With no floor (a window found afresh) each pass reads a bounded number of rows (see
    ``_bounded``), so no single statement waits on a whole account.
    """

    def _read(self, size: int | None) -> int:
        bounded = self.floor is None
        matches = self._bounded(size) if bounded else self._range(size)
        last_read = matches.c.last_read if bounded else literal(False)
        passes = matches.c.rank.is_not(None)  # not the row a bounded read stopped at
        statement = select(matches.c.message_id, matches.c.received_at, matches.c.rank, last_read.label("last_read"))
        if self.filters:
            joined = matches.outerjoin(Message, and_(Message.id == matches.c.message_id, *self.filters))
            passes = and_(passes, Message.id.is_not(None))
            statement = statement.select_from(joined)
        rows = self.session.execute(statement.add_columns(passes.label("passes")).order_by(matches.c.n)).all()
        self.found += [_Match(row.message_id, row.received_at, row.rank) for row in rows if row.passes]
        stopped = bool(rows) and rows[-1].last_read
        self.exhausted = not stopped and (size is None or len(rows) < size)
        if rows:
            self.older_than = (rows[-1].received_at, rows[-1].message_id)
        return len(rows)


class _FilterWalk(_Walk):
    """Reads the messages that pass the filters, then asks which of them match the words.

    Cheaper than reading the matches when the filters keep few of them (a label).
    """

    def _read(self, size: int | None) -> int:
        conditions = _conditions(self.account_id, self.query)
        if self.floor is not None:
            conditions.append(tuple_(Message.received_at, Message.id) >= tuple_(*self.floor))
        if self.older_than is not None:
            conditions.append(tuple_(Message.received_at, Message.id) < tuple_(*self.older_than))
        candidates = self.session.execute(
            select(Message.id, Message.received_at)
            .where(and_(*conditions))
            .order_by(Message.received_at.desc(), Message.id.desc())
            .limit(size)
        ).all()
        if candidates:
            among = func.email_search_among(
                literal(self.account_id, Text), self.text_query, literal([row.id for row in candidates], ARRAY(Text))
            ).table_valued("message_id", "rank")
            ranks = {row.message_id: row.rank for row in self.session.execute(select(among.c.message_id, among.c.rank))}
            self.found += [_Match(row.id, row.received_at, ranks[row.id]) for row in candidates if row.id in ranks]
            self.older_than = (candidates[-1].received_at, candidates[-1].id)
        self.exhausted = size is None or len(candidates) < size
        return len(candidates)


def _matches(
    session: Session,
    account_id: str,
    text_query: ColumnElement,
    query: SearchQuery,
    *,
    floor: tuple[datetime, str] | None,
    older_than: tuple[datetime, str] | None,
    want: int | None,
) -> tuple[list[_Match], tuple[datetime, str] | None]:
    """Matches newest first that pass every filter: at most ``want`` (None: all down to ``floor``).

    Only keys at or above ``floor`` and below ``older_than`` count. Also says where the matches
    end when older ones may have been left out: the ``want``-th match's key, or the key down to
    which the walk is complete when it stopped at ``WINDOW_SECONDS`` with fewer; None when none
    were left out.

    With filters on messages there are two ways: walking the matches (best when the filters
    keep most of them, or the words are rare) or the messages that pass the filters (best when
    they keep few and the words are common). Each is complete down to where it stopped, so
    either can answer alone. Both take a first pass; then the one whose pace promises the rest
    sooner takes the next, sized for what is missing, until one is done or the time is up.
    """
    deadline = None if want is None else time.perf_counter() + WINDOW_SECONDS

    def seconds_left() -> float | None:
        return None if deadline is None else deadline - time.perf_counter()

    words = _WordWalk(session, account_id, text_query, query, floor, older_than)
    walks: list[_Walk] = [words]
    first = want
    if words.filters:
        walks.append(_FilterWalk(session, account_id, text_query, query, floor, older_than))
        first = min(FIRST_PASS, 4 * want) if want is not None else FIRST_PASS
    for walk in list(walks):
        # The other walk's first pass begins only if a pass like the first still fits in the time.
        if walk is not words and (left := seconds_left()) is not None and left < words.seconds:
            walks.remove(walk)
            break
        walk.step(first)
        if walk.done(want):
            return _answer(walk, want)
    while not (walk := min(walks, key=lambda each: each.cost_of_the_rest(want))).done(want):
        if (left := seconds_left()) is not None and left <= 0:
            # Out of time: each walk is complete down to where it stopped; the one that went
            # furthest answers, and the matches end there.
            walk = max(walks, key=lambda each: len(each.found))
            return walk.found, walk.older_than
        walk.step(walk.next_size(want, left))
    return _answer(walk, want)


def _answer(walk: _Walk, want: int | None) -> tuple[list[_Match], tuple[datetime, str] | None]:
    """What a walk that is done found, and where its matches end (None: at the oldest)."""
    if want is not None and len(walk.found) >= want:
        return walk.found[:want], walk.found[want - 1].key
    return walk.found, None


def _best_of_window(
    session: Session,
    account_id: str,
    text_query: ColumnElement,
    query: SearchQuery,
    *,
    floor: tuple[datetime, str] | None,
    top: tuple[datetime, str] | None,
    after: tuple[float, datetime, str] | None,
    limit: int,
) -> tuple[list[_Match], tuple[datetime, str] | None]:
    """With no filters on messages: a page of the window, ranked by PostgreSQL, and the window's end.

    Only the page comes back rather than the whole window: building 1,000 rows in Python per
    search set off the interpreter's full garbage collections, 30 ms every few dozen searches.
    The end is where a window found afresh stopped (the first page of a window only): its
    oldest row when it is full or stopped at its bound on rows read, None when it reached the
    oldest match.
    """
    starting = after is None
    walk = _WordWalk(session, account_id, text_query, query, floor, top)
    # Found afresh with a bound on the rows read, or (later pages) the first page's window down to its floor.
    matches = walk._bounded(RANKED_WINDOW) if starting else walk._range(None)
    last_read = matches.c.last_read if starting else literal(False)
    oldest_first = {"order_by": matches.c.n.desc(), "rows": (None, None)}
    window = select(
        matches.c.message_id,
        matches.c.received_at,
        matches.c.rank,
        func.count().over().label("size"),
        func.first_value(matches.c.received_at).over(**oldest_first).label("end_at"),
        func.first_value(matches.c.message_id).over(**oldest_first).label("end_id"),
        func.first_value(last_read).over(**oldest_first).label("end_last_read"),
    ).subquery("window")
    statement = select(
        window.c.message_id,
        window.c.received_at,
        window.c.rank,
        window.c.size,
        window.c.end_at,
        window.c.end_id,
        window.c.end_last_read,
    )
    if after is not None:
        # ts_rank is a real; the cursor holds its shortest decimal, which is exact only as a real.
        statement = statement.where(
            tuple_(window.c.rank, window.c.received_at, window.c.message_id)
            < tuple_(cast(after[0], REAL), after[1], after[2])
        )
    # The row a bounded read stopped at (no rank) comes last, so that even a window without a
    # match says where it ends.
    rows = session.execute(
        statement.order_by(
            window.c.rank.is_(None), window.c.rank.desc(), window.c.received_at.desc(), window.c.message_id.desc()
        ).limit(limit + 1)
    ).all()
    stopped = bool(rows) and (rows[0].size >= RANKED_WINDOW or rows[0].end_last_read)
    end = (rows[0].end_at, rows[0].end_id) if stopped else None
    page = [_Match(row.message_id, row.received_at, row.rank) for row in rows if row.rank is not None]
    return page, end


def _rank_of_cursor(value: float) -> float:
    """A rank a search gave out: a finite value PostgreSQL's ``real`` holds (ts_rank's type)."""
    invalid = ConflictError("cursor is not one this service gave out", code="INVALID_CURSOR")
    try:
        rank = float(value)
    except OverflowError:  # an integer too large for a float: no rank ever looked like that
        raise invalid from None
    if not math.isfinite(rank) or abs(rank) > REAL_MAX:
        raise invalid
    return rank


def _ranked_page(
    session: Session,
    account_id: str,
    text_query: ColumnElement,
    query: SearchQuery,
    *,
    limit: int,
    cursor: str | None,
    fingerprint: str,
) -> tuple[list[_Match], str | None]:
    """A page of ranked windows: each ranks the newest matches below the last window's end.

    A cursor holds the last hit's rank and key (None: the next window begins), the window's
    end (its floor; None: the window holds every older match) and the key it began below (None:
    the first window, which takes in mail that arrived since).
    """
    after: tuple[float, datetime, str] | None = None
    floor: tuple[datetime, str] | None = None
    top: tuple[datetime, str] | None = None
    if cursor is not None:
        after_rank, when, last_id, floor_when, floor_id, top_when, top_id = cursors.decode(
            cursor,
            fingerprint,
            (
                (int, float, type(None)),
                (int, type(None)),
                (str, type(None)),
                (int, type(None)),
                (str, type(None)),
                (int, type(None)),
                (str, type(None)),
            ),
        )
        given = (after_rank, when, last_id), (floor_when, floor_id), (top_when, top_id)
        # Each part whole or absent, and a window's floor only with a place in it.
        if any(len({value is None for value in part}) > 1 for part in given) or (
            after_rank is None and floor_when is not None
        ):
            raise ConflictError("cursor is not one this service gave out", code="INVALID_CURSOR")
        if after_rank is not None:
            after = (_rank_of_cursor(after_rank), cursors.from_micros(when), last_id)
        if floor_when is not None:
            floor = (cursors.from_micros(floor_when), floor_id)
        if top_when is not None:
            top = (cursors.from_micros(top_when), top_id)
    starting = after is None
    if not _message_filters(query):
        page, end = _best_of_window(
            session, account_id, text_query, query, floor=floor, top=top, after=after, limit=limit
        )
        if starting:
            floor = end
    else:
        # Later pages rank everything down to the first page's window end.
        want = RANKED_WINDOW if starting else None
        window, end = _matches(session, account_id, text_query, query, floor=floor, older_than=top, want=want)
        if starting:
            floor = end
        ordered = sorted(window, key=lambda match: (match.rank, *match.key), reverse=True)
        if after is not None:
            ordered = [match for match in ordered if (match.rank, *match.key) < after]
        page = ordered[: limit + 1]
    window_end = [cursors.micros(floor[0]), floor[1]] if floor else [None, None]
    window_top = [cursors.micros(top[0]), top[1]] if top else [None, None]
    next_cursor = None
    if len(page) > limit:
        last = page[limit - 1]
        next_cursor = cursors.encode(
            fingerprint, [last.rank, cursors.micros(last.received_at), last.message_id, *window_end, *window_top]
        )
    elif floor is not None:
        # The window is done and older mail may match: the next page begins the window below it.
        next_cursor = cursors.encode(fingerprint, [None, None, None, None, None, *window_end])
    return page[:limit], next_cursor


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
    text_query = _text_query(query)
    with db.tenant_session(principal) as session:
        _require(session, account_id, query.folder_id)
        if text_query is None:
            return _filtered_page(session, account_id, query, limit=limit, cursor=cursor, fingerprint=fingerprint)
        if ranked:
            matches, next_cursor = _ranked_page(
                session, account_id, text_query, query, limit=limit, cursor=cursor, fingerprint=fingerprint
            )
        else:
            older_than = None
            if cursor is not None:
                when, last_id = cursors.decode(cursor, fingerprint, (int, str))
                older_than = (cursors.from_micros(when), last_id)
            matches, end = _matches(
                session, account_id, text_query, query, floor=None, older_than=older_than, want=limit + 1
            )
            next_cursor = None
            if len(matches) > limit:
                matches = matches[:limit]
                end = matches[-1].key
            # Fewer than asked for with an end: the walk's time was up there, and the next page goes on below it.
            if end is not None:
                next_cursor = cursors.encode(fingerprint, [cursors.micros(end[0]), end[1]])
        ids = [match.message_id for match in matches]
        # Not asked with no ids: an empty IN under row-level security is planned as a scan.
        found = session.scalars(select(Message).where(Message.id.in_(ids))) if ids else []
        messages = {message.id: message for message in found}
    hits = [
        Hit(message=messages[match.message_id], rank=match.rank if ranked else None)
        for match in matches
        if match.message_id in messages
    ]
    return SearchPage(hits=hits, next_cursor=next_cursor)


def _filtered_page(
    session: Session, account_id: str, query: SearchQuery, *, limit: int, cursor: str | None, fingerprint: str
) -> SearchPage:
    """No words: the messages that pass the filters, newest first."""
    conditions = _conditions(account_id, query)
    if cursor is not None:
        when, last_id = cursors.decode(cursor, fingerprint, (int, str))
        conditions.append(tuple_(Message.received_at, Message.id) < tuple_(cursors.from_micros(when), last_id))
    newest_first = (Message.received_at.desc(), Message.id.desc())
    rows = session.scalars(select(Message).where(and_(*conditions)).order_by(*newest_first).limit(limit + 1)).all()
    hits = [Hit(message=message, rank=None) for message in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = hits[-1].message
        next_cursor = cursors.encode(fingerprint, [cursors.micros(last.received_at), last.id])
    return SearchPage(hits=hits, next_cursor=next_cursor)
