"""Benchmark: listing and reading messages at 100,000 messages a folder, against a bare baseline.

    python bench/list.py [--requests 300] [--deep-requests 30] [--duration 30] [--clients 16] [--million]

Starts `email-service serve` on the embedded default (rate limits off, no worker) and, beside
it, a bare Starlette + psycopg app (uvicorn, h11, one process, like the service) that runs the
same SQL under the same role switch and returns the same JSON. Generates one folder of 100,000
message rows and one of 1,000 for one tenant and a folder of 100,000 for a second tenant, runs
VACUUM ANALYZE, then times --requests sequential requests per case over one keep-alive
connection on both, and --clients concurrent clients for --duration seconds. Prints p50/p99,
requests/s and the ratio service/baseline for each case. --million adds an account of
1,000,000 generated messages and times list, get and counts there (it takes minutes to build).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
from helpers import ServiceProcess, account_body, free_port, service_env  # noqa: E402
from sqlalchemy import text  # noqa: E402

from email_service import embedded  # noqa: E402
from email_service.api.auth import TokenVerifier  # noqa: E402
from email_service.config import Settings, load_settings  # noqa: E402
from email_service.runtime import Runtime  # noqa: E402
from email_service.services.accounts import create_account  # noqa: E402
from email_service.tenancy import Principal  # noqa: E402

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

BIG = 100_000
SMALL = 1_000
MILLION = 1_000_000
CHUNK = 100_000

# Rows shaped like synced mail (about 1.6 KB each: a body, headers, a preview), ties in arrival
# time every two messages and 997 senders, so every sort has ties for the id to break.
GENERATE = text("""
    INSERT INTO messages (id, tenant_id, user_id, account_id, folder_id, uid, message_id_header,
                          conversation_id, subject, from_address, from_name, to_addresses, recipient_names,
                          preview, body_text, headers, received_at, is_read, size, raw_object_key)
    SELECT :prefix || lpad(n::text, 8, '0'), :tenant, :user, :account, :folder, n,
           '<' || n || '@example.com>', 'c' || (n % 5000), 'Subject of message ' || n,
           'sender' || (n % 997) || '@example.com', 'Sender ' || (n % 997), ARRAY['me@example.com'],
           '{"me@example.com": "Me"}',
           left(repeat('The preview of a message. ', 10), 200),
           repeat('The body of a message, long enough to be realistic. ', 20),
           jsonb_build_object('Subject', 'Subject of message ' || n, 'From', 'sender@example.com',
                              'Received', repeat('from relay.example.com by mx.example.com; ', 8)),
           timestamptz '2020-01-01 00:00:00+00' + (n / 2) * interval '1 minute',
           n % 3 <> 0, 4000, 'objects/' || n
    FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS n
""")


class Mailbox:
    """An account with folders of generated messages, and a token of its owner."""

    def __init__(self, runtime: Runtime, verifier: TokenVerifier, sizes: dict[str, int]) -> None:
        self.principal = Principal(uuid.uuid4(), uuid.uuid4())
        self.token = verifier.issue(self.principal.tenant_id, self.principal.user_id, 4 * 3600, time.time())
        self.account_id = create_account(runtime.db, runtime.cipher, self.principal, account_body()).id
        self.folders: dict[str, str] = {}
        owner = {"tenant": self.principal.tenant_id, "user": self.principal.user_id, "account": self.account_id}
        for name, size in sizes.items():
            folder_id = f"f{uuid.uuid4().hex[:20]}"
            self.folders[name] = folder_id
            with runtime.db.maintenance_session() as session:
                session.execute(
                    text(
                        "INSERT INTO folders (id, tenant_id, user_id, account_id, name, display_name, type)"
                        " VALUES (:id, :tenant, :user, :account, :name, :name, 'custom')"
                    ),
                    {"id": folder_id, "name": name, **owner},
                )
            for first in range(1, size + 1, CHUNK):
                with runtime.db.maintenance_session() as session:
                    session.execute(
                        GENERATE,
                        {
                            **owner,
                            "prefix": folder_id[:9] + "m",
                            "folder": folder_id,
                            "first": first,
                            "last": min(size, first + CHUNK - 1),
                        },
                    )
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def messages_path(self, folder: str) -> str:
        return f"/api/{self.account_id}/folders/{self.folders[folder]}/messages"


# -- the bare baseline --------------------------------------------------------------------------


def baseline_app(database_url: str, app_role: str, tenant: str, user: str) -> Starlette:
    """Starlette + psycopg pool: the listMessages SQL of the service, and nothing around it."""
    from psycopg.rows import namedtuple_row
    from psycopg_pool import ConnectionPool
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from email_service.db import libpq_url
    from email_service.handlers.messages import message_view
    from email_service.services import cursors
    from email_service.services.mail import total_for

    pool = ConnectionPool(libpq_url(database_url), min_size=4, max_size=10, kwargs={"row_factory": namedtuple_row})
    columns = (
        "id, account_id, folder_id, from_address, from_name, to_addresses, cc_addresses, bcc_addresses,"
        " recipient_names, subject, preview, is_read, is_starred, is_spam, is_deleted, keywords, delivery_status,"
        " attachment_count, received_at, created_at, updated_at"
    )
    sorts = {
        "receivedAt:asc": ("received_at", "ASC"),
        "receivedAt:desc": ("received_at", "DESC"),
        "from:asc": ("from_address", "ASC"),
        "from:desc": ("from_address", "DESC"),
    }
    filters = {"all": "", "read": " AND is_read", "unread": " AND NOT is_read"}

    def list_messages(request: Request) -> Response:
        account_id, folder_id = request.path_params["account"], request.path_params["folder"]
        query = request.query_params
        limit, offset = int(query.get("limit", 50)), int(query.get("offset", 0))
        sort, filter_ = query.get("sort", "receivedAt:desc"), query.get("filter", "all")
        key, direction = sorts[sort]
        where, params = f"folder_id = %s{filters[filter_]}", [folder_id]
        if "cursor" in query:
            after = cursors.decode(query["cursor"], sort, filter_, time_key=key == "received_at")
            where += f" AND ({key}, id) {'<' if direction == 'DESC' else '>'} (%s, %s)"
            params += [after.key, after.id]
        with pool.connection() as conn, conn.transaction():
            conn.execute(
                "SELECT set_config('role', %s, true) AS r, set_config('app.tenant_id', %s, true) AS t,"
                " set_config('app.user_id', %s, true) AS u",
                (app_role, tenant, user),
            )
            found = conn.execute(
                "SELECT accounts.id, folders.message_count, folders.unread_count FROM accounts"
                " LEFT JOIN folders ON folders.id = %s AND folders.account_id = accounts.id"
                " WHERE accounts.id = %s AND accounts.deleted_at IS NULL",
                (folder_id, account_id),
            ).fetchone()
            rows = conn.execute(
                f"SELECT {columns} FROM messages WHERE {where}"
                f" ORDER BY {key} {direction}, id {direction} LIMIT %s OFFSET %s",
                (*params, limit + 1, offset),
            ).fetchall()
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = cursors.encode(sort, filter_, getattr(rows[-1], key), rows[-1].id)
        body = {
            "messages": [message_view(row) for row in rows],
            "pagination": {
                "total": total_for(filter_, found.message_count, found.unread_count),
                "limit": limit,
                "offset": offset,
                "nextCursor": next_cursor,
            },
        }
        # As the service's encoder (Connexion's Jsonifier ends a body with a newline).
        return Response(json.dumps(body, separators=(",", ":")) + "\n", media_type="application/json")

    return Starlette(routes=[Route("/api/{account}/folders/{folder}/messages", list_messages)])


def serve_baseline() -> None:
    import uvicorn

    config = json.loads(os.environ["BENCH_BASELINE"])
    app = baseline_app(config["database_url"], config["app_role"], config["tenant"], config["user"])
    uvicorn.run(app, host="127.0.0.1", port=config["port"], http="h11", log_level="warning", lifespan="off")


# -- the framework's floor ---------------------------------------------------------------------

FLOOR_PATH = "/api/{account}/floor"
FLOOR_SPEC = {
    "openapi": "3.0.3",
    "info": {"title": "floor", "version": "1"},
    "paths": {
        "/api/{accountId}/floor": {
            "get": {
                "operationId": "list.floor_operation",
                "parameters": [{"name": "accountId", "in": "path", "required": True, "schema": {"type": "string"}}],
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "the page", "content": {"application/json": {}}}},
            }
        }
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "x-bearerInfoFunc": "list.floor_token_info"}}
    },
}


def floor_token_info(token: str) -> dict:
    return {"sub": "floor"}  # the framework's cost alone: no token is checked


def floor_operation(accountId: str):  # noqa: ANN201, N803 - a Flask response; the spec's name
    import flask

    return flask.Response(_floor_body(), mimetype="application/json")


@functools.cache
def _floor_body() -> bytes:
    # Read here, not handed over: Connexion imports this file afresh as the module "list".
    return Path(json.loads(os.environ["BENCH_FLOOR"])["body"]).read_bytes()


def serve_floor() -> None:
    """One operation answering fixed bytes: behind Connexion's FlaskApp (security, validation,
    Flask in its threads), as the service's operations are, or in bare Starlette."""
    import uvicorn

    config = json.loads(os.environ["BENCH_FLOOR"])
    # The start-up probe asks for "/", which this app does not serve: not worth a log line.
    logging.getLogger("connexion").setLevel(logging.CRITICAL)
    if config["kind"] == "connexion":
        from connexion import FlaskApp

        app = FlaskApp(__name__)
        app.add_api(FLOOR_SPEC)
    else:
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        def page(request: Request) -> Response:
            return Response(_floor_body(), media_type="application/json")

        app = Starlette(routes=[Route(FLOOR_PATH, page)])
    uvicorn.run(app, host="127.0.0.1", port=config["port"], http="h11", log_level="warning", lifespan="off")


class Baseline:
    def __init__(self, settings, mailbox: Mailbox | None, *, floor: tuple[str, Path] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if floor is not None:
            env = {
                **os.environ,
                "BENCH_FLOOR": json.dumps({"kind": floor[0], "body": str(floor[1]), "port": self.port}),
            }
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--serve-floor"], env=env, cwd=Path(__file__).parent
            )
        else:
            assert mailbox is not None
            config = {
                "database_url": settings.database_url,
                "app_role": settings.db_app_role,
                "tenant": str(mailbox.principal.tenant_id),
                "user": str(mailbox.principal.user_id),
                "port": self.port,
            }
            env = {**os.environ, "BENCH_BASELINE": json.dumps(config)}
            self.proc = subprocess.Popen([sys.executable, __file__, "--serve-baseline"], env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("the baseline app did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# -- measuring ----------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def timed(
    ours: httpx.Client, bare: httpx.Client | None, paths: Callable[[int], str], count: int, headers: dict
) -> tuple[list[float], list[float] | None]:
    """``count`` GETs of ``paths(i)`` on each app, alternating, so both see the same machine load."""
    for i in range(min(20, count)):
        ours.get(paths(i), headers=headers).raise_for_status()
        if bare is not None:
            bare.get(paths(i)).raise_for_status()
    ours_times: list[float] = []
    bare_times: list[float] = []
    for i in range(count):
        path = paths(i)
        for client, spent, sent in ((ours, ours_times, headers), (bare, bare_times, {})):
            if client is None:
                continue
            started = time.perf_counter()
            response = client.get(path, headers=sent)
            spent.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"GET {path}: {response.status_code} {response.text[:300]}")
    return ours_times, (bare_times if bare is not None else None)


def following(client: httpx.Client, first: str, headers: dict) -> Callable[[int], str]:
    """Paths that follow nextCursor page after page from ``first`` (fetched ahead, not timed)."""
    cursor_of: dict[int, str] = {}

    def path(i: int) -> str:
        if i == 0:
            return first
        if i not in cursor_of:
            previous = client.get(path(i - 1), headers=headers).json()
            cursor_of[i] = previous["pagination"]["nextCursor"]
        separator = "&" if "?" in first else "?"
        return f"{first}{separator}cursor={cursor_of[i]}"

    return path


def throughput(url: str, path: str, headers: dict, clients: int, duration: float) -> tuple[int, float]:
    """(requests completed, seconds) with ``clients`` keep-alive clients for ``duration`` seconds."""
    done = [0] * clients
    failures: list[str] = []
    stop_at = time.monotonic() + duration

    def run(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop_at:
                response = client.get(path, headers=headers)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}")
                    return
                done[index] += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"throughput run failed: {failures[:3]}")
    return sum(done), time.monotonic() - started


def paired_throughput(
    ours: str, bare: str, path: str, headers: dict, clients: int, duration: float
) -> tuple[float, float]:
    """Requests/s of each app, measured in alternating slices so load from elsewhere hits both alike."""
    rounds = max(1, round(duration / 10))
    totals = {ours: [0, 0.0], bare: [0, 0.0]}
    for _ in range(rounds):
        for url, sent in ((ours, headers), (bare, {})):
            count, seconds = throughput(url, path, sent, clients, duration / rounds)
            totals[url][0] += count
            totals[url][1] += seconds
    return totals[ours][0] / totals[ours][1], totals[bare][0] / totals[bare][1]


def line(name: str, service: list[float], baseline: list[float] | None = None) -> None:
    ms = 1000
    text_ = f"{name:<44} service p50 {percentile(service, 50) * ms:7.2f} ms  p99 {percentile(service, 99) * ms:7.2f} ms"
    if baseline:
        text_ += (
            f" | bare p50 {percentile(baseline, 50) * ms:7.2f} ms  p99 {percentile(baseline, 99) * ms:7.2f} ms"
            f" | ratio p50 {percentile(service, 50) / percentile(baseline, 50):.2f}x"
        )
    print(text_, flush=True)


def compare_bodies(service: httpx.Client, bare: httpx.Client, path: str, headers: dict) -> None:
    ours, theirs = service.get(path, headers=headers), bare.get(path)
    same = ours.content == theirs.content
    # The service stamps nothing per request into a list, so the bytes must match.
    print(f"same bytes as the baseline: {same} ({len(ours.content)} bytes a page)", flush=True)
    if not same and ours.json() != theirs.json():
        raise SystemExit("the baseline answers something else than the service: fix the bench first")


def run_cases(args: argparse.Namespace, service_url: str, bare_url: str, box: Mailbox) -> None:
    n = args.requests
    big, small = box.messages_path("big"), box.messages_path("small")
    with httpx.Client(base_url=service_url, timeout=60) as ours, httpx.Client(base_url=bare_url, timeout=60) as bare:
        compare_bodies(ours, bare, big, box.headers)

        def case(name: str, path: str | Callable[[int], str], *, with_baseline: bool = True, count: int = n) -> None:
            paths = path if callable(path) else (lambda _i: path)
            line(name, *timed(ours, bare if with_baseline else None, paths, count, box.headers))

        case("listMessages 100k, offset 0", big)
        # Deep offsets walk the index row by row (about a second each here): fewer of them.
        case("listMessages 100k, offset 50,000", f"{big}?offset=50000", count=args.deep_requests)
        case("listMessages 100k, offset 99,950", f"{big}?offset=99950", count=args.deep_requests)
        case(f"listMessages 100k, {n} cursor pages in a row", following(ours, big, box.headers))
        deep = ours.get(f"{big}?offset=99000", headers=box.headers).json()["pagination"]["nextCursor"]
        case("listMessages 100k, cursor at 99,050", f"{big}?cursor={deep}")
        case("listMessages 100k, filter unread", f"{big}?filter=unread")
        case("listMessages 100k, sort from:asc", f"{big}?sort=from:asc")
        case("listMessages 1,000-message folder", small)
        message_id = ours.get(small, headers=box.headers).json()["messages"][0]["id"]
        case("getMessage", f"/api/{box.account_id}/messages/{message_id}", with_baseline=False)
        case("listFolders", f"/api/{box.account_id}/folders", with_baseline=False)
        case("listAccounts", "/api/accounts", with_baseline=False)

    for name, path in (("100k folder", big), ("1,000-message folder", small)):
        ours_rate, bare_rate = paired_throughput(service_url, bare_url, path, box.headers, args.clients, args.duration)
        print(
            f"{args.clients} clients, {args.duration:.0f} s, {name:<22} service {ours_rate:7.1f} req/s"
            f" | bare {bare_rate:7.1f} req/s | ratio {ours_rate / bare_rate:.2f}x",
            flush=True,
        )


def run_million(args: argparse.Namespace, service_url: str, runtime: Runtime, verifier: TokenVerifier) -> None:
    started = time.monotonic()
    box = Mailbox(runtime, verifier, {"huge": MILLION})
    vacuum(runtime)
    print(f"1,000,000-message folder generated in {time.monotonic() - started:.0f} s", flush=True)
    huge = box.messages_path("huge")
    with httpx.Client(base_url=service_url, timeout=120) as ours:
        line("1M: listMessages offset 0", *timed(ours, None, lambda _i: huge, args.requests, box.headers))
        deep = ours.get(f"{huge}?offset=999000", headers=box.headers).json()["pagination"]["nextCursor"]
        deep_path = f"{huge}?cursor={deep}"
        line("1M: listMessages cursor at 999,050", *timed(ours, None, lambda _i: deep_path, 100, box.headers))
        line("1M: listMessages offset 500,000", *timed(ours, None, lambda _i: f"{huge}?offset=500000", 20, box.headers))
        first = ours.get(huge, headers=box.headers).json()["messages"][0]["id"]
        message = f"/api/{box.account_id}/messages/{first}"
        line("1M: getMessage", *timed(ours, None, lambda _i: message, args.requests, box.headers))
        folders = f"/api/{box.account_id}/folders"
        line("1M: listFolders (the counts)", *timed(ours, None, lambda _i: folders, args.requests, box.headers))
    # What the counts replace: counting the folder under row-level security.
    spent = []
    for _ in range(5):
        with runtime.db.tenant_session(box.principal) as session:
            started = time.perf_counter()
            session.execute(text("SELECT count(*) FROM messages WHERE folder_id = :f"), {"f": box.folders["huge"]})
            spent.append(time.perf_counter() - started)
    print(
        f"1M: count(*) under RLS (what pagination.total used to cost): median {statistics.median(spent) * 1000:.0f} ms"
    )


def run_100k(
    args: argparse.Namespace, service_url: str, runtime: Runtime, verifier: TokenVerifier, settings: Settings
) -> None:
    started = time.monotonic()
    box = Mailbox(runtime, verifier, {"big": BIG, "small": SMALL})
    Mailbox(runtime, verifier, {"other tenant": BIG})
    vacuum(runtime)
    print(f"generated 201,000 messages in {time.monotonic() - started:.0f} s", flush=True)
    baseline = Baseline(settings, box)
    try:
        run_cases(args, service_url, baseline.url, box)
    finally:
        baseline.stop()
    run_floor(args, service_url, box)


def run_floor(args: argparse.Namespace, service_url: str, box: Mailbox) -> None:
    """What any operation costs behind Connexion's FlaskApp, against bare Starlette, in this run.

    Both answer the bytes of a 50-message page with no database and no token check, so the ratio
    is the framework's alone: the most any operation of the service can reach within it.
    """
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        body.write(httpx.get(service_url + box.messages_path("small"), headers=box.headers).content)
        body.flush()
        apps = [Baseline(None, None, floor=(kind, Path(body.name))) for kind in ("connexion", "starlette")]
        try:
            connexion_app, starlette_app = apps
            path = FLOOR_PATH.format(account=box.account_id)
            with httpx.Client(base_url=connexion_app.url) as framed, httpx.Client(base_url=starlette_app.url) as bare:
                spent = timed(framed, bare, lambda _i: path, args.requests, {"Authorization": "Bearer floor"})
            line("floor: fixed page, Connexion FlaskApp vs Starlette", *spent)
            framed_rate, bare_rate = paired_throughput(
                connexion_app.url,
                starlette_app.url,
                path,
                {"Authorization": "Bearer floor"},
                args.clients,
                args.duration,
            )
            print(
                f"floor: {args.clients} clients, {args.duration:.0f} s, fixed page  Connexion {framed_rate:7.1f} req/s"
                f" | Starlette {bare_rate:7.1f} req/s | ratio {framed_rate / bare_rate:.2f}x",
                flush=True,
            )
        finally:
            for app in apps:
                app.stop()


def vacuum(runtime: Runtime) -> None:
    with runtime.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE messages"))
        conn.execute(text("VACUUM ANALYZE folders"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--deep-requests", type=int, default=30, help="requests for the deep-offset cases")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--million", action="store_true", help="also build and time a 1,000,000-message folder")
    parser.add_argument("--only-million", action="store_true", help="the 1,000,000-message folder alone")
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline()
        return
    if args.serve_floor:
        serve_floor()
        return
    if not (min(args.requests, args.deep_requests) >= 1 and max(args.requests, args.deep_requests) <= 100_000):
        parser.error("need 1 <= requests, deep-requests <= 100000")
    if not (0 < args.duration <= 3600 and 1 <= args.clients <= 256):
        parser.error("need 0 < duration <= 3600 and 1 <= clients <= 256")

    with tempfile.TemporaryDirectory(prefix="bench-list-") as tmp:
        workdir = Path(tmp)
        env = service_env(
            None,
            EMAIL_SERVICE_DATA_DIR=str(workdir / "var"),
            EMAIL_SERVICE_LOG_LEVEL="WARNING",
            EMAIL_SERVICE_RATE_LIMITS="false",
        )
        service = ServiceProcess(env, workdir, "--no-embedded-worker")
        try:
            service.wait_healthy()
            settings = load_settings(env)
            with embedded.services(settings) as resolved:
                runtime = Runtime.build(resolved)
                verifier = TokenVerifier.from_settings(resolved)
                try:
                    if not args.only_million:
                        run_100k(args, service.url, runtime, verifier, resolved)
                    if args.million or args.only_million:
                        run_million(args, service.url, runtime, verifier)
                finally:
                    runtime.close()
        finally:
            code = service.stop()
            if code not in (0, None):
                print(f"serve exited with {code}; its log:\n{service.log()[-3000:]}", file=sys.stderr)


if __name__ == "__main__":
    main()
