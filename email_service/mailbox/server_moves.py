"""Telling the server of the moves and deletions made through the API (a write-back task without a message).

Each source folder is selected once; its messages go to each target with one UID MOVE (or
COPY, \\Deleted, UID EXPUNGE), and those deleted for good with one UID EXPUNGE. The rows then
take the UIDs the server gave them (COPYUID), so the next sync sees each message once, in its
new folder. A move the user changed while the server was moving it starts again from where
the server put the message. Where the server reports no new UID, the row goes and the next
sync brings the message back from its new folder.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, load_only

from email_service.changes import entries as changes
from email_service.changes.log import Entry, record
from email_service.db import among
from email_service.mailbox.moves import MOVED_COLUMNS, delete_objects, enqueue_server_moves, object_keys
from email_service.mailbox.writeback import FolderRenumbered, renumbered
from email_service.models import Account, Folder, Message, MessageMove, TaskKind
from email_service.protocols.errors import ConnectionFailed, FolderReadOnly, MailServerError
from email_service.protocols.imap import ImapSession
from email_service.protocols.servers import Protocol
from email_service.queue import tasks
from email_service.runtime import Runtime
from email_service.services.servers import AccountServers
from email_service.tenancy import Principal

log = logging.getLogger(__name__)


def write_moves(runtime: Runtime, principal: Principal, account_id: str, servers: AccountServers) -> dict[str, Any]:
    """Carry out the account's waiting moves and deletions on its server; raises MailServerError."""
    with runtime.db.tenant_session(principal) as session:
        account = session.get(Account, account_id)
        moves = list(
            session.scalars(
                select(MessageMove).where(MessageMove.account_id == account_id).order_by(MessageMove.created_at)
            )
        )
        folders = list(session.scalars(select(Folder).where(Folder.account_id == account_id)))
        names = {f.id: f.name for f in folders}
        uidvalidities = {f.id: f.uidvalidity for f in folders}
        session.expunge_all()
    if account is None or not moves:
        return {"result": "nothing to write"}
    if servers.incoming.protocol is Protocol.POP3:
        return _pop3_deletions(runtime, principal, servers, account, moves)
    moved = expunged = 0
    renumbered_folders: list[str] = []
    by_source: dict[str, list[MessageMove]] = defaultdict(list)
    for move in moves:
        if move.uid is not None:
            by_source[move.source_folder_id].append(move)
    with servers.incoming.imap(runtime.settings) as session:
        for source_id, items in by_source.items():
            try:
                if renumbered(uidvalidities[source_id], session.select(names[source_id])):
                    # The stored UIDs name other messages now: moving or expunging them would
                    # act on those. The folder's sync drops these moves and reloads the folder.
                    renumbered_folders.append(names[source_id])
                    continue
            except ConnectionFailed:
                raise
            except FolderReadOnly:
                # Nothing can leave it: each message goes back to it here, as after a refused move.
                _put_back(runtime, principal, account_id, items)
                continue
            except MailServerError as exc:
                # The folder is gone from the server, and its mail with it; the rows follow.
                log.info("folder of pending moves cannot be opened: %s", exc)
                _finish(runtime, principal, account_id, items, None, {})
                continue
            by_target: dict[str | None, list[MessageMove]] = defaultdict(list)
            for move in items:
                by_target[move.target_folder_id].append(move)
            for target_id, group in by_target.items():
                uids = [move.uid for move in group if move.uid is not None]
                if target_id is None:
                    session.expunge_uids(uids)
                    expunged += _finish(runtime, principal, account_id, group, None, {})
                    continue
                new_uids = _move(session, uids, names[target_id])
                if new_uids is None:
                    _put_back(runtime, principal, account_id, group)
                    continue
                moved += _finish(runtime, principal, account_id, group, target_id, new_uids)
    if renumbered_folders:
        raise FolderRenumbered(renumbered_folders)
    return {"result": f"{moved} moved, {expunged} deleted on the server"}


def _move(session: ImapSession, uids: list[int], target: str) -> dict[int, int] | None:
    try:
        return session.move_uids(uids, target)
    except ConnectionFailed:
        raise
    except MailServerError as exc:
        # The server refused (the target went, a quota): the messages stay where the server has them.
        log.info("server refused a move: %s", exc)
        return None


def _finish(
    runtime: Runtime,
    principal: Principal,
    account_id: str,
    done: list[MessageMove],
    target_id: str | None,
    new_uids: dict[int, int],
) -> int:
    """Record what the server did for ``done`` (moved to ``target_id``, or expunged); returns how many."""
    removed_keys: list[str] = []
    flags_pending: list[str] = []
    again = False
    with runtime.db.tenant_session(principal) as session:
        rows = _lock_followed(session, [d.id for d in done])
        current = {
            m.id: m
            for m in session.scalars(
                select(MessageMove)
                .where(among(MessageMove.id, [d.id for d in done]))
                .order_by(MessageMove.id)
                .with_for_update()
            )
        }
        # UIDs a sync of the target may have stored already (it cannot while the account is held).
        taken = set()
        if target_id is not None and new_uids:
            taken = set(
                session.scalars(
                    select(Message.uid).where(Message.folder_id == target_id, among(Message.uid, new_uids.values()))
                )
            )
        logged: list[Entry] = []
        gone: list[Message] = []
        for before in done:
            move = current.get(before.id)
            if move is None or move.uid != before.uid or move.source_folder_id != before.source_folder_id:
                continue  # a sync saw the message go meanwhile and settled it
            new_uid = new_uids.get(before.uid) if before.uid is not None else None
            message = rows.get(move.message_id) if move.message_id else None
            if move.target_folder_id != target_id and new_uid is not None and target_id is not None:
                # Moved again (or deleted) while the server moved it: go on from where it is now.
                move.source_folder_id, move.uid = target_id, new_uid
                again = True
                continue
            if message is not None and new_uid is not None and message.folder_id == target_id and new_uid not in taken:
                message.uid = new_uid
                if message.writeback_pending:
                    flags_pending.append(message.id)
                session.delete(move)
                continue
            if message is not None:
                # The new place is not known: the row goes, and the next sync brings the message back.
                gone.append(message)
                logged.append(changes.message_destroyed(message.id, message.folder_id))
            session.delete(move)
        session.flush()
        if gone:
            removed_keys = object_keys(session, gone)
            session.execute(delete(Message).where(among(Message.id, [m.id for m in gone])))
        record(session, principal, account_id, logged)
    delete_objects(runtime, removed_keys)
    _write_flags(runtime, principal, account_id, flags_pending)
    if again:
        enqueue_server_moves(runtime, principal, account_id)
    return len(done)


def _lock_followed(session: Session, move_ids: list[int]) -> dict[str, Message]:
    """Lock the rows that follow these moves, before the moves themselves: the order every writer uses."""
    followed = select(MessageMove.message_id).where(among(MessageMove.id, move_ids))
    return {
        m.id: m
        for m in session.scalars(
            select(Message)
            .options(load_only(*MOVED_COLUMNS))
            .where(Message.id.in_(followed))
            .order_by(Message.id)
            .with_for_update()
        )
    }


def _write_flags(runtime: Runtime, principal: Principal, account_id: str, message_ids: list[str]) -> None:
    """Flags changed while a move waited: written now that each message has its UID again."""
    for message_id in message_ids:
        tasks.enqueue(runtime, TaskKind.WRITEBACK, principal, account_id=account_id, message_id=message_id)


def _put_back(runtime: Runtime, principal: Principal, account_id: str, refused: list[MessageMove]) -> None:
    """The server refused the move: each row goes back to the folder the server still has it in."""
    flags_pending: list[str] = []
    with runtime.db.tenant_session(principal) as session:
        logged: list[Entry] = []
        rows = _lock_followed(session, [r.id for r in refused])
        for before in refused:
            move = session.get(MessageMove, before.id, with_for_update=True)
            if move is None:
                continue
            message = rows.get(move.message_id) if move.message_id else None
            if message is not None and move.uid is not None:
                logged.append(changes.message_moved(message.id, message.folder_id, move.source_folder_id))
                message.folder_id, message.uid = move.source_folder_id, move.uid
                if message.writeback_pending:
                    flags_pending.append(message.id)
            session.delete(move)
        record(session, principal, account_id, logged)
    _write_flags(runtime, principal, account_id, flags_pending)


def _pop3_deletions(
    runtime: Runtime, principal: Principal, servers: AccountServers, account: Account, moves: list[MessageMove]
) -> dict[str, Any]:
    """DELE what was deleted here, when the account asks for that; QUIT makes the server delete it."""
    wanted = [m for m in moves if m.pop3_uidl is not None and m.target_folder_id is None]
    if not account.pop3_delete_on_server or not wanted:
        return {"result": "nothing to write"}
    with servers.incoming.session(runtime.settings) as session:
        numbers = session.uidls()
        for move in wanted:
            if move.pop3_uidl in numbers:
                session.delete(numbers[move.pop3_uidl])
        # Only a confirmed QUIT deletes; without it the deletions are tried again and remembered meanwhile.
        session.quit()
    with runtime.db.tenant_session(principal) as session:
        session.execute(delete(MessageMove).where(among(MessageMove.id, [m.id for m in wanted])))
    return {"result": f"{len(wanted)} deleted on the server"}
