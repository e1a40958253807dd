"""Benchmark: the service's IMAP sync against raw IMAP fetching and mbsync, in one run.

    python bench/sync.py [--messages 10000] [--seed 0]

Fills a private Dovecot (the test suite's harness) with a realistic mix of messages (about 10%
with attachments), then times, on the same mailbox:
  - raw:      imaplib `UID FETCH 1:* (BODY.PEEK[])` (the floor: bytes over the wire)
  - mbsync:   Debian's isync syncing the mailbox to a maildir (a real sync tool)
  - initial:  the service's first sync (a real `email-service worker` process, embedded
              PostgreSQL and Redis, objects on disk)
  - resync:   the service's sync again with nothing changed
and prints each time, the ratios, and the worker's peak RSS. Targets: initial <= 2x mbsync,
unchanged re-sync < 100 ms per folder, worker peak RSS < 200 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cryptography.fernet import Fernet  # noqa: E402
from mailservers import Dovecot, ensure_dovecot_installed, make_tls_files  # noqa: E402
from messages import realistic_mix  # noqa: E402
from rq import Queue  # noqa: E402
from rq.job import Job  # noqa: E402

from email_service import embedded, migrate  # noqa: E402
from email_service.config import Settings  # noqa: E402
from email_service.crypto import CredentialCipher  # noqa: E402
from email_service.db import Database  # noqa: E402
from email_service.queue import jobs  # noqa: E402
from email_service.queue.connection import redis_from_url  # noqa: E402
from email_service.services.accounts import create_account  # noqa: E402
from email_service.tenancy import Principal  # noqa: E402


def ensure_mbsync() -> str:
    if shutil.which("mbsync") is None:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "isync"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    return shutil.which("mbsync") or "mbsync"


def raw_fetch(dovecot: Dovecot, user) -> float:
    start = time.perf_counter()
    client = dovecot.imap(user)
    client.select("INBOX", readonly=True)
    typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    client.logout()
    assert typ == "OK" and data
    return time.perf_counter() - start


def mbsync(dovecot: Dovecot, user, workdir: Path) -> float:
    maildir = workdir / "mbsync-maildir"
    maildir.mkdir()
    config = workdir / "mbsyncrc"
    config.write_text(
        f"IMAPAccount bench\nHost {dovecot.host}\nPort {dovecot.imaps_port}\nUser {user.name}\n"
        f"Pass {user.password}\nSSLType IMAPS\nCertificateFile {dovecot.ca_file}\n\n"
        "IMAPStore remote\nAccount bench\n\n"
        f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\n\n"
        "Channel bench\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync Pull\n"
    )
    config.chmod(0o600)
    start = time.perf_counter()
    subprocess.run([ensure_mbsync(), "-q", "-c", str(config), "-a"], check=True)
    return time.perf_counter() - start


# The worker reports its own peak RSS (and its work horse's) as its last line on stderr.
WORKER = (
    "import resource, sys\n"
    "from email_service.cli import main\n"
    "main(['worker', '--burst', '--no-scheduler'])\n"
    "usage = resource.getrusage\n"
    "print(max(usage(resource.RUSAGE_SELF).ru_maxrss, usage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)\n"
)


def run_worker_until_done(env: dict, queue: Queue, job_id: str) -> tuple[float, float, int]:
    """(job run time, wall time, peak RSS in KiB) of one job worked by a real worker process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    job = Job.fetch(job_id, connection=queue.connection)
    if job.get_status() != "finished":
        raise SystemExit(f"sync job ended as {job.get_status()}: {job.meta.get('error')}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return (job.ended_at - job.started_at).total_seconds(), wall, peak_kib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ensure_dovecot_installed()
    base = Path(tempfile.mkdtemp(prefix="bench-"))
    base.chmod(0o755)
    dovecot = Dovecot(Path(tempfile.mkdtemp(prefix="bdv-")), make_tls_files(base))
    dovecot.setup()
    dovecot.start()
    try:
        user = dovecot.add_user()
        start = time.perf_counter()
        dovecot.append_many(user, "INBOX", realistic_mix(args.messages, seed=args.seed))
        print(f"filled INBOX with {args.messages} messages in {time.perf_counter() - start:.1f} s")

        raw = raw_fetch(dovecot, user)
        mb = mbsync(dovecot, user, base)

        jwt_secret = "bench-" + "s" * 40
        key = Fernet.generate_key().decode()
        settings = Settings(
            data_dir=base / "var",
            database_url=None,
            redis_url=None,
            jwt_secret=jwt_secret,
            jwt_issuer=None,
            jwt_audience=None,
            credential_keys=(key,),
            storage_signing_key="bench-links-" + "k" * 32,
            ca_file=dovecot.ca_file,
        )
        with embedded.services(settings) as running:
            migrate.upgrade(running.database_url, running.db_app_role)
            env = {
                **os.environ,
                "DATABASE_URL": running.database_url,
                "REDIS_URL": running.redis_url,
                "JWT_SECRET": jwt_secret,
                "CREDENTIAL_KEYS": key,
                "EMAIL_SERVICE_DATA_DIR": str(running.data_dir),
                "EMAIL_SERVICE_CA_FILE": str(dovecot.ca_file),
                "EMAIL_SERVICE_LOG_LEVEL": "WARNING",
            }
            principal = Principal(uuid.uuid4(), uuid.uuid4())
            db = Database(running.database_url, running.db_app_role)
            account = create_account(
                db,
                CredentialCipher((key,)),
                principal,
                {
                    "accountName": "bench",
                    "emailAddress": "bench@example.com",
                    "protocol": "imap",
                    "hostname": dovecot.host,
                    "port": dovecot.imaps_port,
                    "encryption": "tls",
                    "username": user.name,
                    "password": user.password,
                    "isSyncEnabled": False,
                },
            )
            queue = Queue("sync", connection=redis_from_url(running.redis_url))
            sync_args = (account.id, str(principal.tenant_id), str(principal.user_id))
            initial, initial_wall, peak_kib = run_worker_until_done(
                env, queue, queue.enqueue(jobs.sync_account, *sync_args, job_timeout=7200).id
            )
            job = queue.enqueue(jobs.sync_account, *sync_args)
            resync, _, _ = run_worker_until_done(env, queue, job.id)
            folders = Job.fetch(job.id, connection=queue.connection).return_value()["foldersSync"]
            db.dispose()
    finally:
        dovecot.stop()
        shutil.rmtree(dovecot.base_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)

    per_folder_ms = resync / folders * 1000
    print(f"\n{args.messages} messages, {folders} folders")
    print(f"raw UID FETCH 1:* (BODY.PEEK[])   {raw:8.2f} s")
    print(f"mbsync to a maildir               {mb:8.2f} s")
    print(f"service initial sync (job)        {initial:8.2f} s   ({initial_wall:.2f} s with worker start)")
    print(f"service re-sync, nothing changed  {resync * 1000:8.0f} ms  ({per_folder_ms:.0f} ms per folder)")
    print(f"initial / mbsync                  {initial / mb:8.2f}x   (target <= 2x)")
    print(f"initial / raw fetch               {initial / raw:8.2f}x")
    print(f"worker peak RSS                   {peak_kib / 1024:8.0f} MB  (target < 200 MB)")


if __name__ == "__main__":
    main()
