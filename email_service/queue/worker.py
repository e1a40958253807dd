from __future__ import annotations

import logging

from rq import Queue, Worker

from email_service.config import Settings
from email_service.db import Database
from email_service.queue.connection import QUEUE_NAMES, redis_from_url
from email_service.queue.scheduler import SyncScheduler

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, burst: bool = False, schedule: bool = True) -> bool:
    """Work the service's queues until stopped (or, with ``burst``, until they are empty).

    Unless ``schedule`` is off, the automatic-sync scheduler runs beside the worker.
    """
    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("run_worker needs database and Redis URLs")
    # RQ blocks on BLPOP longer than a client timeout would allow; no socket timeout here.
    connection = redis_from_url(settings.redis_url, timeout=None)  # type: ignore[arg-type]
    queues = [Queue(name, connection=connection) for name in QUEUE_NAMES]
    worker = Worker(queues, connection=connection)
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
