"""Settings read from the environment, validated once at start-up.

A missing or malformed setting raises ``ConfigError`` with one line that names the variable;
the command line prints that line and exits instead of showing a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.fernet import Fernet

from email_service.oauth2.providers import OAuth2Provider, ProviderConfigError, allowed_return_urls, load_providers
from email_service.protocols.destinations import DestinationPolicy, parse_allowed

MIN_JWT_SECRET_BYTES = 32
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line meant for the operator."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str | None
    redis_url: str | None
    jwt_secret: str
    jwt_issuer: str | None
    jwt_audience: str | None
    credential_keys: tuple[str, ...]
    db_app_role: str = "email_service_app"
    minio_endpoint: str | None = None
    minio_access_key: str | None = None
    minio_secret_key: str | None = None
    minio_bucket: str = "email-service"
    minio_secure: bool = True
    minio_region: str | None = None
    public_url: str = "http://127.0.0.1:5000"
    storage_signing_key: str = ""
    ca_file: Path | None = None
    max_body_bytes: int = 1024 * 1024
    max_header_bytes: int = 32 * 1024
    max_upload_bytes: int = 25 * 1024 * 1024
    max_message_bytes: int = 25 * 1024 * 1024
    send_retry_base_seconds: int = 30
    # Background work: worker processes per `worker` command, and how many jobs of one tenant may
    # be queued or running at once across all workers (so one tenant cannot take every worker).
    worker_processes: int = 4
    tenant_concurrency: int = 2
    scheduler_seconds: float = 15.0
    upload_retention_hours: int = 24
    # Real time: how long a watcher's lease on an account lasts without renewal (a dead watcher's
    # accounts move to the others after this), and threads that bring folders up to date.
    watch_lease_seconds: int = 30
    watch_threads: int = 8
    # The change log keeps this many days; a feed cursor older than what is kept must resync.
    change_retention_days: int = 30
    # Per-protocol socket timeouts (connect and each read); the wait for the reply to the end of
    # a message's data follows RFC 5321 4.5.3.2 (10 minutes), since that reply decides whether
    # the message was accepted.
    imap_timeout_seconds: int = 60
    smtp_timeout_seconds: int = 60
    smtp_data_timeout_seconds: int = 600
    rate_limits_enabled: bool = True
    validate_responses: bool = False
    # Event streams: a comment line this often keeps proxies from closing an idle stream; a client
    # further behind than max_catch_up entries of an account is told to resync instead; the
    # streams' reads share this many database connections per API process.
    events_heartbeat_seconds: int = 15
    events_max_catch_up: int = 1000
    events_db_pool_size: int = 4
    # Open streams one user may hold on one API process; the rate limit only bounds how fast
    # they are opened, not how many pile up.
    events_max_streams_per_user: int = 20
    log_level: str = "INFO"
    # Observability: "text" or "json" log lines; /metrics on its own port (every command) and/or on
    # the API's port for holders of the token (unset: neither).
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"  # noqa: S104 - a metrics port is for the cluster's scraper
    metrics_token: str | None = None
    # Mail servers on non-public addresses the operator lets accounts reach (EMAIL_SERVICE_ALLOWED_DESTINATIONS).
    destinations: DestinationPolicy = DestinationPolicy()
    # Webhooks: waits between delivery attempts (default in queue/policy.py), the HTTP timeouts,
    # how many requests may be open at once to one endpoint and for one tenant, and how often
    # the dispatcher looks for changes a lost notification would otherwise leave behind.
    webhook_retry_schedule: tuple[float, ...] = ()  # empty: queue.policy.WEBHOOK_RETRY_SCHEDULE
    webhook_timeout_seconds: float = 10.0
    webhook_endpoint_concurrency: int = 4
    webhook_tenant_concurrency: int = 16
    webhook_catchup_seconds: float = 5.0
    # OAuth2 accounts: the providers (oauth2/providers.py reads them), where the consent flow may
    # return the browser to, how long a consent flow may take, and the token endpoint timeout.
    oauth2_providers: Mapping[str, OAuth2Provider] = field(default_factory=dict)
    oauth2_return_urls: tuple[str, ...] = ()
    oauth2_state_seconds: int = 600
    oauth2_timeout_seconds: float = 20.0

    @property
    def embedded_postgres(self) -> bool:
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    def with_urls(self, database_url: str, redis_url: str) -> Settings:
        return replace(self, database_url=database_url, redis_url=redis_url)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return value


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if scheme not in schemes:
        raise ConfigError(f"{name} must be a URL starting with one of {', '.join(s + '://' for s in schemes)}")
    return raw


def parse_credential_keys(raw: str, name: str = "CREDENTIAL_KEYS") -> tuple[str, ...]:
    """Comma-separated Fernet keys, newest first: the first encrypts, all decrypt."""
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise ConfigError(f"{name} must hold at least one key")
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            raise ConfigError(
                f"{name}: key {position} is not a Fernet key (32 url-safe base64 bytes; "
                "make one with `email-service keygen`)"
            ) from None
    return keys


def _local_secrets(data_dir: Path) -> dict[str, str]:
    """Secrets for the embedded default, made once and kept in the data directory (mode 0600)."""
    path = data_dir / "secrets.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            raise ConfigError(f"{path} is unreadable; remove it to make new local secrets") from None
    data_dir.mkdir(parents=True, exist_ok=True)
    made = {"JWT_SECRET": secrets.token_urlsafe(48), "CREDENTIAL_KEYS": Fernet.generate_key().decode()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(made, handle)
    return made


def _derived_key(secret: str, purpose: str) -> str:
    """A key for one purpose derived from another secret, so one secret does not sign two things."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def _public_url(env: Mapping[str, str]) -> str:
    raw = (env.get("EMAIL_SERVICE_PUBLIC_URL") or "http://127.0.0.1:5000").rstrip("/")
    if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", raw):
        raise ConfigError("EMAIL_SERVICE_PUBLIC_URL must be an http(s) URL such as https://mail-api.example.com")
    return raw


def _ca_file(env: Mapping[str, str]) -> Path | None:
    raw = env.get("EMAIL_SERVICE_CA_FILE")
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"EMAIL_SERVICE_CA_FILE does not name a readable file: {raw}")
    return path


def _destinations(env: Mapping[str, str]) -> DestinationPolicy:
    """Exceptions to the public-addresses-only rule for mail servers, e.g. ``10.0.0.0/8,mail.internal:993``."""
    raw = env.get("EMAIL_SERVICE_ALLOWED_DESTINATIONS", "")
    try:
        return DestinationPolicy(parse_allowed(raw))
    except ValueError as exc:
        raise ConfigError(f"EMAIL_SERVICE_ALLOWED_DESTINATIONS: {exc}") from None


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _schedule(env: Mapping[str, str], name: str) -> tuple[float, ...]:
    """Comma-separated waits such as ``5s,5m,30m,2h``; empty means the built-in schedule."""
    raw = env.get(name, "").strip()
    if not raw:
        return ()
    waits = []
    for item in raw.split(","):
        match = _DURATION.match(item.strip())
        if not match or float(match.group(1)) <= 0:
            raise ConfigError(f"{name} must list positive waits such as 5s,5m,30m,2h, not {item.strip()!r}")
        waits.append(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    return tuple(waits)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not 0 < value <= 3600:
        raise ConfigError(f"{name} must be more than 0 and at most 3600 seconds")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    data_dir = Path(env.get("EMAIL_SERVICE_DATA_DIR") or "./var").resolve()
    database_url = _url(env, "DATABASE_URL", ("postgresql", "postgresql+psycopg", "postgres"))
    redis_url = _url(env, "REDIS_URL", ("redis", "rediss", "unix"))

    jwt_secret = env.get("JWT_SECRET", "")
    credential_raw = env.get("CREDENTIAL_KEYS", "")
    if database_url is None and (not jwt_secret or not credential_raw):
        # The embedded default must run with no configuration at all, so it keeps its own secrets.
        local = _local_secrets(data_dir)
        jwt_secret = jwt_secret or local["JWT_SECRET"]
        credential_raw = credential_raw or local["CREDENTIAL_KEYS"]
    if not jwt_secret:
        raise ConfigError("JWT_SECRET is required when DATABASE_URL is set")
    if len(jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
        raise ConfigError(f"JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes long")
    if not credential_raw:
        raise ConfigError("CREDENTIAL_KEYS is required when DATABASE_URL is set")

    role = env.get("DATABASE_APP_ROLE", "email_service_app")
    if not _ROLE_NAME.match(role):
        raise ConfigError("DATABASE_APP_ROLE must be a lower-case SQL identifier")
    log_level = env.get("EMAIL_SERVICE_LOG_LEVEL", "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("EMAIL_SERVICE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    log_format = env.get("EMAIL_SERVICE_LOG_FORMAT", "text").lower()
    if log_format not in {"text", "json"}:
        raise ConfigError("EMAIL_SERVICE_LOG_FORMAT must be text or json")
    metrics_token = env.get("EMAIL_SERVICE_METRICS_TOKEN") or None
    if metrics_token is not None and len(metrics_token) < 16:
        raise ConfigError("EMAIL_SERVICE_METRICS_TOKEN must be at least 16 characters long")

    minio_endpoint = env.get("MINIO_ENDPOINT") or None
    minio_access = env.get("MINIO_ACCESS_KEY") or None
    minio_secret = env.get("MINIO_SECRET_KEY") or None
    if minio_endpoint and not (minio_access and minio_secret):
        raise ConfigError("MINIO_ACCESS_KEY and MINIO_SECRET_KEY are required when MINIO_ENDPOINT is set")
    if minio_endpoint and "://" in minio_endpoint:
        raise ConfigError("MINIO_ENDPOINT is host:port without a scheme (set MINIO_SECURE for TLS)")
    bucket = env.get("MINIO_BUCKET") or "email-service"
    if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
        raise ConfigError("MINIO_BUCKET must be 3-63 characters of a-z, 0-9, '.' and '-'")

    try:
        oauth2_providers = load_providers(env)
        oauth2_return_urls = allowed_return_urls(env)
    except ProviderConfigError as exc:
        raise ConfigError(str(exc)) from None

    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        redis_url=redis_url,
        jwt_secret=jwt_secret,
        jwt_issuer=env.get("JWT_ISSUER") or None,
        jwt_audience=env.get("JWT_AUDIENCE") or None,
        credential_keys=parse_credential_keys(credential_raw),
        db_app_role=role,
        minio_endpoint=minio_endpoint,
        minio_access_key=minio_access,
        minio_secret_key=minio_secret,
        minio_bucket=bucket,
        minio_secure=_bool(env, "MINIO_SECURE", True),
        minio_region=env.get("MINIO_REGION") or None,
        public_url=_public_url(env),
        storage_signing_key=env.get("EMAIL_SERVICE_STORAGE_KEY") or _derived_key(jwt_secret, "storage-links"),
        ca_file=_ca_file(env),
        max_body_bytes=_int(env, "EMAIL_SERVICE_MAX_BODY_BYTES", 1024 * 1024),
        # Request line and headers together; a JWT of a few KB fits many times over.
        max_header_bytes=_int(env, "EMAIL_SERVICE_MAX_HEADER_BYTES", 32 * 1024, minimum=4096),
        max_upload_bytes=_int(env, "EMAIL_SERVICE_MAX_UPLOAD_BYTES", 25 * 1024 * 1024),
        max_message_bytes=_int(env, "EMAIL_SERVICE_MAX_MESSAGE_BYTES", 25 * 1024 * 1024),
        send_retry_base_seconds=_int(env, "EMAIL_SERVICE_SEND_RETRY_BASE_SECONDS", 30),
        worker_processes=_int(env, "EMAIL_SERVICE_WORKER_PROCESSES", 4),
        tenant_concurrency=_int(env, "EMAIL_SERVICE_TENANT_CONCURRENCY", 2),
        scheduler_seconds=_int(env, "EMAIL_SERVICE_SCHEDULER_SECONDS", 15),
        upload_retention_hours=_int(env, "EMAIL_SERVICE_UPLOAD_RETENTION_HOURS", 24),
        watch_lease_seconds=_int(env, "EMAIL_SERVICE_WATCH_LEASE_SECONDS", 30, minimum=3),
        watch_threads=_int(env, "EMAIL_SERVICE_WATCH_THREADS", 8),
        change_retention_days=_int(env, "EMAIL_SERVICE_CHANGE_RETENTION_DAYS", 30),
        imap_timeout_seconds=_int(env, "EMAIL_SERVICE_IMAP_TIMEOUT_SECONDS", 60),
        smtp_timeout_seconds=_int(env, "EMAIL_SERVICE_SMTP_TIMEOUT_SECONDS", 60),
        smtp_data_timeout_seconds=_int(env, "EMAIL_SERVICE_SMTP_DATA_TIMEOUT_SECONDS", 600),
        rate_limits_enabled=_bool(env, "EMAIL_SERVICE_RATE_LIMITS", True),
        validate_responses=_bool(env, "EMAIL_SERVICE_VALIDATE_RESPONSES", False),
        events_heartbeat_seconds=_int(env, "EMAIL_SERVICE_EVENTS_HEARTBEAT_SECONDS", 15),
        events_max_catch_up=_int(env, "EMAIL_SERVICE_EVENTS_MAX_CATCH_UP", 1000),
        events_db_pool_size=_int(env, "EMAIL_SERVICE_EVENTS_DB_POOL_SIZE", 4),
        events_max_streams_per_user=_int(env, "EMAIL_SERVICE_EVENTS_MAX_STREAMS_PER_USER", 20),
        log_level=log_level,
        log_format=log_format,
        metrics_port=_int(env, "EMAIL_SERVICE_METRICS_PORT", 0, minimum=0) or None,
        metrics_address=env.get("EMAIL_SERVICE_METRICS_ADDRESS") or "0.0.0.0",  # noqa: S104 - see Settings
        metrics_token=metrics_token,
        destinations=_destinations(env),
        webhook_retry_schedule=_schedule(env, "EMAIL_SERVICE_WEBHOOK_RETRY_SCHEDULE"),
        webhook_timeout_seconds=_seconds(env, "EMAIL_SERVICE_WEBHOOK_TIMEOUT_SECONDS", 10.0),
        webhook_endpoint_concurrency=_int(env, "EMAIL_SERVICE_WEBHOOK_ENDPOINT_CONCURRENCY", 4),
        webhook_tenant_concurrency=_int(env, "EMAIL_SERVICE_WEBHOOK_TENANT_CONCURRENCY", 16),
        webhook_catchup_seconds=_seconds(env, "EMAIL_SERVICE_WEBHOOK_CATCHUP_SECONDS", 5.0),
        oauth2_providers=oauth2_providers,
        oauth2_return_urls=oauth2_return_urls,
        oauth2_state_seconds=_int(env, "EMAIL_SERVICE_OAUTH2_STATE_SECONDS", 600, minimum=30),
        oauth2_timeout_seconds=_seconds(env, "EMAIL_SERVICE_OAUTH2_TIMEOUT_SECONDS", 20.0),
    )
