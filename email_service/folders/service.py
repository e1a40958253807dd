"""Creating, renaming and deleting an account's folders through the API.

These are done on the mail server during the request, while the account is held as a sync
would hold it, and the rows change only once the server has: the user waits for a folder
operation anyway, and the server and the API never disagree about which folders exist (a
folder made only here would be removed again by the next sync, a rename seen by a sync before
the server had it would look like one folder deleted and another created).
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

from cuid2 import Cuid
from sqlalchemy import select
from sqlalchemy.orm import Session

from email_service.changes import entries as changes
from email_service.changes.log import Entry, record
from email_service.crypto import CredentialError
from email_service.errors import BadRequestError, ConflictError, DependencyUnavailableError, NotFoundError
from email_service.mail.folders import (
    CUSTOM,
    INBOX,
    ListEntry,
    assign_roles,
    display_name,
    parse_list_line,
)
from email_service.mail.utf7 import decode_mailbox_name, encode_mailbox_name
from email_service.mailbox.moves import server_moves_wait
from email_service.mailbox.server_moves import write_moves
from email_service.mailbox.store import MailStore
from email_service.mailbox.writeback import FolderRenumbered
from email_service.models import Account, Folder, TaskKind
from email_service.protocols.errors import AuthenticationFailed, ConnectionFailed, MailServerError
from email_service.protocols.imap import ImapSession
from email_service.protocols.servers import Protocol
from email_service.queue import tasks
from email_service.queue.locks import AccountLock
from email_service.runtime import Runtime
from email_service.services.server_calls import SLOTS
from email_service.services.servers import AccountServers, load_servers
from email_service.tenancy import Principal

new_id = Cuid().generate
# How long a folder request waits for a running sync of the account to finish before answering 409.
LOCK_WAIT_SECONDS = 10.0
DEFAULT_DELIMITER = "/"


class _Held:
    """An account held for a folder operation: its folders, and an IMAP session opened on first use,
    so that a request refused by its own checks never reaches the mail server."""

    def __init__(
        self,
        account: Account,
        folders: dict[str, Folder],
        servers: AccountServers,
        open_session: Callable[[], ImapSession],
    ) -> None:
        self.account, self.folders, self.servers = account, folders, servers
        self._open_session = open_session
        self._session: ImapSession | None = None

    @property
    def session(self) -> ImapSession:
        if self._session is None:
            self._session = self._open_session()
        return self._session


def _refuse(what: str, exc: MailServerError) -> Exception:
    # The server's own words are not passed on: they are remote input.
    if isinstance(exc, ConnectionFailed):
        return DependencyUnavailableError("the mail server cannot be reached; try again later")
    if isinstance(exc, AuthenticationFailed):
        return ConflictError("the mail server refused the account's login", code="MAIL_SERVER_REFUSED")
    return ConflictError(f"the mail server refused to {what}", code="MAIL_SERVER_REFUSED")


@contextmanager
def _held(runtime: Runtime, principal: Principal, account_id: str, what: str) -> Iterator[_Held]:
    """The account's folders and a logged-in IMAP session, with no sync or write-back running meanwhile."""
    with runtime.db.tenant_session(principal) as session:
        account = session.scalar(select(Account).where(Account.id == account_id, Account.deleted_at.is_(None)))
    if account is None:
        raise NotFoundError(f"Account with ID '{account_id}' does not exist", code="ACCOUNT_NOT_FOUND")
    if account.protocol != Protocol.IMAP:
        raise ConflictError("POP3 accounts have no folders on the server", code="NOT_SUPPORTED")
    try:
        servers = load_servers(runtime.db, runtime.cipher, principal, account_id)
    except CredentialError:
        raise ConflictError(
            "the stored password cannot be decrypted; set it again", code="MAIL_SERVER_REFUSED"
        ) from None
    if servers is None:
        raise ConflictError("the account is disabled", code="ACCOUNT_DISABLED")
    # From here the request waits on the account's lock and its server: it holds one of the
    # user's few slots (server_calls), so one user's slow servers cannot take every API thread.
    with SLOTS.slot(principal):
        lock = AccountLock(runtime.db, account_id)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not lock.acquire():
            if time.monotonic() > deadline:
                raise ConflictError("the account is being synced; try again in a moment", code="ACCOUNT_BUSY")
            time.sleep(0.2)
        try:
            with runtime.db.tenant_session(principal) as session:
                folders = {f.id: f for f in session.scalars(select(Folder).where(Folder.account_id == account_id))}
            try:
                with ExitStack() as stack:
                    yield _Held(
                        account, folders, servers, lambda: stack.enter_context(servers.incoming.imap(runtime.settings))
                    )
            except MailServerError as exc:
                raise _refuse(what, exc) from None
        finally:
            lock.release()


def _leaf(name: Any, delimiter: str) -> str:
    text = " ".join(str(name).split())
    if not text or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in str(name)):
        raise BadRequestError("a folder name must be printable and not blank", code="INVALID_FOLDER_NAME")
    if delimiter in text:
        raise BadRequestError(f"a folder name must not contain '{delimiter}'", code="INVALID_FOLDER_NAME")
    return encode_mailbox_name(text)


def _delimiter(held: _Held, parent: Folder | None) -> str:
    if parent is not None and parent.delimiter:
        return parent.delimiter
    for folder in held.folders.values():
        if folder.delimiter:
            return folder.delimiter
    for entry in map(parse_list_line, held.session.list_folders()):
        if entry is not None and entry.delimiter:
            return entry.delimiter
    return DEFAULT_DELIMITER


def _parent(held: _Held, parent_id: str | None) -> Folder | None:
    """The folder ``parent_id`` names, to put a folder under; None for the top level."""
    if parent_id is None:
        return None
    parent = _folder(held, parent_id)
    if parent.delimiter is None:
        # LIST gave it the delimiter NIL: the server has no hierarchy, and a name with a "/" in
        # it would be one more top-level folder, shown as such by the next sync.
        raise BadRequestError("the mail server has no sub-folders", code="INVALID_FOLDER_PARENT")
    return parent


def _folder(held: _Held, folder_id: str | None) -> Folder:
    folder = held.folders.get(folder_id or "")
    if folder is None:
        raise NotFoundError(f"Folder with ID '{folder_id}' does not exist", code="FOLDER_NOT_FOUND")
    return folder


def _free(held: _Held, name: str) -> None:
    if name.upper() == "INBOX" or any(f.name == name for f in held.folders.values()):
        raise ConflictError("a folder of that name exists there already", code="FOLDER_EXISTS")


def _taken(name: str) -> str:
    # Compared as a user sees names: servers that fold case (or normalise Unicode) refuse a name
    # that differs from an existing one only in that.
    return unicodedata.normalize("NFC", decode_mailbox_name(name)).casefold()


def _unless_taken(held: _Held, name: str, change: Callable[[], None], renamed: str | None = None) -> None:
    """CREATE or RENAME (of ``renamed``) to ``name`` on the server (``change``); refused because the
    server has a folder of that name already (another client made it since the last sync), 409
    FOLDER_EXISTS."""
    session = held.session  # logged in first: a refused login is not taken for a refused name
    try:
        change()
    except (ConnectionFailed, AuthenticationFailed):
        raise
    except MailServerError:
        wanted = _taken(name)
        for entry in map(parse_list_line, session.list_folders()):
            if entry is not None and entry.name != renamed and _taken(entry.name) == wanted:
                raise ConflictError("a folder of that name exists there already", code="FOLDER_EXISTS") from None
        raise


def _protect(folder: Folder, action: str) -> None:
    if folder.type != CUSTOM:
        kind = "the inbox" if folder.type == INBOX else f"the {folder.type} folder"
        raise ConflictError(f"{kind} cannot be {action}", code="FOLDER_PROTECTED")


def _retype(session: Session, account_id: str, logged: list[Entry]) -> None:
    """Roles across the account's folders again, as a sync would give them (one per role)."""
    rows = list(session.scalars(select(Folder).where(Folder.account_id == account_id).order_by(Folder.name)))
    entries = [ListEntry(tuple(f.attributes), f.delimiter, f.name) for f in rows]
    for folder, kind in zip(rows, assign_roles(entries), strict=True):
        if folder.type != kind:
            folder.type = kind
            logged.append(changes.folder_updated(folder.id, ["type"]))


def create_folder(runtime: Runtime, principal: Principal, account_id: str, body: dict[str, Any]) -> Folder:
    with _held(runtime, principal, account_id, "create the folder") as held:
        parent = _parent(held, body.get("parentId"))
        delimiter = _delimiter(held, parent)
        leaf = _leaf(body["name"], delimiter)
        name = f"{parent.name}{delimiter}{leaf}" if parent is not None else leaf
        _free(held, name)
        _unless_taken(held, name, lambda: held.session.create_folder(name))
        # The rows change while the account is still held: a sync in between would see the
        # server's new folders and write rows of its own.
        now = datetime.now(UTC)
        with runtime.db.tenant_session(principal) as session:
            folder = Folder(
                id=new_id(),
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                account_id=account_id,
                name=name,
                display_name=display_name(name, delimiter),
                type=CUSTOM,
                delimiter=delimiter,
                parent_id=parent.id if parent is not None else None,
                attributes=[],
                created_at=now,
                updated_at=now,
            )
            session.add(folder)
            session.flush()
            logged = [changes.folder_created(folder.id)]
            _retype(session, account_id, logged)
            record(session, principal, account_id, logged)
    return folder


def update_folder(
    runtime: Runtime, principal: Principal, account_id: str, folder_id: str, body: dict[str, Any]
) -> Folder:
    """Rename a folder and/or move it under another; its sub-folders go with it."""
    with _held(runtime, principal, account_id, "rename the folder") as held:
        folder = _folder(held, folder_id)
        _protect(folder, "renamed")
        parent_id = body.get("parentId", folder.parent_id)
        parent = _parent(held, parent_id)
        delimiter = folder.delimiter or _delimiter(held, parent)
        if parent is not None and (parent.id == folder.id or parent.name.startswith(folder.name + delimiter)):
            raise BadRequestError("a folder cannot be moved into itself", code="INVALID_FOLDER_PARENT")
        leaf = _leaf(body["name"], delimiter) if "name" in body else folder.name.rsplit(delimiter, 1)[-1]
        name = f"{parent.name}{delimiter}{leaf}" if parent is not None else leaf
        if name == folder.name:
            return folder
        _free(held, name)
        _unless_taken(held, name, lambda: held.session.rename_folder(folder.name, name), renamed=folder.name)
        old = folder.name
        # Still held (see create_folder): a sync would take the old name for a deleted folder.
        now = datetime.now(UTC)
        with runtime.db.tenant_session(principal) as session:
            rows = list(session.scalars(select(Folder).where(Folder.account_id == account_id)))
            logged: list[Entry] = []
            for row in rows:
                if row.name != old and not row.name.startswith(old + delimiter):
                    continue
                row.name = name + row.name[len(old) :]
                row.display_name = display_name(row.name, row.delimiter)
                row.updated_at = now
                logged.append(changes.folder_updated(row.id, ["name", "displayName"]))
            moved = next(row for row in rows if row.id == folder_id)
            if moved.parent_id != (parent.id if parent is not None else None):
                moved.parent_id = parent.id if parent is not None else None
                logged.append(changes.folder_updated(moved.id, ["parentId"]))
            _retype(session, account_id, logged)
            record(session, principal, account_id, logged)
            session.flush()
            session.refresh(moved)
    return moved


def _settle_moves(runtime: Runtime, principal: Principal, account_id: str, held: _Held, folder: Folder) -> None:
    """Make on the server the moves out of and into ``folder`` that wait for it, before it is deleted.

    Until the write-back runs, a message moved out of the folder is still in it on the server,
    and one moved into it is still in its old folder: deleting the folder first would destroy
    the mail the user had moved to safety, and bring back in its old folder the mail the user
    had put in the folder to delete. The account is held, as the write-back job would hold it.
    """
    if not server_moves_wait(runtime, principal, account_id, folder.id):
        return
    try:
        write_moves(runtime, principal, account_id, held.servers)
    except FolderRenumbered as exc:
        # Their stored UIDs name other mail now: as after the write-back job, a sync of those
        # folders drops these moves and brings the folders in again.
        tasks.enqueue(runtime, TaskKind.SYNC, principal, account_id=account_id, params={"folders": exc.folders})
        if folder.name in exc.folders:
            # Its moves out were not made, so the mail the user moved to safety is still in it:
            # deleting it now would destroy that mail. After the sync, the moves are settled.
            raise ConflictError(
                "the folder was rebuilt on the server since the last sync; try again once it is synced",
                code="ACCOUNT_BUSY",
            ) from None


def delete_folder(runtime: Runtime, principal: Principal, account_id: str, folder_id: str) -> None:
    """Delete a folder and its mail, on the server and here."""
    with _held(runtime, principal, account_id, "delete the folder") as held:
        folder = _folder(held, folder_id)
        _protect(folder, "deleted")
        if any(f.parent_id == folder.id for f in held.folders.values()) or (
            folder.delimiter and any(f.name.startswith(folder.name + folder.delimiter) for f in held.folders.values())
        ):
            raise ConflictError("delete the folder's sub-folders first", code="FOLDER_HAS_CHILDREN")
        _settle_moves(runtime, principal, account_id, held, folder)
        held.session.delete_folder(folder.name)
        # Still held (see create_folder).
        MailStore(runtime.db, runtime.objects, principal, account_id).clear_folder(folder)
        with runtime.db.tenant_session(principal) as session:
            row = session.get(Folder, folder.id, with_for_update=True)
            if row is None:
                return
            session.delete(row)
            session.flush()
            logged = [changes.folder_destroyed(folder.id)]
            _retype(session, account_id, logged)
            record(session, principal, account_id, logged)
