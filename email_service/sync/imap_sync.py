"""Incremental IMAP sync of one account.

Per folder the state the server gave last time (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, message
count) is kept. An unchanged folder costs one STATUS round trip whatever its size. New mail is
the UIDs the server has and the store has not, fetched in batches bounded by bytes. Flag
changes come from CONDSTORE's CHANGEDSINCE when the server has it, else from a flags scan.
Expunged messages are the stored UIDs the server no longer lists. A UIDVALIDITY change
means the old UIDs are void, so that folder is rebuilt. Batches commit as they go, so a sync
that dies half way loses nothing and the next one fetches only what is still missing.
When a folder changed, one UID SEARCH ALL tells both what is new and what was expunged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from email_service.mail.folders import display_name, folder_type, parent_name, parse_list_line
from email_service.models import Folder
from email_service.protocols.errors import ConnectionFailed, MailServerError
from email_service.protocols.imap import ImapSession
from email_service.sync.result import ProgressCallback, SyncResult
from email_service.sync.store import IncomingMessage, MailStore, RemoteFolder

log = logging.getLogger(__name__)
NOT_SELECTABLE = {"\\noselect", "\\nonexistent"}
BATCH_BYTES = 8 * 1024 * 1024
BATCH_MESSAGES = 200


def remote_folders(lines: Iterable[bytes]) -> list[RemoteFolder]:
    folders = []
    for line in lines:
        parsed = parse_list_line(line)
        if parsed is None:
            continue
        attributes, delimiter, name = parsed
        folders.append(
            RemoteFolder(
                name=name,
                display_name=display_name(name, delimiter),
                type=folder_type(name, attributes, delimiter),
                delimiter=delimiter,
                parent_name=parent_name(name, delimiter),
                attributes=tuple(attributes),
            )
        )
    return folders


def batches(uids: Sequence[int], sizes: dict[int, int]) -> Iterable[list[int]]:
    """Groups of UIDs small enough to hold in memory at once; a huge message goes alone."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (total + size > BATCH_BYTES or len(batch) >= BATCH_MESSAGES):
            yield batch
            batch, total = [], 0
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
    ) -> None:
        self.store, self.session, self.progress = store, session, progress
        self.force = force
        self.only = set(only_folders or ())
        self.result = SyncResult()

    def run(self) -> SyncResult:
        self.progress(1)
        folders, removed = self.store.reconcile_folders(remote_folders(self.session.list_folders()))
        self.result.messages_removed += removed
        chosen = [f for f in folders.values() if not ({a.lower() for a in f.attributes} & NOT_SELECTABLE)]
        if self.only:
            chosen = [f for f in chosen if f.name in self.only or f.display_name in self.only or f.id in self.only]
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
        self.progress(100)
        return self.result

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
            self.store.touch_folder(folder)
            return
        if folder.uidvalidity is not None and folder.uidvalidity != status.uidvalidity:
            self.result.messages_removed += self.store.clear_folder(folder)
            folder.highestmodseq = None
        mailbox = session.examine(folder.name)
        local = self.store.uids(folder)
        # One UID SEARCH gives both what is new and what went; a message that failed to store
        # last time is simply still "new".
        server_uids = set(session.search_uids())
        self._fetch_new(folder, sorted(server_uids - local), progress)

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

        self.store.save_folder_state(
            folder,
            uidvalidity=mailbox.uidvalidity,
            uidnext=mailbox.uidnext,
            highestmodseq=mailbox.highestmodseq,
            message_count=mailbox.messages,
        )

    def _fetch_new(self, folder: Folder, uids: list[int], progress: ProgressCallback) -> None:
        if not uids:
            return
        sizes = self.session.sizes(uids)
        done = 0
        for batch in batches(uids, sizes):
            incoming = [
                IncomingMessage(raw=m.raw, uid=m.uid, flags=m.flags, internaldate=m.internaldate, modseq=m.modseq)
                for m in self.session.fetch_messages(batch)
            ]
            added, errors = self.store.add_messages(folder, incoming)
            self.result.messages_added += len(added)
            self.result.errors += errors
            done += len(batch)
            progress(done / len(uids))
