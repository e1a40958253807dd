"""GET /api/events against a real `email-service serve` and real PostgreSQL.

Changes are produced the way every writer produces them: ``record(...)`` inside a tenant
transaction, committed (or rolled back) by that transaction.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from helpers import ServiceProcess, User, account_body, assert_error_shape, libpq_url, service_env

from email_service.changes.log import Entry, record
from email_service.models import ChangeEntity, ChangeKind
from email_service.runtime import Runtime

HEARTBEAT_SECONDS = 1
MAX_CATCH_UP = 20
MAX_STREAMS_PER_USER = 10


@pytest.fixture(scope="module")
def service(backing, tmp_path_factory):
    env = service_env(
        backing,
        EMAIL_SERVICE_EVENTS_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
        EMAIL_SERVICE_EVENTS_MAX_CATCH_UP=str(MAX_CATCH_UP),
        EMAIL_SERVICE_EVENTS_MAX_STREAMS_PER_USER=str(MAX_STREAMS_PER_USER),
        EMAIL_SERVICE_VALIDATE_RESPONSES="true",
    )
    proc = ServiceProcess(env, tmp_path_factory.mktemp("events"), "--no-embedded-worker")
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


class Stream:
    """One SSE connection read in a thread: parsed events and raw lines, with their arrival times."""

    def __init__(self, service: ServiceProcess, headers: dict, params: dict | None = None, last_id: str | None = None):
        self.headers = dict(headers)
        if last_id is not None:
            self.headers["Last-Event-ID"] = last_id
        self.url, self.params = service.url + "/api/events", params or {}
        self.events: queue.Queue = queue.Queue()
        self.comments: queue.Queue = queue.Queue()
        self.status: int | None = None
        self.error_body: str | None = None
        self._opened = threading.Event()
        self._stop = threading.Event()
        self.ended = threading.Event()  # the server ended the response
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._opened.wait(15), "no response to GET /api/events"

    def _run(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=HEARTBEAT_SECONDS * 5)) as client,
                client.stream("GET", self.url, headers=self.headers, params=self.params) as response,
            ):
                self.status = response.status_code
                self.content_type = response.headers.get("content-type", "")
                if response.status_code != 200:
                    self.error_body = response.read().decode()
                    self._opened.set()
                    return
                self._opened.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith(":"):
                        self.comments.put((time.monotonic(), line))
                    elif line == "":
                        if fields:
                            self.events.put(
                                {
                                    "event": fields.get("event", "message"),
                                    "id": fields.get("id"),
                                    "data": json.loads(fields["data"]),
                                    "received": time.monotonic(),
                                }
                            )
                        fields = {}
                    else:
                        name, _, value = line.partition(":")
                        fields[name] = value[1:] if value.startswith(" ") else value
                self.ended.set()
        finally:
            self._opened.set()

    def next(self, timeout: float = 5) -> dict:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout}s") from None

    def ready(self) -> dict:
        event = self.next()
        assert event["event"] == "ready", event
        return event

    def assert_quiet(self, seconds: float) -> None:
        try:
            event = self.events.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected event {event}")

    def close(self) -> None:
        self._stop.set()
        # The reader notices at the next line; heartbeats make sure one comes.
        self._thread.join(HEARTBEAT_SECONDS * 5)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_account(service: ServiceProcess, user: User) -> str:
    response = httpx.post(service.url + "/api/accounts", json=account_body(), headers=user.headers, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["id"]


class Rollback(Exception):
    pass


def commit(runtime: Runtime, user: User, account_id: str, *ids: str, rollback: bool = False, **kw) -> int | None:
    """Record one message.created entry per id in one transaction; its last sequence number."""
    entries = [
        Entry(
            ChangeEntity(kw.get("entity", "message")),
            entity_id,
            ChangeKind(kw.get("kind", "created")),
            kw.get("folder", "folder-1"),
            kw.get("detail", {}),
        )
        for entity_id in ids
    ]
    with runtime.db.tenant_session(user.principal) as session:
        last = record(session, user.principal, account_id, entries)
        if rollback:
            raise Rollback
    return last


def test_a_committed_change_arrives_within_a_second(service, runtime, user):
    account = create_account(service, user)
    with Stream(service, user.headers) as stream:
        assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
        ready = stream.ready()
        assert ready["data"] == {"accounts": [account]} and ready["id"]
        commit(
            runtime,
            user,
            account,
            "msg-1",
            kind="updated",
            folder="inbox-1",
            detail={"flags": {"added": ["\\Seen"]}},
        )
        committed = time.monotonic()
        event = stream.next()
        assert event["received"] - committed < 1.0
        assert event["event"] == "message.updated"
        data = event["data"]
        assert data["accountId"] == account and data["entity"] == "message" and data["id"] == "msg-1"
        assert data["folderId"] == "inbox-1" and data["detail"] == {"flags": {"added": ["\\Seen"]}}
        assert data["seq"] == 1 and data["at"].endswith("Z")
        assert event["id"] != ready["id"]
        commit(runtime, user, account, "fld-9", entity="folder", kind="destroyed", folder=None)
        folder_event = stream.next(1)
        assert folder_event["event"] == "folder.destroyed" and folder_event["data"]["seq"] == 2


def test_a_rolled_back_transaction_produces_nothing(service, runtime, user):
    account = create_account(service, user)
    with Stream(service, user.headers) as stream:
        stream.ready()
        with pytest.raises(Rollback):
            commit(runtime, user, account, "never-1", "never-2", rollback=True)
        stream.assert_quiet(1.0)
        commit(runtime, user, account, "after")
        event = stream.next()
        # The rolled-back entries took no sequence numbers either.
        assert (event["data"]["id"], event["data"]["seq"]) == ("after", 1)


def test_other_users_and_other_tenants_changes_never_appear(service, runtime, make_user, verifier):
    alice = make_user()
    colleague = alice.colleague(verifier)
    stranger = make_user()
    mine = create_account(service, alice)
    theirs = create_account(service, colleague)
    foreign = create_account(service, stranger)
    with (
        Stream(service, alice.headers) as alice_stream,
        Stream(service, colleague.headers) as colleague_stream,
    ):
        alice_stream.ready()
        colleague_stream.ready()
        commit(runtime, colleague, theirs, "colleague-msg")
        commit(runtime, stranger, foreign, "stranger-msg")
        commit(runtime, alice, mine, "alice-msg")
        assert alice_stream.next()["data"]["id"] == "alice-msg"
        alice_stream.assert_quiet(1.0)
        assert colleague_stream.next()["data"]["id"] == "colleague-msg"
        colleague_stream.assert_quiet(0.5)


def test_account_id_filters_the_stream(service, runtime, user):
    first, second = create_account(service, user), create_account(service, user)
    with Stream(service, user.headers, params={"accountId": first}) as stream:
        assert stream.ready()["data"] == {"accounts": [first]}
        commit(runtime, user, second, "elsewhere")
        commit(runtime, user, first, "here")
        event = stream.next()
        assert (event["data"]["accountId"], event["data"]["id"]) == (first, "here")
        stream.assert_quiet(1.0)


def test_last_event_id_resumes_exactly_where_the_client_stopped(service, runtime, user):
    first, second = create_account(service, user), create_account(service, user)
    with Stream(service, user.headers) as stream:
        stream.ready()
        commit(runtime, user, first, "a1", "a2", "a3")
        seen = stream.next()
        assert seen["data"]["id"] == "a1"
    # Disconnected after a1: a2 and a3 were sent but not taken; more commits while away.
    commit(runtime, user, second, "b1")
    commit(runtime, user, first, "a4")
    commit(runtime, user, second, "b2")
    with Stream(service, user.headers, last_id=seen["id"]) as resumed:
        resumed.ready()
        got = [resumed.next() for _ in range(5)]
        resumed.assert_quiet(1.0)
    by_account: dict[str, list[str]] = {}
    for event in got:
        by_account.setdefault(event["data"]["accountId"], []).append(event["data"]["id"])
    assert by_account == {first: ["a2", "a3", "a4"], second: ["b1", "b2"]}
    # Resuming from the last event gets nothing again; new commits still arrive.
    with Stream(service, user.headers, last_id=got[-1]["id"]) as again:
        again.ready()
        again.assert_quiet(1.0)
        commit(runtime, user, first, "a5")
        assert again.next()["data"]["id"] == "a5"


def test_a_client_too_far_behind_is_told_to_resync(service, runtime, user):
    account = create_account(service, user)
    with Stream(service, user.headers) as stream:
        position = stream.ready()["id"]
    commit(runtime, user, account, *[f"bulk-{n}" for n in range(MAX_CATCH_UP + 5)])
    with Stream(service, user.headers, last_id=position) as resumed:
        resumed.ready()
        event = resumed.next()
        assert event["event"] == "resync"
        assert event["data"] == {
            "accountId": account,
            "seq": MAX_CATCH_UP + 5,
            "reason": "too_far_behind",
            "missed": MAX_CATCH_UP + 5,
        }
        resumed.assert_quiet(0.5)
        commit(runtime, user, account, "next")
        following = resumed.next()
        assert (following["data"]["id"], following["data"]["seq"]) == ("next", MAX_CATCH_UP + 6)
    # The resync event's id is a position at the head: resuming from it replays nothing.
    with Stream(service, user.headers, last_id=event["id"]) as after_resync:
        after_resync.ready()
        assert after_resync.next()["data"]["id"] == "next"
        after_resync.assert_quiet(0.5)


def test_heartbeats_keep_an_idle_stream_alive(service, user):
    with Stream(service, user.headers) as stream:
        stream.ready()
        started = time.monotonic()
        arrived, line = stream.comments.get(timeout=HEARTBEAT_SECONDS * 3)
        assert line.startswith(":") and arrived - started <= HEARTBEAT_SECONDS * 2.5
        stream.comments.get(timeout=HEARTBEAT_SECONDS * 3)


def test_a_stream_ends_when_its_token_expires(service, runtime, verifier, user):
    account = create_account(service, user)
    token = verifier.issue(user.principal.tenant_id, user.principal.user_id, 3, time.time())
    with Stream(service, {"Authorization": f"Bearer {token}"}) as stream:
        stream.ready()
        opened = time.monotonic()
        commit(runtime, user, account, "before-expiry")
        assert stream.next()["data"]["id"] == "before-expiry"
        assert stream.ended.wait(8), "the stream outlived its token"
        assert time.monotonic() - opened > 1


def test_header_authentication_opens_a_stream_too(service, user):
    headers = {
        "X-Auth-Token": user.token,
        "X-Tenant-ID": str(user.principal.tenant_id),
        "X-User-ID": str(user.principal.user_id),
    }
    with Stream(service, headers) as stream:
        assert stream.status == 200
        stream.ready()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"Authorization": "Bearer not-a-jwt"}, id="bad-token"),
        pytest.param({"X-Auth-Token": "not-a-jwt", "X-Tenant-ID": "x", "X-User-ID": "y"}, id="bad-header-token"),
    ],
)
def test_a_stream_without_valid_credentials_is_401(service, headers):
    response = httpx.get(service.url + "/api/events", headers=headers, timeout=10)
    body = assert_error_shape(response, 401, "UNAUTHORIZED")
    assert body["message"] == "Missing or invalid authentication credentials"


def test_someone_elses_or_an_unknown_account_is_404(service, make_user, verifier):
    owner, other = make_user(), make_user()
    account = create_account(service, owner)
    colleague = owner.colleague(verifier)
    # An id with a NUL names nothing either (PostgreSQL text cannot hold one): 404, not a 500.
    for who, account_id in ((other, account), (colleague, account), (owner, "no-such-account"), (owner, "#m\x00")):
        response = httpx.get(service.url + "/api/events", params={"accountId": account_id}, headers=who.headers)
        assert_error_shape(response, 404, "ACCOUNT_NOT_FOUND")


def test_bad_parameters_are_400(service, user):
    for params, headers in (
        ({"accountId": ""}, {}),
        ({"unknown": "1"}, {}),
    ):
        with httpx.stream(
            "GET", service.url + "/api/events", params=params, headers={**user.headers, **headers}, timeout=10
        ) as response:
            assert response.status_code == 400, (params, headers, response.status_code)
            response.read()
            assert_error_shape(response, 400)


def test_opening_streams_is_rate_limited_per_user(service, user, make_user):
    limit = None
    with httpx.Client(timeout=10) as client:
        for _ in range(100):
            with client.stream("GET", service.url + "/api/events", headers=user.headers) as response:
                if response.status_code == 429:
                    response.read()
                    body = assert_error_shape(response, 429, "RATE_LIMITED")
                    assert int(response.headers["Retry-After"]) >= 1 and "try again" in body["message"]
                    break
                assert response.status_code == 200
                limit = int(response.headers["X-RateLimit-Limit"])
        else:
            raise AssertionError("never limited")
    assert limit == 20
    # Another user has a counter of their own.
    with Stream(service, make_user().headers) as stream:
        assert stream.status == 200


def test_open_streams_per_user_are_capped(service, user, make_user):
    streams = [Stream(service, user.headers) for _ in range(MAX_STREAMS_PER_USER)]
    try:
        for stream in streams:
            stream.ready()
        with httpx.stream("GET", service.url + "/api/events", headers=user.headers, timeout=10) as response:
            response.read()
            assert_error_shape(response, 429, "TOO_MANY_STREAMS")
        with Stream(service, make_user().headers) as other:
            assert other.status == 200
    finally:
        for stream in streams:
            stream._stop.set()
        for stream in streams:
            stream.close()
    # Closed streams free their places (once the server has seen the disconnects).
    deadline = time.monotonic() + 10
    while True:
        with Stream(service, user.headers) as again:
            if again.status == 200 or time.monotonic() > deadline:
                assert again.status == 200, again.error_body
                break
        time.sleep(0.5)


def test_open_streams_do_not_hold_request_threads(service, runtime, make_user):
    """Flask has 10 request threads: 50 streams held in them would stop every other request."""
    users = [make_user() for _ in range(10)]
    accounts = [create_account(service, u) for u in users]
    streams = [Stream(service, u.headers) for u in users for _ in range(5)]
    try:
        for stream in streams:
            assert stream.status == 200
            stream.ready()

        def list_accounts(u: User) -> int:
            return httpx.get(service.url + "/api/accounts", headers=u.headers, timeout=10).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = list(pool.map(list_accounts, users * 3))
        assert statuses == [200] * 30
        assert time.monotonic() - started < 10
        # And every one of the 50 streams is still live.
        for u, account in zip(users, accounts, strict=True):
            commit(runtime, u, account, "fan-out")
        for stream in streams:
            assert stream.next()["data"]["id"] == "fan-out"
    finally:
        for stream in streams:
            stream._stop.set()
        for stream in streams:
            stream.close()


def test_a_lost_listen_connection_loses_no_change(service, runtime, backing, user):
    """Commits made while the process has no LISTEN in place still reach the stream, once."""
    account = create_account(service, user)
    with Stream(service, user.headers) as stream:
        stream.ready()
        with psycopg.connect(libpq_url(backing.database_url), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'email_service_listen'"
            ).fetchone()[0]
        assert killed == 1
        # Right away, before the service can have listened again: the notification goes nowhere.
        commit(runtime, user, account, "while-deaf")
        event = stream.next(timeout=10)
        assert (event["data"]["id"], event["data"]["seq"]) == ("while-deaf", 1)
        commit(runtime, user, account, "after")
        assert stream.next()["data"]["id"] == "after"
        stream.assert_quiet(0.5)


def test_stopping_the_server_ends_open_streams(backing, tmp_path, user):
    """uvicorn waits for open responses on SIGTERM; an endless stream must not hold it up."""
    server = ServiceProcess(service_env(backing), tmp_path, "--no-embedded-worker")
    try:
        server.wait_healthy()
        stream = Stream(server, user.headers)
        stream.ready()
        started = time.monotonic()
        assert server.stop(timeout=20) == 0
        assert time.monotonic() - started < 15
        assert stream.ended.wait(5)
    finally:
        server.stop()


def test_an_event_id_this_service_never_issued_starts_from_now_with_a_resync(service, runtime, user):
    # A browser's EventSource reconnects with whatever id it last saw; a 400 would leave it
    # failing for ever, so the stream opens and tells the client to resync instead.
    account_id = create_account(service, user)
    for committed, bogus in enumerate(("not-an-id-we-issued", "p1.!!!", "0" * 900)):
        with Stream(service, user.headers, last_id=bogus) as stream:
            assert stream.ready()["data"] == {"accounts": [account_id]}
            resync = stream.next()
            assert resync["event"] == "resync"
            expected = {"accountId": account_id, "seq": committed, "reason": "unknown_position", "missed": 0}
            assert resync["data"] == expected
            commit(runtime, user, account_id, f"after-{len(bogus)}")
            assert stream.next()["data"]["id"] == f"after-{len(bogus)}"


def test_a_position_ahead_of_the_log_is_told_to_resync(service, runtime, backing, user):
    # The client saw entries 1-3; the database then lost the last two (a restore from backup, a
    # failover to a replica that lagged). Its copy holds changes the service no longer has, so
    # like the changes feed's CURSOR_UNKNOWN it is told to reload the account.
    account, other = create_account(service, user), create_account(service, user)
    with Stream(service, user.headers) as stream:
        stream.ready()
        commit(runtime, user, account, "kept", "lost-1", "lost-2")
        seen = [stream.next() for _ in range(3)]
    with psycopg.connect(libpq_url(backing.database_url), autocommit=True) as admin, admin.transaction():
        admin.execute("DELETE FROM changes WHERE account_id = %s AND seq > 1", (account,))
        admin.execute("UPDATE accounts SET change_seq = 1 WHERE id = %s", (account,))
    with Stream(service, user.headers, last_id=seen[-1]["id"]) as resumed:
        resumed.ready()
        resync = resumed.next()
        assert resync["event"] == "resync"
        assert resync["data"] == {"accountId": account, "seq": 1, "reason": "unknown_position", "missed": 0}
        resumed.assert_quiet(0.5)  # the other account is where the client left it
        commit(runtime, user, account, "new")
        new = resumed.next()
        assert (new["data"]["id"], new["data"]["seq"]) == ("new", 2)
        commit(runtime, user, other, "other")
        assert resumed.next()["data"]["id"] == "other"
