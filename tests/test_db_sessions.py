"""Database sessions of the API: no ping before each transaction, yet a restart loses no request."""

from __future__ import annotations

from sqlalchemy import text

from email_service.api.app import create_app
from email_service.runtime import Runtime


def _end_every_pooled_connection(api: Runtime, runtime: Runtime, user) -> None:
    """As at a database restart: every connection of ``api``'s pool ends while idle."""
    pids = set()
    for _ in range(api.db.engine.pool.size() + 2):
        with api.db.tenant_session(user.principal) as session:
            pids.add(session.scalar(text("SELECT pg_backend_pid()")))
    with runtime.db.maintenance_session() as session:
        ended = session.scalar(
            text("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM unnest(:pids) AS pid) AS t"),
            {"pids": sorted(pids)},
        )
    assert ended == len(pids)


def test_requests_after_the_database_dropped_every_connection_are_served(backing, runtime, user):
    api = Runtime.build(backing, pre_ping=False)  # as `serve` builds it
    try:
        with create_app(api).test_client() as client:
            for _ in range(3):
                assert client.get("/api/accounts", headers=user.headers).status_code == 200
            _end_every_pooled_connection(api, runtime, user)
            for _ in range(3):
                response = client.get("/api/accounts", headers=user.headers)
                assert response.status_code == 200, response.text
                assert response.json()["pagination"]["total"] == 0
            # listMessages reads on the psycopg connection without a session: it recovers alike
            # (an answer from the database, here that the account does not exist, not a 500).
            _end_every_pooled_connection(api, runtime, user)
            for _ in range(3):
                response = client.get("/api/no-such-account/folders/no-such-folder/messages", headers=user.headers)
                assert response.status_code == 404, response.text
                assert response.json()["code"] == "ACCOUNT_NOT_FOUND"
    finally:
        api.close()
