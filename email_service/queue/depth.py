"""How much background work waits, read when metrics are scraped (Redis queues and the tasks table)."""

from __future__ import annotations

from dataclasses import dataclass

from rq import Queue
from rq.registry import ScheduledJobRegistry
from sqlalchemy import text

from email_service.queue.connection import QUEUE_NAMES
from email_service.runtime import Runtime

# Active tasks by kind and status, and how long the oldest one that is due has waited for a worker.
_TASKS = text("""
SELECT kind, status, count(*),
       coalesce(extract(epoch FROM now() - min(coalesce(run_after, created_at))
                FILTER (WHERE status <> 'started' AND (run_after IS NULL OR run_after <= now()))), 0)
FROM tasks
WHERE status IN ('pending', 'retry', 'started')
GROUP BY kind, status
""")


@dataclass(frozen=True)
class QueueDepths:
    queued: dict[str, int]  # carrier jobs ready to run, by RQ queue
    scheduled: dict[str, int]  # carrier jobs waiting for their time, by RQ queue
    tasks: dict[tuple[str, str], int]  # active tasks by (kind, status)
    oldest_due_seconds: dict[str, float]  # by kind: the longest a due task has waited


def read_depths(runtime: Runtime) -> QueueDepths:
    queued: dict[str, int] = {}
    scheduled: dict[str, int] = {}
    for name in QUEUE_NAMES:
        queue = Queue(name, connection=runtime.redis)
        queued[name] = queue.count
        scheduled[name] = ScheduledJobRegistry(queue=queue).count
    tasks: dict[tuple[str, str], int] = {}
    oldest: dict[str, float] = {}
    with runtime.db.maintenance_session() as session:
        for kind, status, count, age in session.execute(_TASKS):
            tasks[(str(kind), str(status))] = int(count)
            oldest[str(kind)] = max(oldest.get(str(kind), 0.0), float(age or 0))
    return QueueDepths(queued, scheduled, tasks, oldest)
