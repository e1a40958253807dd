"""POP3 sync: everything lands in one inbox folder; UIDL decides what is new; nothing is deleted.

POP3 has no flags, folders or expunge notifications, so messages stay until the user deletes
them here, and a message another client removed from the server stays too (POP3 is a download
protocol: the local copy is the user's copy). A message moved to another folder here, or
deleted here, is not downloaded again while the server keeps it. A message too large to
download is stored by its headers (``mail.too_large``), so it is known and not fetched again.
"""

from __future__ import annotations

from email_service.mail.too_large import shown_by_headers, stand_in
from email_service.mailbox.result import ProgressCallback, SyncResult
from email_service.mailbox.store import IncomingMessage, MailStore, RemoteFolder
from email_service.observability import metrics
from email_service.protocols import pop3
from email_service.protocols.connect import size_words
from email_service.protocols.errors import ConnectionFailed, MailServerError
from email_service.protocols.pop3 import MessageTooLarge, Pop3Session

INBOX = RemoteFolder(name="INBOX", display_name="Inbox", type="inbox", delimiter=None, parent_name=None, attributes=())
BATCH_MESSAGES = 50


class Pop3Sync:
    def __init__(self, store: MailStore, session: Pop3Session, progress: ProgressCallback) -> None:
        self.store, self.session, self.progress = store, session, progress
        self.result = SyncResult()
        self.headers_alone: list[int] = []  # message numbers stored by their headers, said once at the end

    def run(self) -> SyncResult:
        self.progress(1)
        # The server has INBOX alone; Sent, Drafts and any other folder are the user's own.
        folders, _ = self.store.reconcile_folders([INBOX], keep_unlisted=True)
        inbox = folders[INBOX.name]
        on_server = self.session.uidls()
        known = self.store.uidls(inbox)
        elsewhere = self.store.uidls_elsewhere(inbox, on_server)
        new = [uidl for uidl in on_server if uidl not in known and uidl not in elsewhere]
        # One LIST for all: a new message too large to download is known by its size before its RETR.
        sizes = self.session.sizes() if new else {}
        self.progress(5)
        for start in range(0, len(new), BATCH_MESSAGES):
            chunk = new[start : start + BATCH_MESSAGES]
            incoming = []
            for uidl in chunk:
                raw = self._download(on_server[uidl], sizes.get(on_server[uidl], 0))
                if raw is not None:
                    incoming.append(IncomingMessage(raw=raw, uidl=uidl))
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
        if self.headers_alone:
            limit = size_words(pop3.MAX_POP3_MESSAGE)
            self.result.errors.append(shown_by_headers(INBOX.display_name, "message", self.headers_alone, limit))
        self.result.folders_synced = 1
        self.progress(100)
        return metrics.sync_finished("pop3", self.result)

    def _download(self, number: int, listed_size: int) -> bytes | None:
        """Message ``number`` whole, or by its headers when too large; None when neither (said in the errors)."""
        # Read from its module, not imported: RETR's own guard reads the same name (one limit).
        limit = pop3.MAX_POP3_MESSAGE
        size = listed_size
        if size <= limit:
            try:
                return self.session.retrieve(number)
            except MessageTooLarge as exc:
                if exc.size <= limit:
                    # Not too large but a line over the line limit (no mail client writes one): the
                    # note would not be true. Said and skipped: in server order, failing the sync
                    # here would stop it at this message every time. It stays new.
                    self.result.errors.append(str(exc))
                    return None
                # LIST said less than the message is: RETR read it to its end and dropped it. Stored
                # by its headers, it is not read again at every sync.
                size = exc.size
        try:
            headers = self.session.headers(number)
        except ConnectionFailed:
            raise
        except MailServerError as exc:
            # TOP is optional (RFC 1939 7): a server without it answers -ERR. The message is said
            # and skipped, as before TOP was used, and stays new, so a later sync tries again.
            self.result.errors.append(
                f"message {number} is {size_words(size)}, over {size_words(limit)}; it was not downloaded"
                f" and its headers could not be fetched: {exc}"
            )
            return None
        self.headers_alone.append(number)
        return stand_in(headers, size_words(size), size_words(limit))
