"""Listing messages: cursor pages in every sort and filter, and totals kept exact by the database."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from helpers import account_body, assert_error_shape
from messages import plain_message, to_bytes
from sqlalchemy import update

from email_service.cursors import query_fingerprint
from email_service.mailbox.store import IncomingMessage, MailStore, RemoteFolder
from email_service.models import Message

FOLDERS = [
    RemoteFolder(name=name, display_name=name, type=kind, delimiter=None, parent_name=None, attributes=())
    for name, kind in (("INBOX", "inbox"), ("Archive", "custom"))
]
SORTS = ["receivedAt:desc", "receivedAt:asc", "from:asc", "from:desc"]
FILTERS = ["all", "read", "unread"]
BASE = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


class Mailbox:
    def __init__(self, runtime, client, user) -> None:
        created = client.post("/api/accounts", json=account_body(isSyncEnabled=False), headers=user.headers)
        assert created.status_code == 201, created.text
        self.client, self.user, self.account_id = client, user, created.json()["id"]
        self.store = MailStore(runtime.db, runtime.objects, user.principal, self.account_id)
        self.folders, _ = self.store.reconcile_folders(FOLDERS)
        self.next_uid = 1

    def add(self, count: int, folder: str = "INBOX", *, start: int = 0) -> list[int]:
        """``count`` messages; several share a sender and an arrival time, so ids must break ties."""
        incoming = []
        for n in range(start, start + count):
            raw = to_bytes(plain_message(f"Message {n}", sender=f"sender{n % 4}@example.com"))
            incoming.append(
                IncomingMessage(
                    raw=raw,
                    uid=self.next_uid,
                    flags=("\\Seen",) if n % 3 == 0 else (),
                    internaldate=BASE + dt.timedelta(minutes=n // 2),
                )
            )
            self.next_uid += 1
        added, errors = self.store.add_messages(self.folders[folder], incoming)
        assert errors == []
        return added

    def get(self, path: str, **query):
        return self.client.get(f"/api/{self.account_id}{path}", params=query, headers=self.user.headers)

    def page(self, folder: str = "INBOX", **query) -> dict:
        response = self.get(f"/folders/{self.folders[folder].id}/messages", **query)
        assert response.status_code == 200, response.text
        return response.json()

    def walk(self, limit: int, cursor: str | None = None, **query) -> list[str]:
        """Every id from ``cursor`` (or the start), following nextCursor to the last page."""
        seen = []
        while True:
            page = self.page(limit=limit, **query, **({"cursor": cursor} if cursor else {}))
            seen += [m["id"] for m in page["messages"]]
            cursor = page["pagination"]["nextCursor"]
            if cursor is None:
                return seen
            assert len(page["messages"]) == limit

    def counts(self) -> dict[str, tuple[int, int]]:
        folders = self.get("/folders").json()["folders"]
        return {f["name"]: (f["messageCount"], f["unreadCount"]) for f in folders}


@pytest.fixture
def box(runtime, sync_client, user) -> Mailbox:
    # Walking every sort and filter page by page takes more requests than the per-user limits allow.
    return Mailbox(runtime, sync_client, user)


def test_cursor_pages_list_every_message_once_in_each_sort_and_filter(box):
    box.add(23)
    for sort in SORTS:
        for filter_ in FILTERS:
            whole = box.page(sort=sort, filter=filter_, limit=500)
            expected = [m["id"] for m in whole["messages"]]
            assert whole["pagination"]["total"] == len(expected) and whole["pagination"]["nextCursor"] is None
            assert box.walk(4, sort=sort, filter=filter_) == expected, (sort, filter_)
    first = box.page(limit=5)
    assert {**first["pagination"], "nextCursor": None} == {"total": 23, "limit": 5, "offset": 0, "nextCursor": None}
    assert first["pagination"]["nextCursor"]
    # A page reached by offset hands out a cursor too, so a client can switch to cursors anywhere.
    by_offset = box.page(limit=5, offset=5)
    after = box.page(limit=5, cursor=by_offset["pagination"]["nextCursor"])
    assert [m["id"] for m in after["messages"]] == [m["id"] for m in box.page(limit=5, offset=10)["messages"]]


def test_cursor_pages_neither_repeat_nor_skip_while_mail_arrives(box):
    box.add(10)
    first = box.page(limit=4, sort="receivedAt:asc")
    box.add(6, start=100)  # arrive later than everything listed so far
    rest = box.walk(4, sort="receivedAt:asc", cursor=first["pagination"]["nextCursor"])
    everything = [m["id"] for m in box.page(limit=500, sort="receivedAt:asc")["messages"]]
    assert [m["id"] for m in first["messages"]] + rest == everything and len(everything) == 16


def test_totals_and_folder_counts_follow_every_change(runtime, box):
    box.add(12)  # n % 3 == 0 read: 4 read, 8 unread
    inbox, archive = box.folders["INBOX"], box.folders["Archive"]
    assert box.counts() == {"INBOX": (12, 8), "Archive": (0, 0)}
    totals = {f: box.page(filter=f, limit=1)["pagination"]["total"] for f in FILTERS}
    assert totals == {"all": 12, "read": 4, "unread": 8}

    unread = box.page(filter="unread", limit=3)["messages"]
    for message in unread:
        changed = box.client.patch(
            f"/api/{box.account_id}/messages/{message['id']}", json={"isRead": True}, headers=box.user.headers
        )
        assert changed.status_code == 200, changed.text
    assert box.counts()["INBOX"] == (12, 5)
    assert box.page(filter="read", limit=1)["pagination"]["total"] == 7

    # A move (as write-back makes one) changes both folders, in the same statement.
    with runtime.db.tenant_session(box.user.principal) as session:
        session.execute(update(Message).where(Message.id == unread[0]["id"]).values(folder_id=archive.id))
        session.execute(update(Message).where(Message.id == unread[0]["id"]).values(is_read=False))
    assert box.counts() == {"INBOX": (11, 5), "Archive": (1, 1)}
    assert box.page("Archive", filter="unread", limit=5)["pagination"]["total"] == 1

    # Removed on the server: the rows go, and so do their counts; the same for a folder cleared.
    assert box.store.remove_uids(inbox, [1, 2, 3]) == 3  # UIDs 1 and 3 are unread, 1 is read (n=0)
    assert box.counts()["INBOX"] == (8, sum(1 for m in box.page(limit=50)["messages"] if not m["isRead"]))
    box.store.clear_folder(inbox)
    assert box.counts() == {"INBOX": (0, 0), "Archive": (1, 1)}
    assert box.page(limit=5)["pagination"]["total"] == 0


def test_a_message_seen_twice_is_counted_once(box):
    box.add(3)
    box.next_uid = 1
    assert box.add(3) == []  # the same UIDs again: the conflict rule stores nothing
    assert box.counts()["INBOX"] == (3, 2)


def _cursor(sort: str, filter_: str, *key: object) -> str:
    """A cursor of the service's format for a listing in ``sort`` and ``filter_``, holding ``key``."""
    document = {"q": query_fingerprint("messages", sort, filter_), "k": list(key)}
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("sort", "cursor"),
    [
        ("receivedAt:desc", "not-a-cursor"),
        ("receivedAt:desc", _cursor("receivedAt:desc", "all")),
        ("receivedAt:desc", _cursor("receivedAt:asc", "all", 0, "x")),  # made for another sort
        ("receivedAt:desc", _cursor("receivedAt:desc", "unread", 0, "x")),  # made for another filter
        ("receivedAt:desc", _cursor("receivedAt:desc", "all", "yesterday", "x")),
        ("receivedAt:desc", _cursor("receivedAt:desc", "all", 10**30, "x")),
        ("receivedAt:desc", _cursor("receivedAt:desc", "all", True, "x")),
        ("receivedAt:desc", _cursor("receivedAt:desc", "all", 0, ["x"])),
        ("from:asc", _cursor("from:asc", "all", 5, "x")),
        ("from:asc", _cursor("from:asc", "all", "\ud800", "x")),
        ("from:asc", _cursor("from:asc", "all", "a", "\u0000")),
    ],
)
def test_a_cursor_not_issued_for_the_query_answers_409(box, sort, cursor):
    box.add(2)
    response = box.get(f"/folders/{box.folders['INBOX'].id}/messages", limit=1, sort=sort, cursor=cursor)
    assert_error_shape(response, 409, "INVALID_CURSOR")


def test_a_cursor_of_the_wrong_shape_is_refused_by_the_contract(box):
    response = box.get(f"/folders/{box.folders['INBOX'].id}/messages", cursor="a/b+c")
    assert_error_shape(response, 400, "VALIDATION_ERROR")
