"""POP3 sync: everything lands in one inbox folder; UIDL decides what is new; nothing is deleted.

POP3 has no flags, folders or expunge notifications, so messages stay until the user deletes
them here, and a message another client removed from the server stays too (POP3 is a download
protocol: the local copy is the user's copy). A message moved to another folder here, or
deleted here, is not downloaded again while the server keeps it.
"""

from __future__ import annotations

from email_service.mailbox.result import ProgressCallback, SyncResult
from email_service.mailbox.store import IncomingMessage, MailStore, RemoteFolder
from email_service.observability import metrics
from email_service.protocols.pop3 import MessageTooLarge, Pop3Session

INBOX = RemoteFolder(name="INBOX", display_name="Inbox", type="inbox", delimiter=None, parent_name=None, attributes=())
BATCH_MESSAGES = 50


class Pop3Sync:
    def __init__(self, store: MailStore, session: Pop3Session, progress: ProgressCallback) -> None:
        self.store, self.session, self.progress = store, session, progress
        self.result = SyncResult()

    def run(self) -> SyncResult:
        self.progress(1)
        folders, _ = self.store.reconcile_folders([INBOX])
        inbox = folders[INBOX.name]
        on_server = self.session.uidls()
        known = self.store.uidls(inbox)
        elsewhere = self.store.uidls_elsewhere(inbox, on_server)
        new = [uidl for uidl in on_server if uidl not in known and uidl not in elsewhere]
        self.progress(5)
        for start in range(0, len(new), BATCH_MESSAGES):
            chunk = new[start : start + BATCH_MESSAGES]
            incoming = []
            for uidl in chunk:
                try:
                    incoming.append(IncomingMessage(raw=self.session.retrieve(on_server[uidl]), uidl=uidl))
                except MessageTooLarge as exc:
                    # Said and skipped: in server order, failing the sync here would stop it at
                    # this message every time. It stays new, so a later sync tries it again.
                    self.result.errors.append(str(exc))
            metrics.fetched("pop3", (item.raw for item in incoming))
            added, errors = self.store.add_messages(inbox, incoming)
            self.result.messages_added += len(added)
            self.result.errors += errors
            self.progress(5 + int(90 * (start + len(chunk)) / len(new)))
        self.store.save_folder_state(
            inbox,
            uidvalidity=None,
            uidnext=None,
            highestmodseq=None,
        )
        self.result.folders_synced = 1
        self.progress(100)
        return metrics.sync_finished("pop3", self.result)
