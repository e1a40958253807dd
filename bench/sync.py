"""Benchmark: the service's IMAP sync against raw IMAP fetching and mbsync, in one run.

    python bench/sync.py [--messages 10000] [--seed 0]

Fills a private Dovecot (the test suite's harness) with a realistic mix of messages (about 10%
with attachments), then times, on the same mailbox:
  - raw:      imaplib `UID FETCH 1:* (BODY.PEEK[])` (the floor: bytes over the wire)
  - mbsync:   Debian's isync syncing the mailbox to a maildir (a real sync tool)
  - initial:  the service's first sync (a real `email-service worker` process, embedded
              PostgreSQL and Redis, objects on disk)
  - resync:   the service's sync again with nothing changed
and prints each time, the ratios, and the worker's peak RSS. Targets: initial <= 1.0x mbsync,
unchanged re-sync < 100 ms per folder, worker peak RSS < 150 MB, job peak < 200 MB. Last, the CPU
per message of the work storing mail cannot skip (parsing, the body's search vector, compressing
the bodies), each measured apart, and the floor they put under the initial sync.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import psutil  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from mailservers import Dovecot, ensure_dovecot_installed, make_tls_files  # noqa: E402
from messages import realistic_mix  # noqa: E402
from sqlalchemy import text  # noqa: E402

from email_service import embedded, migrate  # noqa: E402
from email_service.config import Settings  # noqa: E402
from email_service.crypto import CredentialCipher  # noqa: E402
from email_service.db import Database  # noqa: E402
from email_service.mail.parse import parse_message  # noqa: E402
from email_service.models import Task, TaskKind, TaskStatus  # noqa: E402
from email_service.protocols.destinations import DestinationPolicy, parse_allowed  # noqa: E402
from email_service.queue import tasks  # noqa: E402
from email_service.runtime import Runtime  # noqa: E402
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
        # State beside the maildir, not in ~/.mbsync: a previous run's state (another Dovecot,
        # other UIDVALIDITYs) would make mbsync refuse the channel.
        "SyncState *\n"
    )
    config.chmod(0o600)
    start = time.perf_counter()
    subprocess.run([ensure_mbsync(), "-q", "-c", str(config), "-a"], check=True)
    return time.perf_counter() - start


# The worker reports its own peak RSS (and its work horse's) as its last line on stderr. Its own
# is VmHWM, not RUSAGE_SELF: Linux carries the parent's peak across fork and exec into
# ru_maxrss, so with 10,000 messages generated in this process that reported this process.
WORKER = (
    "import re, resource, sys\n"
    "from email_service.cli import main\n"
    "main(['worker', '--burst', '--no-scheduler', '--processes', '1'])\n"
    "own = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    "print(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)\n"
)


class TreeMemory:
    """Peak memory of the worker with its work horse's children, sampled.

    ru_maxrss only tells the largest single process, which understates a job that works in
    several processes (the work horse and its parse workers). Sampled here: the work horse's RSS
    plus the USS (pages no other process shares) of each of its descendants, which is what the
    job occupies beyond the worker; and, ten times less often, the PSS summed over the whole
    tree, worker included. USS and PSS mean walking a process's page tables (smaps_rollup):
    read for every process ten times a second, that took about 6% of the machine's CPU from
    the job being timed, which mbsync, timed without a sampler, does not pay.
    """

    TREE_EVERY = 10

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_job = self.peak_tree_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            tick += 1
            try:
                self._sample(tree=tick % self.TREE_EVERY == 0)
            except psutil.Error:
                continue  # a process exited between listing and reading it

    def _sample(self, *, tree: bool) -> None:
        # The command runs a pool: its worker processes fork a work horse per job.
        workers = self.root.children()
        tree_pss = 0
        for horse in [h for worker in workers for h in worker.children()]:
            job = horse.memory_info().rss  # from statm: no page-table walk
            for child in horse.children(recursive=True):
                info = child.memory_full_info()
                job += info.uss
                tree_pss += info.pss
            self.peak_job = max(self.peak_job, job)
            if tree:
                tree_pss += horse.memory_full_info().pss
        if tree:
            tree_pss += self.root.memory_full_info().pss + sum(w.memory_full_info().pss for w in workers)
            self.peak_tree_pss = max(self.peak_tree_pss, tree_pss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_worker_until_done(env: dict, runtime: Runtime, task_id: str) -> tuple[float, float, int, TreeMemory, Task]:
    """(run time, wall time, peak RSS in KiB, tree memory, task row) of one task worked by a real worker process."""
    start = time.perf_counter()
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    tree = TreeMemory(worker.pid)
    _out, err = worker.communicate()
    wall = time.perf_counter() - start
    tree.stop()
    if worker.returncode:
        raise SystemExit(f"worker failed ({worker.returncode}):\n{err}")
    with runtime.db.maintenance_session() as session:
        task = session.get(Task, task_id)
    if task is None or task.status is not TaskStatus.SUCCESS:
        raise SystemExit(f"sync task ended as {task and task.status}: {task and task.error}")
    peak_kib = int(err.strip().splitlines()[-1])
    return (task.finished_at - task.started_at).total_seconds(), wall, peak_kib, tree, task


class ListableWatch:
    """When, during the initial sync, the Inbox's newest page and then all of it became listable.

    Polls the database (as its owner) while the worker runs and notes the wall-clock times at
    which the newest ``PAGE`` messages of the Inbox (the highest UIDs: it was filled in order)
    and all ``total`` messages were stored, for comparison with the task's start.
    """

    PAGE = 50

    def __init__(self, db: Database, total: int, interval: float = 0.1) -> None:
        self.db, self.total, self.interval = db, total, interval
        self.first_page_at: datetime | None = None
        self.all_at: datetime | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Both read indexes and counters only (the (folder, uid) key, the folders' counts kept by
        # their trigger): a count(*) over the messages every few milliseconds would itself load
        # the database the sync is timed on.
        newest = text(
            "SELECT count(*) FROM messages m JOIN folders f ON f.id = m.folder_id"
            " WHERE f.name = 'INBOX' AND m.uid > :floor"
        )
        stored = text("SELECT coalesce(sum(message_count), 0) FROM folders")
        while self.all_at is None and not self._stop.wait(self.interval):
            with self.db.maintenance_session() as session:
                now = datetime.now(UTC)
                floor = {"floor": self.total - self.PAGE}
                if self.first_page_at is None and session.execute(newest, floor).scalar_one() >= self.PAGE:
                    self.first_page_at = now
                if session.execute(stored).scalar_one() >= self.total:
                    self.all_at = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children and their descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu(data_dir: Path) -> float:
    """CPU seconds used so far by the embedded PostgreSQL: the postmaster, its live and its ended backends."""
    pid_file = next(data_dir.rglob("postmaster.pid"))
    postmaster = psutil.Process(int(pid_file.read_text().splitlines()[0]))
    times = postmaster.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in postmaster.children():
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return total


def storage_footprint(runtime: Runtime, data_dir: Path) -> dict[str, tuple[int, int]]:
    """Rows and bytes (heap, indexes and TOAST) of each table, and the object store's bytes, after a sync."""
    sizes: dict[str, tuple[int, int]] = {}
    with runtime.db.maintenance_session() as session:
        tables = session.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
        ).scalars()
        for table in list(tables):
            rows = session.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one()  # noqa: S608 - catalog names
            size = session.execute(text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar_one()
            sizes[table] = (rows, size)
    objects = [p for p in (data_dir / "objects").rglob("*") if p.is_file()]
    sizes["(object storage)"] = (len(objects), sum(p.stat().st_size for p in objects))
    return sizes


# PostgreSQL's part of storing a message, timed over a sample of the synced rows (ids are random,
# so the first rows by id are a fair sample). Each is one statement on an otherwise idle server:
# its elapsed time is CPU time. "|| ''" makes each a new value that PostgreSQL must compress.
_SAMPLE = "(SELECT body_text, body_html FROM messages ORDER BY id LIMIT :rows) m"
_VECTOR = f"SELECT sum(length(to_tsvector(email_search_language(), left(body_text, 50000)))) FROM {_SAMPLE}"
_PARSER = f"SELECT count(*) FROM {_SAMPLE}, ts_parse('default', left(body_text, 50000))"
_BODIES = "INSERT INTO {table} SELECT body_text || '', body_html || '' FROM " + _SAMPLE


def cost_breakdown(runtime: Runtime, messages: int, seed: int, sample: int = 2000) -> list[tuple[str, float]]:
    """Milliseconds of CPU per message for work that storing mail cannot skip, each measured apart.

    Parsing (the standard library's MIME parser, in one process), the search vector of the body
    (and the text search parser's share of it), and compressing the bodies (pglz: the same
    INSERT into a table that compresses and into one that does not). Together they are a floor
    under the job's CPU time that no pipelining overlaps away. Lines starting with a space are
    shares of the line above.
    """
    parts: list[tuple[str, float]] = []
    raws = list(itertools.islice(realistic_mix(messages, seed=seed), sample))
    start = time.process_time()
    for raw in raws:
        parse_message(raw)
    parts.append(("parsing MIME (one process)", (time.process_time() - start) / len(raws) * 1000))
    with runtime.db.maintenance_session() as session:
        rows = min(sample, session.execute(text("SELECT count(*) FROM messages")).scalar_one())

        def per_message(sql: str) -> float:
            start = time.perf_counter()
            session.execute(text(sql), {"rows": rows})
            return (time.perf_counter() - start) / rows * 1000

        parts.append(("to_tsvector of the body (search language)", per_message(_VECTOR)))
        parts.append(("  of which the text search parser", per_message(_PARSER)))
        for table, storage in (("bodies_plain", "EXTERNAL"), ("bodies_pglz", "EXTENDED")):
            session.execute(text(f"CREATE TEMP TABLE {table} (body_text text, body_html text) ON COMMIT DROP"))
            session.execute(text(f"ALTER TABLE {table} ALTER body_text SET STORAGE {storage}"))
            session.execute(text(f"ALTER TABLE {table} ALTER body_html SET STORAGE {storage}"))
        plain = per_message(_BODIES.format(table="bodies_plain"))
        parts.append(("compressing the bodies (pglz)", per_message(_BODIES.format(table="bodies_pglz")) - plain))
    return parts


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
        before = children_cpu()
        mb = mbsync(dovecot, user, base)
        mb_cpu = children_cpu() - before

        # The private Dovecot is on loopback: open exactly its IMAPS port, by the name the account uses.
        allowed = f"{dovecot.host}:{dovecot.imaps_port}"
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
            destinations=DestinationPolicy(parse_allowed(allowed)),
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
                "EMAIL_SERVICE_ALLOWED_DESTINATIONS": allowed,
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
                settings.destinations,
            )
            runtime = Runtime.build(running)
            first = tasks.enqueue(runtime, TaskKind.SYNC, principal, account_id=account.id)
            before_worker, before_pg = children_cpu(), postgres_cpu(running.data_dir)
            watch = ListableWatch(runtime.db, args.messages)
            initial, initial_wall, peak_kib, tree, first_task = run_worker_until_done(env, runtime, first.task_id)
            watch.stop()
            worker_cpu = children_cpu() - before_worker
            started = first_task.started_at

            def since_start(at: datetime | None) -> float | None:
                return None if at is None or started is None else (at - started).total_seconds()

            first_page, all_listable = since_start(watch.first_page_at), since_start(watch.all_at)
            pg_cpu = postgres_cpu(running.data_dir) - before_pg
            storage = storage_footprint(runtime, running.data_dir)
            breakdown = cost_breakdown(runtime, args.messages, args.seed)
            again = tasks.enqueue(runtime, TaskKind.SYNC, principal, account_id=account.id)
            resync, _, _, _, task = run_worker_until_done(env, runtime, again.task_id)
            folders = task.result["foldersSync"]
            runtime.close()
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
    print(f"initial / mbsync                  {initial / mb:8.2f}x   (target <= 1.0x)")
    newest = f"Inbox's newest {ListableWatch.PAGE} listable after"
    for label, at in ((newest, first_page), ("all mail listable after", all_listable)):
        if at is None:
            print(f"{label:33} {'(not seen)':>8}")
        else:
            print(f"{label:33} {at:8.2f} s   ({at / mb:.2f}x mbsync)")
    print(f"initial / raw fetch               {initial / raw:8.2f}x")
    # CPU time is what the machine's load changes least: it shows where the work is, even when
    # another process on a shared machine stretches the wall times above.
    print(f"CPU, mbsync                       {mb_cpu:8.2f} s")
    print(f"CPU, service worker (parse incl.) {worker_cpu:8.2f} s")
    print(f"CPU, service's PostgreSQL         {pg_cpu:8.2f} s")
    print(f"CPU, service total / mbsync       {(worker_cpu + pg_cpu) / mb_cpu:8.2f}x")
    print(f"worker peak RSS                   {peak_kib / 1024:8.0f} MB  (target < 150 MB)")
    print(f"job peak, horse RSS + workers USS {tree.peak_job / 2**20:8.0f} MB  (sampled; target < 200 MB)")
    print(f"worker tree peak, PSS summed      {tree.peak_tree_pss / 2**20:8.0f} MB  (each second, worker included)")
    print(f"\nCPU per message, each part measured apart; with {args.messages} messages, a floor under the job:")
    for label, ms in breakdown:
        print(f"  {label:46} {ms:6.2f} ms")
    cores = len(os.sched_getaffinity(0))
    floor = sum(ms for label, ms in breakdown if not label.startswith(" ")) * args.messages / cores / 1000
    print(f"  {f'together, spread over {cores} cores':46} {floor:6.1f} s   ({floor / mb:.2f}x mbsync)")
    print(f"\nstorage after the initial sync, per message ({args.messages} messages):")
    for table, (rows, size) in sorted(storage.items(), key=lambda item: -item[1][1]):
        if rows or size > 16384:
            per = args.messages
            print(f"  {table:28} {rows:8d} rows {size / 2**20:8.1f} MB   {rows / per:6.2f} rows, {size / per:8.0f} B")
    total = sum(size for table, (_, size) in storage.items() if not table.startswith("("))
    print(f"  database total per message   {total / args.messages:8.0f} B")


if __name__ == "__main__":
    main()
