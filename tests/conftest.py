"""Fixtures: real PostgreSQL and Redis (embedded, or from EMAIL_SERVICE_TEST_* URLs), the app, tokens."""

from __future__ import annotations

import os

# The resolver waits 5 s for a DNS answer that never comes, and this machine's resolver drops
# about one query in 25: the suite's made-up host names (imap.company.com in the spec's examples,
# generated ones) cost minutes of such waits. One second, twice, fails them as surely. Set before
# any lookup, so the C resolver of this process and of every service it starts reads it.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:2")

import secrets
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
from helpers import User, base_settings, libpq_url
from psycopg import sql
from sqlalchemy.engine import make_url

from email_service import embedded, migrate
from email_service.api.app import create_app
from email_service.api.auth import TokenVerifier
from email_service.config import Settings
from email_service.queue.connection import redis_from_url
from email_service.runtime import Runtime

pytest_plugins = ["mailservers", "oauth2server", "s3server", "syncing"]


@pytest.fixture(scope="session")
def backing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings whose DATABASE_URL and REDIS_URL point at a fresh, migrated database and a Redis."""
    data_dir = tmp_path_factory.mktemp("backing")
    db_env = os.environ.get("EMAIL_SERVICE_TEST_DATABASE_URL")
    redis_env = os.environ.get("EMAIL_SERVICE_TEST_REDIS_URL")
    with embedded.services(base_settings(data_dir, database_url=db_env, redis_url=redis_env)) as started:
        database_url = started.database_url
        created = None
        if db_env:
            # A shared server: work in a database of our own and drop it afterwards.
            created = f"email_service_test_{secrets.token_hex(4)}"
            with psycopg.connect(libpq_url(db_env), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(created)))
            database_url = make_url(db_env).set(database=created).render_as_string(hide_password=False)
        settings = started.with_urls(database_url, started.redis_url)
        migrate.upgrade(settings.database_url, settings.db_app_role)
        redis_from_url(settings.redis_url).flushdb()
        try:
            yield settings
        finally:
            if created:
                with psycopg.connect(libpq_url(db_env), autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(created)))


@pytest.fixture(scope="session")
def runtime(backing: Settings) -> Iterator[Runtime]:
    rt = Runtime.build(backing)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def app(runtime: Runtime):
    return create_app(runtime)


@pytest.fixture(scope="session")
def client(app):
    with app.test_client() as test_client:
        yield test_client


@pytest.fixture(scope="session")
def verifier(backing: Settings) -> TokenVerifier:
    return TokenVerifier.from_settings(backing)


@pytest.fixture
def make_user(verifier: TokenVerifier):
    return lambda tenant_id=None: User(verifier, tenant_id)


@pytest.fixture
def user(make_user) -> User:
    return make_user()


@pytest.fixture
def settings_with(backing: Settings):
    return lambda **changes: replace(backing, **changes)
