"""Both authentication schemes, and every way a credential can be wrong."""

from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
import pytest
from helpers import JWT_SECRET, assert_error_shape

from email_service.api.app import create_app
from email_service.runtime import Runtime

TENANT = uuid.uuid4()
USER = uuid.uuid4()


def claims(**overrides):
    values = {"sub": str(USER), "tenant_id": str(TENANT), "exp": int(time.time()) + 600}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def unsigned(payload: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def assert_rejected(response) -> None:
    body = assert_error_shape(response, 401, "UNAUTHORIZED")
    # One answer for every failure: nothing tells an attacker which check failed.
    assert body["message"] == "Missing or invalid authentication credentials"
    assert "X-RateLimit-Limit" not in response.headers


def test_valid_bearer_token_is_accepted(client):
    response = client.get("/api/accounts", headers=bearer(jwt.encode(claims(), JWT_SECRET, algorithm="HS256")))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(jwt.encode(claims(exp=int(time.time()) - 120), JWT_SECRET, algorithm="HS256"), id="expired"),
        pytest.param(jwt.encode(claims(), "another-secret-" + "y" * 40, algorithm="HS256"), id="wrong-secret"),
        pytest.param(unsigned(claims()), id="alg-none"),
        pytest.param(jwt.encode(claims(), JWT_SECRET, algorithm="HS512"), id="other-algorithm"),
        pytest.param(jwt.encode(claims(exp=None), JWT_SECRET, algorithm="HS256"), id="no-exp"),
        pytest.param(jwt.encode(claims(sub=None), JWT_SECRET, algorithm="HS256"), id="no-sub"),
        pytest.param(jwt.encode(claims(tenant_id=None), JWT_SECRET, algorithm="HS256"), id="no-tenant"),
        pytest.param(jwt.encode(claims(tenant_id="acme"), JWT_SECRET, algorithm="HS256"), id="tenant-not-uuid"),
        pytest.param(jwt.encode(claims(sub="bob"), JWT_SECRET, algorithm="HS256"), id="user-not-uuid"),
        pytest.param("not-a-jwt", id="garbage"),
    ],
)
def test_bad_bearer_tokens_are_rejected(client, token):
    assert_rejected(client.get("/api/accounts", headers=bearer(token)))


def test_tampered_payload_is_rejected(client):
    header, _, signature = jwt.encode(claims(), JWT_SECRET, algorithm="HS256").split(".")
    other = base64.urlsafe_b64encode(json.dumps(claims(tenant_id=str(uuid.uuid4()))).encode()).rstrip(b"=").decode()
    assert_rejected(client.get("/api/accounts", headers=bearer(f"{header}.{other}.{signature}")))


def test_missing_credentials_are_rejected(client):
    assert_rejected(client.get("/api/accounts"))
    assert_rejected(client.get("/api/accounts", headers={"Authorization": "Basic dXNlcjpwYXNz"}))


def header_auth(token: str, tenant: object = TENANT, user: object = USER) -> dict:
    headers = {"X-Auth-Token": token}
    if tenant is not None:
        headers["X-Tenant-ID"] = str(tenant)
    if user is not None:
        headers["X-User-ID"] = str(user)
    return headers


def test_header_auth_with_matching_ids_is_accepted(client):
    token = jwt.encode(claims(), JWT_SECRET, algorithm="HS256")
    response = client.get("/api/accounts", headers=header_auth(token))
    assert response.status_code == 200
    upper = client.get("/api/accounts", headers=header_auth(token, str(TENANT).upper(), str(USER).upper()))
    assert upper.status_code == 200


@pytest.mark.parametrize(
    ("tenant", "user"),
    [
        pytest.param(uuid.uuid4(), USER, id="other-tenant"),
        pytest.param(TENANT, uuid.uuid4(), id="other-user"),
        pytest.param(None, USER, id="no-tenant-header"),
        pytest.param(TENANT, None, id="no-user-header"),
        pytest.param("acme", USER, id="tenant-not-uuid"),
    ],
)
def test_header_auth_with_mismatched_ids_is_rejected(client, tenant, user):
    token = jwt.encode(claims(), JWT_SECRET, algorithm="HS256")
    assert_rejected(client.get("/api/accounts", headers=header_auth(token, tenant, user)))


def test_header_auth_verifies_the_token_too(client):
    token = jwt.encode(claims(), "another-secret-" + "y" * 40, algorithm="HS256")
    assert_rejected(client.get("/api/accounts", headers=header_auth(token)))


def test_header_auth_sees_the_same_accounts_as_bearer(client):
    token = jwt.encode(claims(sub=str(uuid.uuid4())), JWT_SECRET, algorithm="HS256")
    info = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    body = {
        "accountName": "A",
        "emailAddress": f"{uuid.uuid4().hex}@example.com",
        "protocol": "imap",
        "hostname": "imap.example.com",
        "port": 993,
        "encryption": "tls",
        "username": "u",
        "password": "p" * 10,
    }
    created = client.post("/api/accounts", json=body, headers=bearer(token)).json()
    listed = client.get("/api/accounts", headers=header_auth(token, info["tenant_id"], info["sub"])).json()
    assert [a["id"] for a in listed["accounts"]] == [created["id"]]


def test_issuer_and_audience_are_checked_when_configured(settings_with):
    settings = settings_with(jwt_issuer="https://issuer.example", jwt_audience="email-service")
    runtime = Runtime.build(settings)
    try:
        with create_app(runtime).test_client() as client:
            good = claims(iss="https://issuer.example", aud="email-service")
            assert client.get("/api/accounts", headers=bearer(jwt.encode(good, JWT_SECRET))).status_code == 200
            for bad in (
                claims(aud="email-service"),
                claims(iss="https://issuer.example"),
                claims(iss="https://evil.example", aud="email-service"),
                claims(iss="https://issuer.example", aud="other"),
            ):
                assert_rejected(client.get("/api/accounts", headers=bearer(jwt.encode(bad, JWT_SECRET))))
    finally:
        runtime.close()


def test_health_needs_no_credentials(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and body["service"] == "email_service"
    assert abs(body["timestamp"] - time.time() * 1000) < 60_000


def test_a_token_accepted_before_is_refused_once_it_expires(client, monkeypatch):
    # The first request verifies the token in full; the next ones reuse that verification, which
    # must not outlive the token: past its expiry (and the 30 s leeway) the same token is refused.
    import email_service.api.auth as auth

    token = jwt.encode(claims(exp=int(time.time()) + 60), JWT_SECRET, algorithm="HS256")
    assert client.get("/api/accounts", headers=bearer(token)).status_code == 200
    assert client.get("/api/accounts", headers=bearer(token)).status_code == 200
    later = time.time() + 91
    monkeypatch.setattr(auth.time, "time", lambda: later)
    assert_rejected(client.get("/api/accounts", headers=bearer(token)))


def test_a_token_is_verified_against_each_secret_it_is_presented_to():
    # Verified tokens are remembered per verifier: another secret (a rotated one) checks afresh.
    from connexion.exceptions import OAuthProblem

    from email_service.api.auth import TokenVerifier

    token = jwt.encode(claims(), JWT_SECRET, algorithm="HS256")
    assert TokenVerifier(JWT_SECRET).verify(token)["sub"] == str(USER)
    with pytest.raises(OAuthProblem):
        TokenVerifier("another-secret-of-enough-length-for-hs256").verify(token)
