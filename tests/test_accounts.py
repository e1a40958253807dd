"""The Accounts operations as a client sees them."""

from __future__ import annotations

import json
import time

from helpers import account_body, assert_error_shape
from sqlalchemy import text


def create(client, user, **overrides):
    response = client.post("/api/accounts", json=account_body(**overrides), headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_returns_the_account_without_its_password(client, user):
    before = int(time.time() * 1000)
    body = account_body(accountName="Gmail", smtpHostname="smtp.example.com", smtpPort=465, smtpEncryption="tls")
    response = client.post("/api/accounts", json=body, headers=user.headers)
    assert response.status_code == 201
    account = response.json()
    assert account["accountName"] == "Gmail"
    assert account["emailAddress"] == body["emailAddress"]
    assert account["tenantId"] == str(user.principal.tenant_id)
    assert account["userId"] == str(user.principal.user_id)
    assert account["protocol"] == "imap" and account["port"] == 993 and account["encryption"] == "tls"
    assert account["smtpHostname"] == "smtp.example.com" and account["smtpPort"] == 465
    assert account["isSyncing"] is False and account["lastSyncAt"] is None and account["isEnabled"] is True
    assert before - 1000 <= account["createdAt"] <= int(time.time() * 1000) + 1000
    assert account["updatedAt"] == account["createdAt"]
    assert account["authType"] == "password" and account["oauth2"] is None
    shown = {key: value for key, value in account.items() if key != "authType"}
    assert "password" not in json.dumps(shown).lower().replace("password not returned", "")
    assert body["password"] not in response.text


def test_defaults_apply_when_optional_fields_are_omitted(client, user):
    body = account_body()
    del body["isSyncEnabled"], body["syncInterval"]
    account = client.post("/api/accounts", json=body, headers=user.headers).json()
    assert account["isSyncEnabled"] is True and account["syncInterval"] == 300


def test_fields_the_create_schema_does_not_name_are_ignored(client, user):
    # isEnabled is an update field only: on create nothing checks its type, so no value of it
    # may reach the database (a string there was a 500); a new account is always enabled.
    for value in ("nope", {}, [1], 5, None, False):
        body = account_body(isEnabled=value, tenantId="someone else", lastSyncAt=5)
        response = client.post("/api/accounts", json=body, headers=user.headers)
        assert response.status_code == 201, (value, response.text)
        account = response.json()
        assert account["isEnabled"] is True and account["lastSyncAt"] is None
        assert account["tenantId"] == str(user.principal.tenant_id)


def test_list_paginates_and_reports_the_total(client, user):
    created = [create(client, user, accountName=f"Account {i}")["id"] for i in range(5)]
    page = client.get("/api/accounts?limit=2&offset=1", headers=user.headers).json()
    assert page["pagination"] == {"total": 5, "limit": 2, "offset": 1}
    assert [a["id"] for a in page["accounts"]] == created[1:3]
    everything = client.get("/api/accounts", headers=user.headers).json()
    assert [a["id"] for a in everything["accounts"]] == created
    assert everything["pagination"]["limit"] == 100
    past_the_end = client.get("/api/accounts?offset=10", headers=user.headers).json()
    assert past_the_end["accounts"] == [] and past_the_end["pagination"]["total"] == 5


def test_huge_offset_is_an_empty_page_not_an_error(client, user):
    create(client, user)
    response = client.get(f"/api/accounts?offset={2**70}", headers=user.headers)
    assert response.status_code == 200
    assert response.json()["accounts"] == []


def test_get_returns_the_account(client, user):
    account = create(client, user)
    response = client.get(f"/api/accounts/{account['id']}", headers=user.headers)
    assert response.status_code == 200
    assert response.json() == account


def test_duplicate_address_of_the_user_is_a_conflict_whatever_its_case(client, user, verifier):
    account = create(client, user, emailAddress="Someone@Example.COM")
    again = client.post("/api/accounts", json=account_body(emailAddress="someone@example.com"), headers=user.headers)
    assert_error_shape(again, 409, "EMAIL_DUPLICATE")
    # A colleague's accounts are their own: no 409 tells them this user has the address.
    colleague = user.colleague(verifier)
    body = account_body(emailAddress="SOMEONE@example.com")
    theirs = client.post("/api/accounts", json=body, headers=colleague.headers)
    assert theirs.status_code == 201, theirs.text
    listed = client.get("/api/accounts", headers=user.headers).json()
    assert [a["id"] for a in listed["accounts"]] == [account["id"]]


def test_same_address_in_another_tenant_is_allowed(client, make_user):
    create(client, make_user(), emailAddress="shared@example.com")
    create(client, make_user(), emailAddress="shared@example.com")


def test_invalid_email_is_rejected_and_nothing_is_stored(client, user):
    response = client.post("/api/accounts", json=account_body(emailAddress="not an address@"), headers=user.headers)
    assert response.status_code == 400
    assert client.get("/api/accounts", headers=user.headers).json()["pagination"]["total"] == 0


def test_update_changes_fields_and_updated_at(client, user):
    account = create(client, user)
    time.sleep(0.01)
    response = client.put(
        f"/api/accounts/{account['id']}",
        json={"accountName": "Renamed", "hostname": "mail.example.com", "syncInterval": 600, "isEnabled": False},
        headers=user.headers,
    )
    assert response.status_code == 200
    updated = response.json()
    assert updated["accountName"] == "Renamed" and updated["hostname"] == "mail.example.com"
    assert updated["syncInterval"] == 600 and updated["isEnabled"] is False
    assert updated["createdAt"] == account["createdAt"] and updated["updatedAt"] > account["updatedAt"]
    assert client.get(f"/api/accounts/{account['id']}", headers=user.headers).json() == updated


def test_update_cannot_change_the_email_address(client, user):
    account = create(client, user)
    response = client.put(
        f"/api/accounts/{account['id']}",
        json={"emailAddress": "other@example.com", "accountName": "X"},
        headers=user.headers,
    )
    body = assert_error_shape(response, 400, "IMMUTABLE_FIELD")
    assert "emailAddress" in body["message"]
    assert client.get(f"/api/accounts/{account['id']}", headers=user.headers).json() == account


def test_update_cannot_change_the_protocol(client, user):
    account = create(client, user)
    response = client.put(f"/api/accounts/{account['id']}", json={"protocol": "pop3"}, headers=user.headers)
    assert_error_shape(response, 400, "IMMUTABLE_FIELD")


def test_update_of_a_missing_account_is_404(client, user):
    assert_error_shape(client.put("/api/accounts/nope", json={"accountName": "X"}, headers=user.headers), 404)


def test_delete_is_soft(client, user, runtime):
    account = create(client, user)
    response = client.delete(f"/api/accounts/{account['id']}", headers=user.headers)
    assert response.status_code == 204 and response.content == b""
    assert_error_shape(client.get(f"/api/accounts/{account['id']}", headers=user.headers), 404)
    assert_error_shape(client.delete(f"/api/accounts/{account['id']}", headers=user.headers), 404)
    assert client.get("/api/accounts", headers=user.headers).json()["pagination"]["total"] == 0
    with runtime.db.tenant_session(user.principal) as session:
        query = text("SELECT deleted_at, email_address FROM accounts WHERE id = :id")
        row = session.execute(query, {"id": account["id"]})
        deleted_at, address = row.one()
    assert deleted_at is not None and address == account["emailAddress"]
    # The address is free again once its account is gone.
    create(client, user, emailAddress=account["emailAddress"])
