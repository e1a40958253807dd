"""Finding an account's role folder (Drafts, Sent, ...) on its server, creating it only when none exists."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update

from email_service.changes import entries as changes
from email_service.changes.log import record
from email_service.db import Database
from email_service.mail.folders import ROLE_ATTRIBUTES, assign_roles, display_name, parse_list_line
from email_service.models import Folder, Message
from email_service.protocols.imap import ImapSession
from email_service.tenancy import Principal


def role_folder_on_server(session: ImapSession, role: str, name: str) -> str:
    """The server name of the account's ``role`` folder.

    The folder the server announces (SPECIAL-USE) or, failing that, names for the role; when
    there is none, ``name`` is created, marked with the role where the server can be told
    (``CREATE name (USE (\\Drafts))``, RFC 6154).
    """
    entries = [entry for entry in map(parse_list_line, session.list_folders()) if entry is not None]
    for entry, kind in zip(entries, assign_roles(entries), strict=True):
        if kind == role:
            return entry.name
    session.ensure_folder(name, ROLE_ATTRIBUTES.get(role))
    return name


def adopt_server_folder(db: Database, principal: Principal, folder_id: str, message_id: str, name: str) -> None:
    """The server's role folder is ``name``, not the one the API made up for a never-synced account.

    The folder row takes the server's name, so the next sync finds one folder, not two; if a
    row of that name exists already, the message moves into it instead.
    """
    with db.tenant_session(principal) as session:
        folder = session.get(Folder, folder_id, with_for_update=True)
        if folder is None or folder.name == name:
            return
        existing = session.scalar(select(Folder).where(Folder.account_id == folder.account_id, Folder.name == name))
        if existing is None:
            folder.name = name
            folder.display_name = display_name(name, folder.delimiter)
            folder.updated_at = datetime.now(UTC)
            record(session, principal, folder.account_id, [changes.folder_updated(folder.id, ["name", "displayName"])])
            return
        moved = session.execute(
            update(Message)
            .where(Message.id == message_id, Message.folder_id == folder.id)
            .values(folder_id=existing.id)
        ).rowcount
        if moved:  # the folders' counts follow in the database (the messages trigger)
            record(session, principal, folder.account_id, [changes.message_moved(message_id, folder.id, existing.id)])
