"""Benchmark: search and conversation reads over 100,000 messages, in one run.

    python bench/search.py [--messages 100000] [--runs 200] [--seed 0]

Starts an embedded PostgreSQL, applies the migrations, and inserts with SQL one account's
messages (three folders, a Zipf-like vocabulary of 5,000 words in subjects and bodies, 600
senders, threads of one to five messages, 10% with attachments, 5% labelled) plus another
tenant's 20% more, so row-level security has rows to keep out. Then times typical queries
through the service functions the API calls (tenant session, RLS, SQLAlchemy), each run
``--runs`` times with varying words, and prints p50/p95/p99 in ms and the ratio of each p99 to
the baseline's: reading one message by id through the same stack. Target: every search p99
< 50 ms. A ranked page ends with its window, so the bench also times what a client waits for
when it follows a phrase's cursor until it has 50 hits, and says how full its first page is.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cryptography.fernet import Fernet  # noqa: E402
from sqlalchemy import text  # noqa: E402

from email_service import embedded, migrate  # noqa: E402
from email_service.config import Settings  # noqa: E402
from email_service.conversations import service as conversations  # noqa: E402
from email_service.crypto import CredentialCipher  # noqa: E402
from email_service.db import Database  # noqa: E402
from email_service.protocols.destinations import DestinationPolicy, parse_allowed  # noqa: E402
from email_service.search import service as search  # noqa: E402
from email_service.services import mail  # noqa: E402
from email_service.services.accounts import create_account  # noqa: E402
from email_service.tenancy import Principal  # noqa: E402

VOCABULARY = 5000
SENDERS = 600
TARGET_P99_MS = 50.0
# Cases timed across several requests, as a client sees them; not held to the per-request target.
FOLLOWING = "following: "

# Words are "w<rank>" drawn log-uniformly over the ranks (low ranks common, as in real text);
# bodies are 40-200 of them. Everything is made by PostgreSQL, so 100,000 rows take seconds.
FILL = """
INSERT INTO messages (
    id, tenant_id, user_id, account_id, folder_id, uid, message_id_header, conversation_id,
    subject, from_address, from_name, to_addresses, preview, body_text, received_at, is_read,
    is_starred, keywords, attachment_count, attachment_names, size
)
SELECT
    :prefix || g, :tenant, :user, :account,
    CASE WHEN g % 10 < 7 THEN :inbox WHEN g % 10 < 9 THEN :archive ELSE :sent END,
    g, '<' || :prefix || g || '@bench.example>', :prefix || 'c' || (g / 3),
    (SELECT string_agg('w' || floor(exp(random() * ln(:vocabulary)))::int, ' ')
       FROM generate_series(1, 3 + g % 4) AS s(x) WHERE g > -x),
    'sender' || floor(exp(random() * ln(:senders)))::int || '@example' || (g % 7) || '.com',
    'Sender ' || (g % 600),
    ARRAY['me@bench.example', 'team' || (g % 50) || '@bench.example'],
    '',
    (SELECT string_agg('w' || floor(exp(random() * ln(:vocabulary)))::int, ' ')
       FROM generate_series(1, 40 + g % 160) AS s(x) WHERE g > -x),
    :newest - (g || ' minutes')::interval,
    g % 3 <> 0, g % 50 = 0,
    CASE WHEN g % 20 = 0 THEN ARRAY['Finance'] ELSE ARRAY[]::text[] END,
    CASE WHEN g % 10 = 0 THEN 1 ELSE 0 END,
    CASE WHEN g % 10 = 0 THEN 'report-' || g || '.pdf' ELSE '' END,
    2000
FROM generate_series(1, :count) AS g
"""


def _settings(base: Path) -> Settings:
    return Settings(
        data_dir=base / "var",
        database_url=None,
        redis_url=None,
        jwt_secret="bench-" + "s" * 40,
        jwt_issuer=None,
        jwt_audience=None,
        credential_keys=(Fernet.generate_key().decode(),),
        storage_signing_key="bench-links-" + "k" * 32,
        ca_file=None,
        destinations=DestinationPolicy(parse_allowed("")),
    )


def _account(db: Database, cipher: CredentialCipher, principal: Principal, name: str) -> tuple[str, dict[str, str]]:
    account = create_account(
        db,
        cipher,
        principal,
        {
            "accountName": name,
            "emailAddress": f"{name}@bench.example",
            "protocol": "imap",
            "hostname": "imap.bench.example",
            "port": 993,
            "encryption": "tls",
            "username": name,
            "password": "bench-password",
            "isSyncEnabled": False,
        },
    )
    folders = {}
    with db.tenant_session(principal) as session:
        for folder in ("INBOX", "Archive", "Sent"):
            folder_id = f"{account.id}-{folder}"
            session.execute(
                text(
                    "INSERT INTO folders (id, tenant_id, user_id, account_id, name, display_name, type)"
                    " VALUES (:id, :tenant, :user, :account, :name, :name, 'custom')"
                ),
                {
                    "id": folder_id,
                    "tenant": principal.tenant_id,
                    "user": principal.user_id,
                    "account": account.id,
                    "name": folder,
                },
            )
            folders[folder] = folder_id
    return account.id, folders


def _fill(db: Database, principal: Principal, account_id: str, folders: dict[str, str], count: int) -> None:
    with db.tenant_session(principal) as session:
        session.execute(
            text(FILL),
            {
                "prefix": account_id[:8] + "-",
                "tenant": principal.tenant_id,
                "user": principal.user_id,
                "account": account_id,
                "inbox": folders["INBOX"],
                "archive": folders["Archive"],
                "sent": folders["Sent"],
                "vocabulary": VOCABULARY,
                "senders": SENDERS,
                "newest": datetime(2026, 11, 1, tzinfo=UTC),
                "count": count,
            },
        )


def _time(label: str, runs: int, call: Callable[[int], object]) -> list[float]:
    call(0)  # warm: plans, caches
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        settings = _settings(Path(tmp))
        with embedded.services(settings) as running:
            migrate.upgrade(running.database_url, running.db_app_role)
            db = Database(running.database_url, running.db_app_role)
            cipher = CredentialCipher(settings.credential_keys)
            owner = Principal(uuid.uuid4(), uuid.uuid4())
            other = Principal(uuid.uuid4(), uuid.uuid4())
            account_id, folders = _account(db, cipher, owner, "owner")
            other_account, other_folders = _account(db, cipher, other, "other")
            start = time.perf_counter()
            _fill(db, owner, account_id, folders, args.messages)
            _fill(db, other, other_account, other_folders, args.messages // 5)
            # What autovacuum does soon after a bulk load, done before timing instead of during it:
            # statistics (search plans by word frequencies) and the visibility map.
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                for table in ("messages", "message_search"):
                    conn.execute(text(f"VACUUM ANALYZE {table}"))
            print(f"inserted {args.messages + args.messages // 5} messages in {time.perf_counter() - start:.1f} s")
            # As `serve` does once started: what set-up built stays out of the collector's walks.
            gc.collect()
            gc.freeze()

            def find(query: search.SearchQuery, cursor: str | None = None, limit: int = 50) -> search.SearchPage:
                return search.search(db, owner, account_id, query, limit=limit, cursor=cursor)

            # The attachment-name case times a search that finds its message, not an empty one.
            assert find(search.SearchQuery(text="report 10")).hits, "attachment names are not found"

            def rare(i: int) -> str:
                return f"w{rng.randrange(1000, VOCABULARY)}"

            def common(i: int) -> str:
                return f"w{rng.randrange(1, 20)}"

            some_id = f"{account_id[:8]}-{args.messages // 2}"
            page_two = {w: find(search.SearchQuery(text=w)).next_cursor for w in (f"w{n}" for n in range(1, 20))}
            recent = datetime(2026, 11, 1, tzinfo=UTC) - timedelta(days=30)
            cases: list[tuple[str, Callable[[int], object]]] = [
                ("baseline: one message by id", lambda i: mail.get_message(db, owner, account_id, some_id)),
                ("q: a rare word", lambda i: find(search.SearchQuery(text=rare(i)))),
                ("q: a common word", lambda i: find(search.SearchQuery(text=common(i)))),
                ("q: two words", lambda i: find(search.SearchQuery(text=f"{common(i)} {rare(i)}"))),
                ("q: a phrase", lambda i: find(search.SearchQuery(text=f'"{common(i)} {common(i)}"'))),
                (
                    "q: a phrase, one folder (10%)",
                    lambda i: find(search.SearchQuery(text=f'"{common(i)} {common(i)}"', folder_id=folders["Sent"])),
                ),
                (
                    "q: a phrase, unread",
                    lambda i: find(search.SearchQuery(text=f'"{common(i)} {common(i)}"', is_read=False)),
                ),
                ("q: a word minus a common word", lambda i: find(search.SearchQuery(text=f"{common(i)} -w1"))),
                (
                    "q: common word, page 2",
                    lambda i: find(search.SearchQuery(text=f"w{i % 19 + 1}"), cursor=page_two[f"w{i % 19 + 1}"]),
                ),
                (
                    "q: common word, one folder (10%)",
                    lambda i: find(search.SearchQuery(text=common(i), folder_id=folders["Sent"])),
                ),
                (
                    "q: common word, starred (2%)",
                    lambda i: find(search.SearchQuery(text=common(i), is_starred=True)),
                ),
                (
                    "q + unread + last 30 days",
                    lambda i: find(search.SearchQuery(text=rare(i), is_read=False, after=recent)),
                ),
                (
                    "from: a sender",
                    lambda i: find(search.SearchQuery(sender=f"sender{rng.randrange(1, SENDERS)}@example")),
                ),
                ("subject: a word", lambda i: find(search.SearchQuery(subject=rare(i)))),
                # Words, not "report-12340": web-search syntax reads "-12340" as "not 12340".
                ("attachment name", lambda i: find(search.SearchQuery(text=f"report {rng.randrange(1, 10000) * 10}"))),
                ("no q: label", lambda i: find(search.SearchQuery(label="Finance"))),
                (
                    "no q: starred with attachment, one folder",
                    lambda i: find(
                        search.SearchQuery(is_starred=True, has_attachment=True, folder_id=folders["INBOX"])
                    ),
                ),
                ("no q: unread, all folders", lambda i: find(search.SearchQuery(is_read=False))),
                (
                    "conversations: INBOX page 1",
                    lambda i: conversations.list_conversations(
                        db, owner, account_id, folders["INBOX"], limit=50, cursor=None
                    ),
                ),
                (
                    "conversation: one thread",
                    lambda i: conversations.get_conversation(
                        db,
                        owner,
                        account_id,
                        f"{account_id[:8]}-c{rng.randrange(1, args.messages // 3)}",
                        limit=100,
                        cursor=None,
                    ),
                ),
            ]
            hits: list[int] = []

            def until_fifty(i: int) -> None:
                # What a client that wants 50 hits waits for: a ranked page ends with its window.
                query, cursor, found = search.SearchQuery(text=f'"{common(i)} {common(i)}"'), None, 0
                while True:
                    page = find(query, cursor)
                    found += len(page.hits)
                    cursor = page.next_cursor
                    if found >= 50 or cursor is None:
                        hits.append(found)
                        return

            cases.append((FOLLOWING + "a phrase, pages to 50 hits", until_fifty))
            results = [(label, _time(label, args.runs, call)) for label, call in cases]
            baseline = _quantile(results[0][1], 0.99)
            print(f"{'query':45} {'p50':>8} {'p95':>8} {'p99':>8} {'p99/base':>9}")
            worst = 0.0
            for label, samples in results:
                p99 = _quantile(samples, 0.99)
                if not label.startswith(("baseline", "conversations", FOLLOWING)):
                    worst = max(worst, p99)
                print(
                    f"{label:45} {statistics.median(samples):8.2f} {_quantile(samples, 0.95):8.2f} "
                    f"{p99:8.2f} {p99 / baseline:9.1f}"
                )
            first_pages = [len(find(search.SearchQuery(text=f'"{common(i)} {common(i)}"')).hits) for i in range(100)]
            print(
                f"a phrase's first page holds {statistics.mean(first_pages):.0f} hits on average (of 50 asked for);"
                f" {statistics.mean(hits):.0f} hits after following"
                " its cursor to 50 (or its end)"
            )
            verdict = "meets" if worst < TARGET_P99_MS else "MISSES"
            print(f"worst search p99 {worst:.2f} ms: {verdict} the target of {TARGET_P99_MS:.0f} ms")
            db.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
