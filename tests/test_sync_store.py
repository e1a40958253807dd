"""MailStore.add_messages against the real database and object store: rows, objects, failures."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from messages import attachments_message, plain_message, realistic_mix, to_bytes
from sqlalchemy import select, text, update

from email_service.mail.parse import parse_message
from email_service.mailbox.store import IncomingMessage, MailStore, RemoteFolder
from email_service.models import Attachment, Change, ChangeEntity, ChangeKind, Folder, Message, MessageMove
from email_service.services.accounts import create_account
from email_service.storage import ObjectNotFound
from email_service.tenancy import Principal

INBOX = RemoteFolder(name="INBOX", display_name="Inbox", type="inbox", delimiter=None, parent_name=None, attributes=())


@dataclass
class Mailbox:
    store: MailStore
    folder: object


def mailbox(runtime, objects=None) -> Mailbox:
    principal = Principal(uuid.uuid4(), uuid.uuid4())
    account = create_account(
        runtime.db,
        runtime.cipher,
        principal,
        {
            "accountName": "store test",
            "emailAddress": f"{uuid.uuid4().hex[:12]}@example.com",
            "protocol": "imap",
            "hostname": "imap.example.com",
            "port": 993,
            "encryption": "tls",
            "username": "someone",
            "password": "secret",
            "isSyncEnabled": False,
        },
    )
    store = MailStore(runtime.db, objects or runtime.objects, principal, account.id)
    folders, _ = store.reconcile_folders([INBOX])
    return Mailbox(store, folders["INBOX"])


def incoming(raws: list[bytes], first_uid: int = 1) -> list[IncomingMessage]:
    return [IncomingMessage(raw=raw, uid=first_uid + n, flags=("\\Seen",)) for n, raw in enumerate(raws)]


def stored(box: Mailbox) -> tuple[list, list]:
    with box.store.db.tenant_session(box.store.principal) as session:
        messages = session.execute(select(Message).where(Message.folder_id == box.folder.id).order_by(Message.uid))
        messages = [row[0] for row in messages]
        ids = [m.id for m in messages]
        attachments = list(session.scalars(select(Attachment).where(Attachment.message_id.in_(ids))))
    return messages, attachments


def read(objects, key: str) -> bytes:
    with objects.open(key) as reader:
        return b"".join(reader)


def test_rows_and_objects_match_the_parse(runtime):
    box = mailbox(runtime)
    raws = [*realistic_mix(30, seed=8), to_bytes(attachments_message())]
    added, errors = box.store.add_messages(box.folder, incoming(raws))
    assert (added, errors) == (list(range(1, len(raws) + 1)), [])
    messages, attachments = stored(box)
    assert len(messages) == len(raws)
    by_message = {}
    for attachment in attachments:
        by_message.setdefault(attachment.message_id, []).append(attachment)
    for message, raw in zip(messages, raws, strict=True):
        parsed = parse_message(raw)
        assert (message.subject, message.body_text, message.preview) == (
            parsed.subject,
            parsed.text_body,
            parsed.preview,
        )
        assert (message.is_read, message.size, message.attachment_count) == (True, len(raw), len(parsed.attachments))
        assert read(runtime.objects, message.raw_object_key) == raw
        mine = sorted(by_message.get(message.id, []), key=lambda a: a.filename)
        expected = sorted(parsed.attachments, key=lambda a: a.filename)
        assert [(a.filename, a.mime_type, a.size) for a in mine] == [
            (a.filename, a.mime_type, a.size) for a in expected
        ]
        for row, part in zip(mine, expected, strict=True):
            assert read(runtime.objects, row.object_key) == part.data


def test_messages_stored_before_are_refused_and_leave_no_objects(runtime, monkeypatch):
    box = mailbox(runtime)
    raws = [to_bytes(plain_message(f"one {n}")) for n in range(3)]
    assert box.store.add_messages(box.folder, incoming(raws))[0] == [1, 2, 3]
    written = []
    real_put_many = runtime.objects.put_many

    def recording(objects):
        written.extend(key for key, _data, _type in objects)
        real_put_many(objects)

    monkeypatch.setattr(runtime.objects, "put_many", recording)
    again = incoming([*raws, to_bytes(plain_message("new"))])
    assert box.store.add_messages(box.folder, again)[0] == [4]
    messages, _ = stored(box)
    assert [m.uid for m in messages] == [1, 2, 3, 4]
    kept = {messages[-1].raw_object_key}
    for key in written:
        if key in kept:
            continue
        with pytest.raises(ObjectNotFound):
            runtime.objects.open(key)


def test_a_batch_keeps_folder_counts_change_log_and_search_exact(runtime):
    box = mailbox(runtime)
    first = [to_bytes(plain_message(f"first {n}")) for n in range(3)]
    assert box.store.add_messages(box.folder, incoming(first))[0] == [1, 2, 3]
    # Stored again with two new ones, unread: the three already there are refused.
    raws = [*first, to_bytes(plain_message("unread one")), to_bytes(attachments_message("with files"))]
    again = [IncomingMessage(raw=raw, uid=n + 1) for n, raw in enumerate(raws)]
    assert box.store.add_messages(box.folder, again) == ([4, 5], [])

    messages, attachments = stored(box)
    principal, account_id = box.store.principal, box.store.account_id
    with box.store.db.tenant_session(principal) as session:
        folder = session.get(Folder, box.folder.id)
        assert (folder.message_count, folder.unread_count) == (5, 2)
        created = session.scalars(
            select(Change.entity_id).where(
                Change.account_id == account_id,
                Change.entity == ChangeEntity.MESSAGE,
                Change.kind == ChangeKind.CREATED,
            )
        ).all()
        assert sorted(created) == sorted(m.id for m in messages)
        # Each message is found by search, the one with files by a word of an attachment's name only.
        for message in messages:
            words = " & ".join(message.subject.split())
            found = session.scalars(
                text("SELECT message_id FROM email_search_among(:account, to_tsquery('simple', :words), :ids)"),
                {"account": account_id, "words": words, "ids": [m.id for m in messages]},
            ).all()
            assert message.id in found
        found = session.scalars(
            text("SELECT message_id FROM email_search_among(:account, plainto_tsquery('simple', 'Résumé'), :ids)"),
            {"account": account_id, "ids": [m.id for m in messages]},
        ).all()
        assert found == [messages[-1].id]
        # The names sync wrote are those the attachments' own trigger would have written.
        names = session.execute(
            text("SELECT attachment_names FROM messages WHERE id = :id"), {"id": messages[-1].id}
        ).scalar_one()
    assert names == " ".join(a.filename for a in sorted(attachments, key=lambda a: a.id))
    assert "Résumé" in names


class OneAtATime:
    """An object store without put_many (as the MinIO backend), optionally failing some objects."""

    def __init__(self, inner, fail_type: str | None = None) -> None:
        self.inner, self.fail_type = inner, fail_type

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        if content_type == self.fail_type:
            raise OSError("the store refused it")
        self.inner.put_bytes(key, data, content_type)

    def open(self, key):
        return self.inner.open(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_a_store_without_batch_writes_and_a_failing_object(runtime):
    box = mailbox(runtime, OneAtATime(runtime.objects, fail_type="application/pdf"))
    raws = [
        to_bytes(plain_message("plain")),
        to_bytes(attachments_message("with a pdf")),
        to_bytes(plain_message("after")),
    ]
    added, errors = box.store.add_messages(box.folder, incoming(raws))
    assert added == [1, 3]
    assert errors == ["Inbox: message UID 2 could not be stored (OSError)"]
    assert [m.subject for m in stored(box)[0]] == ["plain", "after"]


def test_a_failed_batch_write_falls_back_to_one_message_at_a_time(runtime, monkeypatch):
    box = mailbox(runtime)
    calls = []

    def failing_put_many(objects):
        calls.append(len(objects))
        raise OSError("disk trouble")

    monkeypatch.setattr(runtime.objects, "put_many", failing_put_many)
    raws = [to_bytes(plain_message(f"m{n}")) for n in range(4)]
    added, errors = box.store.add_messages(box.folder, incoming(raws))
    assert calls and (added, errors) == ([1, 2, 3, 4], [])
    messages, _ = stored(box)
    assert [read(runtime.objects, m.raw_object_key) for m in messages] == raws


def test_an_attachment_type_no_store_would_take_is_stored_as_octet_stream(runtime):
    # 5,000 characters: more than object stores take for a content type (and than a valid type has).
    long_type = "application/x-" + "y" * 5000
    odd = (
        "From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        "Content-Type: text/plain\r\n\r\nbody\r\n--B\r\nContent-Type: " + long_type + "\r\n\r\ndata\r\n--B--\r\n"
    ).encode()
    box = mailbox(runtime)
    added, errors = box.store.add_messages(box.folder, incoming([to_bytes(plain_message("fine")), odd]))
    assert (added, errors) == ([1, 2], [])
    _, [attachment] = stored(box)
    assert attachment.mime_type == "application/octet-stream"
    assert read(runtime.objects, attachment.object_key) == b"data"


def test_ids_are_cuids_and_a_forked_process_draws_its_own_randomness():
    from cuid2 import Cuid

    from email_service.mailbox import store as store_module

    ids = [store_module.new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids) and all(Cuid.is_cuid(i) and len(i) == 24 for i in ids)
    generator = store_module._BufferedSystemRandom()
    generator.random()  # the buffer now holds bytes read ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what it would draw next
        os.write(write, generator.randbytes(64))
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 64) != generator.randbytes(64)
    assert 0 <= generator.random() < 1 and 0 <= generator.getrandbits(70) < 2**70


def test_a_folder_made_here_for_mail_still_to_file_outlives_a_list_without_it(runtime):
    # A send or draft before an account's first sync makes its Sent or Drafts folder here; a
    # sync before the job filed the copy found no such folder on the server and deleted it with
    # the message (a queued send was lost; a delivered one vanished).
    box = mailbox(runtime)
    store = box.store
    with runtime.db.tenant_session(store.principal) as session:
        account_id = store.account_id
        made = {}
        for name in ("Sent", "Spare"):
            folder = Folder(
                id=uuid.uuid4().hex,
                tenant_id=store.principal.tenant_id,
                user_id=store.principal.user_id,
                account_id=account_id,
                name=name,
                display_name=name,
                type="sent" if name == "Sent" else "custom",
            )
            session.add(folder)
            made[name] = folder.id
        session.flush()
        written = Message(
            id=uuid.uuid4().hex,
            tenant_id=store.principal.tenant_id,
            user_id=store.principal.user_id,
            account_id=account_id,
            folder_id=made["Sent"],
            subject="Written here",
            received_at=datetime.now(UTC),
            delivery_status="queued",
        )
        session.add(written)
    listed, removed = store.reconcile_folders([INBOX])
    # Kept, though not the server's to sync (only the listed folders are synced).
    assert set(listed) == {"INBOX"} and removed == 0
    assert {name: f.id for name, f in store.folders().items() if name != "INBOX"} == {"Sent": made["Sent"]}
    # Filed (it has its UID now, and the server's folder is the one to list): nothing keeps it.
    with runtime.db.tenant_session(store.principal) as session:
        session.execute(update(Message).where(Message.id == written.id).values(uid=1))
    _, removed = store.reconcile_folders([INBOX])
    assert set(store.folders()) == {"INBOX"} and removed == 1


def test_an_unchanged_folder_list_writes_no_folder_row(runtime):
    box = mailbox(runtime)
    archive = RemoteFolder("Archive", "Archive", "custom", "/", None, ())
    folders, _ = box.store.reconcile_folders([INBOX, archive])
    before = {name: folder.updated_at for name, folder in folders.items()}
    again, _ = box.store.reconcile_folders([INBOX, archive])
    assert {name: folder.updated_at for name, folder in again.items()} == before
    # A folder the server now describes otherwise is written, and only that one.
    renamed = RemoteFolder("Archive", "Archiv", "custom", "/", None, ())
    changed, _ = box.store.reconcile_folders([INBOX, renamed])
    assert changed["INBOX"].updated_at == before["INBOX"]
    assert changed["Archive"].updated_at > before["Archive"] and changed["Archive"].display_name == "Archiv"


def test_a_folder_renamed_on_the_server_is_followed_only_where_its_uidvalidity_leaves_no_doubt(runtime):
    box = mailbox(runtime)
    store = box.store

    def custom(name: str, *attributes: str) -> RemoteFolder:
        return RemoteFolder(name, name, "custom", "/", None, attributes)

    folders, _ = store.reconcile_folders([INBOX, *(custom(name) for name in "ABCDFJK")])
    # C was never synced; K is still listed, and has the UIDVALIDITY of J that goes.
    for name, uidvalidity in {"A": 7, "B": 7, "D": 9, "F": 11, "J": 13, "K": 13}.items():
        store.save_folder_state(folders[name], uidvalidity=uidvalidity, uidnext=2, highestmodseq=None)
    store.add_messages(folders["F"], incoming([to_bytes(plain_message("Kept"))]))
    store.add_messages(folders["A"], incoming([to_bytes(plain_message("In A"))]))
    with runtime.db.tenant_session(store.principal) as session:
        message = session.scalar(select(Message).where(Message.folder_id == folders["F"].id))
        # Moved to the inbox here, not yet on the server: the move names the folder by its id.
        session.add(
            MessageMove(
                tenant_id=store.principal.tenant_id,
                user_id=store.principal.user_id,
                account_id=store.account_id,
                message_id=message.id,
                source_folder_id=folders["F"].id,
                uid=message.uid,
                target_folder_id=folders["INBOX"].id,
            )
        )
        session.execute(update(Message).where(Message.id == message.id).values(folder_id=folders["INBOX"].id, uid=None))
    asked: list[list[str]] = []
    held_open: list[int] = []

    def uidvalidities(names):
        asked.append(sorted(names))
        # The server is asked with no transaction of the store open: a slow STATUS held one (and
        # its row locks and snapshot) for as long as the server took.
        with runtime.db.maintenance_session() as session:
            held_open.append(
                session.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                        " AND state LIKE 'idle in transaction%' AND query ILIKE '%FROM folders%'"
                    )
                )
            )
        return {"A2": 7, "C2": 5, "D2": 9, "E": 9, "F2": 11, "J2": 13}

    listed = [INBOX, *(custom(name) for name in ("A2", "C2", "D2", "E", "F2", "J2", "K")), custom("G", "\\Noselect")]
    after, removed = store.reconcile_folders(listed, uidvalidities=uidvalidities)
    # A and B share a UIDVALIDITY, D2 and E do too, K has J's, and C was never synced: those
    # went and came.
    assert asked == [["A2", "C2", "D2", "E", "F2", "J2"]] and removed == 1
    assert held_open == [0]
    assert {after[name].id for name in ("A2", "C2", "D2", "E", "J2")}.isdisjoint(f.id for f in folders.values())
    renamed = after["F2"]
    assert renamed.id == folders["F"].id and renamed.display_name == "F2" and renamed.uidvalidity == 11
    # The move waiting to leave the folder still knows where the message is on the server.
    assert store.uids(renamed) == {1}
    with runtime.db.tenant_session(store.principal) as session:
        logged = session.execute(
            select(Change.entity, Change.kind, Change.entity_id, Change.detail)
            .where(Change.account_id == store.account_id, Change.entity_id == renamed.id)
            .order_by(Change.seq)
        ).all()
        assert session.scalar(select(MessageMove.source_folder_id)) == renamed.id
    assert [(e, k, d) for e, k, _i, d in logged][-1] == (
        ChangeEntity.FOLDER,
        ChangeKind.UPDATED,
        {"fields": ["displayName", "name"]},
    )
    # With nothing gone from the list, no folder is asked about.
    store.reconcile_folders([*listed, custom("H")], uidvalidities=uidvalidities)
    assert len(asked) == 1


def test_flags_from_the_server_never_undo_a_change_made_while_they_are_applied(runtime):
    box = mailbox(runtime)
    box.store.add_messages(box.folder, incoming([to_bytes(plain_message("Read it here"))]))
    [message], _ = stored(box)
    # The user marks the message unread through the API; the change is not committed yet when
    # a sync, which read the row before, writes the server's flags (still \Seen, and starred).
    with runtime.db.tenant_session(box.store.principal) as session:
        session.execute(
            text("UPDATE messages SET is_read = false, writeback_pending = true WHERE id = :id"), {"id": message.id}
        )
        applying = ThreadPoolExecutor(1).submit(box.store.apply_flags, box.folder, {1: (("\\Seen", "\\Flagged"), None)})
        time.sleep(1)  # the sync now waits for the row
        assert not applying.done()
    assert applying.result(timeout=30) == 0
    [message], _ = stored(box)
    assert message.is_read is False and message.is_starred is False and message.writeback_pending is True


def test_a_folder_beyond_65535_messages_has_its_flags_checked_and_can_be_emptied(runtime):
    # Every UID of a large folder goes into one statement (a server without CONDSTORE reports the
    # flags of all of them; a folder gone from the server is emptied): more values than
    # PostgreSQL's protocol allows parameters in a statement.
    box = mailbox(runtime)
    size = 70_000
    with runtime.db.maintenance_session() as session:
        session.execute(
            text(
                "INSERT INTO messages (id, tenant_id, user_id, account_id, folder_id, uid, subject, from_address,"
                " to_addresses, received_at)"
                " SELECT 'big' || lpad(n::text, 6, '0'), :tenant, :user, :account, :folder, n, 'Generated', "
                " 'someone@example.com', ARRAY['me@example.com'], now() FROM generate_series(1, :size) AS n"
            ),
            {
                "tenant": box.store.principal.tenant_id,
                "user": box.store.principal.user_id,
                "account": box.store.account_id,
                "folder": box.folder.id,
                "size": size,
            },
        )
    # The server says the first one was read; the rest are as stored.
    changes = {uid: ((), None) for uid in range(2, size + 1)} | {1: (("\\Seen",), None)}
    assert box.store.apply_flags(box.folder, changes) == 1
    assert box.store.remove_uids(box.folder, range(size - 9, size + 1)) == 10
    assert box.store.clear_folder(box.folder) == size - 10
    assert stored(box) == ([], [])
