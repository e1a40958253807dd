"""Every Prometheus metric the service exports, and how processes share them.

Metrics are defined here and nowhere else; code elsewhere records with one call. Labels name
operations, kinds, outcomes and categories, never a tenant, user, account or address: the
series stay few and say nothing about whose mail it is.

Multiprocess mode: the API's worker threads, every process of a worker pool, the job each RQ
work horse runs, watchers and webhook dispatchers write their values to files in
``PROMETHEUS_MULTIPROC_DIR`` (``prepare_directory`` sets it up before anything records), and a
scrape sums the files of that directory. A work horse is forked per job, so it writes to one
file per worker process (``<worker pid>-job``) instead of one per job, which would make every
scrape read more files as jobs go by; the horses of one worker run one after another.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server

if TYPE_CHECKING:
    from email_service.config import Settings
    from email_service.runtime import Runtime

log = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseException)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# ------------------------------------------------------------------------- process identity

_job_identity: tuple[int, str] | None = None  # (pid that adopted it, identifier)


def _process_identifier() -> str:
    if _job_identity is not None and _job_identity[0] == os.getpid():
        return _job_identity[1]
    return str(os.getpid())


def adopt_job_identity() -> None:
    """In an RQ work horse: write to the file its worker's horses share (see the module's doc)."""
    global _job_identity
    _job_identity = (os.getpid(), f"{os.getppid()}-job")


if os.environ.get(MULTIPROC_ENV):
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_identifier)


# ---------------------------------------------------------------------------------- metrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)

HTTP_REQUESTS = Counter(
    "email_service_http_requests",
    "HTTP requests answered, by operation, method and status",
    ["operation", "method", "status"],
)
HTTP_DURATION = Histogram(
    "email_service_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer",
    ["operation", "method"],
    buckets=_LATENCY_BUCKETS,
)
JOBS = Counter("email_service_jobs", "Background task runs, by kind and outcome", ["kind", "outcome"])
JOB_DURATION = Histogram(
    "email_service_job_duration_seconds", "How long a task run took", ["kind", "outcome"], buckets=_JOB_BUCKETS
)
JOB_QUEUE_WAIT = Histogram(
    "email_service_job_queue_wait_seconds",
    "Time from a task being due to a worker claiming it",
    ["kind"],
    buckets=_JOB_BUCKETS,
)
SYNC_MESSAGES = Counter(
    "email_service_sync_messages", "Messages a sync added, updated or removed", ["protocol", "change"]
)
SYNC_BYTES = Counter("email_service_sync_fetched_bytes", "Bytes of messages fetched by sync", ["protocol"])
SENDS = Counter("email_service_sends", "Messages whose delivery ended, by outcome", ["outcome"])
CONNECTION_ERRORS = Counter(
    "email_service_mail_connection_errors", "Failed connections to mail servers, by category", ["protocol", "category"]
)
RATE_LIMITED = Counter("email_service_rate_limit_rejections", "Requests refused by a rate limit", ["operation"])
IDLE_CONNECTIONS = Gauge(
    "email_service_idle_connections", "IMAP IDLE connections the watchers hold", multiprocess_mode="livesum"
)
EVENT_LAG = Histogram(
    "email_service_event_delivery_lag_seconds",
    "Time from a change's commit to its event on an open stream",
    buckets=_LAG_BUCKETS,
)
WEBHOOK_LAG = Histogram(
    "email_service_webhook_delivery_lag_seconds",
    "Time from a webhook delivery's creation to its successful attempt",
    buckets=_LAG_BUCKETS,
)

# Exception class names of protocols.errors (and the destination policy), as label values.
_CATEGORIES = {
    "AuthenticationFailed": "authentication",
    "CertificateFailed": "certificate",
    "HostNotFound": "host_not_found",
    "UnexpectedGreeting": "unexpected_greeting",
    "DestinationRefused": "destination_refused",
    "ConnectionFailed": "connection",
    "MailServerError": "server",
}
_FINAL_SENDS = {"sent", "failed", "ambiguous"}
# Connexion reports operations by their handler's dotted path; labels use the spec's operationId.
OPERATION_NAMES: dict[str, str] = {}


# ----------------------------------------------------------------------- one-line recorders


def connection_failed(protocol: str, error: BaseException) -> None:
    category = next((_CATEGORIES[c.__name__] for c in type(error).__mro__ if c.__name__ in _CATEGORIES), "other")
    CONNECTION_ERRORS.labels(protocol, category).inc()


def session_failed(session: object, error: E) -> E:
    """A mail session (``ImapSession``, ``Pop3Session``, ``SmtpSession``) could not be opened; returns ``error``."""
    connection_failed(type(session).__name__.removesuffix("Session").lower(), error)
    return error


def sync_finished(protocol: str, result: Any) -> Any:
    """Count a sync's changes; returns ``result`` so a sync can end with ``return sync_finished(...)``."""
    SYNC_MESSAGES.labels(protocol, "added").inc(result.messages_added)
    SYNC_MESSAGES.labels(protocol, "updated").inc(result.messages_updated)
    SYNC_MESSAGES.labels(protocol, "removed").inc(result.messages_removed)
    return result


def fetched(protocol: str, raws: Iterable[bytes]) -> None:
    SYNC_BYTES.labels(protocol).inc(sum(len(raw) for raw in raws))


def delivery_status_changed(before: str | None, after: object) -> None:
    """A message's delivery status moved; a move into sent, failed or ambiguous ends a send."""
    if str(after) in _FINAL_SENDS and before != str(after):
        SENDS.labels(str(after)).inc()


def job_ended(kind: object, outcome: str, started: float) -> None:
    elapsed = time.monotonic() - started
    JOBS.labels(str(kind), outcome).inc()
    JOB_DURATION.labels(str(kind), outcome).observe(elapsed)


def job_claimed(kind: object, due_since: datetime) -> None:
    JOB_QUEUE_WAIT.labels(str(kind)).observe(max(0.0, (datetime.now(UTC) - due_since).total_seconds()))


def rate_limited(operation: str) -> None:
    RATE_LIMITED.labels(OPERATION_NAMES.get(operation, "other")).inc()


def lag_since(histogram: Histogram, at: datetime | None) -> None:
    if at is not None:
        histogram.observe(max(0.0, (datetime.now(UTC) - at).total_seconds()))


# -------------------------------------------------------------------------------- exposition


class QueueCollector:
    """Queue depths and the oldest due task's age, read from Redis and PostgreSQL at each scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from email_service.queue.depth import read_depths

        try:
            depths = read_depths(self.runtime)
        except Exception as exc:  # noqa: BLE001 - a scrape shows what it can; the failure is logged
            log.warning("queue depths not read: %s", type(exc).__name__)
            return
        queued = GaugeMetricFamily("email_service_queue_depth", "Carrier jobs ready to run, by queue", labels=["queue"])
        scheduled = GaugeMetricFamily(
            "email_service_queue_scheduled", "Carrier jobs waiting for their time, by queue", labels=["queue"]
        )
        for name, count in depths.queued.items():
            queued.add_metric([name], count)
            scheduled.add_metric([name], depths.scheduled.get(name, 0))
        tasks = GaugeMetricFamily(
            "email_service_tasks_active", "Tasks waiting or running, by kind and status", labels=["kind", "status"]
        )
        for (kind, status), count in sorted(depths.tasks.items()):
            tasks.add_metric([kind, status], count)
        oldest = GaugeMetricFamily(
            "email_service_task_oldest_due_seconds", "How long the oldest due task has waited, by kind", labels=["kind"]
        )
        for kind, age in sorted(depths.oldest_due_seconds.items()):
            oldest.add_metric([kind], age)
        yield from (queued, scheduled, tasks, oldest)


class _ProcessLocal:
    """This process's own metrics, when no multiprocess directory is set (tests that build the app)."""

    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()


def registry(runtime: Runtime | None = None) -> CollectorRegistry:
    """What a scrape reads: every process's files (or this process's metrics), and queue depths with a runtime."""
    found = CollectorRegistry(auto_describe=True)
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(found)
    else:
        found.register(_ProcessLocal())  # type: ignore[arg-type]
    if runtime is not None:
        found.register(QueueCollector(runtime))  # type: ignore[arg-type]
    return found


def exposition(scrape_from: CollectorRegistry) -> bytes:
    return generate_latest(scrape_from)


def token_matches(configured: str | None, authorization: str | None) -> bool:
    if not configured or not authorization:
        return False
    return hmac.compare_digest(authorization.encode(), f"Bearer {configured}".encode())


_server_lock = threading.Lock()


def serve_port(settings: Settings, runtime: Runtime | None = None) -> None:
    """Serve ``/metrics`` on ``EMAIL_SERVICE_METRICS_PORT`` in a thread of this process, when it is set.

    Each pod's processes share one directory, so one server per pod shows them all. A port
    already taken (a second command on one machine) is logged and left to the first.
    """
    if not settings.metrics_port:
        return
    with _server_lock:
        try:
            start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry(runtime))
        except OSError as exc:
            log.warning("metrics port %d not opened: %s", settings.metrics_port, exc.strerror or type(exc).__name__)
            return
    log.info("metrics on %s:%d/metrics", settings.metrics_address, settings.metrics_port)
