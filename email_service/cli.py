"""The ``email-service`` command: serve, worker, webhooks, migrate, token, rotate-keys, keygen."""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from email_service import __version__, embedded, migrate
from email_service.config import ConfigError, Settings, load_settings
from email_service.observability import logs, process

log = logging.getLogger("email_service")
# Commands that record metrics (and serve them, on the API port or EMAIL_SERVICE_METRICS_PORT).
LONG_RUNNING = {"serve", "worker", "watch", "webhooks"}


class StartupError(Exception):
    """Start-up cannot go on; the message is one line for the operator."""


def _where(database_url: str) -> str:
    url = make_url(database_url)
    return f"{url.host or url.query.get('host', 'local socket')}:{url.port or 5432}/{url.database}"


def _unreachable(settings: Settings, exc: OperationalError) -> StartupError:
    """The one line an operator sees for a database a command cannot reach (no traceback)."""
    first_line = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    return StartupError(f"cannot reach PostgreSQL at {_where(settings.database_url)}: {first_line}")


def _migrate(settings: Settings) -> None:
    try:
        migrate.upgrade(settings.database_url, settings.db_app_role)
    except OperationalError as exc:
        raise _unreachable(settings, exc) from None


def _worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url or "",
        REDIS_URL=settings.redis_url or "",
        JWT_SECRET=settings.jwt_secret,
        CREDENTIAL_KEYS=",".join(settings.credential_keys),
        EMAIL_SERVICE_DATA_DIR=str(settings.data_dir),
        EMAIL_SERVICE_STORAGE_KEY=settings.storage_signing_key,
    )
    # The children write their metrics to serve's directory, and serve's port shows them.
    env.pop("EMAIL_SERVICE_METRICS_PORT", None)
    return env


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; with the default handler that
    # would kill this process before it stops the worker and the embedded servers below.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from email_service.api.app import create_app
    from email_service.api.header_limit import BoundedH11Protocol
    from email_service.observability import metrics
    from email_service.runtime import Runtime

    embedded_default = settings.embedded_postgres or settings.embedded_redis
    with embedded.services(settings) as resolved:
        if embedded_default or args.migrate:
            _migrate(resolved)
        children: list[ChildSupervisor] = []
        env = _worker_env(resolved)
        if embedded_default and args.embedded_worker:
            # The embedded default is one command: the API, and a worker and a watcher beside it,
            # which die with it.
            children += [ChildSupervisor("worker", env), ChildSupervisor("watch", env, what="watcher")]
        if embedded_default and args.embedded_webhooks:
            # Webhook deliveries likewise: the dispatcher runs beside the API and dies with it.
            children.append(ChildSupervisor("webhooks", env, what="webhook dispatcher"))
        for child in children:
            child.start()
        # No ping before each request's transaction: a round trip on every request, where a
        # connection lost to a database restart is retried on its first statement instead.
        runtime = Runtime.build(resolved, pre_ping=False)
        metrics.serve_port(resolved, runtime)
        app = create_app(runtime)
        # Everything built so far (the spec, its validators, the ORM's mappings) lives as long as
        # the process: kept out of the collector's reach, a full collection no longer walks it,
        # which otherwise paused a request now and then for tens of milliseconds.
        gc.freeze()
        try:
            uvicorn.run(
                app,
                host=args.host,
                port=args.port,
                lifespan="on",
                log_level=resolved.log_level.lower(),
                # Uvicorn logs through the root logger in the service's format. The access line is
                # the service's own (observability.http), in both formats: uvicorn's would carry
                # the query string, where signed links and OAuth2 callbacks hold credentials.
                log_config=None,
                access_log=False,
                proxy_headers=True,
                # h11, bounded: the default httptools parser reads a header block of any size.
                http=BoundedH11Protocol,
                h11_max_incomplete_event_size=resolved.max_header_bytes,
            )
        finally:
            for child in children:
                child.stop()
            runtime.close()
    return 0


class ChildSupervisor:
    """A process ``serve`` runs beside the API on the embedded default (worker, watcher, webhook dispatcher).

    It is started so that Linux ends it when ``serve`` dies (even by SIGKILL); if it dies first,
    ``serve`` says so in its log and starts another, waiting longer each time it keeps dying.
    """

    def __init__(self, command: str, env: dict[str, str], *, what: str | None = None) -> None:
        self.command, self.env = command, env
        self.what = what or f"background {command}"
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{command}-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        from email_service.queue.worker import die_with_parent

        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "email_service", self.command],
            env=self.env,
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            assert self.proc is not None
            started = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            log.error("the %s (pid %d) exited with %s; starting another", self.what, self.proc.pid, code)
            # A worker that dies at once would otherwise be restarted in a tight loop.
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 60.0)
            if self._stopping.wait(delay):
                return
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from email_service.observability import metrics
    from email_service.queue.worker import run_worker

    # SIGTERM stops the pool warmly (each process finishes its job); the embedded servers are
    # then left for the other commands still using them, or stopped if this was the last.
    with embedded.services(settings) as resolved:
        metrics.serve_port(resolved)
        run_worker(resolved, burst=args.burst, schedule=args.schedule, processes=args.processes)
    return 0


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from email_service.observability import metrics
    from email_service.watch.watcher import run_watcher

    with embedded.services(settings) as resolved:
        metrics.serve_port(resolved)
        run_watcher(resolved)
    return 0


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from email_service.observability import metrics
    from email_service.webhooks.dispatcher import run_dispatcher

    with embedded.services(settings) as resolved:
        metrics.serve_port(resolved)
        run_dispatcher(resolved)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with embedded.services(settings) as resolved:
        _migrate(resolved)
    print("migrations applied")
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from email_service.api.auth import TokenVerifier

    try:
        tenant_id, user_id = uuid.UUID(args.tenant_id), uuid.UUID(args.user_id)
    except ValueError:
        raise StartupError("--tenant-id and --user-id must be UUIDs") from None
    print(TokenVerifier.from_settings(settings).issue(tenant_id, user_id, args.ttl, time.time()))
    return 0


def cmd_rotate_keys(args: argparse.Namespace, settings: Settings) -> int:
    from email_service.runtime import Runtime
    from email_service.services.accounts import rotate_credentials
    from email_service.webhooks.service import rotate_secrets

    with embedded.services(settings) as resolved:
        runtime = Runtime.build(resolved)
        try:
            changed = rotate_credentials(runtime.db, runtime.cipher)
            changed += rotate_secrets(runtime.db, runtime.cipher)  # webhook signing secrets
        except OperationalError as exc:
            # Each batch commits on its own: what was re-encrypted stays so, and a rerun goes on.
            raise _unreachable(resolved, exc) from None
        finally:
            runtime.close()
    print(f"re-encrypted {changed} credentials under the newest key")
    return 0


def cmd_keygen(args: argparse.Namespace, settings: Settings | None) -> int:
    print(Fernet.generate_key().decode())
    return 0


def _number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for a whole number in ``low``..``high``: anything else is refused in one line.

    Unchecked, a pool of -1 worker processes ended at once with status 0, and a port above
    65535 was silently taken modulo 65536.
    """

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < low or (high is not None and number > high):
            wanted = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({wanted})")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="email-service",
        description="Multi-tenant REST service for email accounts (IMAP, POP3, SMTP). "
        "Configuration comes from the environment; see the README.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the API (and, on the embedded default, a worker and a webhook dispatcher)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_number(1, 65535), default=5000)
    serve.add_argument("--migrate", action="store_true", help="apply migrations first (always on the embedded default)")
    serve.add_argument(
        "--no-embedded-worker",
        dest="embedded_worker",
        action="store_false",
        help="on the embedded default, do not start a worker and a watcher beside the API",
    )
    serve.add_argument(
        "--no-embedded-webhooks",
        dest="embedded_webhooks",
        action="store_false",
        help="on the embedded default, do not start a webhook dispatcher beside the API",
    )
    serve.set_defaults(handler=cmd_serve)

    worker = commands.add_parser("worker", help="run an RQ worker for the service's queues")
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.add_argument(
        "--processes",
        type=_number(1),
        default=None,
        help="worker processes, each running one job at a time (default EMAIL_SERVICE_WORKER_PROCESSES, 4)",
    )
    worker.add_argument(
        "--no-scheduler",
        dest="schedule",
        action="store_false",
        help="do not run the automatic-sync scheduler beside this worker",
    )
    worker.set_defaults(handler=cmd_worker)

    commands.add_parser(
        "watch", help="hold IMAP IDLE on the accounts' inboxes and bring new mail in as it arrives"
    ).set_defaults(handler=cmd_watch)

    commands.add_parser(
        "webhooks", help="send webhook deliveries of committed changes (any number may run at once)"
    ).set_defaults(handler=cmd_webhooks)

    commands.add_parser("migrate", help="apply database migrations").set_defaults(handler=cmd_migrate)

    token = commands.add_parser("token", help="print a signed JWT for local use")
    token.add_argument("--tenant-id", required=True)
    token.add_argument("--user-id", required=True)
    token.add_argument("--ttl", type=_number(1), default=3600, help="seconds until it expires (default 3600)")
    token.set_defaults(handler=cmd_token)

    commands.add_parser(
        "rotate-keys", help="re-encrypt every stored credential under the newest CREDENTIAL_KEYS key"
    ).set_defaults(handler=cmd_rotate_keys)
    commands.add_parser("keygen", help="print a new key for CREDENTIAL_KEYS").set_defaults(
        handler=cmd_keygen, needs_settings=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings() if getattr(args, "needs_settings", True) else None
        if settings is not None:
            logs.configure(settings)
            if settings.embedded_postgres or settings.embedded_redis:
                # The embedded default keeps secrets, mail and queues in its data directory:
                # whatever this command writes there is its owner's alone.
                os.umask(0o077)
            if args.command in LONG_RUNNING:
                process.prepare_directory(settings)  # before any metric exists
        return args.handler(args, settings)
    except (ConfigError, StartupError) as exc:
        print(f"email-service: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
