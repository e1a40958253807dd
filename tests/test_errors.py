"""Every error is the seed's ErrorResponse: validation, routing, size, media type, faults."""

from __future__ import annotations

import json
from dataclasses import replace

import anyio
import pytest
from helpers import account_body, assert_error_shape
from starlette.exceptions import HTTPException

from email_service.api.app import create_app
from email_service.api.body_limit import BodyLimitMiddleware
from email_service.runtime import Runtime


def test_validation_errors(client, user):
    missing = client.post("/api/accounts", json={"accountName": "x"}, headers=user.headers)
    assert "required" in assert_error_shape(missing, 400, "VALIDATION_ERROR")["message"]
    wrong_type = client.post("/api/accounts", json=account_body(port="993"), headers=user.headers)
    assert "port" in assert_error_shape(wrong_type, 400)["message"]
    out_of_range = client.post("/api/accounts", json=account_body(port=70000), headers=user.headers)
    assert "port" in assert_error_shape(out_of_range, 400)["message"]
    bad_enum = client.post("/api/accounts", json=account_body(protocol="smtp"), headers=user.headers)
    assert "protocol" in assert_error_shape(bad_enum, 400)["message"]
    assert_error_shape(client.get("/api/accounts?limit=0", headers=user.headers), 400)
    assert_error_shape(client.get("/api/accounts?limit=abc", headers=user.headers), 400)
    assert_error_shape(client.get("/api/accounts?unknown=1", headers=user.headers), 400)
    assert client.get("/api/accounts", headers=user.headers).json()["pagination"]["total"] == 0


def test_malformed_bodies(client, user):
    headers = {**user.headers, "Content-Type": "application/json"}
    assert (
        "JSON"
        in assert_error_shape(client.post("/api/accounts", content=b"{not json", headers=headers), 400)["message"]
    )
    assert (
        "UTF-8"
        in assert_error_shape(client.post("/api/accounts", content=b'{"a": "\xff"}', headers=headers), 400)["message"]
    )
    assert_error_shape(client.post("/api/accounts", content=b"", headers=headers), 400)
    assert_error_shape(client.post("/api/accounts", content=b"[1, 2]", headers=headers), 400)


def test_malformed_multipart_is_400(client, user):
    account = client.post("/api/accounts", json=account_body(), headers=user.headers).json()
    response = client.post(
        f"/api/{account['id']}/attachments",
        content=b"--b\r\nnot a part--b--\r\n",
        headers={**user.headers, "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_error_shape(response, 400)


def test_head_answers_as_get_does_without_a_body(client, user):
    # With response validation on, the empty body of a HEAD failed the JSON schema: a 500.
    created = client.post("/api/accounts", json=account_body(), headers=user.headers)
    assert created.status_code == 201, created.text
    for path in ("/health", "/api/accounts", f"/api/accounts/{created.json()['id']}"):
        got, head = client.get(path, headers=user.headers), client.head(path, headers=user.headers)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"]
    assert_error_shape(client.get("/api/accounts/nope", headers=user.headers), 404)
    assert client.head("/api/accounts/nope", headers=user.headers).status_code == 404


def test_unknown_route_is_404(client, user):
    assert_error_shape(client.get("/no/such/thing"), 404, "NOT_FOUND")
    assert_error_shape(client.get("/api/accounts/a/b/c", headers=user.headers), 404, "NOT_FOUND")


def test_wrong_method_is_405_with_every_allowed_method(client, user):
    response = client.patch("/api/accounts/abc", json={}, headers=user.headers)
    assert_error_shape(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["Allow"] == "DELETE, GET, PUT"
    collection = client.delete("/api/accounts", headers=user.headers)
    assert_error_shape(collection, 405)
    assert collection.headers["Allow"] == "GET, POST"


def test_oversized_body_is_413(client, user):
    big = account_body(accountName="x" * 200, password="p" * 2_000_000)
    assert_error_shape(client.post("/api/accounts", json=big, headers=user.headers), 413, "PAYLOAD_TOO_LARGE")

    def chunks():
        for _ in range(40):
            yield b" " * 65536

    # A chunked body has no Content-Length: the bytes that arrive are counted against the limit.
    chunked = client.post(
        "/api/accounts", content=chunks(), headers={**user.headers, "Content-Type": "application/json"}
    )
    assert_error_shape(chunked, 413, "PAYLOAD_TOO_LARGE")


def test_body_limit_counts_bytes_of_a_body_without_length():
    received = []

    async def reader(scope, receive, send):
        while True:
            message = await receive()
            received.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                return

    async def chunked_receive():
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    middleware = BodyLimitMiddleware(reader, max_bytes=2500)
    scope = {"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}
    with pytest.raises(HTTPException) as raised:
        anyio.run(middleware, scope, chunked_receive, None)
    assert raised.value.status_code == 413
    assert sum(received) <= 2500


def test_wrong_media_type_is_415(client, user):
    response = client.post(
        "/api/accounts", content=b"accountName=x", headers={**user.headers, "Content-Type": "text/plain"}
    )
    assert_error_shape(response, 415, "UNSUPPORTED_MEDIA_TYPE")


def test_a_json_body_without_a_content_type_is_read_as_json(client, user):
    # Many HTTP clients send a body given as a string with no Content-Type at all; the body is
    # checked as the operation's JSON, so the handler must receive that JSON, not raw bytes.
    body = account_body(accountName="No content type")
    created = client.post("/api/accounts", content=json.dumps(body), headers=user.headers)
    assert created.status_code == 201, created.text
    account = created.json()
    assert account["accountName"] == "No content type"
    renamed = client.put(
        f"/api/accounts/{account['id']}", content=json.dumps({"accountName": "Renamed"}), headers=user.headers
    )
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["accountName"] == "Renamed"
    invalid = client.post("/api/accounts", content=json.dumps({"accountName": "x"}), headers=user.headers)
    assert "required" in assert_error_shape(invalid, 400, "VALIDATION_ERROR")["message"]
    # A form cannot be read without a Content-Type that names its boundary.
    upload = client.post(f"/api/{account['id']}/attachments", content=b"hello", headers=user.headers)
    assert_error_shape(upload, 415, "UNSUPPORTED_MEDIA_TYPE")
    no_boundary = client.post(
        f"/api/{account['id']}/attachments",
        content=b"hello",
        headers={**user.headers, "Content-Type": "multipart/form-data"},
    )
    assert_error_shape(no_boundary, 400)


@pytest.fixture
def broken_client(backing, request):
    """An app whose dependency named by the test parameter cannot be reached."""
    broken = {"database_url": "postgresql://nobody@127.0.0.1:1/none", "redis_url": "redis://127.0.0.1:1/0"}
    runtime = Runtime.build(replace(backing, **{request.param: broken[request.param]}))
    with create_app(runtime).test_client() as client:
        yield client
    runtime.close()


@pytest.mark.parametrize("broken_client", ["database_url"], indirect=True)
def test_database_outage_is_500_without_details_and_health_is_503(broken_client, user, caplog):
    response = broken_client.get("/api/accounts", headers=user.headers)
    body = assert_error_shape(response, 500, "INTERNAL_ERROR")
    assert "127.0.0.1" not in response.text and "psycopg" not in response.text.lower()
    assert body["message"] == "The service could not complete the request"
    health = broken_client.get("/health")
    assert "database" in assert_error_shape(health, 503, "DEPENDENCY_UNAVAILABLE")["message"]


@pytest.mark.parametrize("broken_client", ["redis_url"], indirect=True)
def test_redis_outage_fails_health_but_not_requests(broken_client, user):
    health = broken_client.get("/health")
    assert "redis" in assert_error_shape(health, 503, "DEPENDENCY_UNAVAILABLE")["message"]
    # Limits fail open: an outage of the counter store must not take the API down.
    response = broken_client.get("/api/accounts", headers=user.headers)
    assert response.status_code == 200 and "X-RateLimit-Limit" not in response.headers
