from __future__ import annotations

import logging

from rq import Queue, Worker

from email_service.config import Settings
from email_service.queue.connection import QUEUE_NAMES, redis_from_url

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, burst: bool = False) -> bool:
    """Work the service's queues until stopped (or, with ``burst``, until they are empty)."""
    if settings.redis_url is None:
        raise ValueError("run_worker needs a Redis URL")
    # RQ blocks on BLPOP longer than a client timeout would allow; no socket timeout here.
    connection = redis_from_url(settings.redis_url, timeout=None)  # type: ignore[arg-type]
    queues = [Queue(name, connection=connection) for name in QUEUE_NAMES]
    worker = Worker(queues, connection=connection)
    log.info("worker %s listening on %s", worker.name, ", ".join(QUEUE_NAMES))
    return worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
