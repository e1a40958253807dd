"""ImapSync's fetch / parse / write pipeline, with a scripted server and an in-memory store.

The real server and database are exercised by test_sync.py; here the pipeline's own promises:
every batch is stored with exactly what parse_message gives, what was fetched before a failure
is still stored, a failed write stops the sync, and the parse pool never outlives the job.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil
import pytest
from messages import realistic_mix

from email_service.mail.parse import parse_message
from email_service.mailbox import imap_sync
from email_service.mailbox.imap_sync import ImapSync
from email_service.protocols.errors import ConnectionFailed


@dataclass
class Fetched:
    uid: int
    raw: bytes
    flags: tuple[str, ...] = ()
    internaldate: None = None
    modseq: None = None


@dataclass
class State:
    uidvalidity: int = 7
    uidnext: int = 0
    highestmodseq: None = None
    messages: int = 0


class Server:
    condstore = False

    def __init__(self, mail: list[bytes], fail_on_fetch: int | None = None) -> None:
        self.mail = {uid: raw for uid, raw in enumerate(mail, start=1)}
        self.fail_on_fetch = fail_on_fetch
        self.fetches = 0
        self.examined: list[str] = []
        self.requested: list[list[int]] = []

    def list_folders(self) -> list[bytes]:
        return [b'(\\HasNoChildren) "/" INBOX']

    def status(self, name: str) -> State:
        self.examined.append(name)
        return State(uidnext=len(self.mail) + 1, messages=len(self.mail))

    def examine(self, name: str) -> State:
        return State(uidnext=len(self.mail) + 1, messages=len(self.mail))

    def search_uids(self) -> list[int]:
        return sorted(self.mail)

    def sizes(self, uids: list[int]) -> dict[int, int]:
        return {uid: len(self.mail[uid]) for uid in uids}

    def fetch_messages(self, uids: list[int], *, refusals: list[str] | None = None):
        self.fetches += 1
        self.requested.append(list(uids))
        if self.fetches == self.fail_on_fetch:
            raise ConnectionFailed("connection reset by imap.example.com")
        return [Fetched(uid, self.mail[uid]) for uid in uids]

    def flags(self, *_args, **_kwargs) -> dict:
        return {}


@dataclass
class Folder:
    id: str = "f1"
    name: str = "INBOX"
    display_name: str = "Inbox"
    type: str = "inbox"
    attributes: tuple = ()
    uidvalidity: int | None = None
    uidnext: int | None = None
    highestmodseq: int | None = None
    message_count: int = 0


@dataclass
class Store:
    fail_after: int | None = None
    stored: dict[int, object] = field(default_factory=dict)
    threads: set[str] = field(default_factory=set)
    calls: int = 0

    def reconcile_folders(self, remote, uidvalidities=None):
        return {"INBOX": Folder()}, 0

    def uids(self, folder) -> set[int]:
        return set(self.stored)

    def add_parsed(self, folder, incoming, parsed):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("database went away")
        for item, result in zip(incoming, parsed, strict=True):
            self.stored[item.uid] = result
        errors = [f"Inbox: message UID {item.uid} odd" for item in incoming if item.uid % 97 == 0]
        return [item.uid for item in incoming], errors

    def apply_flags(self, folder, changes) -> int:
        return 0

    def remove_uids(self, folder, uids) -> int:
        return 0

    def touch_folders(self, folders) -> None:
        pass

    def save_folder_state(self, folder, **state) -> None:
        folder.uidvalidity = state["uidvalidity"]


@pytest.fixture(scope="module")
def mail() -> list[bytes]:
    return list(realistic_mix(150, seed=12))


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    # Many batches from a small mailbox, so the pipeline has several in flight.
    monkeypatch.setattr(imap_sync, "BATCH_BYTES", 256 * 1024)
    monkeypatch.setattr(imap_sync, "FIRST_BATCH_MESSAGES", 5)


def children() -> set[int]:
    # This process's own children: a parse pool's workers are forked from it. Their descendants
    # are not counted: the session's worker process forks job horses of its own at any time.
    return {child.pid for child in psutil.Process().children()}


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "in-process"])
def test_every_message_is_stored_as_parse_message_gives_it(mail, monkeypatch, pool):
    if not pool:
        monkeypatch.setattr(imap_sync, "POOL_MIN_MESSAGES", 10**9)
    before = children()
    store, progress = Store(), []
    result = ImapSync(store, Server(mail), progress.append).run()
    assert result.messages_added == len(mail) and result.folders_synced == 1
    assert store.stored == {uid: parse_message(raw) for uid, raw in enumerate(mail, start=1)}
    # Errors come back in the order of the messages, whichever writer stored them.
    assert result.errors == [f"Inbox: message UID {uid} odd" for uid in (97,)]
    assert progress == sorted(progress) and progress[-1] == 100
    assert store.threads <= {f"sync-writer-{n}" for n in range(imap_sync.WRITER_THREADS)}
    assert children() - before == set()  # the pool is gone with the job


def test_what_was_fetched_before_a_failure_is_stored(mail):
    before = children()
    server, store = Server(mail, fail_on_fetch=4), Store()
    with pytest.raises(ConnectionFailed):
        ImapSync(store, server, lambda _p: None).run()
    # Three batches arrived before the connection broke; all of them were written. Newest
    # first: what is left for the next sync is the oldest mail.
    uids = sorted(server.mail, reverse=True)
    first_three = sum(len(batch) for batch in list(imap_sync.batches(uids, server.sizes(uids)))[:3])
    assert sorted(store.stored) == list(range(len(mail) - first_three + 1, len(mail) + 1))
    assert children() - before == set()


def test_a_failed_write_stops_the_sync(mail):
    before = children()
    store = Store(fail_after=2)
    with pytest.raises(RuntimeError, match="database went away"):
        ImapSync(store, Server(mail), lambda _p: None).run()
    # The failing batch, and at most the batches the other writers had already begun: none after it.
    assert 3 <= store.calls <= 2 + imap_sync.WRITER_THREADS
    assert children() - before == set()


def test_first_batch_is_small_and_batches_are_bounded():
    sizes = {uid: 1000 for uid in range(1, 1001)}
    groups = list(imap_sync.batches(sorted(sizes), sizes))
    assert [uid for group in groups for uid in group] == sorted(sizes)
    assert len(groups[0]) == imap_sync.FIRST_BATCH_MESSAGES
    assert all(len(g) <= imap_sync.BATCH_MESSAGES and sum(sizes[u] for u in g) <= imap_sync.BATCH_BYTES for g in groups)


def test_the_inbox_syncs_first_and_newest_mail_first(mail):
    class TwoFolders(Store):
        def reconcile_folders(self, remote, uidvalidities=None):
            archive = Folder(id="f0", name="Archive", display_name="Archive", type="archive")
            return {"Archive": archive, "INBOX": Folder()}, 0

    server = Server(mail)
    ImapSync(TwoFolders(), server, lambda _p: None).run()
    assert server.examined == ["INBOX", "Archive"]
    # The first batch asked for holds the newest messages (highest UIDs) the folder has.
    first = server.requested[0]
    assert sorted(first) == list(range(len(mail) - len(first) + 1, len(mail) + 1))


@pytest.mark.parametrize(
    ("asked", "synced"),
    [(["INBOX"], ["Inbox"]), (["inbox"], ["Inbox"]), (["Archive"], ["Archive"]), (["archive"], [])],
)
def test_inbox_is_asked_for_in_any_case_and_other_folders_by_their_exact_name(mail, asked, synced):
    # RFC 3501 5.1: INBOX is case-insensitive, so "INBOX" is the folder a server lists as "Inbox";
    # every other name is the server's own and matched as it is.
    class Listed(Store):
        def __init__(self) -> None:
            super().__init__()
            archive = Folder(id="f0", name="Archive", display_name="Archive", type="archive")
            self.listed = {"Inbox": Folder(name="Inbox"), "Archive": archive}

        def folders(self):
            return self.listed

        def reconcile_folders(self, remote, uidvalidities=None):
            return self.listed, 0

    server = Server(mail[:3])
    ImapSync(Listed(), server, lambda _p: None, only_folders=asked, list_folders=False).run()
    assert server.examined == synced
