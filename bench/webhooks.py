"""Benchmark: from a committed change to its signed webhook received, and fairness under a hanging receiver.

    python bench/webhooks.py [--tenants 20] [--changes 20] [--rate 100]

Runs embedded PostgreSQL and Redis in a temporary directory, a real ``email-service webhooks``
process, and HTTP receivers on 127.0.0.1 that verify every signature. Each tenant has one
account and one endpoint; changes are committed through the change log (``record``) at about
``--rate`` per second across the tenants. Prints commit-to-receipt latency (p50, p95, p99, max),
duplicates, and the same while one extra tenant's endpoint hangs on every request.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import base_settings, service_env  # noqa: E402
from standardwebhooks import Webhook  # noqa: E402

from email_service import embedded, migrate  # noqa: E402
from email_service.changes.log import Entry, record  # noqa: E402
from email_service.crypto import CredentialCipher  # noqa: E402
from email_service.db import Database  # noqa: E402
from email_service.models import Account, ChangeEntity, ChangeKind  # noqa: E402
from email_service.tenancy import Principal  # noqa: E402
from email_service.webhooks import service  # noqa: E402


class Receiver:
    def __init__(self, hang: bool = False) -> None:
        self.arrivals: dict[str, float] = {}
        self.duplicates = 0
        self.bad_signatures = 0
        self.secrets: dict[str, str] = {}  # endpoint id by path -> secret
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if hang:
                    time.sleep(600)
                    return
                at = time.monotonic()
                try:
                    event = Webhook(receiver.secrets[self.path]).verify(body, dict(self.headers.items()))
                except Exception:  # noqa: BLE001 - counted, the bench goes on
                    receiver.bad_signatures += 1
                    event = None
                if event is not None:
                    key = f"{event['data']['accountId']}:{event['data']['seq']}"
                    if key in receiver.arrivals:
                        receiver.duplicates += 1
                    receiver.arrivals.setdefault(key, at)
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        settings = base_settings(Path(tmp))
        with embedded.services(settings) as resolved:
            migrate.upgrade(resolved.database_url, resolved.db_app_role)
            db = Database(resolved.database_url, resolved.db_app_role)
            cipher = CredentialCipher(resolved.credential_keys)
            env = service_env(resolved, EMAIL_SERVICE_DATA_DIR=tmp)
            proc = subprocess.Popen([sys.executable, "-m", "email_service", "webhooks"], env=env)
            try:
                good, hanging = Receiver(), Receiver(hang=True)
                tenants = []
                for index in range(args.tenants + 1):
                    principal = Principal(uuid.uuid4(), uuid.uuid4())
                    account_id = f"bench{index}{uuid.uuid4().hex[:8]}"
                    with db.tenant_session(principal) as session:
                        session.add(
                            Account(
                                id=account_id,
                                tenant_id=principal.tenant_id,
                                user_id=principal.user_id,
                                account_name="bench",
                                email_address=f"{account_id}@example.com",
                                email_key=f"{account_id}@example.com",
                                protocol="imap",
                                hostname="imap.example.com",
                                port=993,
                                encryption="tls",
                                username="u",
                                password_encrypted=cipher.encrypt("p"),
                                is_sync_enabled=False,
                                sync_interval=300,
                                is_enabled=True,
                            )
                        )
                    receiver = hanging if index == args.tenants else good
                    path = f"/hook/{index}"
                    created = service.create(
                        db, cipher, principal, {"url": receiver.base + path}, settings.destinations
                    )
                    receiver.secrets[path] = created.secret
                    tenants.append((principal, account_id))
                time.sleep(2)
                for phase, with_hanging in (("quiet", False), ("one tenant's receiver hangs", True)):
                    good.arrivals.clear()
                    committed: dict[str, float] = {}
                    if with_hanging:
                        principal, account_id = tenants[-1]
                        for _ in range(50):
                            with db.tenant_session(principal) as session:
                                record(
                                    session,
                                    principal,
                                    account_id,
                                    [Entry(ChangeEntity.MESSAGE, "m", ChangeKind.CREATED)],
                                )
                    interval = 1.0 / args.rate
                    for round_ in range(args.changes):
                        for principal, account_id in tenants[:-1]:
                            with db.tenant_session(principal) as session:
                                seq = record(
                                    session,
                                    principal,
                                    account_id,
                                    [Entry(ChangeEntity.MESSAGE, f"m{round_}", ChangeKind.CREATED)],
                                )
                            committed[f"{account_id}:{seq}"] = time.monotonic()
                            time.sleep(interval)
                    deadline = time.monotonic() + 30
                    while len(good.arrivals) < len(committed) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    latencies = [good.arrivals[k] - at for k, at in committed.items() if k in good.arrivals]
                    print(
                        f"{phase}: {len(latencies)}/{len(committed)} received, "
                        f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
                        f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
                        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
                        f"duplicates {good.duplicates}, bad signatures {good.bad_signatures}"
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                db.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--changes", type=int, default=20, help="changes per tenant in each phase")
    parser.add_argument("--rate", type=float, default=100.0, help="commits per second across tenants")
    run(parser.parse_args())
