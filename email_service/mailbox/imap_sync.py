"""Incremental IMAP sync of one account.

Per folder the state the server gave last time (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, message
count) is kept. An unchanged folder costs one STATUS round trip whatever its size. New mail is
the UIDs the server has and the store has not, fetched in batches bounded by bytes, newest
first and the Inbox before other folders: during a first sync of a large mailbox the mail a
user looks at first is listable after the first batch, not after the whole folder. Flag
changes come from CONDSTORE's CHANGEDSINCE when the server has it, else from a flags scan.
Expunged messages are the stored UIDs the server no longer lists. A UIDVALIDITY change
means the old UIDs are void, so that folder is rebuilt. Batches commit as they go, so a sync
that dies half way loses nothing and the next one fetches only what is still missing.
When a folder changed, one UID SEARCH ALL tells both what is new and what was expunged.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence

from email_service.mail.folders import (
    INBOX,
    assign_roles,
    display_name,
    listed_once,
    parent_name,
    parse_list_line,
    selectable,
)
from email_service.mail.parse import parse_message
from email_service.mail.parse_pool import ParseJob, ParsePool
from email_service.mail.too_large import shown_by_headers, stand_in
from email_service.mailbox.heap import return_large_buffers
from email_service.mailbox.result import ProgressCallback, SyncResult
from email_service.mailbox.store import IncomingMessage, MailStore, RemoteFolder
from email_service.models import Folder
from email_service.observability import metrics
from email_service.protocols.connect import MAX_FETCHED_MESSAGE, size_words
from email_service.protocols.errors import ConnectionFailed, MailServerError
from email_service.protocols.imap import ImapSession

log = logging.getLogger(__name__)
# Up to three batches are held at once (one being fetched, one parsed, one written), so a
# batch is kept smaller than when each was fetched and stored in turn.
BATCH_BYTES = 2 * 1024 * 1024
BATCH_MESSAGES = 100
FIRST_BATCH_MESSAGES = 32
# Below this many new messages a folder is parsed in the job's own process: starting workers
# would cost more than it saves.
POOL_MIN_MESSAGES = 64
# One writer: on two cores a second one (a second PostgreSQL backend) did not pay for the batch
# of memory it holds; more may on bigger machines.
WRITER_THREADS = 2


def remote_folders(lines: Iterable[bytes]) -> list[RemoteFolder]:
    entries = listed_once(parsed for parsed in map(parse_list_line, lines) if parsed is not None)
    return [
        RemoteFolder(
            name=entry.name,
            display_name=display_name(entry.name, entry.delimiter),
            type=kind,
            delimiter=entry.delimiter,
            parent_name=parent_name(entry.name, entry.delimiter),
            attributes=tuple(entry.attributes),
        )
        for entry, kind in zip(entries, assign_roles(entries), strict=True)
    ]


def batches(uids: Sequence[int], sizes: dict[int, int]) -> Iterable[list[int]]:
    """Groups of UIDs small enough to hold in memory at once; a huge message goes alone.

    The first group is small, so that parsing and writing start while the rest is fetched.
    """
    batch: list[int] = []
    total = 0
    limit = FIRST_BATCH_MESSAGES
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (total + size > BATCH_BYTES or len(batch) >= limit):
            yield batch
            batch, total, limit = [], 0, BATCH_MESSAGES
        batch.append(uid)
        total += size
    if batch:
        yield batch


class ImapSync:
    def __init__(
        self,
        store: MailStore,
        session: ImapSession,
        progress: ProgressCallback,
        *,
        force: bool = False,
        only_folders: Sequence[str] | None = None,
        list_folders: bool = True,
        max_new: int | None = None,
        parse_pool: bool = True,
    ) -> None:
        self.store, self.session, self.progress = store, session, progress
        self.force = force
        # At most this many new messages per folder (the newest); the folder is then named in
        # ``result.folders_left`` for a queued sync to finish. None: all of them.
        self.max_new = max_new
        # False where forking parse workers is out of place (a process full of other threads).
        self.parse_pool = parse_pool
        self.only = set(only_folders or ())
        # INBOX is the one name in any case (RFC 3501 5.1): the watcher asks for "INBOX" where the
        # server lists "Inbox". Every other name is matched exactly.
        self._inbox_asked = any(name.upper() == "INBOX" for name in self.only)
        # A change reported on a known folder (IDLE) does not need the folder list checked again.
        self.list_folders = list_folders or not self.only
        self.result = SyncResult()
        self._unchanged: list[Folder] = []
        self._pool: ParsePool | None = None
        self._pool_tried = False

    def run(self) -> SyncResult:
        # Before the parse workers fork (they inherit it) and the writers start.
        return_large_buffers()
        try:
            return metrics.sync_finished("imap", self._run())
        finally:
            if self._pool is not None:
                self._pool.close()

    def _run(self) -> SyncResult:
        self.progress(1)
        folders = {} if self.list_folders else self.store.folders()
        if not any(self._named(f) for f in folders.values()):
            folders, removed = self.store.reconcile_folders(
                remote_folders(self.session.list_folders()), uidvalidities=self._uidvalidities
            )
            self.result.messages_removed += removed
        # The Inbox first (a stable sort keeps the others in their order): it is what a user opens.
        chosen = sorted((f for f in folders.values() if selectable(f.attributes)), key=lambda f: f.type != INBOX)
        if self.only:
            chosen = [f for f in chosen if self._named(f) or f.display_name in self.only or f.id in self.only]
        self.progress(5)
        for index, folder in enumerate(chosen):
            start = 5 + 90 * index / len(chosen)
            span = 90 / len(chosen)
            try:
                self._sync_folder(folder, lambda fraction, s=start, w=span: self.progress(int(s + w * fraction)))
                self.result.folders_synced += 1
            except ConnectionFailed:
                raise
            except MailServerError as exc:
                # The server refused this folder only; the others still sync.
                log.warning("folder %s failed: %s", folder.name, exc)
                self.result.errors.append(f"{folder.display_name}: {exc}")
        self.store.touch_folders(self._unchanged)
        self.progress(100)
        return self.result

    def _uidvalidities(self, names: Sequence[str]) -> dict[str, int]:
        """The UIDVALIDITY of new folders, to tell one renamed by another client (one STATUS each).

        Asked only when folders went and others came since the last list. A folder the server
        will not report on is simply not paired: it is then a new folder, as it always was.
        """
        found: dict[str, int] = {}
        for name in names:
            try:
                found[name] = self.session.status(name).uidvalidity
            except ConnectionFailed:
                raise
            except MailServerError as exc:
                log.info("no UIDVALIDITY for new folder %s: %s", name, exc)
        return found

    def _named(self, folder: Folder) -> bool:
        """Whether ``only_folders`` names this folder by its server name."""
        return folder.name in self.only or (self._inbox_asked and folder.name.upper() == "INBOX")

    def _sync_folder(self, folder: Folder, progress: ProgressCallback) -> None:
        session = self.session
        status = session.status(folder.name)
        unchanged = (
            not self.force
            and folder.uidvalidity == status.uidvalidity
            and folder.uidnext == status.uidnext
            and folder.message_count == status.messages
            and (session.condstore and folder.highestmodseq == status.highestmodseq)
        )
        if unchanged:
            # Marked synced with the other unchanged folders at the end: one write, not one each.
            self._unchanged.append(folder)
            return
        if folder.uidvalidity is not None and folder.uidvalidity != status.uidvalidity:
            self.result.messages_removed += self.store.clear_folder(folder)
            folder.highestmodseq = None
        mailbox = session.examine(folder.name)
        local = self.store.uids(folder)
        # One UID SEARCH gives both what is new and what went; a message that failed to store
        # last time is simply still "new".
        server_uids = set(session.search_uids())
        # Newest (highest UID) first; a sync cut off half way leaves the oldest mail for the next one.
        new = sorted(server_uids - local, reverse=True)
        left = self.max_new is not None and len(new) > self.max_new
        if left:
            new = new[: self.max_new]
        missed = self._fetch_new(folder, new, progress)

        kept = local & server_uids
        if kept:
            known = f"1:{max(kept)}"
            if session.condstore and folder.highestmodseq and not self.force:
                changes = session.flags(known, changed_since=folder.highestmodseq)
            else:
                changes = session.flags(known)
            self.result.messages_updated += self.store.apply_flags(
                folder, {uid: change for uid, change in changes.items() if uid in kept}
            )
        self.result.messages_removed += self.store.remove_uids(folder, local - server_uids)

        if left:
            self.result.folders_left.append(folder.name)
        # With older mail still to fetch (or mail the server would not give this time) the folder
        # must not look unchanged to the next sync: its UIDNEXT is not kept, nor a HIGHESTMODSEQ
        # past the flags already applied.
        incomplete = left or missed
        self.store.save_folder_state(
            folder,
            uidvalidity=mailbox.uidvalidity,
            uidnext=None if incomplete else mailbox.uidnext,
            highestmodseq=folder.highestmodseq if incomplete else mailbox.highestmodseq,
        )

    def _parse_pool(self, count: int) -> ParsePool | None:
        """The job's parse pool, started the first time a folder has enough new mail to pay for it."""
        if self.parse_pool and self._pool is None and not self._pool_tried and count >= POOL_MIN_MESSAGES:
            self._pool_tried = True
            self._pool = ParsePool.start()
        return self._pool

    def _fetch_new(self, folder: Folder, uids: list[int], progress: ProgressCallback) -> bool:
        """Fetch and store ``uids``; whether some of them the server would not give (said in the errors)."""
        if not uids:
            return False
        refusals: list[str] = []
        missed = 0
        sizes = self.session.sizes(uids)
        # Too large to hold: not downloaded, but shown by its headers (mail.too_large).
        too_large = [uid for uid in uids if sizes.get(uid, 0) > MAX_FETCHED_MESSAGE]
        if too_large:
            self.result.errors.append(
                shown_by_headers(folder.display_name, "UID", too_large, size_words(MAX_FETCHED_MESSAGE))
            )
            self._store_headers_alone(folder, too_large, sizes)
            skipped = set(too_large)
            uids = [uid for uid in uids if uid not in skipped]
            if not uids:
                return False
        pool = self._parse_pool(len(uids))
        # A pipeline: this thread fetches, the pool parses, a writer thread stores. While one
        # batch is written the next is parsed and the one after fetched.
        writer = _BatchWriter(self.store, folder, self.result, lambda done: progress(done / len(uids)))
        try:
            for batch in batches(uids, sizes):
                incoming = [
                    IncomingMessage(raw=m.raw, uid=m.uid, flags=m.flags, internaldate=m.internaldate, modseq=m.modseq)
                    for m in self.session.fetch_messages(batch, refusals=refusals)
                ]
                # A batch the server answered only in part: the rest is said, and the batches after
                # it go on (failing the folder here would stop at the same message every time).
                missed += len(set(batch) - {item.uid for item in incoming})
                metrics.fetched("imap", (item.raw for item in incoming))
                writer.put(incoming, pool.parse([item.raw for item in incoming]) if pool is not None else None)
        except BaseException:
            # What was fetched before the failure is still stored: a sync cut off half way loses nothing.
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                log.exception("storing the batches fetched before a failure failed too")
            raise
        writer.close()
        if refusals:
            self.result.errors.append(
                f"{folder.display_name}: {missed} new message(s) not given by the server this time ({refusals[0]})"
            )
        return bool(refusals)

    def _store_headers_alone(self, folder: Folder, uids: list[int], sizes: dict[int, int]) -> None:
        """Messages too large to download, stored by their header sections with a note as body.

        Stored, their UIDs are known: they are not new at the next sync, and their flags, moves
        and deletions work as any message's. Header sections are small; a batch of them at once.
        """
        limit = size_words(MAX_FETCHED_MESSAGE)
        for start in range(0, len(uids), BATCH_MESSAGES):
            batch = uids[start : start + BATCH_MESSAGES]
            incoming = [
                IncomingMessage(
                    raw=stand_in(m.raw, size_words(sizes[m.uid]), limit),
                    uid=m.uid,
                    flags=m.flags,
                    internaldate=m.internaldate,
                    modseq=m.modseq,
                )
                for m in self.session.fetch_messages(batch, headers_only=True)
                if m.uid in sizes
            ]
            added, errors = self.store.add_messages(folder, incoming)
            self.result.messages_added += len(added)
            self.result.errors += errors


class _BatchWriter:
    """Stores fetched batches from threads of their own, while the fetching thread goes on.

    Writing a batch is mostly waiting (for PostgreSQL, for fsync), time in which the next batch
    is fetched and parsed. With several writers, batches commit independently and may finish
    out of order (a UID stored is simply not fetched again); errors are reported in batch order
    all the same. At most one batch waits here besides those being written, which bounds memory.
    A writer's failure stops the sync: the next ``put`` or ``close`` raises it.
    """

    def __init__(
        self,
        store: MailStore,
        folder: Folder,
        result: SyncResult,
        progress: Callable[[int], None],
        threads: int = WRITER_THREADS,
    ) -> None:
        self.store, self.folder, self.result, self.progress = store, folder, result, progress
        self._queue: queue.Queue[tuple[int, list[IncomingMessage], ParseJob | None] | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._reported = False
        self._done = 0
        self._batches = 0
        self._errors: dict[int, list[str]] = {}
        self._threads = [
            threading.Thread(target=self._run, name=f"sync-writer-{n}", daemon=True) for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, incoming: list[IncomingMessage], job: ParseJob | None) -> None:
        """Queue a batch; raises the writers' failure instead once there is one."""
        item = (self._batches, incoming, job)
        self._batches += 1
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue  # the writers are busy (or failed: checked above)

    def close(self) -> None:
        """Wait until every queued batch is stored; raises a writer's failure if not reported yet."""
        for _thread in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        for sequence in sorted(self._errors):
            self.result.errors += self._errors[sequence]
        self._errors.clear()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so put() never blocks for good; nothing more is stored
            sequence, incoming, job = item
            try:
                parsed = job.result() if job is not None else [parse_message(m.raw) for m in incoming]
                added, errors = self.store.add_parsed(self.folder, incoming, parsed)
                with self._lock:
                    self.result.messages_added += len(added)
                    self._errors[sequence] = errors
                    self._done += len(incoming)
                    self.progress(self._done)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the fetching thread
                with self._lock:
                    if self._error is None:
                        self._error = exc
