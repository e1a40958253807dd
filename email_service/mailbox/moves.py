"""Moving and deleting messages through the API: the new state shows at once, a job tells the server.

A move changes the row's folder in the same transaction that logs it. Until the server has
moved the message too, a ``MessageMove`` keeps where it still is there (folder and UID), so a
sync in between neither fetches it again from its old folder nor drops it from its new one;
the row has no UID meanwhile (its UID in the new folder is only known once the server moved
it). Deleting moves to the account's Trash; in Trash, or when asked, it deletes for good: the
row goes at once and the ``MessageMove`` (with no target) waits for the server's expunge.

POP3 has one server folder: moves are local only, and a deletion reaches the server (DELE)
only if the account says so; otherwise the UIDL is remembered so the message is not
downloaded again while the server keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, load_only

from email_service.changes import entries as changes
from email_service.changes.log import Entry, record
from email_service.db import among
from email_service.errors import ConflictError, NotFoundError
from email_service.mail.folders import SPAM, TRASH, selectable
from email_service.mailbox.store import MailStore
from email_service.models import Account, Attachment, Folder, Message, MessageMove, Task, TaskKind, TaskStatus
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
# What a move or deletion reads of each message: not the bodies, which may be large.
MOVED_COLUMNS = (
    Message.id,
    Message.account_id,
    Message.folder_id,
    Message.uid,
    Message.pop3_uidl,
    Message.is_read,
    Message.is_spam,
    Message.raw_object_key,
    Message.updated_at,
    Message.writeback_pending,
)


@dataclass
class Outcome:
    """What a move or delete did: ids moved (or deleted), and ids no message of the account has."""

    done: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    deleted_for_good: list[str] = field(default_factory=list)
    folder_id: str | None = None  # where the moved ones are now (Trash for a deletion)


def move_messages(
    runtime: Runtime, principal: Principal, account_id: str, message_ids: Sequence[str], folder_id: str
) -> Outcome:
    """Move messages to ``folder_id``; those already there are left as they are (and count as moved)."""
    return _apply(runtime, principal, account_id, message_ids, folder_id=folder_id, permanent=False)


def delete_messages(
    runtime: Runtime, principal: Principal, account_id: str, message_ids: Sequence[str], *, permanent: bool
) -> Outcome:
    """Move messages to Trash; delete for good those in Trash already, or all of them with ``permanent``."""
    return _apply(runtime, principal, account_id, message_ids, folder_id=None, permanent=permanent)


def _apply(
    runtime: Runtime,
    principal: Principal,
    account_id: str,
    message_ids: Sequence[str],
    *,
    folder_id: str | None,
    permanent: bool,
) -> Outcome:
    ids = list(dict.fromkeys(i for i in message_ids))
    outcome = Outcome()
    removed_keys: list[str] = []
    with runtime.db.tenant_session(principal) as session:
        account = session.scalar(select(Account).where(Account.id == account_id, Account.deleted_at.is_(None)))
        if account is None:
            raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
        folders = {f.id: f for f in session.scalars(select(Folder).where(Folder.account_id == account_id))}
        target = None
        if folder_id is not None or not permanent:
            # POP3 mail has no Trash of the server's to go to: without one here, deleting deletes.
            target = _target(folders, folder_id, trash_optional=account.protocol == "pop3")
        outcome.folder_id = target.id if target is not None else None
        clean_ids = [i for i in ids if "\x00" not in i]
        # Locks in one order everywhere (messages, then their moves, then the account's log
        # sequence last, in record), so a request and a write-back never wait on each other in a circle.
        messages = {
            m.id: m
            for m in session.scalars(
                select(Message)
                .options(load_only(*MOVED_COLUMNS))
                .where(Message.account_id == account_id, Message.id.in_(clean_ids))
                .order_by(Message.id)
                .with_for_update()
            )
        }
        pending = {
            p.message_id: p
            for p in session.scalars(
                select(MessageMove)
                .where(MessageMove.message_id.in_(list(messages)))
                .order_by(MessageMove.id)
                .with_for_update()
            )
        }
        logged: list[Entry] = []
        doomed: list[Message] = []
        server_work = False
        touched: set[str] = set()
        now = datetime.now(UTC)
        for message_id in ids:
            message = messages.get(message_id)
            if message is None:
                outcome.not_found.append(message_id)
                continue
            outcome.done.append(message_id)
            source = message.folder_id
            for_good = folder_id is None and (permanent or target is None or source == target.id)
            if for_good:
                doomed.append(message)
                server_work |= _forget(session, principal, account, message, pending.get(message.id))
                outcome.deleted_for_good.append(message_id)
                logged.append(changes.message_destroyed(message.id, source))
                touched.add(source)
                continue
            assert target is not None
            if source == target.id:
                continue
            server_work |= _relocate(session, principal, account, message, pending.get(message.id), target)
            columns = []
            spam = target.type == SPAM
            if (folders[source].type == SPAM or spam) and message.is_spam != spam:
                message.is_spam = spam
                columns.append("is_spam")
            message.updated_at = now
            logged.append(changes.message_moved(message.id, source, target.id, columns))
            touched |= {source, target.id}
        session.flush()
        if doomed:
            removed_keys = object_keys(session, doomed)
            session.execute(delete(Message).where(among(Message.id, [m.id for m in doomed])))
        _touch([folders[f] for f in touched], now)
        # Last in the transaction: taking the account's sequence locks its row until commit.
        record(session, principal, account_id, logged)
    delete_objects(runtime, removed_keys)
    if server_work:
        enqueue_server_moves(runtime, principal, account_id)
    return outcome


def filed_on_server(
    runtime: Runtime, principal: Principal, message_id: str, folder_id: str, filed: tuple[int, int], size: int
) -> None:
    """A copy of a message written here was stored on the server in ``folder_id`` as ``filed``
    (its UIDVALIDITY and UID).

    The row takes the UID, so the next sync sees one copy, not two. If the row was moved (it had
    no UID, so it simply moved) or deleted while the copy was stored, the copy follows it there:
    a ``MessageMove`` from where the server has it, for the account's next write-back.
    """
    if not _own_copy(runtime, principal, message_id, folder_id, filed):
        return
    uid = filed[1]
    with runtime.db.tenant_session(principal) as session:
        message = session.scalar(
            select(Message).options(load_only(*MOVED_COLUMNS)).where(Message.id == message_id).with_for_update()
        )
        if message is not None and message.folder_id == folder_id and message.uid is None:
            message.uid, message.size = uid, size
            return
        if message is not None and message.uid is not None:
            return  # it has its place on the server already (not a case the service makes)
        account_id = (
            message.account_id
            if message is not None
            else session.scalar(select(Folder.account_id).where(Folder.id == folder_id))
        )
        if account_id is None:
            return  # the account and its folders are gone, and its clean-up empties the server side too
        session.add(
            MessageMove(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                account_id=account_id,
                message_id=message.id if message is not None else None,
                source_folder_id=folder_id,
                uid=uid,
                target_folder_id=message.folder_id if message is not None else None,
            )
        )
    log.info("message %s moved while its copy was filed; the copy follows it on the server", message_id)
    enqueue_server_moves(runtime, principal, account_id)


def _own_copy(runtime: Runtime, principal: Principal, message_id: str, folder_id: str, filed: tuple[int, int]) -> bool:
    """Whether the row written here may take the UID of the copy just filed for it.

    A task whose APPEND answer was lost finds the copy on its next try; a sync that ran in
    between took that copy for a new message. It is this message's copy: the row written here
    (whose id the client knows) keeps the UID, and the sync's row goes. Unless a change made
    since moves or deletes that row (the server's copy goes with it, as asked), or the folder's
    UIDVALIDITY is not the one the UID belongs to (the next sync renumbers the folder anyway):
    then the row stays as it is, here only, and nothing the user did is undone.
    """
    uidvalidity, uid = filed
    with runtime.db.tenant_session(principal) as session:
        folder = session.get(Folder, folder_id)
    if folder is None:
        return True  # gone: filed_on_server settles it
    if folder.uidvalidity is not None and folder.uidvalidity != uidvalidity:
        return False
    if not MailStore(runtime.db, runtime.objects, principal, folder.account_id).give_way(folder, uid, message_id):
        log.info("message %s: the copy a sync took for a new message is moved as asked; kept here", message_id)
        return False
    return True


def _target(folders: dict[str, Folder], folder_id: str | None, *, trash_optional: bool = False) -> Folder | None:
    if folder_id is None:
        trash = sorted((f for f in folders.values() if f.type == TRASH), key=lambda f: (f.name, f.id))
        if not trash and trash_optional:
            return None
        if not trash:
            raise ConflictError(
                "the account has no Trash folder; delete with permanent=true to delete for good", code="NO_TRASH_FOLDER"
            )
        return trash[0]
    target = folders.get(folder_id)
    if target is None:
        raise NotFoundError(f"Folder with ID '{folder_id}' does not exist", code="FOLDER_NOT_FOUND")
    if not selectable(target.attributes):
        raise ConflictError(f"folder '{target.display_name}' cannot hold messages", code="FOLDER_NOT_SELECTABLE")
    return target


def _relocate(
    session: Session,
    principal: Principal,
    account: Account,
    message: Message,
    move: MessageMove | None,
    target: Folder,
) -> bool:
    """Put the row in ``target`` and note where the server still has it; True if the server has work."""
    if account.protocol != "imap" or (message.uid is None and move is None):
        # POP3 folders other than the inbox exist here only; mail not yet on the server simply moves.
        message.folder_id = target.id
        return False
    if move is None:
        move = _where_on_server(session, principal, message)
    message.folder_id = target.id
    if move.source_folder_id == target.id:
        # Back where the server has it: nothing to tell the server any more.
        message.uid = move.uid
        session.delete(move)
        return False
    message.uid = None  # its UID in the target is known once the server has moved it
    move.target_folder_id = target.id
    move.updated_at = datetime.now(UTC)
    return True


def _where_on_server(session: Session, principal: Principal, message: Message) -> MessageMove:
    """A new record of where the server has ``message`` now, for the server's move or deletion to come."""
    move = MessageMove(
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        account_id=message.account_id,
        message_id=message.id,
        source_folder_id=message.folder_id,
        uid=message.uid,
        pop3_uidl=message.pop3_uidl,
    )
    session.add(move)
    return move


def _forget(
    session: Session, principal: Principal, account: Account, message: Message, move: MessageMove | None
) -> bool:
    """Prepare the row's deletion for good, keeping what the server must still expunge; True if the
    server has work. The caller deletes the row."""
    on_server = account.protocol == "imap" and (message.uid is not None or move is not None)
    pop3 = account.protocol == "pop3" and message.pop3_uidl is not None
    if move is None and (on_server or pop3):
        move = _where_on_server(session, principal, message)
    if move is not None:
        move.message_id = None
        move.target_folder_id = None
        move.updated_at = datetime.now(UTC)
    return on_server or (pop3 and account.pop3_delete_on_server)


def object_keys(session: Session, messages: Sequence[Message]) -> list[str]:
    """The stored objects of ``messages`` (raw message and attachments), to delete after commit."""
    keys = [m.raw_object_key for m in messages if m.raw_object_key]
    ids = [m.id for m in messages]
    return keys + list(session.scalars(select(Attachment.object_key).where(among(Attachment.message_id, ids))))


def _touch(folders: list[Folder], now: datetime) -> None:
    # Their counts follow in the database (the messages trigger); only the change time is ours.
    for folder in folders:
        folder.updated_at = now


def delete_objects(runtime: Runtime, keys: list[str]) -> None:
    for key in keys:
        try:
            runtime.objects.delete(key)
        except Exception as exc:  # noqa: BLE001 - a leftover object is harmless, the deletion is done
            log.warning("could not delete object %s: %s", key, type(exc).__name__)


def waits_for_server_move(session: Session, message_id: str) -> bool:
    """Whether a move of the message made here waits to be made on the server."""
    return session.scalar(select(MessageMove.id).where(MessageMove.message_id == message_id).limit(1)) is not None


def enqueue_server_moves(runtime: Runtime, principal: Principal, account_id: str) -> None:
    """One waiting task per account carries every move and deletion made until it starts."""
    with runtime.db.tenant_session(principal) as session:
        waiting = session.scalar(
            select(Task.id).where(
                Task.account_id == account_id,
                Task.kind == TaskKind.WRITEBACK,
                Task.message_id.is_(None),
                Task.status.in_([TaskStatus.PENDING, TaskStatus.RETRY]),
            )
        )
    if waiting is None:
        # A write-back without a message: the account's moves and deletions (see server_moves).
        tasks.enqueue(runtime, TaskKind.WRITEBACK, principal, account_id=account_id)


def server_moves_wait(runtime: Runtime, principal: Principal, account_id: str, folder_id: str | None = None) -> bool:
    """Whether moves of the account's messages (into or out of ``folder_id``, if given) wait for the server."""
    query = select(MessageMove.id).where(MessageMove.account_id == account_id, MessageMove.uid.is_not(None))
    if folder_id is not None:
        query = query.where(or_(MessageMove.source_folder_id == folder_id, MessageMove.target_folder_id == folder_id))
    with runtime.db.tenant_session(principal) as session:
        return session.scalar(query.limit(1)) is not None


def resume_server_moves(runtime: Runtime, principal: Principal, account_id: str) -> None:
    """Queue the account's moves again if any wait for the server: their task may have run out of tries."""
    if server_moves_wait(runtime, principal, account_id):
        enqueue_server_moves(runtime, principal, account_id)


def restore_row(session: Session, move: MessageMove) -> None:
    """The server could not move the message: its row goes back where the server has it."""
    if move.message_id is not None and move.uid is not None:
        session.execute(
            update(Message)
            .where(Message.id == move.message_id)
            .values(folder_id=move.source_folder_id, uid=move.uid, updated_at=datetime.now(UTC))
        )
    session.delete(move)
