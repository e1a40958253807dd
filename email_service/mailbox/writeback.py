"""Writing a message's changed state (read, starred, labels, spam) back to its IMAP server.

The row already holds the state the user asked for (the API wrote it at once) and is marked
``writeback_pending``, which keeps sync from overwriting it with the server's older flags. Only
the fields changed here (``writeback_fields``) are written: marking a message read never takes
off a star another client put on it since the last sync. Only the flags the service manages are
touched (\\Seen, \\Flagged, keywords); others, like \\Answered, stay as the server has them.
The mark is cleared only if the row did not change again meanwhile, so a second edit is never
lost to a sync that runs between two write-backs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, exists, select, update

from email_service.changes import entries as changes
from email_service.changes.log import Entry, record
from email_service.db import Database
from email_service.models import Folder, Message, Task, TaskKind, TaskStatus
from email_service.protocols.errors import FolderReadOnly
from email_service.protocols.imap import ImapSession, MailboxState
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
SPAM_KEYWORD = "$Junk"
MANAGED_SYSTEM_FLAGS = {"\\seen": "\\Seen", "\\flagged": "\\Flagged"}
WRITTEN_FIELDS = frozenset({"is_read", "is_starred", "is_spam", "keywords"})
# A sync that ends well hands at most this many stranded changes back to the workers; the
# next sync takes the rest.
STRANDED_LIMIT = 500


class FolderRenumbered(Exception):
    """The server gave folders new UIDs (a new UIDVALIDITY): the stored UIDs now name other messages."""

    def __init__(self, folders: list[str]) -> None:
        super().__init__(f"renumbered on the server: {', '.join(folders)}")
        self.folders = folders


def renumbered(stored_uidvalidity: int | None, state: MailboxState) -> bool:
    """Whether a folder opened for writing no longer has the UIDs its stored rows were synced with."""
    # A server that sends no UIDVALIDITY (0) cannot be checked; the sync catches it up.
    return bool(stored_uidvalidity and state.uidvalidity and state.uidvalidity != stored_uidvalidity)


@dataclass(frozen=True)
class PendingChange:
    message_id: str
    uid: int
    folder_name: str
    folder_type: str
    folder_uidvalidity: int | None
    is_read: bool
    is_starred: bool
    is_spam: bool
    keywords: tuple[str, ...]
    fields: frozenset[str]  # those changed here; a row pending from before they were kept: all
    updated_at: datetime
    spam_folder: Folder | None
    inbox: Folder | None


def load_pending(db: Database, principal: Principal, message_id: str) -> PendingChange | None:
    with db.tenant_session(principal) as session:
        row = session.execute(
            select(Message, Folder).join(Folder, Folder.id == Message.folder_id).where(Message.id == message_id)
        ).one_or_none()
        if row is None or not row.Message.writeback_pending or row.Message.uid is None:
            return None
        message, folder = row.Message, row.Folder
        folders = list(session.scalars(select(Folder).where(Folder.account_id == message.account_id)))
    return PendingChange(
        message_id=message.id,
        uid=message.uid,
        folder_name=folder.name,
        folder_type=folder.type,
        folder_uidvalidity=folder.uidvalidity,
        is_read=message.is_read,
        is_starred=message.is_starred,
        is_spam=message.is_spam,
        keywords=tuple(message.keywords),
        fields=frozenset(message.writeback_fields or WRITTEN_FIELDS),
        updated_at=message.updated_at,
        spam_folder=next((f for f in folders if f.type == "spam"), None),
        inbox=next((f for f in folders if f.type == "inbox"), None),
    )


def stranded(db: Database, principal: Principal, account_id: str, *, limit: int = STRANDED_LIMIT) -> list[str]:
    """Messages whose change made here no waiting or running task will write: its task ran out of tries.

    A write-back gives up after its retries (about 20 minutes of a server that is down), and
    the row stays pending, so sync leaves its flags alone and nothing else would ever write it.
    A message waiting for its move is left out: the move's end writes its flags.
    """
    carried = exists().where(
        Task.account_id == account_id,
        Task.kind == TaskKind.WRITEBACK,
        Task.status.in_([TaskStatus.PENDING, TaskStatus.RETRY, TaskStatus.STARTED]),
        Task.message_id == Message.id,
    )
    with db.tenant_session(principal) as session:
        return list(
            session.scalars(
                select(Message.id)
                .where(
                    Message.account_id == account_id,
                    Message.writeback_pending.is_(True),
                    Message.uid.is_not(None),
                    ~carried,
                )
                .order_by(Message.updated_at)
                .limit(limit)
            )
        )


def flag_changes(change: PendingChange, server_flags: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(flags to add, flags to remove) to bring the server to the row's state in the fields changed here."""
    on_server = {MANAGED_SYSTEM_FLAGS.get(f.lower(), f) for f in server_flags}
    wanted: set[str] = set()
    unwanted: set[str] = set()

    def state(flag: str, on: bool) -> None:
        (wanted if on else unwanted).add(flag)

    if "is_read" in change.fields:
        state("\\Seen", change.is_read)
    if "is_starred" in change.fields:
        state("\\Flagged", change.is_starred)
    if "keywords" in change.fields:
        # The labels are the row's keywords as a whole: those the server has beyond them go.
        keywords = set(change.keywords) - {SPAM_KEYWORD}
        wanted |= keywords
        unwanted |= {f for f in on_server if not f.startswith("\\") and f != SPAM_KEYWORD} - keywords
    if change.spam_folder is None and "is_spam" in change.fields:
        # No spam folder to move to: the spam state travels as the $Junk keyword instead.
        state(SPAM_KEYWORD, change.is_spam)
    return sorted(wanted - on_server), sorted(unwanted & on_server)


def write_back(db: Database, principal: Principal, session: ImapSession, change: PendingChange) -> str:
    """Apply one pending change on the server; returns what happened, for the task result.

    Raises ``FolderRenumbered`` (writing nothing) when the message's UID may name another message now.
    """
    try:
        state = session.select(change.folder_name)
    except FolderReadOnly:
        # Nothing can be written there, now or later: the next sync shows the server's flags again.
        _clear(db, principal, change)
        return "not written: the server lets this account only read the folder"
    if renumbered(change.folder_uidvalidity, state):
        raise FolderRenumbered([change.folder_name])
    server = session.flags(str(change.uid)).get(change.uid)
    if server is None:
        # Expunged elsewhere meanwhile: the next sync removes the row.
        _clear(db, principal, change)
        return "gone from the server"
    add, remove = flag_changes(change, server[0])
    session.store(change.uid, add=add, remove=remove)
    in_spam = change.folder_type == "spam"
    destination = None
    if change.spam_folder is not None and "is_spam" in change.fields and change.is_spam != in_spam:
        destination = change.spam_folder if change.is_spam else change.inbox
    if destination is None:
        _clear(db, principal, change)
        return "flags written"
    new_uid = session.move(change.uid, destination.name)
    with db.tenant_session(principal) as tx:
        # Locked, so the folder logged as "from" is the one the row really left.
        row = tx.execute(
            select(Message.account_id, Message.folder_id).where(Message.id == change.message_id).with_for_update()
        ).one_or_none()
        if row is None:
            # A sync removed the row meanwhile, and logged that.
            return f"moved to {destination.display_name}"
        logged: list[Entry] = []
        if new_uid is None:
            # Without the new UID the row cannot follow; the next sync brings the message back in its new folder.
            tx.execute(delete(Message).where(Message.id == change.message_id))
            logged.append(changes.message_destroyed(change.message_id, row.folder_id))
        else:
            tx.execute(
                update(Message)
                .where(Message.id == change.message_id)
                .values(folder_id=destination.id, uid=new_uid, writeback_pending=False, writeback_fields=[])
            )
            if row.folder_id != destination.id:
                logged.append(changes.message_moved(change.message_id, row.folder_id, destination.id))
        record(tx, principal, row.account_id, logged)
    return f"moved to {destination.display_name}"


def _clear(db: Database, principal: Principal, change: PendingChange) -> None:
    with db.tenant_session(principal) as tx:
        tx.execute(
            update(Message)
            .where(Message.id == change.message_id, Message.updated_at == change.updated_at)
            .values(writeback_pending=False, writeback_fields=[])
        )
