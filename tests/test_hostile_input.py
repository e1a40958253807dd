"""Hostile requests against the running service (`email-service serve` under uvicorn).

Every one must end in a clean 4xx ErrorResponse that names the field and the rule, never a 500,
a trace in the log, the JSON schema, or the caller's input echoed back.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from contract_hooks import CLI_CONFIG, OAUTH2_ENV
from helpers import JWT_SECRET, ServiceProcess, User, account_body, assert_error_shape, libpq_url, service_env
from psycopg import sql
from sqlalchemy.engine import make_url

from email_service import migrate


@pytest.fixture(scope="module")
def service(backing, tmp_path_factory):
    process = ServiceProcess(service_env(backing), tmp_path_factory.mktemp("hostile"))
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture
def api(service):
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def raw_request(service: ServiceProcess, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client library normalises them); the status and the whole answer.

    Sending stops once the server answers, as a server that refuses early closes the connection.
    """
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        for start in range(0, len(data), 65536):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(data[start : start + 65536])
            except (BrokenPipeError, ConnectionResetError):
                break
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    return int(answer.split(b" ", 2)[1]), answer


def assert_no_echo(body: dict) -> None:
    """No schema dump, no trace: the message is one short line."""
    message = body["message"]
    assert "Failed validating" not in message and "schema" not in message.lower(), message
    assert "\n" not in message and len(message) < 200, message


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("limit=-5", "query parameter limit must be at least 1"),
        ("limit=0", "query parameter limit must be at least 1"),
        ("limit=100000", "query parameter limit must be at most 1000"),
        ("limit=abc", "query parameter limit must be of type integer"),
        ("offset=-1", "query parameter offset must be at least 0"),
    ],
)
def test_query_errors_name_the_parameter_and_the_rule(api, verifier, query, expected):
    body = assert_error_shape(api.get(f"/api/accounts?{query}", headers=User(verifier).headers), 400)
    assert body["message"] == expected
    assert_no_echo(body)


def test_unknown_query_parameters_are_named_briefly(api, verifier):
    name = "x" * 5000
    body = assert_error_shape(api.get(f"/api/accounts?{name}=1", headers=User(verifier).headers), 400)
    assert body["message"].startswith("unknown query parameter: xxxx")
    assert_no_echo(body)


def test_long_ids_and_paths_are_not_mirrored(api, verifier):
    user = User(verifier)
    long_id = "c" * 3000
    for path in (f"/api/accounts/{long_id}", f"/api/{long_id}/folders", f"/no/such/{long_id}"):
        response = api.get(path, headers=user.headers)
        body = assert_error_shape(response, 404)
        assert long_id not in response.text and len(body["message"]) <= 240


HOSTILE_BODIES = {
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "nested-just-over-the-limit": b'{"accountName":' + b"[" * 40 + b"]" * 40 + b"}",
    "lone-surrogate": b'{"accountName": "\\ud800", "emailAddress": "a@example.com"}',
    "lone-surrogate-key": b'{"\\udfff": 1}',
    "huge-integer": b'{"port": ' + b"9" * 5000 + b"}",
    "truncated": b'{"accountName": "x", ',
    "not-utf8": b'{"accountName": "\xc3\x28"}',
    "nul-bytes": b"\x00" * 100,
}


@pytest.mark.parametrize("raw", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_hostile_json_bodies_are_400_without_a_trace(api, service, verifier, raw):
    response = api.post(
        "/api/accounts", content=raw, headers={**User(verifier).headers, "Content-Type": "application/json"}
    )
    body = assert_error_shape(response, 400)
    assert_no_echo(body)
    assert "Traceback" not in service.log()


def test_a_lone_surrogate_in_an_update_is_400(api, service, verifier):
    user = User(verifier)
    account = api.post("/api/accounts", json=account_body(), headers=user.headers).json()
    response = api.put(
        f"/api/accounts/{account['id']}",
        content=b'{"accountName": "ok\\udc80"}',
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert_error_shape(response, 400)
    assert api.get(f"/api/accounts/{account['id']}", headers=user.headers).json()["accountName"] == "Work Email"
    assert "Traceback" not in service.log()


def test_a_line_break_at_the_end_does_not_pass_a_pattern(api, verifier):
    # The spec's patterns end in $, which in ECMA 262 (JSON Schema's regex) ends the input; in
    # Python it also matches before a final newline, which let "bob\n" into a login line.
    user = User(verifier)
    account = api.post("/api/accounts", json=account_body(), headers=user.headers).json()
    for field, value in (("accountName", "Work\n"), ("username", "bob\n"), ("password", "secretpw\n")):
        assert_error_shape(api.put(f"/api/accounts/{account['id']}", json={field: value}, headers=user.headers), 400)
    assert api.get(f"/api/accounts/{account['id']}", headers=user.headers).json()["username"] == "user@example.com"
    # A label goes into IMAP commands as an atom: checked before the message is even looked up.
    labels = api.patch(
        f"/api/{account['id']}/messages/no-such-message", json={"labels": ["work\n"]}, headers=user.headers
    )
    assert_error_shape(labels, 400)
    since = api.get(f"/api/{account['id']}/changes", params={"since": "1\n"}, headers=user.headers)
    assert_error_shape(since, 400)


@pytest.mark.parametrize("path", ["/api/accounts/", "/api/accounts/abc/", "/health/", "/api/sync/task/x/"])
def test_trailing_slashes_answer_404_and_never_redirect_by_host(service, verifier, path):
    token = User(verifier).token
    status, answer = raw_request(
        service,
        f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert status == 404, answer[:300]
    assert b"evil.example" not in answer and b"location:" not in answer.lower()


def test_the_docs_redirect_is_relative(service):
    status, answer = raw_request(service, b"GET /docs HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert status == 307
    assert b"location: /docs/\r\n" in answer.lower() and b"evil.example" not in answer
    assert httpx.get(service.url + "/docs/", timeout=10).status_code == 200


def chunked(data: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_chunked_bodies_are_read(service, verifier):
    user = User(verifier)
    body = json.dumps(account_body(accountName="Chunked")).encode()
    head = (
        f"POST /api/accounts HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {user.token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    status, answer = raw_request(service, head + chunked(body))
    assert status == 201, answer[-500:]
    listed = httpx.get(service.url + "/api/accounts", headers=user.headers, timeout=10).json()
    assert [a["accountName"] for a in listed["accounts"]] == ["Chunked"]


def test_chunked_bodies_over_the_limit_are_413(api, verifier):
    def chunks():
        yield b'{"accountName": "'
        for _ in range(40):
            yield b"x" * 65536

    response = api.post(
        "/api/accounts", content=chunks(), headers={**User(verifier).headers, "Content-Type": "application/json"}
    )
    assert_error_shape(response, 413, "PAYLOAD_TOO_LARGE")


def test_chunked_uploads_are_read(api, verifier):
    user = User(verifier)
    account = api.post("/api/accounts", json=account_body(), headers=user.headers).json()
    boundary = "b0undary"
    payload = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nhello chunked\r\n--{boundary}--\r\n"
    ).encode()

    def chunks():
        for i in range(0, len(payload), 10):
            yield payload[i : i + 10]

    response = api.post(
        f"/api/{account['id']}/attachments",
        content=chunks(),
        headers={**user.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["size"] == len(b"hello chunked")


@pytest.mark.parametrize("size", [40_000, 10_600_000], ids=["40KB", "10.6MB"])
def test_header_blocks_over_the_limit_are_431(service, verifier, size):
    token = User(verifier).token
    head = f"GET /api/accounts HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
    padding = f"X-Padding: {'p' * size}\r\n"
    status, answer = raw_request(service, (head + padding + "Connection: close\r\n\r\n").encode())
    assert status == 431, answer[:300]
    header, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in header.lower()
    assert json.loads(body)["code"] == "HEADERS_TOO_LARGE"
    assert len(answer) < 1000
    # The service is still up and serves the next request.
    assert httpx.get(service.url + "/api/accounts", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_a_large_authorization_header_is_431(api, verifier):
    response = api.get("/api/accounts", headers={"Authorization": "Bearer " + "a" * 10_600_000})
    body = assert_error_shape(response, 431, "HEADERS_TOO_LARGE")
    assert body["message"] == "Request headers exceed 32768 bytes"


def test_headers_within_the_limit_are_served(api, verifier):
    headers = {**User(verifier).headers, "X-Padding": "p" * 20_000}
    assert api.get("/api/accounts", headers=headers).status_code == 200


def test_requests_that_are_not_http_get_an_error_response(service):
    status, answer = raw_request(service, b"GET /api/accounts HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n")
    assert status == 400
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == "VALIDATION_ERROR"


def token_for(claims: dict) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, JWT_SECRET, algorithm="HS256")


def test_a_bearer_token_with_identity_headers_of_another_user_is_401(api, verifier):
    alice, bob = User(verifier), User(verifier)
    api.post("/api/accounts", json=account_body(), headers=alice.headers)
    ids = {"X-Tenant-ID": str(bob.principal.tenant_id), "X-User-ID": str(bob.principal.user_id)}
    for headers in (
        {**alice.headers, **ids},
        {**alice.headers, "X-User-ID": str(bob.principal.user_id)},
        {**alice.headers, "X-Tenant-ID": str(bob.principal.tenant_id)},
        {**alice.headers, "X-User-ID": "not-a-uuid"},
        # Both schemes at once, for two users: neither identity is served.
        {**alice.headers, "X-Auth-Token": bob.token, **ids},
        {
            **alice.headers,
            "X-Auth-Token": bob.token,
            "X-Tenant-ID": str(alice.principal.tenant_id),
            "X-User-ID": str(alice.principal.user_id),
        },
    ):
        body = assert_error_shape(api.get("/api/accounts", headers=headers), 401, "UNAUTHORIZED")
        assert body["message"] == "Missing or invalid authentication credentials"
    own = {"X-Tenant-ID": str(alice.principal.tenant_id), "X-User-ID": str(alice.principal.user_id)}
    served = api.get("/api/accounts", headers={**alice.headers, **own, "X-Auth-Token": alice.token})
    assert served.status_code == 200 and served.json()["pagination"]["total"] == 1


def test_a_token_for_another_audience_is_401_when_none_is_configured(api):
    user = {"sub": str(uuid.uuid4()), "tenant_id": str(uuid.uuid4())}
    other = {"Authorization": f"Bearer {token_for({**user, 'aud': 'other-service'})}"}
    assert_error_shape(api.get("/api/accounts", headers=other), 401, "UNAUTHORIZED")
    plain = {"Authorization": f"Bearer {token_for(user)}"}
    assert api.get("/api/accounts", headers=plain).status_code == 200


def create_account(api: httpx.Client, user: User, address: str) -> httpx.Response:
    return api.post("/api/accounts", json=account_body(emailAddress=address), headers=user.headers)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("p\u0430ypal@example.com", "Cyrillic, Latin"),  # Cyrillic а in a Latin name
        ("\u03c1aypal@example.com", "Greek, Latin"),  # Greek ρ
        ("admin@ex\u0430mple.com", "Cyrillic, Latin"),  # in the domain
    ],
)
def test_look_alike_addresses_are_refused(api, verifier, address, problem):
    user = User(verifier)
    body = assert_error_shape(create_account(api, user, address), 400, "INVALID_EMAIL_FORMAT")
    assert "mixes scripts" in body["message"] and problem in body["message"]
    assert api.get("/api/accounts", headers=user.headers).json()["pagination"]["total"] == 0


def test_addresses_are_stored_in_one_canonical_form(api, verifier):
    user = User(verifier)
    fullwidth = create_account(api, user, "\uff4a\uff4f\uff48\uff4e@Example.COM")
    assert fullwidth.status_code == 201, fullwidth.text
    assert fullwidth.json()["emailAddress"] == "john@example.com"
    unicode_domain = create_account(api, user, "kunde@B\u00dcCHER.example")
    assert unicode_domain.json()["emailAddress"] == "kunde@xn--bcher-kva.example"
    # Other spellings of the same mailboxes are the same addresses.
    for spelling in (
        "JOHN@example.com",
        "john@EXAMPLE.com",
        "kunde@xn--bcher-kva.example",
        "Kunde@b\u00fccher.example",
    ):
        assert_error_shape(create_account(api, user, spelling), 409, "EMAIL_DUPLICATE")
    # Scripts used alone, or mixed as Japanese is written, are addresses like any other.
    for address in ("\u0438\u0432\u0430\u043d@example.com", "\u5c71\u7530\u305f\u308d\u3046@example.jp"):
        assert create_account(api, user, address).status_code == 201


def test_a_user_cannot_learn_a_colleagues_addresses(api, verifier):
    alice = User(verifier)
    bob = alice.colleague(verifier)
    assert create_account(api, alice, "ceo@example.com").status_code == 201
    theirs = create_account(api, bob, "CEO@example.com")
    assert theirs.status_code == 201, theirs.text
    bobs = api.get("/api/accounts", headers=bob.headers).json()["accounts"]
    alices = api.get("/api/accounts", headers=alice.headers).json()["accounts"]
    assert [a["emailAddress"] for a in bobs] == ["CEO@example.com"]
    assert [a["emailAddress"] for a in alices] == ["ceo@example.com"]


@pytest.fixture
def fresh_database(backing):
    name = f"email_service_migration_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(backing.database_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(backing.database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq_url(backing.database_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_the_migration_keys_existing_addresses_and_makes_them_unique_per_user(fresh_database, backing):
    tenant, alice, bob = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    insert = (
        "INSERT INTO accounts (id, tenant_id, user_id, account_name, email_address, {key}protocol, hostname,"
        " port, encryption, username, password_encrypted)"
        " VALUES (%s, %s, %s, 'n', %s, {value}'imap', 'h', 993, 'tls', 'u', '\\x00')"
    )
    migrate.upgrade(fresh_database, backing.db_app_role, "0005")
    with psycopg.connect(libpq_url(fresh_database), autocommit=True) as conn:
        conn.execute("SELECT set_config('app.maintenance', 'on', false)")
        conn.execute(insert.format(key="", value=""), ("a1", tenant, alice, "Boss@example.com"))
        conn.execute(insert.format(key="", value=""), ("a3", tenant, alice, "kunde@b\u00fccher.example"))
        conn.execute(insert.format(key="", value=""), ("a4", tenant, alice, "p\u0430ypal@example.com"))
        with pytest.raises(psycopg.errors.UniqueViolation):
            # Before: one address per tenant, whoever holds it.
            conn.execute(insert.format(key="", value=""), ("b1", tenant, bob, "boss@example.com"))
    migrate.upgrade(fresh_database, backing.db_app_role)
    with psycopg.connect(libpq_url(fresh_database), autocommit=True) as conn:
        conn.execute("SELECT set_config('app.maintenance', 'on', false)")
        keys = dict(conn.execute("SELECT id, email_key FROM accounts").fetchall())
        # Keyed as the service keys new addresses; a look-alike stored earlier is kept as it was.
        assert keys == {
            "a1": "boss@example.com",
            "a3": "kunde@xn--bcher-kva.example",
            "a4": "p\u0430ypal@example.com",
        }
        with_key = insert.format(key="email_key, ", value="%s, ")
        conn.execute(with_key, ("b1", tenant, bob, "boss@example.com", "boss@example.com"))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(with_key, ("a2", tenant, alice, "BOSS@example.com", "boss@example.com"))


@pytest.fixture(scope="module")
def unlimited_service(backing, tmp_path_factory):
    # Limits are tested on their own; here they would turn most generated requests into 429s.
    # So is the destination policy (tests/test_destinations.py): generated host names such as "0"
    # match the spec's pattern and would be refused, which schemathesis reads as valid data
    # rejected. It runs no worker: only its folder operations connect, to generated servers that do
    # not exist (contract_hooks.CLI_CONFIG), so it opens every address.
    env = service_env(
        backing,
        EMAIL_SERVICE_RATE_LIMITS="false",
        EMAIL_SERVICE_VALIDATE_RESPONSES="true",
        EMAIL_SERVICE_ALLOWED_DESTINATIONS="0.0.0.0/0,::/0",
        **OAUTH2_ENV,
    )
    process = ServiceProcess(env, tmp_path_factory.mktemp("schemathesis"))
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def test_schemathesis_with_every_check_and_the_stateful_phase_finds_nothing(unlimited_service, verifier, tmp_path):
    """The CLI against the running service, as a client's contract test would run it."""
    user = User(verifier)
    report = tmp_path / "report.json"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CLI_CONFIG)
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{unlimited_service.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {user.token}",
            "--checks",
            "all",
            # Not the coverage phase: its cases are derived from the spec alone, the same in every
            # run, and tests/test_schemathesis.py runs them against the same app with every check
            # (here they took three of every five minutes and found nothing the other run cannot).
            "--phases",
            "examples,fuzzing,stateful",
            "-n",
            "25",
            "--seed",
            "1",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        # schemathesis keeps a cache in its working directory; not in the repository's.
        cwd=tmp_path,
        # The same changes to generated requests as tests/test_schemathesis.py makes (contract_hooks).
        env={**os.environ, "SCHEMATHESIS_HOOKS": "cli_hooks", "PYTHONPATH": str(Path(__file__).parent)},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Traceback" not in unlimited_service.log()
    # It reached real resources, not only 401s: accounts were created through it (the stateful
    # phase may delete every one of them again, so the service's access log is the witness).
    assert "email_service.access: POST /api/accounts 201 " in unlimited_service.log()


def test_upload_form_errors_name_the_field_without_echoing_it(api, service, verifier):
    user = User(verifier)
    account = api.post("/api/accounts", json=account_body(), headers=user.headers).json()
    long_name = "n" * 3000
    unknown = api.post(
        f"/api/{account['id']}/attachments",
        files={"file": ("a.txt", b"hello", "text/plain")},
        data={long_name: "x"},
        headers=user.headers,
    )
    body = assert_error_shape(unknown, 400)
    assert body["message"].startswith("unknown form field: nnnn") and long_name not in unknown.text
    misnamed = api.post(
        f"/api/{account['id']}/attachments", files={"other": ("a.txt", b"hello", "text/plain")}, headers=user.headers
    )
    assert assert_error_shape(misnamed, 400)["message"] == "unknown form field: other"
    assert long_name not in service.log()


ODD_REQUESTS = {
    "bad-percent-in-query-value": ("GET", "/api/accounts?limit=%ff", {}, b""),
    "bad-percent-in-query-name": ("GET", "/api/accounts?%ff%fe=1", {}, b""),
    "bad-percent-in-path": ("GET", "/api/accounts/%ff%fe", {}, b""),
    "nul-in-path": ("GET", "/api/accounts/%00", {}, b""),
    "float-for-integer": ("GET", "/api/accounts?limit=1e3", {}, b""),
    "repeated-parameter": ("GET", "/api/accounts?limit=1&limit=x", {}, b""),
    "latin1-identity-header": ("GET", "/api/accounts", {"X-User-ID": "\xff\xfe"}, b""),
    "odd-charset": (
        "POST",
        "/api/accounts",
        {"Content-Type": "application/json; charset=utf-7"},
        b'{"accountName": "+AGEAYgBj-"}',
    ),
    "unknown-charset": ("POST", "/api/accounts", {"Content-Type": "application/json; charset=nope"}, b"{}"),
    "json-null": ("POST", "/api/accounts", {"Content-Type": "application/json"}, b"null"),
    "json-nan": ("POST", "/api/accounts", {"Content-Type": "application/json"}, b'{"port": NaN}'),
    "json-infinity": ("POST", "/api/accounts", {"Content-Type": "application/json"}, b'{"port": 1e999}'),
    "bom": ("POST", "/api/accounts", {"Content-Type": "application/json"}, b'\xef\xbb\xbf{"accountName": "x"}'),
    "negative-length": ("POST", "/api/accounts", {"Content-Type": "application/json", "Content-Length": "-1"}, b""),
}


@pytest.mark.parametrize("request_parts", list(ODD_REQUESTS.values()), ids=list(ODD_REQUESTS))
def test_odd_requests_get_a_clean_4xx(service, verifier, request_parts):
    method, target, headers, body = request_parts
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {User(verifier).token}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if "Content-Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    status, answer = raw_request(service, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    assert 400 <= status < 500, answer[:500]
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), answer[:500]
    message = json.loads(payload)["message"]
    assert "schema" not in message.lower() and "\n" not in message
    assert "Traceback" not in service.log()


def test_the_header_limit_holds_under_any_server(client, verifier):
    """The app checks parsed headers itself, for servers other than `serve`'s bounded h11 parser."""
    headers = {**User(verifier).headers, "X-Padding": "p" * 40_000}
    body = assert_error_shape(client.get("/api/accounts", headers=headers), 431, "HEADERS_TOO_LARGE")
    assert body["message"] == "Request headers exceed 32768 bytes"
