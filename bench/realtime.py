"""Benchmark: how fresh real time is, and what a watched account costs, in one run.

    python bench/realtime.py [--accounts 100] [--memory-accounts 1000] [--samples 200]

On a private Dovecot (the test suite's harness) and the embedded PostgreSQL and Redis, with one
`email-service watch` process:

  - baseline: a bare IMAP client in IDLE, from another client's APPEND to its EXISTS (the floor:
    what the mail server itself takes to tell anyone)
  - latency with ``--accounts`` watched accounts, from a change on the server (APPEND, a flag
    change, an expunge) to (a) the change visible in the database the API reads, (b) its event
    on the account owner's events stream (`email-service serve`, GET /api/events), (c) its
    webhook received (`email-service webhooks`, one endpoint per owner), p50 and p99
  - a refresh with nothing to do, and a full sync with nothing to do, per account
  - the watcher's memory: RSS with no account, then with ``--memory-accounts`` watched, per account

Targets: p50 < 1 s and p99 < 2 s; a sync with nothing to do <= 50 ms per account; < 100 KB per
watched account above the process's base. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import imaplib
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
import psutil  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from helpers import ServiceProcess  # noqa: E402
from httpx_sse import aconnect_sse  # noqa: E402
from mailservers import Dovecot, ensure_dovecot_installed, make_tls_files  # noqa: E402
from messages import plain_message, to_bytes  # noqa: E402
from sqlalchemy import text  # noqa: E402

from email_service import embedded, migrate  # noqa: E402
from email_service.api.auth import TokenVerifier  # noqa: E402
from email_service.config import Settings  # noqa: E402
from email_service.mailbox.imap_sync import ImapSync  # noqa: E402
from email_service.mailbox.live import refresh_folder  # noqa: E402
from email_service.mailbox.store import MailStore  # noqa: E402
from email_service.protocols.destinations import DestinationPolicy, parse_allowed  # noqa: E402
from email_service.runtime import Runtime  # noqa: E402
from email_service.services.accounts import create_account  # noqa: E402
from email_service.services.servers import load_servers  # noqa: E402
from email_service.tenancy import Principal  # noqa: E402
from email_service.watch.leases import Leases  # noqa: E402
from email_service.webhooks import service as webhooks  # noqa: E402

# 1,000 IDLE connections at once: more than Dovecot's default process limits allow.
DOVECOT_LIMITS = """
default_process_limit = 3000
default_client_limit = 6000
service imap {
  process_limit = 3000
}
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def wait_until(condition, timeout: float, every: float = 0.005) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``timeout``."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if condition():
            return time.perf_counter() - start
        time.sleep(every)
    return None


def idle_baseline(dovecot: Dovecot, user, samples: int) -> list[float]:
    """APPEND by one client -> EXISTS seen by another in IDLE, with imaplib (no service involved)."""
    latencies = []
    watcher = dovecot.imap(user)
    watcher.select("INBOX", readonly=True)
    for n in range(samples):
        tag = watcher._new_tag()
        watcher.send(tag + b" IDLE\r\n")
        watcher.readline()  # "+ idling"
        start = time.perf_counter()
        dovecot.append(user, "INBOX", to_bytes(plain_message(f"baseline {n}")))
        while b"EXISTS" not in watcher.readline():
            pass
        latencies.append(time.perf_counter() - start)
        watcher.send(b"DONE\r\n")
        while not watcher.readline().startswith(tag):
            pass
    watcher.logout()
    return latencies


class Bench:
    def __init__(self, base: Path, dovecot: Dovecot, settings: Settings, env: dict[str, str]) -> None:
        self.base, self.dovecot, self.settings, self.env = base, dovecot, settings, env
        self.runtime = Runtime.build(settings)
        self.accounts: list[tuple[str, Principal, object]] = []  # (account id, principal, mail user)

    def add_accounts(self, count: int) -> None:
        for _ in range(count):
            user = self.dovecot.add_user()
            self.dovecot.append(user, "INBOX", to_bytes(plain_message("first")))
            principal = Principal(uuid.uuid4(), uuid.uuid4())
            account = create_account(
                self.runtime.db,
                self.runtime.cipher,
                principal,
                {
                    "accountName": "bench",
                    "emailAddress": f"{user.name}@example.com",
                    "protocol": "imap",
                    "hostname": self.dovecot.host,
                    "port": self.dovecot.imaps_port,
                    "encryption": "tls",
                    "username": user.name,
                    "password": user.password,
                    "isSyncEnabled": True,
                    "syncInterval": 604800,
                },
                self.settings.destinations,
            )
            self.accounts.append((account.id, principal, user))

    def watched(self) -> int:
        leases = Leases(self.runtime.redis, "bench")
        return sum(1 for account_id, _, _ in self.accounts if leases.holder(account_id))

    def caught_up(self) -> int:
        with self.runtime.db.maintenance_session() as session:
            return session.execute(
                text("SELECT count(DISTINCT account_id) FROM messages WHERE subject = 'first'")
            ).scalar()

    def visible(self, account_id: str, subject: str) -> str | None:
        """The id of the message with ``subject`` in the account, once the API's data has it."""
        with self.runtime.db.maintenance_session() as session:
            row = session.execute(
                text("SELECT id FROM messages WHERE account_id = :a AND subject = :s"),
                {"a": account_id, "s": subject},
            ).first()
        return row.id if row else None

    def starred(self, account_id: str, subject: str) -> bool:
        with self.runtime.db.maintenance_session() as session:
            return bool(
                session.execute(
                    text("SELECT 1 FROM messages WHERE account_id = :a AND subject = :s AND is_starred"),
                    {"a": account_id, "s": subject},
                ).first()
            )

    def latencies(
        self, samples: int, events: EventListener, hooks: HookReceiver
    ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
        """(change -> API data, -> event on the stream, -> webhook received) latencies, by kind of change."""
        found: dict[str, list[float]] = {"append": [], "flag": [], "expunge": []}
        streamed: dict[str, list[float]] = {"append": [], "flag": [], "expunge": []}
        hooked: dict[str, list[float]] = {"append": [], "flag": [], "expunge": []}
        clients: dict[str, imaplib.IMAP4] = {}
        for n in range(samples):
            account_id, _, user = self.accounts[n % len(self.accounts)]
            client = clients.get(account_id)
            if client is None:
                client = clients[account_id] = self.dovecot.imap(user)
                client.select("INBOX")
            subject = f"sample {n}"
            start = time.perf_counter()
            client.append("INBOX", None, None, to_bytes(plain_message(subject)))
            took = wait_until(lambda a=account_id, s=subject: self.visible(a, s), 10)
            found["append"].append(took if took is not None else float("inf"))
            message_id = self.visible(account_id, subject)
            streamed["append"].append(events.latency("message.created", message_id, start))
            hooked["append"].append(hooks.latency("message.created", message_id, start))
            if n % 4 == 0:
                _, data = client.uid("SEARCH", "SUBJECT", f'"{subject}"')
                uid = data[0].split()[0]
                start = time.perf_counter()
                client.uid("STORE", uid, "+FLAGS", "(\\Flagged)")
                took = wait_until(lambda a=account_id, s=subject: self.starred(a, s), 10)
                found["flag"].append(took if took is not None else float("inf"))
                streamed["flag"].append(events.latency("message.updated", message_id, start))
                hooked["flag"].append(hooks.latency("message.updated", message_id, start))
                start = time.perf_counter()
                client.uid("STORE", uid, "+FLAGS", "(\\Deleted)")
                client.expunge()
                took = wait_until(lambda a=account_id, s=subject: not self.visible(a, s), 10)
                found["expunge"].append(took if took is not None else float("inf"))
                streamed["expunge"].append(events.latency("message.destroyed", message_id, start))
                hooked["expunge"].append(hooks.latency("message.destroyed", message_id, start))
        for client in clients.values():
            client.logout()
        return found, streamed, hooked

    def idle_cost(self, count: int, rounds: int = 3) -> tuple[float, float, float]:
        """Milliseconds per account, each the median of ``rounds`` interleaved rounds: an INBOX refresh
        with nothing new, a full sync with nothing new, and the floor for that sync: a bare imaplib
        client (one TLS context, no session resumption) logging in, listing and asking STATUS of
        every folder. Interleaved, so load on a shared machine weighs on all three alike."""
        chosen = self.accounts[:count]
        refresh, full, bare = [], [], []
        context = ssl.create_default_context(cafile=str(self.settings.ca_file))
        for _ in range(rounds):
            start = time.perf_counter()
            for account_id, principal, _ in chosen:
                refresh_folder(self.runtime, principal, account_id)
            refresh.append((time.perf_counter() - start) / len(chosen) * 1000)
            start = time.perf_counter()
            for account_id, principal, _ in chosen:
                servers = load_servers(self.runtime.db, self.runtime.cipher, principal, account_id)
                with servers.incoming.imap(self.settings) as session:
                    ImapSync(
                        MailStore(self.runtime.db, self.runtime.objects, principal, account_id),
                        session,
                        lambda _p: None,
                    ).run()
            full.append((time.perf_counter() - start) / len(chosen) * 1000)
            start = time.perf_counter()
            for _, _, user in chosen:
                client = imaplib.IMAP4_SSL(self.dovecot.host, self.dovecot.imaps_port, ssl_context=context)
                client.login(user.name, user.password)
                _, lines = client.list('""', '"*"')
                for line in lines:
                    if b"\\noselect" in line.lower():
                        continue
                    name = line.rsplit(b' "/" ', 1)[-1].decode()
                    client.status(name, "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)")
                client.logout()
            bare.append((time.perf_counter() - start) / len(chosen) * 1000)
        return statistics.median(refresh), statistics.median(full), statistics.median(bare)


class Arrivals:
    """When each (event name, message id) arrived, and the latency of one from a start time."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[str, str], list[float]] = defaultdict(list)

    def arrived(self, name: str, message_id: str) -> None:
        self.arrivals[(name, message_id)].append(time.perf_counter())

    def latency(self, name: str, message_id: str | None, since: float, timeout: float = 10) -> float:
        """Seconds from ``since`` to the first ``name`` for the message after it, or inf."""

        def first() -> float | None:
            times = [t for t in self.arrivals.get((name, message_id or ""), ()) if t >= since]
            return min(times) if times else None

        wait_until(lambda: first() is not None, timeout)
        found = first()
        return found - since if found is not None else float("inf")


class HookReceiver(Arrivals):
    """One HTTP endpoint on 127.0.0.1 that every owner's webhook points at; records arrivals."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                receiver.arrived(body["type"], body["data"]["id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class EventListener(Arrivals):
    """One events stream per account owner, in a thread of its own; when each event arrived."""

    def __init__(self, url: str, tokens: list[str]) -> None:
        super().__init__()
        self.url, self.tokens = url, tokens
        self.ready = 0
        self.failures: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks = [asyncio.run_coroutine_threadsafe(self._listen(token), self.loop) for token in tokens]

    async def _listen(self, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
                aconnect_sse(client, "GET", self.url + "/api/events", headers=headers) as source,
            ):
                async for event in source.aiter_sse():
                    if event.event == "ready":
                        self.ready += 1
                    elif event.event.startswith("message."):
                        self.arrived(event.event, event.json()["id"])
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def wait_ready(self, timeout: float) -> None:
        if wait_until(lambda: self.ready >= len(self.tokens), timeout, every=0.1) is None:
            raise SystemExit(f"only {self.ready} of {len(self.tokens)} streams opened: {self.failures[:3]}")

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--memory-accounts", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument(
        "--watcher-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the watcher"
    )
    args = parser.parse_args()

    ensure_dovecot_installed()
    base = Path(tempfile.mkdtemp(prefix="bench-rt-"))
    base.chmod(0o755)
    dovecot = Dovecot(Path(tempfile.mkdtemp(prefix="brt-")), make_tls_files(base), extra_config=DOVECOT_LIMITS)
    dovecot.setup()
    dovecot.start()
    watcher = None
    try:
        allowed = f"{dovecot.host}:{dovecot.imaps_port},127.0.0.1"  # Dovecot, and the webhook receiver
        key = Fernet.generate_key().decode()
        settings = Settings(
            data_dir=base / "var",
            database_url=None,
            redis_url=None,
            jwt_secret="bench-" + "s" * 40,
            jwt_issuer=None,
            jwt_audience=None,
            credential_keys=(key,),
            storage_signing_key="bench-links-" + "k" * 32,
            ca_file=Path(dovecot.ca_file),
            destinations=DestinationPolicy(parse_allowed(allowed)),
        )
        with embedded.services(settings) as running:
            migrate.upgrade(running.database_url, running.db_app_role)
            env = {
                **os.environ,
                "DATABASE_URL": running.database_url,
                "REDIS_URL": running.redis_url,
                "JWT_SECRET": running.jwt_secret,
                "CREDENTIAL_KEYS": key,
                "EMAIL_SERVICE_DATA_DIR": str(running.data_dir),
                "EMAIL_SERVICE_CA_FILE": str(dovecot.ca_file),
                "EMAIL_SERVICE_ALLOWED_DESTINATIONS": allowed,
                "EMAIL_SERVICE_LOG_LEVEL": "WARNING",
                "EMAIL_SERVICE_WATCH_LEASE_SECONDS": "10",
                **dict(item.split("=", 1) for item in args.watcher_env),
            }
            bench = Bench(base, dovecot, running, env)
            hook_policy = running.destinations
            baseline_user = dovecot.add_user()
            baseline = idle_baseline(dovecot, baseline_user, min(args.samples, 50))

            watcher = subprocess.Popen([sys.executable, "-m", "email_service", "watch"], env=env)
            process = psutil.Process(watcher.pid)
            time.sleep(5)
            rss_empty = process.memory_info().rss

            start = time.perf_counter()
            bench.add_accounts(args.accounts)
            ready = wait_until(lambda: bench.caught_up() >= args.accounts, 300, every=0.5)
            if ready is None:
                raise SystemExit(f"only {bench.caught_up()} of {args.accounts} accounts caught up in 300 s")
            print(f"{args.accounts} accounts watched and caught up {time.perf_counter() - start:.1f} s after creation")
            api = ServiceProcess({**env, "EMAIL_SERVICE_RATE_LIMITS": "false"}, base)
            api.wait_healthy()
            verifier = TokenVerifier.from_settings(running)
            tokens = [verifier.issue(p.tenant_id, p.user_id, 3600, time.time()) for _, p, _ in bench.accounts]
            events = EventListener(api.url, tokens)
            events.wait_ready(120)
            hooks = HookReceiver()
            for _, principal, _ in bench.accounts:
                webhooks.create(bench.runtime.db, bench.runtime.cipher, principal, {"url": hooks.url}, hook_policy)
            dispatcher = subprocess.Popen([sys.executable, "-m", "email_service", "webhooks"], env=env)
            time.sleep(3)
            found, streamed, hooked = bench.latencies(args.samples, events, hooks)
            dispatcher.terminate()
            dispatcher.wait(timeout=60)
            events.close()
            hooks.close()
            api.stop()
            refresh_ms, full_ms, bare_ms = bench.idle_cost(min(args.accounts, 50))

            more = args.memory_accounts - args.accounts
            if more > 0:
                bench.add_accounts(more)
                done = wait_until(lambda: bench.caught_up() >= args.memory_accounts, 900, every=1.0)
                if done is None:
                    print(f"warning: {bench.caught_up()} of {args.memory_accounts} caught up in 900 s")
                time.sleep(10)
            rss_full = process.memory_info().rss
            watched = bench.watched()
            bench.runtime.close()
            watcher.terminate()
            watcher.wait(timeout=60)
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        dovecot.stop()
        shutil.rmtree(dovecot.base_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)

    base_p50 = percentile(baseline, 0.5)
    print(
        f"\nbaseline: bare IMAP IDLE, APPEND -> EXISTS   p50 {base_p50 * 1000:7.0f} ms   "
        f"p99 {percentile(baseline, 0.99) * 1000:7.0f} ms   ({len(baseline)} samples)"
    )
    figures_by_leg = (
        ("visible in the API data", found),
        ("event on the stream    ", streamed),
        ("webhook received       ", hooked),
    )
    for where, figures in figures_by_leg:
        for name, values in figures.items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            print(
                f"{name:8} -> {where}   p50 {p50 * 1000:7.0f} ms   p99 {p99 * 1000:7.0f} ms   "
                f"({len(values)} samples, {args.accounts} accounts; p50 {p50 / base_p50:.1f}x baseline; "
                f"targets p50 < 1000, p99 < 2000)"
            )
    print(f"refresh of INBOX with nothing new           {refresh_ms:7.1f} ms per account (target <= 50)")
    print(
        f"full sync with nothing new                  {full_ms:7.1f} ms per account (target <= 50; "
        f"{full_ms / bare_ms:.1f}x a bare client's login, LIST and STATUS of every folder: {bare_ms:.1f} ms)"
    )
    per_account = (rss_full - rss_empty) / max(watched, 1) / 1024
    print(
        f"watcher RSS: {rss_empty / 2**20:.0f} MB with none, {rss_full / 2**20:.0f} MB with {watched} watched: "
        f"{per_account:.0f} KB per account (target < 100)"
    )
    print(f"median latency: {statistics.median(found['append']) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
