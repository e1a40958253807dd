"""Per-user limits from the spec's x-rate-limits, counted in Redis and shared between processes."""

from __future__ import annotations

import copy
import time

import httpx
import pytest
from helpers import ServiceProcess, User, account_body, assert_error_shape, service_env

from email_service.api.app import load_spec
from email_service.api.rate_limit import rules_from_spec


def limit_headers(response) -> tuple[int, int, int]:
    h = response.headers
    return int(h["X-RateLimit-Limit"]), int(h["X-RateLimit-Remaining"]), int(h["X-RateLimit-Reset"])


def test_rules_come_from_the_spec_table():
    spec = load_spec()
    rules = rules_from_spec(spec, lambda op: op["operationId"])
    assert rules["listAccounts"].item.amount == 100
    assert rules["createAccount"].item.amount == 10
    assert rules["syncAccount"].item.amount == 5 and rules["syncAccount"].bucket == "POST /api/sync/*"
    assert rules["sendEmail"].item.amount == 10
    assert rules["getAccount"].item.amount == 50 and rules["getSyncStatus"].item.amount == 50
    assert rules["getAccount"].bucket != rules["deleteAccount"].bucket
    assert "healthCheck" not in rules
    changed = copy.deepcopy(spec)
    changed["x-rate-limits"]["byEndpoint"][0]["limit"] = 7
    assert rules_from_spec(changed, lambda op: op["operationId"])["listAccounts"].item.amount == 7


def test_every_authenticated_response_carries_the_headers(client, user):
    first = client.get("/api/accounts", headers=user.headers)
    second = client.get("/api/accounts", headers=user.headers)
    limit, remaining, reset = limit_headers(first)
    assert (limit, remaining) == (100, 99)
    assert limit_headers(second)[1] == 98
    now_ms = time.time() * 1000
    assert now_ms < reset <= now_ms + 61_000
    other = client.get("/api/accounts/nope", headers=user.headers)
    assert other.status_code == 404 and limit_headers(other)[:2] == (50, 49)
    invalid = client.post("/api/accounts", json={"accountName": ""}, headers=user.headers)
    assert invalid.status_code == 400 and limit_headers(invalid)[:2] == (10, 9)


def test_unauthenticated_responses_have_no_limit_headers(client):
    assert "X-RateLimit-Limit" not in client.get("/health").headers
    assert "X-RateLimit-Limit" not in client.get("/api/accounts").headers


def test_exceeding_a_limit_answers_429_with_retry_after(client, user, make_user):
    for i in range(10):
        response = client.post("/api/accounts", json=account_body(), headers=user.headers)
        assert response.status_code == 201, response.text
        assert limit_headers(response)[1] == 9 - i
    refused = client.post("/api/accounts", json=account_body(), headers=user.headers)
    body = assert_error_shape(refused, 429, "RATE_LIMITED")
    assert "try again" in body["message"]
    assert limit_headers(refused)[:2] == (10, 0)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Nothing was created by the refused request.
    assert client.get("/api/accounts", headers=user.headers).json()["pagination"]["total"] == 10
    # Other endpoints and other users have counters of their own.
    assert client.get("/api/accounts", headers=user.headers).status_code == 200
    assert client.post("/api/accounts", json=account_body(), headers=make_user().headers).status_code == 201


@pytest.fixture(scope="module")
def two_api_processes(backing, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("two-processes")
    processes = [ServiceProcess(service_env(backing), cwd) for _ in range(2)]
    try:
        for process in processes:
            process.wait_healthy()
        yield processes
    finally:
        for process in processes:
            process.stop()


def test_two_api_processes_share_one_counter(two_api_processes, verifier):
    user = User(verifier)
    remaining = []
    for i in range(10):
        process = two_api_processes[i % 2]
        response = httpx.post(process.url + "/api/accounts", json=account_body(), headers=user.headers, timeout=10)
        assert response.status_code == 201, response.text
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    assert remaining == list(range(9, -1, -1))
    for process in two_api_processes:
        refused = httpx.post(process.url + "/api/accounts", json=account_body(), headers=user.headers, timeout=10)
        assert_error_shape(refused, 429, "RATE_LIMITED")
