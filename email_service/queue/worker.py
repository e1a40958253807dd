from __future__ import annotations

import logging

from rq import Queue, Worker

from email_service.config import Settings
from email_service.db import Database
from email_service.queue.connection import QUEUE_NAMES, redis_from_url
from email_service.queue.scheduler import SyncScheduler

log = logging.getLogger(__name__)
JOB_MONITORING_SECONDS = 10
WORKER_TTL_SECONDS = 40
MAINTENANCE_SECONDS = 20


def run_worker(settings: Settings, *, burst: bool = False, schedule: bool = True) -> bool:
    """Work the service's queues until stopped (or, with ``burst``, until they are empty).

    Unless ``schedule`` is off, the automatic-sync scheduler runs beside the worker.
    """
    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("run_worker needs database and Redis URLs")
    # RQ blocks on BLPOP longer than a client timeout would allow; no socket timeout here.
    connection = redis_from_url(settings.redis_url, timeout=None)  # type: ignore[arg-type]
    queues = [Queue(name, connection=connection) for name in QUEUE_NAMES]
    worker = Worker(
        queues,
        connection=connection,
        # A job is abandoned once its worker's heartbeat lapses: RQ allows monitoring interval + 60 s.
        # Checking for that every 20 s (not RQ's 10 minutes) puts a killed worker's sync back on the
        # queue within about two minutes. The sync lock's 60 s lease has run out by then.
        job_monitoring_interval=JOB_MONITORING_SECONDS,
        worker_ttl=WORKER_TTL_SECONDS,
        maintenance_interval=MAINTENANCE_SECONDS,
    )
    scheduler = None
    if schedule and not burst:
        scheduler = SyncScheduler(
            Database(settings.database_url, settings.db_app_role, pool_size=2),
            redis_from_url(settings.redis_url),
            worker.name,
        )
        scheduler.start()
    log.info("worker %s listening on %s", worker.name, ", ".join(QUEUE_NAMES))
    try:
        return worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
    finally:
        if scheduler is not None:
            scheduler.stop()
