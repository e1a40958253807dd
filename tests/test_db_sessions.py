"""Database sessions of the API: no ping before each transaction, yet a restart loses no request."""

from __future__ import annotations

from sqlalchemy import text

from email_service.api.app import create_app
from email_service.runtime import Runtime


def test_requests_after_the_database_dropped_every_connection_are_served(backing, runtime, user):
    api = Runtime.build(backing, pre_ping=False)  # as `serve` builds it
    try:
        with create_app(api).test_client() as client:
            for _ in range(3):
                assert client.get("/api/accounts", headers=user.headers).status_code == 200
            pids = set()
            for _ in range(api.db.engine.pool.size() + 2):
                with api.db.tenant_session(user.principal) as session:
                    pids.add(session.scalar(text("SELECT pg_backend_pid()")))
            # As at a database restart: every pooled connection ends while idle.
            with runtime.db.maintenance_session() as session:
                ended = session.scalar(
                    text("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM unnest(:pids) AS pid) AS t"),
                    {"pids": sorted(pids)},
                )
            assert ended == len(pids)
            for _ in range(3):
                response = client.get("/api/accounts", headers=user.headers)
                assert response.status_code == 200, response.text
                assert response.json()["pagination"]["total"] == 0
    finally:
        api.close()
