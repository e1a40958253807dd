"""Tenant and user isolation: through the API, and in PostgreSQL itself (row-level security)."""

from __future__ import annotations

import uuid

import pytest
from helpers import account_body, assert_error_shape
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from email_service.tenancy import Principal


@pytest.fixture
def owner_and_strangers(client, make_user):
    owner = make_user()
    account = client.post("/api/accounts", json=account_body(), headers=owner.headers).json()
    colleague = make_user(owner.principal.tenant_id)
    outsider = make_user()
    return owner, account, [colleague, outsider]


def test_no_other_user_can_see_or_touch_an_account(client, owner_and_strangers):
    owner, account, strangers = owner_and_strangers
    path = f"/api/accounts/{account['id']}"
    for stranger in strangers:
        # Exactly as for an id that does not exist: nothing reveals that it does.
        missing = assert_error_shape(client.get("/api/accounts/does-not-exist", headers=stranger.headers), 404)
        hidden = assert_error_shape(client.get(path, headers=stranger.headers), 404)
        assert hidden["code"] == missing["code"] and hidden["error"] == missing["error"]
        assert_error_shape(client.put(path, json={"accountName": "Mine now"}, headers=stranger.headers), 404)
        assert_error_shape(client.delete(path, headers=stranger.headers), 404)
        listed = client.get("/api/accounts", headers=stranger.headers).json()
        assert listed["accounts"] == [] and listed["pagination"]["total"] == 0
    assert client.get(path, headers=owner.headers).json() == account


def _seed(runtime, principal: Principal, count: int) -> None:
    with runtime.db.tenant_session(principal) as session:
        for _i in range(count):
            session.execute(
                text(
                    "INSERT INTO accounts (id, tenant_id, user_id, account_name, email_address, email_key, protocol,"
                    " hostname, port, encryption, username, password_encrypted)"
                    " VALUES (:id, :t, :u, 'n', :email, :email, 'imap', 'h', 993, 'tls', 'u', '\\x00')"
                ),
                {
                    "id": uuid.uuid4().hex,
                    "t": principal.tenant_id,
                    "u": principal.user_id,
                    "email": f"{uuid.uuid4().hex}@example.com",
                },
            )


def test_a_query_without_any_tenant_filter_sees_only_the_current_users_rows(runtime):
    mine = Principal(uuid.uuid4(), uuid.uuid4())
    colleague = Principal(mine.tenant_id, uuid.uuid4())
    other_tenant = Principal(uuid.uuid4(), uuid.uuid4())
    _seed(runtime, mine, 2)
    _seed(runtime, colleague, 3)
    _seed(runtime, other_tenant, 4)
    with runtime.db.tenant_session(mine) as session:
        rows = session.execute(text("SELECT tenant_id, user_id FROM accounts")).all()
    assert len(rows) == 2
    assert {(r.tenant_id, r.user_id) for r in rows} == {(mine.tenant_id, mine.user_id)}


def test_without_a_tenant_context_the_application_role_sees_nothing(runtime, backing):
    _seed(runtime, Principal(uuid.uuid4(), uuid.uuid4()), 1)
    with runtime.db.engine.begin() as conn:
        conn.execute(text(f'SET LOCAL ROLE "{backing.db_app_role}"'))
        assert conn.execute(text("SELECT count(*) FROM accounts")).scalar() == 0


def test_rows_for_another_tenant_cannot_be_written(runtime):
    mine = Principal(uuid.uuid4(), uuid.uuid4())
    with pytest.raises(ProgrammingError, match="row-level security"), runtime.db.tenant_session(mine) as session:
        session.execute(
            text(
                "INSERT INTO accounts (id, tenant_id, user_id, account_name, email_address, email_key, protocol,"
                " hostname, port, encryption, username, password_encrypted)"
                " VALUES ('x', :t, :u, 'n', 'e@example.com', 'e@example.com', 'imap', 'h', 993, 'tls', 'u', '\\x00')"
            ),
            {"t": uuid.uuid4(), "u": mine.user_id},
        )


def test_the_application_role_cannot_bypass_or_disable_row_security(runtime, backing):
    with runtime.db.engine.connect() as conn:
        role = conn.execute(
            text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :r"), {"r": backing.db_app_role}
        ).one()
        assert role == (False, False)
        table = conn.execute(
            text(
                "SELECT relrowsecurity, relforcerowsecurity, pg_get_userbyid(relowner) FROM pg_class"
                " WHERE relname = 'accounts'"
            )
        ).one()
        assert table[0] is True and table[1] is True and table[2] != backing.db_app_role
    principal = Principal(uuid.uuid4(), uuid.uuid4())
    for statement in (
        "ALTER TABLE accounts DISABLE ROW LEVEL SECURITY",
        "SET row_security = off; SELECT count(*) FROM accounts",
        "DELETE FROM accounts",
    ):
        with pytest.raises(DBAPIError), runtime.db.tenant_session(principal) as session:
            session.execute(text(statement))
