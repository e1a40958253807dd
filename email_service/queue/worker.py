"""``email-service worker``: a pool of RQ worker processes for the service's queues, and the scheduler.

Each process works one job at a time, so a pool of several keeps a slow mail server from
holding up everyone else; the per-tenant limit on queued and running jobs (see ``tasks.push``)
keeps any one tenant from filling the pool.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import time
from typing import Any

from rq import Worker
from rq.worker_pool import WorkerPool

from email_service.config import Settings
from email_service.observability import metrics
from email_service.queue import context
from email_service.queue.connection import QUEUE_NAMES, redis_from_url
from email_service.queue.scheduler import Scheduler
from email_service.runtime import Runtime

log = logging.getLogger(__name__)
JOB_MONITORING_SECONDS = 10
WORKER_TTL_SECONDS = 40
MAINTENANCE_SECONDS = 20
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no worker outlives who started it.

    A parent that dies while still forking (a pool stopped during start-up, before it handles
    signals) can die before its child gets here: the request then never fires, and the child
    would work the queues forever as an orphan. A child whose parent is already gone stops at
    once. ``parent_pid``: the parent's pid, taken before the fork, where this runs in a child
    that multiprocessing did not start (``subprocess``'s ``preexec_fn``).
    """
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's clean stop still ends its children
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)  # nothing taken yet, nothing to clean up


class ServiceWorker(Worker):
    """RQ's worker with the service's intervals, dying with the pool that started it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # RQ calls a job abandoned once its worker's heartbeat lapses (monitoring interval + 60 s);
        # the task's own heartbeat lets the scheduler resume it sooner, this keeps RQ's records tidy.
        kwargs.setdefault("job_monitoring_interval", JOB_MONITORING_SECONDS)
        kwargs.setdefault("worker_ttl", WORKER_TTL_SECONDS)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_SECONDS)
        super().__init__(*args, **kwargs)
        die_with_parent()

    def main_work_horse(self, job: Any, queue: Any) -> None:
        metrics.adopt_job_identity()  # one metrics file for all of this worker's horses, not one per job
        super().main_work_horse(job, queue)


class ServicePool(WorkerPool):
    """RQ's pool, replacing a process that keeps dying (Redis away, say) after a growing pause.

    RQ starts a new process each second for every one that died: with Redis unreachable each
    dies at once with a traceback, so the pool forked and logged in a tight loop (40 tracebacks
    in 15 s from two processes) for as long as the outage lasted. A process that dies within
    ``QUICK_DEATH_SECONDS`` of its start doubles the pause before the pool starts any other
    (from 1 s up to ``MAX_RESPAWN_PAUSE``), once for all that died in one round; one that lived
    longer ends the pauses.
    """

    QUICK_DEATH_SECONDS = 30.0
    MAX_RESPAWN_PAUSE = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._born: dict[str, float] = {}
        self._pause = 0.0
        self._respawn_at = 0.0
        self._quick_deaths = 0  # in the current round

    def start_worker(self, *args: Any, **kwargs: Any) -> None:
        super().start_worker(*args, **kwargs)
        for name in self.worker_dict.keys() - self._born.keys():
            self._born[name] = time.monotonic()

    def handle_dead_worker(self, worker_data: Any) -> None:
        now = time.monotonic()
        lived = now - self._born.pop(worker_data.name, now)
        if lived < self.QUICK_DEATH_SECONDS:
            self._quick_deaths += 1
        else:
            self._pause = 0.0
        super().handle_dead_worker(worker_data)

    def check_workers(self, respawn: bool = True) -> None:
        self._quick_deaths = 0
        self.reap_workers()  # counts this round's quick deaths
        if self._quick_deaths:
            self._pause = min(self.MAX_RESPAWN_PAUSE, max(1.0, self._pause * 2))
            self._respawn_at = time.monotonic() + self._pause
            log.warning(
                "%d worker process(es) died soon after starting; none is started for %.0f s",
                self._quick_deaths,
                self._pause,
            )
        super().check_workers(respawn=respawn and time.monotonic() >= self._respawn_at)


def run_worker(settings: Settings, *, burst: bool = False, schedule: bool = True, processes: int | None = None) -> None:
    """Work the service's queues until stopped (or, with ``burst``, until they are empty).

    Jobs use ``settings`` (the worker's own, resolved configuration), never the environment.
    Unless ``schedule`` is off, the scheduler runs beside the pool.
    """
    context.use_settings(settings)
    # RQ blocks on BLPOP longer than a client timeout would allow; no socket timeout here.
    connection = redis_from_url(settings.redis_url, timeout=None)  # type: ignore[arg-type]
    pool = ServicePool(
        list(QUEUE_NAMES),
        connection=connection,
        num_workers=processes or settings.worker_processes,
        worker_class=ServiceWorker,
    )
    scheduler = None
    if schedule and not burst:
        name = f"{pool.name}@{os.getpid()}"
        scheduler = Scheduler(Runtime.build(settings), name, interval=settings.scheduler_seconds)
        scheduler.start()
    log.info("worker pool of %d processes on %s", pool.num_workers, ", ".join(QUEUE_NAMES))
    try:
        pool.start(burst=burst, logging_level=settings.log_level)
    finally:
        if scheduler is not None:
            scheduler.stop()
            scheduler.runtime.close()
