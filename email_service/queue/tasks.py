"""Tasks as the API shows them: RQ jobs owned by one tenant's user, with progress and a result.

The task id is the RQ job id. Ownership is kept in the job's meta, and a job that belongs to
someone else is reported exactly like one that does not exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from email_service.queue.jobs import sync_account
from email_service.tenancy import Principal

TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
ACTIVE_KEY = "email_service:active-task:{kind}:{account_id}"
RESULT_TTL = 24 * 3600
STATUS = {
    JobStatus.QUEUED: "pending",
    JobStatus.DEFERRED: "pending",
    JobStatus.SCHEDULED: "pending",
    JobStatus.STARTED: "started",
    JobStatus.FINISHED: "success",
    JobStatus.FAILED: "failure",
    JobStatus.STOPPED: "failure",
    JobStatus.CANCELED: "failure",
}
ACTIVE = {"pending", "started", "retry"}


@dataclass(frozen=True)
class TaskView:
    task_id: str
    status: str
    progress: int
    result: dict | None
    error: str | None


def _owned(job: Job, principal: Principal) -> bool:
    return job.meta.get("tenant_id") == str(principal.tenant_id) and job.meta.get("user_id") == str(principal.user_id)


def _status(job: Job) -> str:
    status = job.get_status(refresh=False)
    if status in (JobStatus.SCHEDULED, JobStatus.QUEUED) and job.meta.get("attempts", 0) > 0:
        return "retry"
    return STATUS.get(status, "pending")


def view(redis: Redis, principal: Principal, task_id: str) -> TaskView | None:
    if not TASK_ID.match(task_id):
        return None  # RQ refuses such ids outright; to the caller it is simply no task of theirs
    try:
        job = Job.fetch(task_id, connection=redis)
    except NoSuchJobError:
        return None
    if not _owned(job, principal):
        return None
    status = _status(job)
    result = job.return_value() if status == "success" else None
    progress = 100 if status == "success" else int(job.meta.get("progress", 0))
    error = job.meta.get("error") if status in ("failure", "retry") else None
    if status == "failure" and not error:
        error = "the task stopped before it finished"
    return TaskView(task_id=job.id, status=status, progress=progress, result=result, error=error)


def enqueue_once(
    redis: Redis,
    queue_name: str,
    kind: str,
    principal: Principal,
    account_id: str,
    function: Callable[..., Any],
    *args: Any,
    timeout: int = 3600,
    retry: Retry | None = None,
) -> tuple[str, str]:
    """Enqueue ``function`` unless a task of this kind is already pending or running for the account."""
    key = ACTIVE_KEY.format(kind=kind, account_id=account_id)
    current = redis.get(key)
    if current:
        existing = view(redis, principal, current.decode())
        if existing is not None and existing.status in ACTIVE:
            return existing.task_id, existing.status
    job = Queue(queue_name, connection=redis).enqueue(
        function,
        *args,
        job_timeout=timeout,
        retry=retry,
        result_ttl=RESULT_TTL,
        failure_ttl=RESULT_TTL,
        meta={
            "tenant_id": str(principal.tenant_id),
            "user_id": str(principal.user_id),
            "account_id": account_id,
            "kind": kind,
            "progress": 0,
        },
    )
    redis.set(key, job.id, ex=timeout)
    return job.id, "pending"


# A sync whose worker dies (killed, OOM, lost host) is requeued by RQ once the worker's heartbeat
# lapses; the sync commits as it goes, so the next run carries on where it stopped. A sync that ran
# and failed is not retried: sync_account clears the retries then.
ABANDONED_SYNC_RETRIES = 3


def enqueue_sync(
    redis: Redis,
    principal: Principal,
    account_id: str,
    *,
    force: bool = False,
    folders: list[str] | None = None,
) -> tuple[str, str]:
    """Start a sync of the account unless one is pending or running; returns (task id, status)."""
    return enqueue_once(
        redis,
        "sync",
        "sync",
        principal,
        account_id,
        sync_account,
        account_id,
        str(principal.tenant_id),
        str(principal.user_id),
        force,
        folders,
        retry=Retry(max=ABANDONED_SYNC_RETRIES),
    )
