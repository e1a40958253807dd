"""What sync writes: folders, messages and attachments rows, and their bytes in object storage.

Every transaction runs as the account's tenant and user (row-level security applies to workers
too). Bytes go to object storage before the rows that point at them commit; rows a conflict
refused leave no objects behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cuid2 import Cuid
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from email_service.db import Database
from email_service.mail.parse import ParsedMessage, parse_message
from email_service.models import Attachment, Folder, Message
from email_service.storage import ObjectStore
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
new_id = Cuid().generate
SYSTEM_FLAGS = {"\\seen", "\\flagged", "\\draft", "\\deleted", "\\answered", "\\recent"}
SPAM_KEYWORDS = {"$junk", "junk"}


@dataclass(frozen=True)
class RemoteFolder:
    name: str
    display_name: str
    type: str
    delimiter: str | None
    parent_name: str | None
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class IncomingMessage:
    raw: bytes
    uid: int | None = None
    uidl: str | None = None
    flags: tuple[str, ...] = ()
    internaldate: datetime | None = None
    modseq: int | None = None


def flag_columns(flags: Iterable[str], folder_type: str) -> dict:
    lowered = {flag.lower() for flag in flags}
    return {
        "is_read": "\\seen" in lowered,
        "is_starred": "\\flagged" in lowered,
        "is_draft": "\\draft" in lowered,
        "is_deleted": "\\deleted" in lowered,
        "is_spam": folder_type == "spam" or bool(lowered & SPAM_KEYWORDS),
        "keywords": sorted(flag for flag in flags if flag.lower() not in SYSTEM_FLAGS),
    }


class MailStore:
    def __init__(self, db: Database, objects: ObjectStore, principal: Principal, account_id: str) -> None:
        self.db, self.objects, self.principal, self.account_id = db, objects, principal, account_id

    def _key(self, kind: str, object_id: str) -> str:
        return f"{self.principal.tenant_id}/{self.account_id}/{kind}/{object_id}"

    # -- folders ---------------------------------------------------------------------------

    def folders(self) -> dict[str, Folder]:
        with self.db.tenant_session(self.principal) as session:
            rows = session.scalars(select(Folder).where(Folder.account_id == self.account_id))
            return {folder.name: folder for folder in rows}

    def reconcile_folders(self, remote: Sequence[RemoteFolder]) -> tuple[dict[str, Folder], int]:
        """Make the folder rows match the server's list; returns the folders and how many messages went."""
        now = datetime.now(UTC)
        removed_keys: list[str] = []
        removed_messages = 0
        with self.db.tenant_session(self.principal) as session:
            existing = {f.name: f for f in session.scalars(select(Folder).where(Folder.account_id == self.account_id))}
            wanted = {r.name: r for r in remote}
            for name, folder in existing.items():
                if name not in wanted:
                    keys, count = self._message_keys(session, folder.id)
                    removed_keys += keys
                    removed_messages += count
                    session.delete(folder)
            for name, info in wanted.items():
                folder = existing.get(name)
                if folder is None:
                    folder = Folder(
                        id=new_id(),
                        tenant_id=self.principal.tenant_id,
                        user_id=self.principal.user_id,
                        account_id=self.account_id,
                        name=name,
                        created_at=now,
                    )
                    session.add(folder)
                    existing[name] = folder
                folder.display_name = info.display_name
                folder.type = info.type
                folder.delimiter = info.delimiter
                folder.attributes = list(info.attributes)
                folder.updated_at = now
            session.flush()
            for name, info in wanted.items():
                parent = existing.get(info.parent_name) if info.parent_name else None
                existing[name].parent_id = parent.id if parent is not None else None
            result = {name: existing[name] for name in wanted}
        self._delete_objects(removed_keys)
        return result, removed_messages

    def save_folder_state(
        self,
        folder: Folder,
        *,
        uidvalidity: int | None,
        uidnext: int | None,
        highestmodseq: int | None,
        message_count: int,
    ) -> None:
        with self.db.tenant_session(self.principal) as session:
            unread = session.scalar(
                select(func.count())
                .select_from(Message)
                .where(Message.folder_id == folder.id, Message.is_read.is_(False))
            )
            session.execute(
                update(Folder)
                .where(Folder.id == folder.id)
                .values(
                    uidvalidity=uidvalidity,
                    uidnext=uidnext,
                    highestmodseq=highestmodseq,
                    message_count=message_count,
                    unread_count=unread or 0,
                    synced_at=datetime.now(UTC),
                    updated_at=datetime.now(UTC),
                )
            )
        folder.uidvalidity, folder.uidnext, folder.highestmodseq = uidvalidity, uidnext, highestmodseq
        folder.message_count = message_count

    def touch_folder(self, folder: Folder) -> None:
        with self.db.tenant_session(self.principal) as session:
            session.execute(update(Folder).where(Folder.id == folder.id).values(synced_at=datetime.now(UTC)))

    # -- messages --------------------------------------------------------------------------

    def uids(self, folder: Folder) -> set[int]:
        with self.db.tenant_session(self.principal) as session:
            return set(
                session.scalars(select(Message.uid).where(Message.folder_id == folder.id, Message.uid.is_not(None)))
            )

    def uidls(self, folder: Folder) -> set[str]:
        with self.db.tenant_session(self.principal) as session:
            rows = session.scalars(select(Message.pop3_uidl).where(Message.folder_id == folder.id))
            return {uidl for uidl in rows if uidl is not None}

    def add_messages(self, folder: Folder, incoming: Sequence[IncomingMessage]) -> tuple[list[int | str], list[str]]:
        """Store a batch; returns (the UIDs/UIDLs now stored, per-message errors)."""
        rows, attachment_rows, keys_by_message, errors = [], [], {}, []
        for item in incoming:
            label = f"UID {item.uid}" if item.uid is not None else f"UIDL {item.uidl}"
            try:
                parsed = parse_message(item.raw)
                row, attachments, keys = self._prepare(folder, item, parsed)
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the folder
                log.warning("message %s in folder %s not stored: %s", label, folder.name, type(exc).__name__)
                errors.append(f"{folder.display_name}: message {label} could not be stored ({type(exc).__name__})")
                continue
            rows.append(row)
            attachment_rows.extend(attachments)
            keys_by_message[row["id"]] = keys
        if not rows:
            return [], errors
        conflict = ["folder_id", "uid"] if folder_uses_uids(incoming) else ["folder_id", "pop3_uidl"]
        with self.db.tenant_session(self.principal) as session:
            inserted = set(
                session.scalars(
                    insert(Message).values(rows).on_conflict_do_nothing(index_elements=conflict).returning(Message.id)
                )
            )
            kept = [a for a in attachment_rows if a["message_id"] in inserted]
            if kept:
                session.execute(insert(Attachment).values(kept))
        # Rows another sync stored first: their objects are ours alone, and unreferenced.
        self._delete_objects(
            [k for message_id, keys in keys_by_message.items() if message_id not in inserted for k in keys]
        )
        stored = [r["uid"] if r["uid"] is not None else r["pop3_uidl"] for r in rows if r["id"] in inserted]
        return stored, errors

    def _prepare(
        self, folder: Folder, item: IncomingMessage, parsed: ParsedMessage
    ) -> tuple[dict, list[dict], list[str]]:
        message_id = new_id()
        raw_key = self._key("messages", f"{message_id}.eml")
        self.objects.put_bytes(raw_key, item.raw, "message/rfc822")
        keys = [raw_key]
        attachments = []
        for part in parsed.attachments:
            attachment_id = new_id()
            key = self._key("attachments", attachment_id)
            self.objects.put_bytes(key, part.data, part.mime_type)
            keys.append(key)
            attachments.append(
                {
                    "id": attachment_id,
                    "tenant_id": self.principal.tenant_id,
                    "user_id": self.principal.user_id,
                    "account_id": self.account_id,
                    "message_id": message_id,
                    "filename": part.filename,
                    "mime_type": part.mime_type,
                    "size": part.size,
                    "content_id": part.content_id,
                    "is_inline": part.is_inline,
                    "object_key": key,
                }
            )
        received = item.internaldate or parsed.date or datetime.now(UTC)
        row = {
            "id": message_id,
            "tenant_id": self.principal.tenant_id,
            "user_id": self.principal.user_id,
            "account_id": self.account_id,
            "folder_id": folder.id,
            "uid": item.uid,
            "pop3_uidl": item.uidl,
            "modseq": item.modseq,
            "message_id_header": parsed.message_id,
            "conversation_id": parsed.conversation_key,
            "subject": _clean(parsed.subject),
            "from_address": _clean(parsed.from_address),
            "from_name": _clean(parsed.from_name) if parsed.from_name else None,
            "to_addresses": [_clean(a) for a in parsed.to],
            "cc_addresses": [_clean(a) for a in parsed.cc],
            "bcc_addresses": [_clean(a) for a in parsed.bcc],
            "preview": _clean(parsed.preview),
            "body_text": _clean(parsed.text_body),
            "body_html": _clean(parsed.html_body) if parsed.html_body else None,
            "headers": {_clean(k): _clean(v) for k, v in parsed.headers.items()},
            "received_at": received,
            "size": len(item.raw),
            "attachment_count": len(attachments),
            "raw_object_key": raw_key,
            **flag_columns(item.flags, folder.type),
        }
        return row, attachments, keys

    def apply_flags(self, folder: Folder, changes: dict[int, tuple[tuple[str, ...], int | None]]) -> int:
        """Update rows whose flags differ from the server's; returns how many changed."""
        if not changes:
            return 0
        updated = 0
        with self.db.tenant_session(self.principal) as session:
            current = session.execute(
                select(
                    Message.id,
                    Message.uid,
                    Message.is_read,
                    Message.is_starred,
                    Message.is_draft,
                    Message.is_deleted,
                    Message.is_spam,
                    Message.keywords,
                ).where(
                    Message.folder_id == folder.id,
                    Message.uid.in_(list(changes)),
                    # A change made through the API and not yet on the server wins over the server's flags.
                    Message.writeback_pending.is_(False),
                )
            ).all()
            for row in current:
                flags, modseq = changes[row.uid]
                wanted = flag_columns(flags, folder.type)
                have = {
                    "is_read": row.is_read,
                    "is_starred": row.is_starred,
                    "is_draft": row.is_draft,
                    "is_deleted": row.is_deleted,
                    "is_spam": row.is_spam,
                    "keywords": sorted(row.keywords),
                }
                if wanted != have:
                    session.execute(
                        update(Message)
                        .where(Message.id == row.id)
                        .values(**wanted, modseq=modseq, updated_at=datetime.now(UTC))
                    )
                    updated += 1
        return updated

    def remove_uids(self, folder: Folder, uids: Iterable[int]) -> int:
        uids = list(uids)
        if not uids:
            return 0
        with self.db.tenant_session(self.principal) as session:
            keys, _ = self._message_keys(session, folder.id, uids)
            count = session.execute(
                delete(Message).where(Message.folder_id == folder.id, Message.uid.in_(uids))
            ).rowcount
        self._delete_objects(keys)
        return count

    def clear_folder(self, folder: Folder) -> int:
        """Forget every message of a folder (its UIDVALIDITY changed: the old UIDs mean nothing now)."""
        with self.db.tenant_session(self.principal) as session:
            keys, _ = self._message_keys(session, folder.id)
            count = session.execute(delete(Message).where(Message.folder_id == folder.id)).rowcount
        self._delete_objects(keys)
        return count

    def _message_keys(self, session: object, folder_id: str, uids: list[int] | None = None) -> tuple[list[str], int]:
        query = select(Message.id, Message.raw_object_key).where(Message.folder_id == folder_id)
        if uids is not None:
            query = query.where(Message.uid.in_(uids))
        messages = session.execute(query).all()
        ids = [m.id for m in messages]
        keys = [m.raw_object_key for m in messages if m.raw_object_key]
        if ids:
            keys += list(session.scalars(select(Attachment.object_key).where(Attachment.message_id.in_(ids))))
        return keys, len(messages)

    def _delete_objects(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                self.objects.delete(key)
            except Exception as exc:  # noqa: BLE001 - a leftover object is harmless, a failed sync is not
                log.warning("could not delete object %s: %s", key, type(exc).__name__)


def folder_uses_uids(incoming: Sequence[IncomingMessage]) -> bool:
    return any(item.uid is not None for item in incoming)


def _clean(value: str | None) -> str:
    # PostgreSQL text cannot hold NUL; mail from the wild sometimes does.
    return (value or "").replace("\x00", "")
