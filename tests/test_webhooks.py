"""Webhooks end to end: a real dispatcher process, real receivers on 127.0.0.1, the real change log."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psutil
import pytest
from cryptography.fernet import Fernet
from helpers import TEST_DESTINATIONS, ServiceProcess, account_body, assert_error_shape, service_env
from mailservers import make_tls_files
from sqlalchemy import func, text, update
from standardwebhooks import Webhook, WebhookVerificationError

from email_service.api.app import _path_patterns, _routing_order, load_spec
from email_service.changes.log import Entry, record
from email_service.config import load_settings
from email_service.crypto import CredentialCipher
from email_service.models import ChangeEntity, ChangeKind, WebhookEndpoint
from email_service.protocols import destinations
from email_service.queue.policy import webhook_retry_delay
from email_service.webhooks import dispatcher as dispatcher_module
from email_service.webhooks import signing, urls
from email_service.webhooks.dispatcher import Claimed, Dispatcher, Outcome
from email_service.webhooks.fanout import BATCH, prune
from email_service.webhooks.service import rotate_secrets

ID_PATTERN = re.compile(r"^wh_[A-Za-z0-9]{8,64}$")
# Short waits so a whole retry schedule fits in a test; they still grow, as in production.
RETRY_SCHEDULE = "0.3s,0.6s,1.2s"
RETRY_WAITS = (0.3, 0.6, 1.2)
# Longer than the latency the tests demand: promptness must come from LISTEN, not the catch-up.
CATCH_UP_SECONDS = 3


# ------------------------------------------------------------------------------------ receivers


class Receiver:
    """An HTTP server on ``host`` that records every request and answers as told.

    ``answer``, when given, decides each answer's status from the recorded request (it may wait).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        status: int = 204,
        hang: bool = False,
        tls: ssl.SSLContext | None = None,
        port: int = 0,
        answer: Callable[[dict], int] | None = None,
    ) -> None:
        self.status, self.hang, self.answer = status, hang, answer
        self.requests: list[dict] = []
        self.open_requests = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    request = {"at": time.monotonic(), "headers": headers, "body": body.decode()}
                    receiver.requests.append(request)
                    receiver.open_requests += 1
                try:
                    if receiver.hang:
                        receiver._release.wait(60)
                        return
                    self.send_response(receiver.answer(request) if receiver.answer else receiver.status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                finally:
                    with receiver._lock:
                        receiver.open_requests -= 1

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://{host}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= count:
                return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"expected {count} requests, got {len(self.requests)}: {self.requests}")

    def events(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kwargs: object) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for item in made:
        item.close()


# ----------------------------------------------------------------------------------- dispatcher


class DispatcherProcess:
    """``email-service webhooks`` as its own process, as an operator runs it."""

    def __init__(self, backing, log_dir, **env: str) -> None:
        # A CA of the tests' own and a receiver certificate for the name "localhost" only.
        self.tls = make_tls_files(log_dir, ip_san=False)
        self.env = service_env(
            backing,
            **{
                "EMAIL_SERVICE_CA_FILE": self.tls.ca_file,
                "EMAIL_SERVICE_DATA_DIR": str(backing.data_dir),
                "EMAIL_SERVICE_WEBHOOK_RETRY_SCHEDULE": RETRY_SCHEDULE,
                "EMAIL_SERVICE_WEBHOOK_CATCHUP_SECONDS": str(CATCH_UP_SECONDS),
                "EMAIL_SERVICE_WEBHOOK_ENDPOINT_CONCURRENCY": "2",
                **env,
            },
        )
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        log = (self.log_dir / f"webhooks-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "email_service", "webhooks"], env=self.env, stdout=log, stderr=log
        )
        self.procs.append(proc)
        # Ready once it listens: from then on a commit reaches it at once.
        log_path = self.log_dir / f"webhooks-{len(self.procs) - 1}.log"
        deadline = time.monotonic() + 60
        while "listening for changes" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.05)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, self.logs()

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob("webhooks-*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture(scope="module")
def dispatcher(backing, tmp_path_factory) -> Iterator[DispatcherProcess]:
    processes = DispatcherProcess(backing, tmp_path_factory.mktemp("webhooks"))
    processes.start()
    yield processes
    processes.stop_all()


@pytest.fixture
def own_dispatcher(dispatcher, backing, tmp_path) -> Iterator[Callable[..., DispatcherProcess]]:
    """Runs a dispatcher with settings of the test's own, alone: the module's stop until the test ends."""
    made: list[DispatcherProcess] = []

    def start(**env: str) -> DispatcherProcess:
        for proc in dispatcher.procs:
            if proc.poll() is None:
                dispatcher.stop(proc)
        made.append(DispatcherProcess(backing, tmp_path, **env))
        made[-1].start()
        return made[-1]

    yield start
    for processes in made:
        processes.stop_all()
    if made:
        dispatcher.start()


# -------------------------------------------------------------------------------------- helpers


def new_account(client, user) -> str:
    response = client.post("/api/accounts", json=account_body(), headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def new_webhook(client, user, url: str, **fields: object) -> dict:
    response = client.post("/api/webhooks", json={"url": url, **fields}, headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()


def commit(runtime, user, account_id: str, *entries: tuple[str, str]) -> float:
    """Commit change-log entries (entity, kind) as a writer does; returns when the commit returned."""
    with runtime.db.tenant_session(user.principal) as session:
        record(
            session,
            user.principal,
            account_id,
            [
                Entry(ChangeEntity(entity), f"{entity}-{uuid.uuid4().hex[:12]}", ChangeKind(kind), "folder-1", {"n": i})
                for i, (entity, kind) in enumerate(entries)
            ],
        )
    return time.monotonic()


def fanned_out(runtime, *account_ids: str, timeout: float = 5.0) -> None:
    """Wait until fan-out has read every committed entry of these accounts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with runtime.db.maintenance_session() as session:
            behind = session.scalar(
                text(
                    "SELECT count(*) FROM accounts a LEFT JOIN webhook_cursors c ON c.account_id = a.id"
                    " WHERE a.id = ANY(:ids) AND a.change_seq > coalesce(c.seq, 0)"
                ),
                {"ids": list(account_ids)},
            )
        if behind == 0:
            return
        time.sleep(0.05)
    raise AssertionError("fan-out did not catch up")


def settled(runtime, webhook_id: str, timeout: float = 10.0) -> None:
    """Wait until no delivery of the endpoint waits or is being sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with runtime.db.maintenance_session() as session:
            pending = session.scalar(
                text("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = :id AND status = 'pending'"),
                {"id": webhook_id},
            )
        if pending == 0:
            return
        time.sleep(0.05)
    raise AssertionError("deliveries still pending")


def verified(secret: str, request: dict) -> dict:
    """The payload, after the standardwebhooks library accepted its signature (it raises otherwise)."""
    return Webhook(secret).verify(request["body"], request["headers"])


def webhook_state(client, user, webhook_id: str) -> dict:
    response = client.get(f"/api/webhooks/{webhook_id}", headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def rotate_secret(client, user, webhook_id: str, body: dict | None = None) -> dict:
    response = client.post(f"/api/webhooks/{webhook_id}/rotate-secret", json=body, headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def rejected(secret: str, request: dict) -> bool:
    """Whether a receiver holding ``secret`` refuses the request's signature."""
    try:
        verified(secret, request)
    except WebhookVerificationError as exc:
        assert "signature" in str(exc).lower(), exc  # refused for its signature, not its age or headers
        return True
    return False


def stored_secrets(runtime, webhook_id: str, cipher: CredentialCipher | None = None) -> tuple[str, str | None]:
    """The endpoint's current and previous secrets as stored, decrypted."""
    cipher = cipher or runtime.cipher
    with runtime.db.maintenance_session() as session:
        endpoint = session.get(WebhookEndpoint, webhook_id)
        previous = endpoint.previous_secret_encrypted
        return cipher.decrypt(endpoint.secret_encrypted), None if previous is None else cipher.decrypt(previous)


# ---------------------------------------------------------------------------------------- tests


def test_the_secret_is_shown_once_and_stored_encrypted(sync_client, user, runtime):
    created = new_webhook(sync_client, user, "https://hooks.example.com/email", description="tickets")
    assert ID_PATTERN.match(created["id"]) and created["secret"].startswith("whsec_")
    assert created["status"] == "enabled" and created["eventTypes"] is None and created["accountId"] is None
    Webhook(created["secret"])  # a secret every Standard Webhooks library reads

    listed = sync_client.get("/api/webhooks", headers=user.headers)
    fetched = sync_client.get(f"/api/webhooks/{created['id']}", headers=user.headers)
    assert listed.status_code == 200 and fetched.status_code == 200
    assert [w["id"] for w in listed.json()["webhooks"]] == [created["id"]]
    for answer in (listed, fetched):
        assert "secret" not in answer.text and created["secret"] not in answer.text
    with runtime.db.maintenance_session() as session:
        stored = session.get(WebhookEndpoint, created["id"])
        assert created["secret"].encode() not in bytes(stored.secret_encrypted)
        assert runtime.cipher.decrypt(stored.secret_encrypted) == created["secret"]


def test_a_committed_change_arrives_signed_within_a_second(sync_client, user, runtime, dispatcher, receiver):
    hook = receiver()
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    # The first delivery also waits for the dispatcher to start and learn of the new endpoint.
    commit(runtime, user, account, ("message", "created"))
    hook.wait_for(1, timeout=CATCH_UP_SECONDS + 5)
    latencies = []
    for count in range(2, 7):
        committed = commit(runtime, user, account, ("message", "created"))
        latencies.append(hook.wait_for(count, timeout=3)[-1]["at"] - committed)
        time.sleep(0.2)
    # A catch-up pass alone would deliver after up to CATCH_UP_SECONDS, so five deliveries all
    # within a second would happen by chance once in 243 runs; a pushed one takes milliseconds.
    assert max(latencies) < 1.0, latencies
    request = hook.requests[0]

    event = verified(created["secret"], request)
    assert event["type"] == "message.created"
    assert re.match(r"^\d{4}-\d\d-\d\dT.*Z$", event["timestamp"])
    data = event["data"]
    assert data["accountId"] == account and data["seq"] == 1 and data["folderId"] == "folder-1"
    assert data["id"].startswith("message-") and data["detail"] == {"n": 0}
    assert request["headers"]["webhook-id"].startswith("msg_")
    assert abs(int(request["headers"]["webhook-timestamp"]) - time.time()) < 5
    assert request["headers"]["webhook-signature"].startswith("v1,")
    assert request["headers"]["host"] == hook.url.split("/")[2]
    # A forged body fails verification with the same headers.
    with pytest.raises(Exception, match="signature"):
        Webhook(created["secret"]).verify(request["body"].replace("created", "destroyed"), request["headers"])

    settled(runtime, created["id"])
    attempts = sync_client.get(f"/api/webhooks/{created['id']}/deliveries", headers=user.headers).json()["deliveries"]
    assert len(attempts) == 6
    attempts = attempts[-1:]
    assert attempts[0]["succeeded"] and attempts[0]["statusCode"] == 204 and attempts[0]["attempt"] == 1
    assert attempts[0]["error"] is None and attempts[0]["nextAttemptAt"] is None
    assert attempts[0]["deliveryId"] == request["headers"]["webhook-id"]


def test_a_change_whose_transaction_began_before_the_endpoint_still_reaches_it(
    sync_client, user, runtime, dispatcher, receiver
):
    hook = receiver()
    account = new_account(sync_client, user)
    commit(runtime, user, account, ("message", "created"))  # the account's history: not sent
    fanned_out(runtime, account)
    # A sync batch logs its change, then waits for its uploads before it commits; the user makes
    # the endpoint meanwhile. The change is committed after the endpoint: it is new to it.
    with runtime.db.tenant_session(user.principal) as session:
        entry = Entry(ChangeEntity("message"), "message-late", ChangeKind("created"), "folder-1", {})
        record(session, user.principal, account, [entry])
        time.sleep(1.5)
        new_webhook(sync_client, user, hook.url)
    [request] = hook.wait_for(1, timeout=CATCH_UP_SECONDS + 5)
    data = json.loads(request["body"])["data"]
    assert data["seq"] == 2 and data["id"] == "message-late"
    commit(runtime, user, account, ("message", "created"))
    assert [json.loads(r["body"])["data"]["seq"] for r in hook.wait_for(2, timeout=5)] == [2, 3]


def test_each_change_arrives_exactly_once_across_restarts_and_two_dispatchers(
    sync_client, user, runtime, dispatcher, receiver
):
    hook = receiver()
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, *[("message", "created")] * 5)
    hook.wait_for(5)

    # Every dispatcher stops; changes committed meanwhile have no one to hear their notification.
    for proc in dispatcher.procs:
        if proc.poll() is None:
            dispatcher.stop(proc)
    commit(runtime, user, account, *[("message", "updated")] * 5)
    time.sleep(0.5)
    assert len(hook.requests) == 5

    # Two dispatchers come back at once: the catch-up pass finds what was missed, and the claim
    # keeps them from sending anything twice.
    dispatcher.start()
    dispatcher.start()
    for _ in range(4):
        commit(runtime, user, account, *[("folder", "updated")] * 5)
    hook.wait_for(30, timeout=10)
    fanned_out(runtime, account)
    settled(runtime, created["id"])
    time.sleep(1.0)  # anything sent twice would have arrived by now

    ids = [r["headers"]["webhook-id"] for r in hook.requests]
    seqs = sorted(verified(created["secret"], r)["data"]["seq"] for r in hook.requests)
    assert len(ids) == len(set(ids)) == 30
    assert seqs == list(range(1, 31))


def test_event_type_and_account_filters(sync_client, user, runtime, dispatcher, receiver):
    first, second = new_account(sync_client, user), new_account(sync_client, user)
    created_only, second_only, everything = receiver(), receiver(), receiver()
    new_webhook(sync_client, user, created_only.url, eventTypes=["message.created", "folder.created"])
    scoped = new_webhook(sync_client, user, second_only.url, accountId=second)
    new_webhook(sync_client, user, everything.url)

    commit(runtime, user, first, ("message", "created"), ("message", "updated"), ("folder", "destroyed"))
    commit(runtime, user, second, ("folder", "created"), ("message", "destroyed"))
    everything.wait_for(5)
    created_only.wait_for(2)
    second_only.wait_for(2)
    fanned_out(runtime, first, second)
    settled(runtime, scoped["id"])
    time.sleep(0.5)

    def seen(hook: Receiver) -> set[tuple[str, str]]:
        return {(e["data"]["accountId"], e["type"]) for e in hook.events()}

    assert seen(created_only) == {(first, "message.created"), (second, "folder.created")}
    assert seen(second_only) == {(second, "folder.created"), (second, "message.destroyed")}
    assert len(everything.requests) == 5


def test_other_users_changes_never_reach_an_endpoint(
    sync_client, user, verifier, make_user, runtime, dispatcher, receiver
):
    colleague, stranger = user.colleague(verifier), make_user()
    mine = new_account(sync_client, user)
    theirs = {who: new_account(sync_client, who) for who in (colleague, stranger)}
    hook = receiver()
    created = new_webhook(sync_client, user, hook.url)

    # Another user's account cannot be named as a filter, nor seen through the endpoint.
    refused = sync_client.post(
        "/api/webhooks", json={"url": hook.url, "accountId": theirs[colleague]}, headers=user.headers
    )
    assert_error_shape(refused, 404, "ACCOUNT_NOT_FOUND")
    for who in (colleague, stranger):
        assert sync_client.get(f"/api/webhooks/{created['id']}", headers=who.headers).status_code == 404
        assert sync_client.get(f"/api/webhooks/{created['id']}/deliveries", headers=who.headers).status_code == 404
        assert sync_client.delete(f"/api/webhooks/{created['id']}", headers=who.headers).status_code == 404
        assert sync_client.get("/api/webhooks", headers=who.headers).json()["webhooks"] == []
        commit(runtime, who, theirs[who], ("message", "created"), ("folder", "created"))
    commit(runtime, user, mine, ("message", "created"))
    hook.wait_for(1)
    fanned_out(runtime, mine, *theirs.values())
    settled(runtime, created["id"])
    time.sleep(0.5)
    assert [e["data"]["accountId"] for e in hook.events()] == [mine]


def test_a_failing_receiver_gets_growing_retries_then_the_endpoint_is_disabled(
    sync_client, user, runtime, dispatcher, receiver
):
    hook = receiver(status=500)
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, ("message", "created"))
    requests = hook.wait_for(1 + len(RETRY_WAITS), timeout=10)
    settled(runtime, created["id"])

    assert len({r["headers"]["webhook-id"] for r in requests}) == 1
    gaps = [later["at"] - earlier["at"] for earlier, later in zip(requests, requests[1:], strict=False)]
    for gap, wait in zip(gaps, RETRY_WAITS, strict=True):
        assert wait * 0.75 <= gap <= wait * 1.2 + 1.1, gaps  # jitter is +/-20%; polling adds < 1 s
    assert gaps == sorted(gaps)

    state = webhook_state(sync_client, user, created["id"])
    assert state["status"] == "disabled" and state["disabledAt"] is not None
    assert "4 times" in state["disabledReason"] and "HTTP 500" in state["disabledReason"]
    attempts = sync_client.get(f"/api/webhooks/{created['id']}/deliveries?limit=10", headers=user.headers).json()[
        "deliveries"
    ]
    assert [a["attempt"] for a in attempts] == [4, 3, 2, 1]
    assert all(a["statusCode"] == 500 and "HTTP 500" in a["error"] and not a["succeeded"] for a in attempts)
    assert attempts[0]["nextAttemptAt"] is None and all(a["nextAttemptAt"] for a in attempts[1:])

    # Disabled means nothing more is sent, until the user enables it again.
    commit(runtime, user, account, ("message", "updated"))
    fanned_out(runtime, account)
    time.sleep(1.0)
    assert len(hook.requests) == 4
    hook.status = 200
    enabled = sync_client.post(f"/api/webhooks/{created['id']}/enable", headers=user.headers)
    assert enabled.status_code == 200 and enabled.json()["status"] == "enabled"
    assert enabled.json()["disabledReason"] is None
    # Changes made while it was disabled are not delivered; the next one is.
    commit(runtime, user, account, ("folder", "created"))
    hook.wait_for(5)
    assert hook.events()[-1]["type"] == "folder.created"


def test_410_gone_disables_the_endpoint_at_once(sync_client, user, runtime, dispatcher, receiver):
    hook = receiver(status=410)
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, ("message", "created"))
    hook.wait_for(1)
    settled(runtime, created["id"])
    time.sleep(RETRY_WAITS[0] * 2)
    assert len(hook.requests) == 1
    state = webhook_state(sync_client, user, created["id"])
    assert state["status"] == "disabled" and "410 Gone" in state["disabledReason"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:{port}/hook",  # loopback, but only 127.0.0.1 is allow-listed
        "http://[::1]:{port}/hook",
        "http://0.0.0.0:{port}/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[fd00::1]/hook",
        "https://[::ffff:127.0.0.2]:{port}/hook",
        "http://93.184.215.14/hook",  # public, but plain http only goes to allow-listed hosts
    ],
)
def test_urls_the_policy_refuses_are_refused_at_create_and_never_contacted(
    sync_client, user, runtime, dispatcher, receiver, url
):
    hook = receiver(host="127.0.0.2")
    port = hook.url.split(":")[2].split("/")[0]
    account = new_account(sync_client, user)
    answer = sync_client.post("/api/webhooks", json={"url": url.format(port=port)}, headers=user.headers)
    body = assert_error_shape(answer, 400, "DESTINATION_NOT_ALLOWED")
    assert "url" in body["message"]
    assert sync_client.get("/api/webhooks", headers=user.headers).json()["webhooks"] == []
    commit(runtime, user, account, ("message", "created"))
    fanned_out(runtime, account)
    time.sleep(0.3)
    assert hook.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/x",
        "https://user:pw@hooks.example.com/x",
        "https:///nohost",
        "not a url",
        "https://\u2603.example/x",  # not a valid international name
    ],
)
def test_malformed_urls_are_refused(sync_client, user, url):
    answer = sync_client.post("/api/webhooks", json={"url": url}, headers=user.headers)
    assert_error_shape(answer, 400)


def test_an_international_host_name_is_called_by_its_a_label():
    # Host header, SNI and the certificate check take ASCII only; a Unicode name stopped every
    # delivery before a request was made.
    target = urls.parse("https://Bücher.Example:8443/hook")
    assert target.host == "xn--bcher-kva.example" and target.host_header == "xn--bcher-kva.example:8443"
    assert urls.parse("https://münchen.de/hook").host_header == "xn--mnchen-3ya.de"


def test_the_policy_is_applied_again_at_every_delivery(sync_client, user, runtime, dispatcher, receiver):
    allowed, elsewhere = receiver(), receiver(host="127.0.0.2")
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, allowed.url)
    # As if the endpoint's name now resolved to an address the policy refuses.
    with runtime.db.maintenance_session() as session:
        session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == created["id"]).values(url=elsewhere.url))
    commit(runtime, user, account, ("message", "created"))
    deadline = time.monotonic() + 5
    attempts: list = []
    while not attempts and time.monotonic() < deadline:
        attempts = sync_client.get(f"/api/webhooks/{created['id']}/deliveries", headers=user.headers).json()[
            "deliveries"
        ]
        time.sleep(0.05)
    assert attempts and attempts[-1]["statusCode"] is None
    assert "destination not allowed" in attempts[-1]["error"]
    assert elsewhere.requests == [] and allowed.requests == []


def test_a_hanging_endpoint_does_not_delay_another_tenants_delivery(
    sync_client, user, make_user, runtime, dispatcher, receiver
):
    hanging, healthy = receiver(hang=True), receiver()
    other = make_user()
    slow_account, fast_account = new_account(sync_client, user), new_account(sync_client, other)
    slow = new_webhook(sync_client, user, hanging.url)
    new_webhook(sync_client, other, healthy.url)

    commit(runtime, user, slow_account, *[("message", "created")] * 20)
    hanging.wait_for(2)
    time.sleep(0.3)
    # The endpoint holds as many requests as its limit (2 in these tests, across every dispatcher
    # process running), not the 20 it is owed.
    assert hanging.open_requests == 2

    committed = commit(runtime, other, fast_account, ("message", "created"))
    [request] = healthy.wait_for(1, timeout=3)
    assert request["at"] - committed < 1.5, f"{request['at'] - committed:.3f} s"
    assert hanging.open_requests == 2
    # Removing the hanging endpoint ends its deliveries; the dispatcher records nothing for it.
    assert sync_client.delete(f"/api/webhooks/{slow['id']}", headers=user.headers).status_code == 204


def fan_out_position(runtime, account_id: str) -> int:
    with runtime.db.maintenance_session() as session:
        return session.scalar(
            text("SELECT coalesce(max(seq), 0) FROM webhook_cursors WHERE account_id = :id"), {"id": account_id}
        )


def test_a_change_log_backlog_takes_turns_with_other_accounts(
    sync_client, user, make_user, runtime, dispatcher, receiver
):
    # A first sync writes one change per message: its account's fan-out takes several batches.
    # The receiver hangs so the backlog's deliveries are made but barely sent (two at a time).
    busy_hook, other_hook = receiver(hang=True), receiver()
    other = make_user()
    busy_account, other_account = new_account(sync_client, user), new_account(sync_client, other)
    busy = new_webhook(sync_client, user, busy_hook.url)
    quiet = new_webhook(sync_client, other, other_hook.url)
    backlog = 6 * BATCH
    commit(runtime, user, busy_account, *[("message", "created")] * backlog)
    deadline = time.monotonic() + 30
    while fan_out_position(runtime, busy_account) == 0:
        assert time.monotonic() < deadline, "fan-out of the backlog did not start"
        time.sleep(0.01)

    # Another tenant's change, committed while most of the backlog is still to be fanned out.
    commit(runtime, other, other_account, ("message", "created"))
    assert backlog - fan_out_position(runtime, busy_account) >= 2 * BATCH, "the backlog went too fast to test"
    other_hook.wait_for(1, timeout=30)
    fanned_out(runtime, busy_account, timeout=60)

    # Each pass is one transaction, and a delivery row carries its transaction's start: the other
    # account's delivery was made between the backlog's batches, not after the last of them.
    with runtime.db.maintenance_session() as session:
        made_after = session.scalar(
            text(
                "SELECT count(*) FROM webhook_deliveries b WHERE b.endpoint_id = :busy AND b.created_at >"
                " (SELECT created_at FROM webhook_deliveries WHERE endpoint_id = :quiet)"
            ),
            {"busy": busy["id"], "quiet": quiet["id"]},
        )
    assert made_after >= BATCH, made_after
    assert sync_client.delete(f"/api/webhooks/{busy['id']}", headers=user.headers).status_code == 204


def test_webhook_urls_never_reach_account_operations(sync_client, user, runtime):
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, "https://hooks.example.com/x")
    missing = "wh_" + "A" * 24

    # Ids of the webhook shape reach the webhook operations...
    assert sync_client.get(f"/api/webhooks/{created['id']}", headers=user.headers).json()["id"] == created["id"]
    assert_error_shape(sync_client.get(f"/api/webhooks/{missing}", headers=user.headers), 404, "WEBHOOK_NOT_FOUND")
    assert_error_shape(
        sync_client.get(f"/api/webhooks/{missing}/deliveries", headers=user.headers), 404, "WEBHOOK_NOT_FOUND"
    )
    assert_error_shape(
        sync_client.post(f"/api/webhooks/{missing}/enable", headers=user.headers), 404, "WEBHOOK_NOT_FOUND"
    )
    # ...a segment no webhook id can be is the account path it spells (account "webhooks")...
    assert_error_shape(sync_client.get("/api/webhooks/folders", headers=user.headers), 404, "ACCOUNT_NOT_FOUND")
    upload = sync_client.post("/api/webhooks/attachments", files={"file": ("a.txt", b"x")}, headers=user.headers)
    assert_error_shape(upload, 404, "ACCOUNT_NOT_FOUND")
    # ...account paths keep reaching theirs, and anything else is no webhook id.
    assert sync_client.get(f"/api/{account}/folders", headers=user.headers).status_code == 200
    assert_error_shape(sync_client.get("/api/webhooks/not-an-id", headers=user.headers), 400)
    assert_error_shape(sync_client.get(f"/api/{created['id']}/folders", headers=user.headers), 404, "ACCOUNT_NOT_FOUND")

    assert sync_client.delete(f"/api/webhooks/{created['id']}", headers=user.headers).status_code == 204
    assert_error_shape(sync_client.get(f"/api/webhooks/{created['id']}", headers=user.headers), 404)


def test_request_validation(sync_client, user):
    for body in (
        {},
        {"url": "https://hooks.example.com/x", "eventTypes": ["message.exploded"]},
        {"url": "https://hooks.example.com/x", "eventTypes": []},
        {"url": "https://hooks.example.com/x", "surprise": True},
        {"url": "https://hooks.example.com/" + "x" * 2100},
    ):
        assert_error_shape(sync_client.post("/api/webhooks", json=body, headers=user.headers), 400)
    assert_error_shape(sync_client.get("/api/webhooks", headers={}), 401)


def test_serve_on_the_embedded_default_runs_a_dispatcher_that_dies_with_it(tmp_path):
    service = ServiceProcess(service_env(None, EMAIL_SERVICE_DATA_DIR=str(tmp_path / "var")), tmp_path)
    try:
        service.wait_healthy()
        deadline = time.monotonic() + 20
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and not children:
            children = [
                p
                for p in psutil.Process(service.proc.pid).children()
                if p.cmdline()[-2:] == ["email_service", "webhooks"]
            ]
            time.sleep(0.2)
        assert len(children) == 1, [p.cmdline() for p in psutil.Process(service.proc.pid).children()]
    finally:
        assert service.stop() == 0, service.log()
    assert not children[0].is_running() or children[0].status() == psutil.STATUS_ZOMBIE


def test_the_default_schedule_retries_for_about_a_day(backing):
    settings = replace(backing, webhook_retry_schedule=())
    waits = [webhook_retry_delay(attempt, settings) for attempt in range(1, 9)]
    assert waits[-1] is None and None not in waits[:-1]
    nominal = (5, 300, 1800, 7200, 18000, 36000, 36000)
    for wait, planned in zip(waits, nominal, strict=False):
        assert planned * 0.8 <= wait <= planned * 1.2
    # About a day in all (27.6 h as planned), each wait within its jitter of +/- 20 %.
    assert 24 * 3600 <= sum(nominal) <= 30 * 3600
    assert sum(nominal) * 0.8 <= sum(waits[:-1]) <= sum(nominal) * 1.2
    assert load_settings(
        {**service_env(backing), "EMAIL_SERVICE_WEBHOOK_RETRY_SCHEDULE": "250ms,2s,1m"}
    ).webhook_retry_schedule == (
        0.25,
        2.0,
        60.0,
    )


def test_routing_does_not_depend_on_the_order_paths_are_written_in():
    spec = load_spec()
    patterns = _path_patterns(spec)
    # Written with the webhook paths first, as a merge might leave them.
    reordered = {**spec, "paths": dict(sorted(spec["paths"].items(), key=lambda item: "webhooks" not in item[0]))}
    assert next(iter(reordered["paths"])).startswith("/api/webhooks")
    routed = list(_routing_order(reordered, patterns)["paths"])
    assert routed.index("/api/{accountId}/folders") < routed.index("/api/webhooks/{webhookId}")
    assert routed.index("/api/{accountId}/attachments") < routed.index("/api/webhooks/{webhookId}")


def test_a_lost_notification_is_caught_up(sync_client, user, runtime, dispatcher, receiver):
    hook = receiver()
    account = new_account(sync_client, user)
    new_webhook(sync_client, user, hook.url)
    # An entry committed with no NOTIFY, as when the notification is lost on the way.
    with runtime.db.maintenance_session() as session:
        seq = session.scalar(
            text("UPDATE accounts SET change_seq = change_seq + 1 WHERE id = :id RETURNING change_seq"), {"id": account}
        )
        session.execute(
            text(
                "INSERT INTO changes (account_id, seq, tenant_id, user_id, entity, entity_id, kind)"
                " VALUES (:id, :seq, :tenant, :user, 'message', 'm-quiet', 'created')"
            ),
            {"id": account, "seq": seq, "tenant": user.principal.tenant_id, "user": user.principal.user_id},
        )
    started = time.monotonic()
    [request] = hook.wait_for(1, timeout=CATCH_UP_SECONDS + 3)
    assert request["at"] - started <= CATCH_UP_SECONDS + 1.5
    assert json.loads(request["body"])["data"]["id"] == "m-quiet"


def test_finished_deliveries_are_pruned_after_a_week(sync_client, user, runtime, dispatcher, receiver):
    hook = receiver()
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, ("message", "created"), ("message", "updated"))
    hook.wait_for(2)
    settled(runtime, created["id"])
    with runtime.db.maintenance_session() as session:
        session.execute(
            text(
                "UPDATE webhook_deliveries SET created_at = now() - interval '8 days',"
                " status = CASE WHEN seq = 2 THEN 'pending' ELSE status END,"
                " next_attempt_at = CASE WHEN seq = 2 THEN now() + interval '1 day' ELSE next_attempt_at END"
                " WHERE endpoint_id = :id"
            ),
            {"id": created["id"]},
        )
    assert prune(runtime.db) >= 1
    with runtime.db.maintenance_session() as session:
        left = session.execute(
            text("SELECT seq, status FROM webhook_deliveries WHERE endpoint_id = :id"), {"id": created["id"]}
        ).all()
    assert [tuple(row) for row in left] == [(2, "pending")]  # a waiting delivery is never removed


def test_key_rotation_reencrypts_webhook_secrets(sync_client, user, runtime):
    created = new_webhook(sync_client, user, "https://hooks.example.com/rotate")
    rotating = new_webhook(sync_client, user, "https://hooks.example.com/rotating")
    rotated = rotate_secret(sync_client, user, rotating["id"], {"graceSeconds": 3600})
    old_key = runtime.settings.credential_keys[0]
    new_key = Fernet.generate_key().decode()
    assert rotate_secrets(runtime.db, CredentialCipher((new_key, old_key))) >= 3
    only_new_key = CredentialCipher((new_key,))
    assert stored_secrets(runtime, created["id"], only_new_key) == (created["secret"], None)
    # The secret still in its grace period too: with only the new key, deliveries keep both signatures.
    assert stored_secrets(runtime, rotating["id"], only_new_key) == (rotated["secret"], rotating["secret"])
    # The suite's key back in front for the tests that follow.
    rotate_secrets(runtime.db, CredentialCipher((old_key, new_key)))


def test_a_rotated_secret_signs_beside_the_new_one_until_its_grace_period_ends(
    sync_client, user, runtime, dispatcher, receiver
):
    hook = receiver()
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url, eventTypes=["message.created"])
    commit(runtime, user, account, ("message", "created"))
    hook.wait_for(1, timeout=CATCH_UP_SECONDS + 5)
    old = created["secret"]

    asked = time.time()
    rotated = rotate_secret(sync_client, user, created["id"], {"graceSeconds": 3600})
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old
    Webhook(new)  # a secret every Standard Webhooks library reads
    # The same endpoint: its id, settings and history stay.
    for field in ("id", "url", "eventTypes", "status", "createdAt"):
        assert rotated[field] == created[field], field
    assert abs(rotated["previousSecretExpiresAt"] - (asked + 3600) * 1000) < 5000
    fetched = sync_client.get(f"/api/webhooks/{created['id']}", headers=user.headers)
    assert fetched.json()["previousSecretExpiresAt"] == rotated["previousSecretExpiresAt"]
    assert "secret" not in fetched.json() and new not in fetched.text and old not in fetched.text

    # During the grace period each delivery carries both signatures: receivers holding either verify.
    commit(runtime, user, account, ("message", "created"))
    during = hook.wait_for(2)[-1]
    assert re.fullmatch(r"v1,\S+ v1,\S+", during["headers"]["webhook-signature"])
    assert verified(old, during)["type"] == "message.created"
    assert verified(new, during)["type"] == "message.created"
    assert rejected(signing.new_secret(), during)

    # The grace period over (as if an hour had passed): the new secret alone signs.
    with runtime.db.maintenance_session() as session:
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == created["id"])
            .values(previous_secret_expires_at=func.now() - timedelta(seconds=1))
        )
    assert webhook_state(sync_client, user, created["id"])["previousSecretExpiresAt"] is None
    commit(runtime, user, account, ("message", "created"))
    after = hook.wait_for(3)[-1]
    assert re.fullmatch(r"v1,\S+", after["headers"]["webhook-signature"])
    assert verified(new, after)["type"] == "message.created"
    assert rejected(old, after)

    # Over, it is not kept either: the dispatcher's next catch-up drops it from the database.
    def previous_kept() -> bool:
        with runtime.db.maintenance_session() as session:
            endpoint = session.get(WebhookEndpoint, created["id"])
            return endpoint.previous_secret_encrypted is not None or endpoint.previous_secret_expires_at is not None

    deadline = time.monotonic() + CATCH_UP_SECONDS * 3
    while previous_kept() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not previous_kept()

    # A leaked secret: graceSeconds 0 stops it at once, for the very next delivery.
    leaked = rotate_secret(sync_client, user, created["id"], {"graceSeconds": 0})
    assert leaked["previousSecretExpiresAt"] is None and leaked["secret"] not in (old, new)
    commit(runtime, user, account, ("message", "created"))
    last = hook.wait_for(4)[-1]
    assert verified(leaked["secret"], last)["type"] == "message.created"
    assert rejected(new, last) and rejected(old, last)

    settled(runtime, created["id"])
    history = sync_client.get(f"/api/webhooks/{created['id']}/deliveries", headers=user.headers).json()
    assert [a["statusCode"] for a in history["deliveries"]] == [204] * 4


def test_a_previous_secret_that_no_longer_decrypts_only_loses_its_signature(
    sync_client, user, runtime, dispatcher, receiver
):
    # Its key retired from the keyring: the delivery failed where the current secret would do.
    hook = receiver()
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url, eventTypes=["message.created"])
    new = rotate_secret(sync_client, user, created["id"], {"graceSeconds": 3600})["secret"]
    with runtime.db.maintenance_session() as session:
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == created["id"])
            .values(previous_secret_encrypted=b"sealed under a key no longer configured")
        )
    commit(runtime, user, account, ("message", "created"))
    [delivered] = hook.wait_for(1, timeout=CATCH_UP_SECONDS + 5)
    assert re.fullmatch(r"v1,\S+", delivered["headers"]["webhook-signature"])
    assert verified(new, delivered)["type"] == "message.created"
    settled(runtime, created["id"])
    assert webhook_state(sync_client, user, created["id"])["status"] == "enabled"


def test_a_delivery_waiting_at_a_rotation_is_signed_with_the_secrets_current_when_sent(
    sync_client, user, runtime, dispatcher, receiver
):
    switched: list[str] = []  # the secret the receiver holds once it has switched over

    def answer(request: dict) -> int:
        # A receiver that takes only the new secret once it has it; until then it is down.
        return 204 if switched and not rejected(switched[0], request) else 503

    hook = receiver(answer=answer)
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, ("message", "created"))
    [first] = hook.wait_for(1)
    assert verified(created["secret"], first)

    rotated = rotate_secret(sync_client, user, created["id"], {"graceSeconds": 0})
    switched.append(rotated["secret"])
    settled(runtime, created["id"])
    retried = hook.requests[-1]
    assert retried["headers"]["webhook-id"] == first["headers"]["webhook-id"]
    assert verified(rotated["secret"], retried) == verified(created["secret"], first)
    assert rejected(created["secret"], retried)
    history = sync_client.get(f"/api/webhooks/{created['id']}/deliveries", headers=user.headers).json()
    assert history["deliveries"][0]["statusCode"] == 204
    assert {a["deliveryId"] for a in history["deliveries"]} == {first["headers"]["webhook-id"]}
    assert webhook_state(sync_client, user, created["id"])["status"] == "enabled"


def test_rotating_a_secret_takes_a_grace_period_in_range_and_only_the_owners_endpoint(
    sync_client, user, verifier, make_user, runtime
):
    created = new_webhook(sync_client, user, "https://hooks.example.com/rotate-me")
    path = f"/api/webhooks/{created['id']}/rotate-secret"
    for body in (
        {"graceSeconds": -1},
        {"graceSeconds": 604801},
        {"graceSeconds": "60"},
        {"graceSeconds": 1.5},
        {"graceSeconds": None},
        {"grace": 60},
        [60],
    ):
        assert_error_shape(sync_client.post(path, json=body, headers=user.headers), 400)
    for who in (user.colleague(verifier), make_user()):
        assert_error_shape(sync_client.post(path, headers=who.headers), 404, "WEBHOOK_NOT_FOUND")
    missing = "/api/webhooks/wh_" + "A" * 24 + "/rotate-secret"
    assert_error_shape(sync_client.post(missing, headers=user.headers), 404, "WEBHOOK_NOT_FOUND")
    assert_error_shape(sync_client.post(path, headers={}), 401)
    assert stored_secrets(runtime, created["id"]) == (created["secret"], None)  # none of those rotated it

    asked = time.time()
    answer = sync_client.post(path, headers=user.headers)  # no body: a day's grace
    assert answer.status_code == 200, answer.text
    assert abs(answer.json()["previousSecretExpiresAt"] - (asked + 86400) * 1000) < 5000
    assert stored_secrets(runtime, created["id"]) == (answer.json()["secret"], created["secret"])
    week = rotate_secret(sync_client, user, created["id"], {"graceSeconds": 604800})
    assert abs(week["previousSecretExpiresAt"] - (asked + 604800) * 1000) < 5000


def test_https_goes_to_the_checked_address_and_verifies_the_name(sync_client, user, runtime, dispatcher, receiver):
    # The certificate names "localhost" and not 127.0.0.1: the request connects to the address
    # the policy checked, and TLS (SNI and the certificate check) still uses the URL's name.
    by_name = receiver(host="127.0.0.1", tls=dispatcher.tls.server_context())
    port = by_name.url.split(":")[2].split("/")[0]
    account = new_account(sync_client, user)
    named = new_webhook(sync_client, user, f"https://localhost:{port}/hook")
    by_address = new_webhook(sync_client, user, f"https://127.0.0.1:{port}/hook")
    commit(runtime, user, account, ("message", "created"))
    [request] = by_name.wait_for(1)
    assert verified(named["secret"], request)["type"] == "message.created"
    assert request["headers"]["host"] == f"localhost:{port}"

    # The same receiver under its address: the certificate does not name it, so nothing is sent.
    settled(runtime, named["id"])
    deadline = time.monotonic() + 5
    attempts: list = []
    while not attempts and time.monotonic() < deadline:
        answer = sync_client.get(f"/api/webhooks/{by_address['id']}/deliveries", headers=user.headers)
        attempts = answer.json()["deliveries"]
        time.sleep(0.05)
    assert attempts and attempts[-1]["statusCode"] is None
    assert "certificate" in attempts[-1]["error"].lower()
    assert len(by_name.requests) == 1


def test_a_receiver_that_is_down_is_not_stormed_with_retries(sync_client, user, runtime, dispatcher, receiver):
    hook = receiver(status=503)
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, *[("message", "created")] * 12)
    deadline = time.monotonic() + 15
    while webhook_state(sync_client, user, created["id"])["status"] == "enabled" and time.monotonic() < deadline:
        time.sleep(0.1)
    state = webhook_state(sync_client, user, created["id"])
    assert state["status"] == "disabled" and "HTTP 503" in state["disabledReason"]
    time.sleep(0.5)
    # Each delivery on its own would have made 12 x 4 = 48 requests; waiting together, each retry
    # step sends about as many as the endpoint's limit (2 here).
    attempts = 1 + len(RETRY_WAITS)
    assert attempts <= len(hook.requests) <= 3 * attempts, len(hook.requests)
    # The events not yet tried are kept for when the endpoint is enabled again.
    with runtime.db.maintenance_session() as session:
        waiting = session.scalar(
            text("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = :id AND status = 'pending'"),
            {"id": created["id"]},
        )
    assert waiting >= 12 - 3
    hook.status, before = 204, len(hook.requests)
    assert sync_client.post(f"/api/webhooks/{created['id']}/enable", headers=user.headers).status_code == 200
    settled(runtime, created["id"])
    time.sleep(0.3)
    delivered = [json.loads(r["body"])["data"]["seq"] for r in hook.requests[before:]]
    assert len(delivered) == len(set(delivered)) == waiting


def waiting_deliveries(runtime, webhook_id: str) -> list:
    """The endpoint's waiting deliveries: attempts, when due, and when their own last failure scheduled them."""
    with runtime.db.maintenance_session() as session:
        return session.execute(
            text(
                "SELECT d.id, d.attempts, d.next_attempt_at, d.next_attempt_at - now() AS due_in,"
                " (SELECT a.next_attempt_at FROM webhook_attempts a WHERE a.delivery_id = d.id"
                "  ORDER BY a.id DESC LIMIT 1) AS own"
                " FROM webhook_deliveries d WHERE d.endpoint_id = :id AND d.status = 'pending'"
            ),
            {"id": webhook_id},
        ).all()


def test_a_receiver_that_recovers_gets_its_held_back_deliveries_at_once(
    sync_client, user, runtime, own_dispatcher, receiver
):
    # Retries an hour apart, as in production after a few failures: waiting for them is the bug.
    own_dispatcher(EMAIL_SERVICE_WEBHOOK_RETRY_SCHEDULE="1h,1h")
    hook = receiver(status=503)
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, *[("message", "created")] * 6)
    hook.wait_for(2)
    # The two tried fail, and every other waiting delivery waits with them, about an hour.
    deadline = time.monotonic() + 10
    while True:
        waiting = waiting_deliveries(runtime, created["id"])
        if len(waiting) == 6 and all(row.due_in > timedelta(minutes=30) for row in waiting):
            break
        assert time.monotonic() < deadline, waiting
        time.sleep(0.05)
    failed_themselves = {row.id for row in waiting if row.attempts > 0}
    held_back = len(waiting) - len(failed_themselves)
    assert failed_themselves and held_back and len(hook.requests) == len(failed_themselves)

    # The receiver is back: a new change is delivered at once, and succeeds. The deliveries held
    # back only for the others' failures follow it without waiting the hour...
    hook.status, before = 204, len(hook.requests)
    commit(runtime, user, account, ("message", "created"))
    hook.wait_for(before + 1 + held_back, timeout=5)
    time.sleep(0.3)
    sent = [r["headers"]["webhook-id"] for r in hook.requests[before:]]
    assert len(sent) == len(set(sent)) == 1 + held_back and not set(sent) & failed_themselves
    # ...and those that failed themselves keep the retry their own failure scheduled.
    waiting = waiting_deliveries(runtime, created["id"])
    assert {row.id for row in waiting} == failed_themselves
    assert all(row.next_attempt_at == row.own and row.due_in > timedelta(minutes=30) for row in waiting)
    assert webhook_state(sync_client, user, created["id"])["status"] == "enabled"
    assert sync_client.delete(f"/api/webhooks/{created['id']}", headers=user.headers).status_code == 204


def test_an_endpoint_enabled_again_starts_its_retries_over(sync_client, user, runtime, dispatcher, receiver):
    lock = threading.Lock()
    tries: dict[str, int] = {}
    held: list[str] = []
    disabled = threading.Event()
    after_enable = [500]  # the answers once the endpoint is enabled again; 204 after them

    def answer(request: dict) -> int:
        delivery = request["headers"]["webhook-id"]
        with lock:
            tries[delivery] = tries.get(delivery, 0) + 1
            hold = not held and tries[delivery] == len(RETRY_WAITS)
            if hold:
                held.append(delivery)
            elif disabled.is_set():
                return after_enable.pop(0) if after_enable else 204
        if hold:
            # The first delivery at its last retry but one is answered only once the other has used
            # up its retries and disabled the endpoint: it is left waiting with one attempt to go.
            disabled.wait(8)
        return 500

    hook = receiver(answer=answer)
    account = new_account(sync_client, user)
    created = new_webhook(sync_client, user, hook.url)
    commit(runtime, user, account, ("message", "created"), ("message", "created"))
    deadline = time.monotonic() + 10
    while webhook_state(sync_client, user, created["id"])["status"] == "enabled":
        assert time.monotonic() < deadline, hook.requests
        time.sleep(0.05)
    assert "4 times" in webhook_state(sync_client, user, created["id"])["disabledReason"]
    disabled.set()
    deadline = time.monotonic() + 5
    while [row.attempts for row in waiting_deliveries(runtime, created["id"])] != [len(RETRY_WAITS)]:
        assert time.monotonic() < deadline, waiting_deliveries(runtime, created["id"])
        time.sleep(0.05)
    [left] = waiting_deliveries(runtime, created["id"])
    assert left.id == held[0]

    assert sync_client.post(f"/api/webhooks/{created['id']}/enable", headers=user.headers).status_code == 200
    # A failure after enabling is retried like a first failure; the retry gets through.
    hook.wait_for(len(RETRY_WAITS) + 4 + 2)
    settled(runtime, created["id"])
    state = webhook_state(sync_client, user, created["id"])
    assert state["status"] == "enabled" and state["disabledReason"] is None
    answers = sync_client.get(f"/api/webhooks/{created['id']}/deliveries?limit=2", headers=user.headers).json()
    assert [(a["deliveryId"], a["attempt"], a["statusCode"]) for a in answers["deliveries"]] == [
        (left.id, 2, 204),
        (left.id, 1, 500),
    ]


def dispatcher_resolving_slowly(runtime, monkeypatch, *, seconds: float, name: str) -> Dispatcher:
    """A dispatcher in this process, for which names starting with "slow" take ``seconds`` to resolve."""
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        if host.startswith("slow"):
            time.sleep(seconds)  # a name server that drops queries
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(urls, "resolve", functools.partial(destinations.resolve, resolver=resolver))
    return Dispatcher(replace(runtime.settings, destinations=TEST_DESTINATIONS), runtime.db, runtime.cipher, name=name)


def test_a_tenant_whose_receivers_resolve_slowly_does_not_delay_another_tenant(runtime, receiver, monkeypatch):
    healthy = receiver()
    port = healthy.url.split(":")[2].split("/")[0]
    sender = dispatcher_resolving_slowly(runtime, monkeypatch, seconds=2, name="fairness-test")
    recorded: dict[str, tuple[float, Outcome]] = {}
    # What each delivery ended with, and when (the rows themselves are not the subject here).
    monkeypatch.setattr(
        sender, "_record", lambda delivery, outcome: recorded.update({delivery.id: (time.monotonic(), outcome)})
    )
    secret = runtime.cipher.encrypt(signing.new_secret())

    def claimed(delivery_id: str, tenant: str, host: str) -> Claimed:
        url = f"http://{host}:{port}/hook"
        return Claimed(delivery_id, f"wh_{delivery_id}", tenant, "message.created", {}, url, secret)

    async def deliver() -> float:
        async with httpx.AsyncClient(trust_env=False) as client:
            sender._client = client
            slow = [
                asyncio.create_task(sender._deliver(claimed(f"slow{n}", "a", f"slow{n}.example"))) for n in range(8)
            ]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await sender._deliver(claimed("fast", "b", "fast.example"))
            await asyncio.gather(*slow)
            return recorded["fast"][0] - started

    took = asyncio.run(deliver())
    assert recorded["fast"][1].status_code == 204 and took < 1.0, took
    assert all(recorded[f"slow{n}"][1].status_code == 204 for n in range(8))


def test_look_ups_cut_off_by_the_time_limit_keep_their_tenants_threads_until_they_end(runtime, receiver, monkeypatch):
    # A look-up cannot be stopped: a delivery cut off at its time limit leaves its thread waiting
    # on the name server. Its tenant's slot goes free only when that thread does, so a tenant
    # whose name server drops queries never has more than its share of the threads.
    monkeypatch.setattr(dispatcher_module, "DNS_THREADS", 4)
    monkeypatch.setattr(dispatcher_module, "DNS_PER_TENANT", 2)
    sender = dispatcher_resolving_slowly(runtime, monkeypatch, seconds=3, name="dns-slots-test")

    async def look_ups() -> float:
        for round_ in range(3):  # each delivery gives up after 0.3 s, and the tenant tries again
            cut_off = [
                asyncio.wait_for(sender._look_up("a", urls.parse(f"http://slow{round_}{n}.example/hook")), 0.3)
                for n in range(2)
            ]
            await asyncio.gather(*cut_off, return_exceptions=True)
        started = time.monotonic()
        await sender._look_up("b", urls.parse("http://fast.example/hook"))
        return time.monotonic() - started

    try:
        took = asyncio.run(look_ups())
    finally:
        sender._resolving.shutdown(wait=True)
    assert took < 1.0, took


def test_a_connect_timeout_goes_on_to_the_next_permitted_address(runtime, receiver, monkeypatch):
    # An address that takes no connections: a listening socket whose queue of connections not yet
    # accepted is full. The kernel drops further SYNs, so a connect waits until its timeout, as it
    # does to a host that is down or behind a firewall that drops packets.
    silent = socket.socket()
    fillers: list[socket.socket] = []
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        port = silent.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        with pytest.raises(TimeoutError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        healthy = receiver(host="127.0.0.2", port=port)

        def resolver(host, port, *args, **kwargs):
            # The receiver's name has two addresses, the silent one first.
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("127.0.0.1", "127.0.0.2")
            ]

        monkeypatch.setattr(urls, "resolve", functools.partial(destinations.resolve, resolver=resolver))
        allowed = destinations.DestinationPolicy(destinations.parse_allowed("127.0.0.1,127.0.0.2"))
        settings = replace(runtime.settings, destinations=allowed, webhook_timeout_seconds=1.0)
        sender = Dispatcher(settings, runtime.db, runtime.cipher, name="connect-timeout-test")
        recorded: dict[str, Outcome] = {}
        monkeypatch.setattr(sender, "_record", lambda delivery, outcome: recorded.update({delivery.id: outcome}))
        secret = runtime.cipher.encrypt(signing.new_secret())
        delivery = Claimed("two", "wh_two", "a", "message.created", {}, f"http://two.example:{port}/hook", secret)

        async def deliver() -> None:
            # Timeouts as the dispatcher sets them: the connect timeout is the request timeout.
            timeout = httpx.Timeout(settings.webhook_timeout_seconds, connect=settings.webhook_timeout_seconds)
            async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
                sender._client = client
                await sender._deliver(delivery)

        asyncio.run(deliver())
        assert recorded["two"].status_code == 204, recorded["two"]
        assert len(healthy.requests) == 1
    finally:
        for filler in fillers:
            filler.close()
        silent.close()
