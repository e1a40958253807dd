"""Benchmark: moving and deleting many messages, through the service and as a bare IMAP client.

    python bench/moves.py [--messages 500]

On a private Dovecot (the test suite's harness) and the embedded PostgreSQL and Redis, in one
process (the write-back job is called directly, as a worker would):

  - baseline: a bare imaplib client moving ``--messages`` messages with one UID MOVE, and
    deleting them with one UID STORE \\Deleted + UID EXPUNGE (the floor: what the server takes)
  - the service: the API's bulk move of the same number (what the caller waits for), the
    write-back to the server (UID MOVE + following COPYUID into the rows), a sync afterwards
    (must add and remove nothing), then the bulk delete for good and its write-back

Ratios are the service's write-back time over the bare client's. Loopback only.
"""

from __future__ import annotations

import argparse
import imaplib
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cryptography.fernet import Fernet  # noqa: E402
from mailservers import Dovecot, ensure_dovecot_installed, make_tls_files  # noqa: E402
from messages import plain_message, to_bytes  # noqa: E402
from sqlalchemy import select  # noqa: E402

from email_service import embedded, migrate  # noqa: E402
from email_service.config import Settings  # noqa: E402
from email_service.mailbox.imap_sync import ImapSync  # noqa: E402
from email_service.mailbox.moves import delete_messages, move_messages  # noqa: E402
from email_service.mailbox.server_moves import write_moves  # noqa: E402
from email_service.mailbox.store import MailStore  # noqa: E402
from email_service.models import Folder, Message  # noqa: E402
from email_service.protocols.destinations import DestinationPolicy, parse_allowed  # noqa: E402
from email_service.runtime import Runtime  # noqa: E402
from email_service.services.accounts import create_account  # noqa: E402
from email_service.services.servers import load_servers  # noqa: E402
from email_service.tenancy import Principal  # noqa: E402


def fill(dovecot: Dovecot, count: int):
    user = dovecot.add_user()
    dovecot.append_many(user, "INBOX", (to_bytes(plain_message(f"Message {i:05d}")) for i in range(count)))
    dovecot.create_folder(user, "Archiv")
    return user


def bare_client(dovecot: Dovecot, count: int) -> tuple[float, float]:
    user = fill(dovecot, count)
    with dovecot.imap(user) as client:
        client.select("INBOX")
        start = time.perf_counter()
        typ, _ = client.uid("MOVE", "1:*", "Archiv")
        moved = time.perf_counter() - start
        assert typ == "OK"
        client.select("Archiv")
        start = time.perf_counter()
        client.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Deleted)")
        client.uid("EXPUNGE", "1:*")
        deleted = time.perf_counter() - start
        assert client.uid("SEARCH", "ALL")[1] == [b""]
    return moved, deleted


def timed(call):
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def service(runtime: Runtime, dovecot: Dovecot, count: int) -> dict[str, float]:
    user = fill(dovecot, count)
    principal = Principal(uuid.uuid4(), uuid.uuid4())
    account = create_account(
        runtime.db,
        runtime.cipher,
        principal,
        {
            "accountName": "bench",
            "emailAddress": f"{user.name}@example.com",
            "protocol": "imap",
            "hostname": dovecot.host,
            "port": dovecot.imaps_port,
            "encryption": "tls",
            "username": user.name,
            "password": user.password,
            "isSyncEnabled": False,
        },
        runtime.settings.destinations,
    )
    servers = load_servers(runtime.db, runtime.cipher, principal, account.id)
    store = MailStore(runtime.db, runtime.objects, principal, account.id)

    def sync():
        with servers.incoming.imap(runtime.settings) as session:
            return ImapSync(store, session, lambda _: None).run()

    sync()
    with runtime.db.tenant_session(principal) as session:
        folders = {f.name: f.id for f in session.scalars(select(Folder).where(Folder.account_id == account.id))}
        ids = list(session.scalars(select(Message.id).where(Message.folder_id == folders["INBOX"])))
    assert len(ids) == count
    figures = {}
    figures["api move"], outcome = timed(lambda: move_messages(runtime, principal, account.id, ids, folders["Archiv"]))
    assert len(outcome.done) == count
    figures["write-back move"], _ = timed(lambda: write_moves(runtime, principal, account.id, servers))
    figures["sync after"], result = timed(sync)
    assert result.messages_added == 0 and result.messages_removed == 0, result.as_dict()
    with runtime.db.tenant_session(principal) as session:
        kept = set(session.scalars(select(Message.id).where(Message.folder_id == folders["Archiv"])))
    assert kept == set(ids), "every message keeps its id in its new folder"
    figures["api delete"], outcome = timed(lambda: delete_messages(runtime, principal, account.id, ids, permanent=True))
    assert len(outcome.deleted_for_good) == count
    figures["write-back delete"], _ = timed(lambda: write_moves(runtime, principal, account.id, servers))
    with dovecot.imap(user) as client:
        client.select("Archiv", readonly=True)
        assert client.uid("SEARCH", "ALL")[1] == [b""]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    args = parser.parse_args()
    ensure_dovecot_installed()
    base = Path(tempfile.mkdtemp(prefix="bench-mv-"))
    base.chmod(0o755)
    dovecot = Dovecot(Path(tempfile.mkdtemp(prefix="bmv-")), make_tls_files(base))
    dovecot.setup()
    dovecot.start()
    try:
        settings = Settings(
            data_dir=base / "var",
            database_url=None,
            redis_url=None,
            jwt_secret="bench-" + "s" * 40,
            jwt_issuer=None,
            jwt_audience=None,
            credential_keys=(Fernet.generate_key().decode(),),
            storage_signing_key="bench-links-" + "k" * 32,
            ca_file=Path(dovecot.ca_file),
            destinations=DestinationPolicy(parse_allowed(f"{dovecot.host}:{dovecot.imaps_port}")),
        )
        with embedded.services(settings) as running:
            migrate.upgrade(running.database_url, running.db_app_role)
            runtime = Runtime.build(running)
            try:
                bare_move, bare_delete = bare_client(dovecot, args.messages)
                figures = service(runtime, dovecot, args.messages)
            finally:
                runtime.close()
        n = args.messages
        print(f"{n} messages")
        print(f"bare imaplib: UID MOVE {bare_move * 1000:.0f} ms", end="; ")
        print(f"STORE \\Deleted + UID EXPUNGE {bare_delete * 1000:.0f} ms")
        for name, seconds in figures.items():
            print(f"service {name}: {seconds * 1000:.0f} ms ({seconds * 1000 / n:.2f} ms per message)")
        print(f"write-back move / bare UID MOVE: {figures['write-back move'] / bare_move:.1f}x")
        print(f"write-back delete / bare expunge: {figures['write-back delete'] / bare_delete:.1f}x")
    finally:
        dovecot.stop()
        shutil.rmtree(dovecot.base_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    imaplib.Debug = 0
    main()
