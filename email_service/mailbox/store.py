"""What sync writes: folders, messages and attachments rows, and their bytes in object storage.

Every transaction runs as the account's tenant and user (row-level security applies to workers
too). Bytes go to object storage before the rows that point at them commit; rows a conflict
refused leave no objects behind.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from cuid2 import Cuid
from psycopg.types.json import Json
from sqlalchemy import TextClause, delete, select, text, update
from sqlalchemy.orm import Session

from email_service.changes import entries as changelog
from email_service.changes.log import Entry, record
from email_service.db import Database, among
from email_service.mail.folders import selectable
from email_service.mail.parse import ParsedMessage, parse_message
from email_service.models import Attachment, Folder, Message, MessageMove
from email_service.storage import ObjectStore
from email_service.tenancy import Principal

log = logging.getLogger(__name__)


class _BufferedSystemRandom(random.SystemRandom):
    """``SystemRandom`` that reads the kernel's randomness 4 KB at a time instead of 7 bytes per draw.

    cuid2 draws about 25 numbers per id and a sync makes an id per message and attachment, so a
    getrandom() call per draw was a measurable part of storing a batch. The numbers come from
    the same kernel CSPRNG, by the same formula; what is read ahead is never handed out twice,
    and a forked process starts with an empty buffer of its own.
    """

    _BLOCK = 4096

    def __init__(self, x: object = None) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0
        _buffered_randoms.add(self)
        super().__init__(x)

    def _take(self, count: int) -> bytes:
        if count > self._BLOCK:
            return os.urandom(count)
        with self._lock:
            if self._offset + count > len(self._buffer):
                self._buffer, self._offset = os.urandom(self._BLOCK), 0
            taken = self._buffer[self._offset : self._offset + count]
            self._offset += count
            return taken

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._buffer, self._offset = b"", 0

    def random(self) -> float:
        return (int.from_bytes(self._take(7)) >> 3) * _RECIP_BPF

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        numbytes = (k + 7) // 8
        return int.from_bytes(self._take(numbytes)) >> (numbytes * 8 - k)

    def randbytes(self, n: int) -> bytes:
        return self._take(n)


_RECIP_BPF = 2.0**-53  # as random.SystemRandom: 53 random bits make the float
_buffered_randoms: weakref.WeakSet[_BufferedSystemRandom] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for generator in _buffered_randoms:
        generator._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
new_id = Cuid(random_generator=_BufferedSystemRandom).generate
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

    def reconcile_folders(
        self,
        remote: Sequence[RemoteFolder],
        uidvalidities: Callable[[Sequence[str]], Mapping[str, int]] | None = None,
        *,
        keep_unlisted: bool = False,
    ) -> tuple[dict[str, Folder], int]:
        """Make the folder rows match the server's list; returns the folders and how many messages went.

        ``uidvalidities`` gives the UIDVALIDITY of folders the server lists (those it can tell);
        with it, a folder gone from the list and one new in it that are the same folder renamed
        by another client keep the row, its id and its messages (see ``renamed_folders``). It
        is asked only when folders went and others came in the same list.

        A folder the list does not name goes, with its messages, unless it was never on the
        server: ``keep_unlisted`` (POP3, whose one server folder is INBOX: every other folder is
        the user's own, made here), or a folder made here for an account never synced that holds
        mail written here still to be filed (the send or draft job files it, and takes the
        server's folder of that role).
        """
        now = datetime.now(UTC)
        removed_keys: list[str] = []
        removed_messages = 0
        logged: list[Entry] = []
        wanted = {r.name: r for r in remote}
        # Asked before the transaction below, never inside it: a STATUS per new folder is a round
        # trip to a server that may be slow, and only a sync that saw folders come and go asks.
        # The transaction reads the rows again: a folder made or removed in between (a compose
        # makes its Sent folder without the account's lock) only goes unpaired.
        validities = self._new_folders_uidvalidities(wanted, uidvalidities) if uidvalidities is not None else {}
        with self.db.tenant_session(self.principal) as session:
            existing = {f.name: f for f in session.scalars(select(Folder).where(Folder.account_id == self.account_id))}
            before = {folder.id: _folder_view(folder) for folder in existing.values()}
            gone = {name: folder.uidvalidity for name, folder in existing.items() if name not in wanted}
            appeared = {name: validities[name] for name in wanted if name not in existing and name in validities}
            if appeared:
                kept = [folder.uidvalidity for name, folder in existing.items() if name in wanted]
                for old, new in renamed_folders(gone, appeared, kept).items():
                    # The row follows the folder: the loop below gives it the list's description.
                    folder = existing.pop(old)
                    folder.name = new
                    existing[new] = folder
            unlisted = [folder for name, folder in existing.items() if name not in wanted]
            kept_here = {f.id for f in unlisted} if keep_unlisted else _holding_mail_to_file(session, unlisted)
            for name, folder in existing.items():
                if name not in wanted and folder.id not in kept_here:
                    ids, keys = self._message_keys(session, folder.id)
                    removed_keys += keys
                    removed_messages += len(ids)
                    # Its messages go with it (FK cascade): each is destroyed for the log's readers.
                    logged += [changelog.message_destroyed(message_id, folder.id) for message_id in ids]
                    logged.append(changelog.folder_destroyed(folder.id))
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
                described = {
                    "display_name": info.display_name,
                    "type": info.type,
                    "delimiter": info.delimiter,
                    "attributes": list(info.attributes),
                }
                # An unchanged folder is not written: a sync with nothing to do stays read-only.
                if any(getattr(folder, column) != value for column, value in described.items()):
                    for column, value in described.items():
                        setattr(folder, column, value)
                    folder.updated_at = now
            session.flush()
            for name, info in wanted.items():
                parent = existing.get(info.parent_name) if info.parent_name else None
                existing[name].parent_id = parent.id if parent is not None else None
            for name in wanted:
                folder = existing[name]
                if folder.id not in before:
                    logged.append(changelog.folder_created(folder.id))
                elif fields := changelog.changed_columns(before[folder.id], _folder_view(folder)):
                    logged.append(changelog.folder_updated(folder.id, fields))
            record(session, self.principal, self.account_id, logged)
            result = {name: existing[name] for name in wanted}
        self._delete_objects(removed_keys)
        return result, removed_messages

    def _new_folders_uidvalidities(
        self, wanted: Mapping[str, RemoteFolder], uidvalidities: Callable[[Sequence[str]], Mapping[str, int]]
    ) -> Mapping[str, int]:
        """The server's UIDVALIDITY of each listed folder new here, when some stored folder went
        (the only case a rename can explain); empty otherwise, and nothing is asked."""
        with self.db.tenant_session(self.principal) as session:
            stored = dict(
                session.execute(
                    select(Folder.name, Folder.uidvalidity).where(Folder.account_id == self.account_id)
                ).all()
            )
        appeared = [name for name, info in wanted.items() if name not in stored and selectable(info.attributes)]
        gone_synced = any(v is not None for name, v in stored.items() if name not in wanted)
        return uidvalidities(appeared) if appeared and gone_synced else {}

    def save_folder_state(
        self,
        folder: Folder,
        *,
        uidvalidity: int | None,
        uidnext: int | None,
        highestmodseq: int | None,
    ) -> None:
        # The counts are the database's (a trigger keeps them with every message change): read, never written.
        with self.db.tenant_session(self.principal) as session:
            counts = session.execute(
                update(Folder)
                .where(Folder.id == folder.id)
                .values(
                    uidvalidity=uidvalidity,
                    uidnext=uidnext,
                    highestmodseq=highestmodseq,
                    synced_at=datetime.now(UTC),
                    updated_at=datetime.now(UTC),
                )
                .returning(Folder.message_count, Folder.unread_count)
            ).one_or_none()
        folder.uidvalidity, folder.uidnext, folder.highestmodseq = uidvalidity, uidnext, highestmodseq
        if counts is not None:
            folder.message_count, folder.unread_count = counts

    def touch_folders(self, folders: Sequence[Folder]) -> None:
        """Mark folders that had nothing new as synced now, in one transaction."""
        if not folders:
            return
        with self.db.tenant_session(self.principal) as session:
            session.execute(
                update(Folder).where(Folder.id.in_([f.id for f in folders])).values(synced_at=datetime.now(UTC))
            )

    # -- messages --------------------------------------------------------------------------

    def uids(self, folder: Folder) -> set[int]:
        """UIDs of the folder's messages on the server, those moved or deleted here and not there yet included."""
        with self.db.tenant_session(self.principal) as session:
            stored = session.scalars(
                select(Message.uid).where(Message.folder_id == folder.id, Message.uid.is_not(None))
            )
            leaving = session.scalars(
                select(MessageMove.uid).where(MessageMove.source_folder_id == folder.id, MessageMove.uid.is_not(None))
            )
            return set(stored) | set(leaving)

    def uidls(self, folder: Folder) -> set[str]:
        with self.db.tenant_session(self.principal) as session:
            rows = session.scalars(select(Message.pop3_uidl).where(Message.folder_id == folder.id))
            return {uidl for uidl in rows if uidl is not None}

    def uidls_elsewhere(self, folder: Folder, on_server: Iterable[str]) -> set[str]:
        """POP3 UIDLs not to download into ``folder``: moved to another folder here, or deleted here.

        What the server no longer has needs no remembering: those deletions are forgotten.
        """
        present = set(on_server)
        with self.db.tenant_session(self.principal) as session:
            moved = session.scalars(
                select(Message.pop3_uidl).where(
                    Message.account_id == self.account_id,
                    Message.folder_id != folder.id,
                    Message.pop3_uidl.is_not(None),
                )
            )
            deleted = session.execute(
                select(MessageMove.id, MessageMove.pop3_uidl).where(
                    MessageMove.account_id == self.account_id, MessageMove.pop3_uidl.is_not(None)
                )
            ).all()
            gone = [row.id for row in deleted if row.pop3_uidl not in present]
            if gone:
                session.execute(delete(MessageMove).where(among(MessageMove.id, gone)))
            return set(moved) | {row.pop3_uidl for row in deleted if row.pop3_uidl in present}

    def add_messages(self, folder: Folder, incoming: Sequence[IncomingMessage]) -> tuple[list[int | str], list[str]]:
        """Parse and store a batch; returns (the UIDs/UIDLs now stored, per-message errors)."""
        return self.add_parsed(folder, incoming, [parse_message(item.raw) for item in incoming])

    def add_parsed(
        self, folder: Folder, incoming: Sequence[IncomingMessage], parsed: Sequence[ParsedMessage]
    ) -> tuple[list[int | str], list[str]]:
        """Store a batch already parsed (``parsed[i]`` is ``parse_message(incoming[i].raw)``).

        Objects are written while the rows are inserted, and the transaction commits only once
        every object is durable. Returns (the UIDs/UIDLs now stored, per-message errors).
        """
        errors: dict[int, str] = {}
        prepared: list[_Prepared] = []
        for index, (item, message) in enumerate(zip(incoming, parsed, strict=True)):
            try:
                prepared.append(self._prepare(folder, index, item, message))
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the folder
                errors[index] = self._not_stored(folder, item, exc)
        if prepared:
            conflict = ["folder_id", "uid"] if folder_uses_uids(incoming) else ["folder_id", "pop3_uidl"]
            inserted = self._write(folder, incoming, prepared, conflict, errors)
        else:
            inserted = []
        return [item.uid if item.uid is not None else item.uidl for item in inserted], [
            errors[index] for index in sorted(errors)
        ]

    def _write(
        self,
        folder: Folder,
        incoming: Sequence[IncomingMessage],
        prepared: list[_Prepared],
        conflict: list[str],
        errors: dict[int, str],
    ) -> list[IncomingMessage]:
        put_many = getattr(self.objects, "put_many", None)
        if put_many is not None:
            writer = _Background(put_many, [obj for p in prepared for obj in p.objects])
            try:
                with self.db.tenant_session(self.principal) as session:
                    inserted = self._insert(session, prepared, conflict)
                    # The rows must not commit before the objects they point at are durable; a
                    # failed write raises here and rolls the rows back.
                    writer.result()
            except _ObjectsFailed as failed:
                log.warning("batch object write failed (%s); storing one message at a time", failed.reason)
            else:
                return self._keep_inserted(incoming, prepared, inserted)
            finally:
                writer.join()
        # Without batch writes (or after one failed): object by object, a failure costs its message only.
        kept = []
        for p in prepared:
            written = []
            try:
                for key, data, content_type in p.objects:
                    self.objects.put_bytes(key, data, content_type)
                    written.append(key)
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the folder
                errors[p.index] = self._not_stored(folder, incoming[p.index], exc)
                self._delete_objects(written)
                continue
            kept.append(p)
        if not kept:
            return []
        with self.db.tenant_session(self.principal) as session:
            inserted = self._insert(session, kept, conflict)
        return self._keep_inserted(incoming, kept, inserted)

    def _insert(self, session: Session, prepared: list[_Prepared], conflict: list[str]) -> set[str]:
        # One statement per batch, not one per row: the statement-level triggers on messages
        # (folder counts, search index) then run once per batch, and RETURNING names exactly the
        # rows the conflict rule let in, with no second query.
        inserted = set(
            session.scalars(_insert_rows("messages", tuple(conflict)), {"rows": _json_rows([p.row for p in prepared])})
        )
        attachments = [a for p in prepared if p.row["id"] in inserted for a in p.attachments]
        if attachments:
            session.execute(_insert_rows("attachments", ()), {"rows": _json_rows(attachments)})
        # One log write per batch, in this transaction: rows a conflict refused were never ours to announce.
        record(
            session,
            self.principal,
            self.account_id,
            [changelog.message_created(p.row["id"], p.row["folder_id"]) for p in prepared if p.row["id"] in inserted],
        )
        return inserted

    def _keep_inserted(
        self, incoming: Sequence[IncomingMessage], prepared: list[_Prepared], inserted: set[str]
    ) -> list[IncomingMessage]:
        # Rows another sync stored first: their objects are ours alone, and unreferenced.
        self._delete_objects([key for p in prepared if p.row["id"] not in inserted for key, _d, _t in p.objects])
        return [incoming[p.index] for p in prepared if p.row["id"] in inserted]

    def _not_stored(self, folder: Folder, item: IncomingMessage, exc: Exception) -> str:
        label = f"UID {item.uid}" if item.uid is not None else f"UIDL {item.uidl}"
        log.warning("message %s in folder %s not stored: %s", label, folder.name, type(exc).__name__)
        return f"{folder.display_name}: message {label} could not be stored ({type(exc).__name__})"

    def _prepare(self, folder: Folder, index: int, item: IncomingMessage, parsed: ParsedMessage) -> _Prepared:
        message_id = new_id()
        raw_key = self._key("messages", f"{message_id}.eml")
        objects = [(raw_key, item.raw, "message/rfc822")]
        attachments = []
        for position, part in enumerate(parsed.attachments):
            attachment_id = new_id()
            key = self._key("attachments", attachment_id)
            objects.append((key, part.data, part.mime_type))
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
                    # Its place among the message's parts: the files are listed in the order sent.
                    "position": position,
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
            "recipient_names": {_clean(k): _clean(v) for k, v in parsed.recipient_names.items()},
            "preview": _clean(parsed.preview),
            "body_text": _clean(parsed.text_body),
            "body_html": _clean(parsed.html_body) if parsed.html_body else None,
            "headers": {_clean(k): _clean(v) for k, v in parsed.headers.items()},
            "received_at": received,
            "size": len(item.raw),
            "attachment_count": len(attachments),
            # What the attachments' statement trigger would compute (their names in id order):
            # given here, the row is indexed for search once, at insert, and not updated again.
            "attachment_names": " ".join(a["filename"] for a in sorted(attachments, key=lambda a: a["id"])),
            "raw_object_key": raw_key,
            **flag_columns(item.flags, folder.type),
        }
        return _Prepared(index, row, attachments, objects)

    def apply_flags(self, folder: Folder, changes: dict[int, tuple[tuple[str, ...], int | None]]) -> int:
        """Update rows whose flags differ from the server's; returns how many changed."""
        if not changes:
            return 0
        updated: list[Entry] = []
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
                    among(Message.uid, changes),
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
                if wanted == have:
                    continue
                # Checked again as the row is written: a change made through the API since the
                # read above (it waits for this row, or this waits for it) must not be undone.
                done = session.execute(
                    update(Message)
                    .where(Message.id == row.id, Message.writeback_pending.is_(False))
                    .values(**wanted, modseq=modseq, updated_at=datetime.now(UTC))
                )
                if done.rowcount:
                    updated.append(
                        changelog.message_updated(row.id, folder.id, changelog.changed_columns(have, wanted))
                    )
            record(session, self.principal, self.account_id, updated)
        return len(updated)

    def remove_uids(self, folder: Folder, uids: Iterable[int]) -> int:
        uids = list(uids)
        if not uids:
            return 0
        with self.db.tenant_session(self.principal) as session:
            ids, keys = self._message_keys(session, folder.id, uids, lock=True)
            logged = [changelog.message_destroyed(i, folder.id) for i in ids]
            # Moved or deleted here while another client removed it there: nothing is left to move.
            more_ids, more_keys, more_logged = self._drop_leaving(session, folder.id, uids)
            ids, keys, logged = ids + more_ids, keys + more_keys, logged + more_logged
            session.flush()
            session.execute(delete(Message).where(among(Message.id, ids)))
            record(session, self.principal, self.account_id, logged)
        self._delete_objects(keys)
        return len(ids)

    def give_way(self, folder: Folder, uid: int, written_here: str) -> bool:
        """Remove the row a sync made of the copy ``uid`` filed for ``written_here``; False, with
        nothing removed, when a change made since moves or deletes that copy.

        Checked and removed in one transaction with the row locked: a move of it through the API
        locks it first too, so it is either seen here (and left to go where it was sent) or finds
        the row gone.
        """
        with self.db.tenant_session(self.principal) as session:
            ids, keys = self._message_keys(session, folder.id, [uid], lock=True)
            leaving = session.scalar(
                select(MessageMove.id).where(MessageMove.source_folder_id == folder.id, MessageMove.uid == uid).limit(1)
            )
            if leaving is not None:
                return False
            ids = [message_id for message_id in ids if message_id != written_here]
            if ids:
                session.execute(delete(Message).where(among(Message.id, ids)))
                record(
                    session, self.principal, self.account_id, [changelog.message_destroyed(i, folder.id) for i in ids]
                )
        if ids:
            self._delete_objects(keys)
        return True

    def clear_folder(self, folder: Folder) -> int:
        """Forget every message of a folder (its UIDVALIDITY changed: the old UIDs mean nothing now)."""
        with self.db.tenant_session(self.principal) as session:
            ids, keys = self._message_keys(session, folder.id, lock=True)
            logged = [changelog.message_destroyed(i, folder.id) for i in ids]
            # Moves waiting to leave it name old UIDs too: those messages come back with the rest.
            more_ids, more_keys, more_logged = self._drop_leaving(session, folder.id, None)
            ids, keys, logged = ids + more_ids, keys + more_keys, logged + more_logged
            session.flush()
            session.execute(delete(Message).where(among(Message.id, ids)))
            record(session, self.principal, self.account_id, logged)
        self._delete_objects(keys)
        return len(ids)

    def _drop_leaving(
        self, session: Session, folder_id: str, uids: list[int] | None
    ) -> tuple[list[str], list[str], list[Entry]]:
        """Forget the waiting moves out of ``folder_id`` (of ``uids``, or all); returns the (ids,
        object keys, log entries) of the rows that followed them, for the caller to delete."""
        query = select(MessageMove).where(MessageMove.source_folder_id == folder_id)
        if uids is not None:
            query = query.where(among(MessageMove.uid, uids))
        ids: list[str] = []
        keys: list[str] = []
        logged: list[Entry] = []
        # The rows that follow the moves are locked before the moves, the order the API's moves use.
        followed = session.execute(
            select(Message.id, Message.folder_id)
            .where(Message.id.in_(query.with_only_columns(MessageMove.message_id).scalar_subquery()))
            .order_by(Message.id)
            .with_for_update()
        ).all()
        for row in followed:
            more_ids, more_keys = self._message_keys(session, row.folder_id, only=[row.id])
            ids += more_ids
            keys += more_keys
            logged += [changelog.message_destroyed(i, row.folder_id) for i in more_ids]
        for move in session.scalars(query.order_by(MessageMove.id).with_for_update()).all():
            session.delete(move)
        return ids, keys, logged

    def _message_keys(
        self,
        session: Session,
        folder_id: str,
        uids: list[int] | None = None,
        *,
        lock: bool = False,
        only: list[str] | None = None,
    ) -> tuple[list[str], list[str]]:
        """(ids, object keys) of a folder's messages, or of those with ``uids``.

        With ``lock`` the rows stay locked until commit, so the ids deleted are exactly the ids
        logged even when a write-back moves or deletes one of them meanwhile.
        """
        query = select(Message.id, Message.raw_object_key).where(Message.folder_id == folder_id).order_by(Message.uid)
        if uids is not None:
            query = query.where(among(Message.uid, uids))
        if only is not None:
            query = query.where(among(Message.id, only))
        if lock:
            query = query.with_for_update()
        messages = session.execute(query).all()
        ids = [m.id for m in messages]
        keys = [m.raw_object_key for m in messages if m.raw_object_key]
        if ids:
            keys += list(session.scalars(select(Attachment.object_key).where(among(Attachment.message_id, ids))))
        return ids, keys

    def _delete_objects(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                self.objects.delete(key)
            except Exception as exc:  # noqa: BLE001 - a leftover object is harmless, a failed sync is not
                log.warning("could not delete object %s: %s", key, type(exc).__name__)


@dataclass(frozen=True)
class _Prepared:
    """One message ready to write: its row, its attachment rows and its objects (key, bytes, type)."""

    index: int
    row: dict
    attachments: list[dict]
    objects: list[tuple[str, bytes, str]]


class _ObjectsFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Background:
    """Runs one call in a thread, so object writes (mostly fsync waits) overlap the DB work."""

    def __init__(self, call: Callable[..., object], *args: object) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call, args), name="object-writes", daemon=True)
        self._thread.start()

    def _run(self, call: Callable[..., object], args: tuple) -> None:
        try:
            call(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise _ObjectsFailed(type(self._error).__name__) from self._error

    def join(self) -> None:
        self._thread.join()


# The columns each batch insert names; the others take their defaults.
_ROW_COLUMNS = {
    "messages": (
        "id", "tenant_id", "user_id", "account_id", "folder_id", "uid", "pop3_uidl", "modseq",
        "message_id_header", "conversation_id", "subject", "from_address", "from_name", "to_addresses",
        "cc_addresses", "bcc_addresses", "recipient_names", "preview", "body_text", "body_html", "headers",
        "received_at",
        "size", "attachment_count", "attachment_names", "raw_object_key",
        "is_read", "is_starred", "is_draft", "is_deleted", "is_spam", "keywords",
    ),
    "attachments": (
        "id", "tenant_id", "user_id", "account_id", "message_id", "filename", "mime_type", "size",
        "content_id", "is_inline", "object_key", "position",
    ),
}  # fmt: skip


@functools.cache
def _insert_rows(table: str, conflict: tuple[str, ...]) -> TextClause:
    """A batch of rows in one statement: they travel as one JSON array, read back as the table's row type.

    One parameter whatever the batch size (a multi-row VALUES would need one per column per row),
    and no temporary table to create, so the application role needs no privilege it lacks.
    """
    columns = ", ".join(_ROW_COLUMNS[table])
    on_conflict = f" ON CONFLICT ({', '.join(conflict)}) DO NOTHING RETURNING id" if conflict else ""
    return text(
        f"INSERT INTO {table} ({columns}) SELECT {columns}"  # noqa: S608 - names from the constants above
        f" FROM json_populate_recordset(NULL::{table}, CAST(:rows AS json)){on_conflict}"
    )


# msgspec writes the rows' JSON (UTF-8 as is, datetimes in RFC 3339, UUIDs as strings) in a
# tenth of the standard library's time: a batch's bodies and headers are megabytes of text,
# encoded under the interpreter lock of the process that also fetches and hands out the mail.
_ROWS_ENCODER = msgspec.json.Encoder()


def _json_rows(rows: list[dict]) -> Json:
    # Handed to psycopg as the encoder's bytes: as a str they were decoded here only for psycopg
    # to encode them again, two more copies of megabytes per batch.
    return Json(rows, dumps=_ROWS_ENCODER.encode)


def _folder_view(folder: Folder) -> dict[str, object]:
    # What the API shows of a folder: a change to any of these is a folder update in the log.
    return {"name": folder.name, "displayName": folder.display_name, "type": folder.type, "parentId": folder.parent_id}


def _holding_mail_to_file(session: Session, folders: Sequence[Folder]) -> set[str]:
    """Which of ``folders``, never synced, hold mail written here that no server has yet."""
    made_here = [folder.id for folder in folders if folder.uidvalidity is None]
    if not made_here:
        return set()
    return set(
        session.scalars(
            select(Message.folder_id)
            .where(among(Message.folder_id, made_here), Message.uid.is_(None), Message.delivery_status.is_not(None))
            .distinct()
        )
    )


def renamed_folders(
    gone: Mapping[str, int | None], appeared: Mapping[str, int], kept: Iterable[int | None] = ()
) -> dict[str, str]:
    """Which folders gone from the server's list are folders new in it under another name: {old: new}.

    ``gone`` and ``kept`` hold the stored UIDVALIDITY of the folders no longer listed and of
    those still listed, ``appeared`` the server's for the new ones. Servers keep a folder's
    UIDVALIDITY across RENAME (Dovecot does, and the UIDs stay valid), so a stored folder and a
    listed one with the same UIDVALIDITY are one folder renamed by another client. Only pairs
    that leave no doubt count: exactly one gone and one new folder with that UIDVALIDITY, the
    stored one having been synced, and no folder still listed having it too (a server that
    gives every folder the same one, as some do, tells nothing by it). Anything else is a folder
    deleted and another created, as before.
    """
    shared = set(kept)
    old_by_validity: dict[int, list[str]] = {}
    for name, uidvalidity in gone.items():
        if uidvalidity is not None and uidvalidity not in shared:
            old_by_validity.setdefault(uidvalidity, []).append(name)
    new_by_validity: dict[int, list[str]] = {}
    for name, uidvalidity in appeared.items():
        new_by_validity.setdefault(uidvalidity, []).append(name)
    return {
        old[0]: new_by_validity[uidvalidity][0]
        for uidvalidity, old in old_by_validity.items()
        if len(old) == 1 and len(new_by_validity.get(uidvalidity, ())) == 1
    }


def folder_uses_uids(incoming: Sequence[IncomingMessage]) -> bool:
    return any(item.uid is not None for item in incoming)


def _clean(value: str | None) -> str:
    # PostgreSQL text cannot hold NUL; mail from the wild sometimes does.
    return (value or "").replace("\x00", "")
