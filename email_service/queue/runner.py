"""Running tasks: the carrier job RQ executes, and the reaper that resumes tasks whose worker died.

One run: claim the task (only the carrier named on its row may), keep its heartbeat fresh,
call the kind's job function, then record the outcome by the kind's policy:

- a result: success;
- ``TaskDeferred``: waiting again, without counting a try;
- ``TaskRetry``: another try after the policy's wait, or failure when none is left;
- ``TaskFailed``, the run's time limit, or anything unexpected: failure, with the reason in
  words (an unexpected error is logged in full here and shown only as a reference).

Every failure, however it comes, goes through the kind's failure hook, so a send that fails
marks its message failed (or ambiguous) whatever stopped it.
"""

from __future__ import annotations

import importlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from email_service.models import Task, TaskKind, TaskStatus
from email_service.observability import logs, metrics
from email_service.queue.context import job_runtime
from email_service.queue.locks import AccountLock
from email_service.queue.policy import HEARTBEAT_SECONDS, RETENTION, STALE_SECONDS, TaskPolicy, policy
from email_service.queue.tasks import TaskDeferred, TaskFailed, TaskRetry, push
from email_service.runtime import Runtime
from email_service.tenancy import Principal

log = logging.getLogger(__name__)

# Job functions by kind, as "module:function" so the queue package does not import the features.
# Each takes a TaskContext and returns the task's result; each failure hook takes the context,
# the reason in words and whether it is permanent, and brings the kind's own rows in line.
JOBS: dict[TaskKind, str] = {
    TaskKind.SYNC: "email_service.mailbox.jobs:run_sync",
    TaskKind.WRITEBACK: "email_service.mailbox.jobs:run_writeback",
    TaskKind.SEND: "email_service.outgoing.jobs:run_send",
    TaskKind.DRAFT: "email_service.outgoing.jobs:run_draft",
    TaskKind.CLEANUP: "email_service.retention.cleanup:run_cleanup",
}
FAILURE_HOOKS: dict[TaskKind, str] = {
    TaskKind.SYNC: "email_service.mailbox.jobs:sync_failed",
    TaskKind.SEND: "email_service.outgoing.jobs:send_failed",
}


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class TaskContext:
    """What a job function gets: who, what, which try, and a way to report progress."""

    runtime: Runtime
    task_id: str
    kind: TaskKind
    principal: Principal
    account_id: str | None
    message_id: str | None
    params: dict[str, Any]
    attempt: int
    carrier_id: str
    holds_account: bool = False  # the runner holds the account's lock for the whole run
    # What an earlier try of this task recorded of its work (``keep``).
    earlier_result: dict[str, Any] = field(default_factory=dict)
    started_at: datetime | None = None  # when this run of the task began (None: not known)
    _progress: int = 0
    _reported_at: float = field(default=0.0)
    started: float = field(default_factory=time.monotonic)

    def still_running(self, session: Session) -> bool:
        """Whether this run still holds its task, checked in the caller's transaction.

        The task's row stays share-locked until that transaction ends, so the reaper cannot hand
        the task to another worker in between (it skips locked rows and looks again later).
        """
        held = session.execute(
            select(Task.id)
            .where(Task.id == self.task_id, Task.carrier_id == self.carrier_id, Task.status == TaskStatus.STARTED)
            .with_for_update(read=True)
        ).first()
        return held is not None

    def keep(self, result: dict[str, Any]) -> None:
        """Record what this try achieved, for a later try of the task (``earlier_result``).

        Shown only once the task succeeds. A record that cannot be written is logged: the work is
        done either way, and a later try only reports less of it.
        """
        self.earlier_result = dict(result)
        try:
            with self.runtime.db.maintenance_session() as session:
                session.execute(
                    update(Task)
                    .where(Task.id == self.task_id, Task.carrier_id == self.carrier_id)
                    .values(result=self.earlier_result, updated_at=datetime.now(UTC))
                )
        except SQLAlchemyError as exc:
            log.warning("task %s: what it did so far not recorded: %s", self.task_id, type(exc).__name__)

    def progress(self, percent: int) -> None:
        """Record progress (0-100); written at most twice a second and never backwards."""
        percent = max(0, min(100, int(percent)))
        now = time.monotonic()
        if percent <= self._progress or (now - self._reported_at < 0.5 and percent < 100):
            return
        self._progress, self._reported_at = percent, now
        try:
            with self.runtime.db.maintenance_session() as session:
                session.execute(
                    update(Task)
                    .where(Task.id == self.task_id, Task.carrier_id == self.carrier_id, Task.progress < percent)
                    .values(progress=percent, updated_at=datetime.now(UTC))
                )
        except SQLAlchemyError as exc:  # progress is a courtesy; the work itself goes on
            log.warning("task %s: progress not recorded: %s", self.task_id, type(exc).__name__)


class _Heartbeat:
    """Keeps the task's heartbeat fresh while it runs; a task whose heartbeat lapses is resumed elsewhere."""

    def __init__(self, runtime: Runtime, task_id: str, carrier_id: str) -> None:
        self.runtime, self.task_id, self.carrier_id = runtime, task_id, carrier_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"task-heartbeat-{task_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                with self.runtime.db.maintenance_session() as session:
                    session.execute(
                        update(Task)
                        .where(Task.id == self.task_id, Task.carrier_id == self.carrier_id)
                        .values(heartbeat_at=datetime.now(UTC))
                    )
            except SQLAlchemyError as exc:  # a passing fault: the next beat tries again
                log.warning("task %s: heartbeat failed: %s", self.task_id, type(exc).__name__)


def run_task(task_id: str, tenant_id: str, user_id: str, carrier_id: str) -> None:
    """The carrier job: run task ``task_id`` once, if this carrier is still the one named on it."""
    runtime = job_runtime()
    principal = Principal(uuid.UUID(tenant_id), uuid.UUID(user_id))
    with runtime.db.maintenance_session() as session:
        task = session.get(Task, task_id)
    logs.start_job(task_id, tenant_id, task.account_id if task else None, getattr(get_current_job(), "meta", None))
    if task is None or task.carrier_id != carrier_id or not task.status.active or task.status is TaskStatus.STARTED:
        log.info("carrier %s of task %s has nothing to do (superseded or finished)", carrier_id, task_id)
        return
    rules = policy(task.kind, runtime.settings)
    lock = AccountLock(runtime.db, task.account_id) if rules.holds_account and task.account_id else None
    if lock is not None and not lock.acquire():
        # Another task works on the account. This one is not claimed (it stays waiting, so a new
        # request still joins it) and comes back in a few seconds.
        push(runtime, task_id, principal, task.kind, delay=random.uniform(2.0, 6.0), replacing=carrier_id)
        return
    try:
        context = _claim(runtime, principal, task_id, carrier_id)
        if context is None:
            return
        context.holds_account = lock is not None
        with _Heartbeat(runtime, task_id, carrier_id):
            _run(context, rules)
    finally:
        if lock is not None:
            lock.release()


def _run(context: TaskContext, rules: TaskPolicy) -> None:
    try:
        result = _resolve(JOBS[context.kind])(context)
    except TaskDeferred as deferred:
        _defer(context, deferred)
    except TaskRetry as retry:
        delay = rules.retry_delay(context.attempt)
        if delay is None and retry.otherwise is not None:
            _finish(context, TaskStatus.SUCCESS, result=retry.otherwise)
        elif delay is None:
            _fail(context, retry.message, permanent=False)
        else:
            _retry(context, retry.message, delay)
    except TaskFailed as failed:
        _fail(context, failed.message, permanent=failed.permanent)
    except JobTimeoutException:
        _fail(context, f"it did not finish within its time limit of {rules.timeout // 60} minutes", permanent=False)
    except Exception:
        log.exception("task %s (%s) failed unexpectedly", context.task_id, context.kind)
        _fail(context, f"an internal error stopped it (reference {context.task_id})", permanent=False)
    else:
        _finish(context, TaskStatus.SUCCESS, result=result if isinstance(result, dict) else {})


def _claim(runtime: Runtime, principal: Principal, task_id: str, carrier_id: str) -> TaskContext | None:
    now = datetime.now(UTC)
    with runtime.db.maintenance_session() as session:
        task = session.scalars(
            update(Task)
            .where(
                Task.id == task_id,
                Task.carrier_id == carrier_id,
                Task.status.in_([TaskStatus.PENDING, TaskStatus.RETRY]),
            )
            .values(
                status=TaskStatus.STARTED, attempts=Task.attempts + 1, heartbeat_at=now, started_at=now, updated_at=now
            )
            .returning(Task)
        ).one_or_none()
    if task is None:
        log.info("carrier %s of task %s has nothing to do (superseded or finished)", carrier_id, task_id)
        return None
    metrics.job_claimed(task.kind, max(task.created_at, task.run_after or task.created_at))
    return TaskContext(
        runtime=runtime,
        task_id=task.id,
        kind=task.kind,
        principal=principal,
        account_id=task.account_id,
        message_id=task.message_id,
        params=dict(task.params or {}),
        attempt=task.attempts,
        carrier_id=carrier_id,
        started_at=task.started_at,
        earlier_result=dict(task.result or {}),
        _progress=task.progress,
    )


def _update(context: TaskContext, **values: Any) -> bool:
    """Write the outcome, unless another carrier took the task over meanwhile (then its outcome counts)."""
    values.setdefault("updated_at", datetime.now(UTC))
    with context.runtime.db.maintenance_session() as session:
        done = session.execute(
            update(Task).where(Task.id == context.task_id, Task.carrier_id == context.carrier_id).values(**values)
        )
        return bool(done.rowcount)


def _finish(context: TaskContext, status: TaskStatus, **values: Any) -> bool:
    values.update(status=status, finished_at=datetime.now(UTC))
    metrics.job_ended(context.kind, str(status), context.started)
    if status is TaskStatus.SUCCESS:
        values.update(progress=100, error=None)
    return _update(context, **values)


def _fail(context: TaskContext, message: str, *, permanent: bool) -> None:
    metrics.job_ended(context.kind, str(TaskStatus.FAILURE), context.started)
    now = datetime.now(UTC)
    with context.runtime.db.maintenance_session() as session:
        # The row lock keeps another carrier from taking the task over meanwhile.
        held = session.execute(
            select(Task.id).where(Task.id == context.task_id, Task.carrier_id == context.carrier_id).with_for_update()
        ).first()
        if held is None:
            return  # another carrier took the task over: its outcome counts
        # What the task worked on says so first (a message's delivery status, in its own
        # transaction), so a client that sees the task failed never sees the message still sending.
        run_failure_hook(context.runtime, context.kind, context, message, permanent)
        session.execute(
            update(Task)
            .where(Task.id == context.task_id)
            .values(status=TaskStatus.FAILURE, error=message, finished_at=now, updated_at=now)
        )


def run_failure_hook(runtime: Runtime, kind: TaskKind, context: TaskContext, message: str, permanent: bool) -> None:
    hook = FAILURE_HOOKS.get(kind)
    if hook is None:
        return
    try:
        _resolve(hook)(context, message, permanent)
    except Exception:
        log.exception("failure hook of %s task %s failed", kind, getattr(context, "task_id", "?"))


def _retry(context: TaskContext, message: str, delay: int) -> None:
    run_after = datetime.now(UTC) + timedelta(seconds=delay)
    metrics.job_ended(context.kind, "retry", context.started)
    if _update(context, status=TaskStatus.RETRY, error=message, run_after=run_after):
        log.info("task %s: try %d failed (%s); next in %d s", context.task_id, context.attempt, message, delay)
        push(context.runtime, context.task_id, context.principal, context.kind, delay=delay)


def _defer(context: TaskContext, deferred: TaskDeferred) -> None:
    run_after = datetime.now(UTC) + timedelta(seconds=deferred.seconds)
    metrics.job_ended(context.kind, "deferred", context.started)
    # Waiting for the account is not a try: the attempt counted at claim is given back.
    if _update(context, status=TaskStatus.PENDING, attempts=Task.attempts - 1, run_after=run_after, heartbeat_at=None):
        push(context.runtime, context.task_id, context.principal, context.kind, delay=deferred.seconds)


# ---------------------------------------------------------------------------------------- reaper


def reap(runtime: Runtime, *, lost_after: float = 60.0) -> dict[str, int]:
    """Resume tasks whose worker died, re-push tasks whose carrier Redis lost, drop old finished tasks.

    Runs on the scheduler's leader only. A started task whose heartbeat lapsed is put back to
    run again (up to its policy's ``abandoned_retries``, then failed): sync carries on from what
    it committed, a send finds out whether its data had gone out and says ambiguous if so.
    """
    now = datetime.now(UTC)
    counts = {"resumed": 0, "failed": 0, "repushed": 0, "removed": 0}
    with runtime.db.maintenance_session() as session:
        stale = list(
            session.scalars(
                select(Task)
                .where(Task.status == TaskStatus.STARTED, Task.heartbeat_at < now - timedelta(seconds=STALE_SECONDS))
                .with_for_update(skip_locked=True)
                .limit(500)
            )
        )
        resumed: list[Task] = []
        failed: list[Task] = []
        for task in stale:
            if task.abandoned < policy(task.kind, runtime.settings).abandoned_retries:
                task.status, task.abandoned, task.heartbeat_at = TaskStatus.PENDING, task.abandoned + 1, None
                task.error = "the worker running it stopped; it is resumed on another"
                resumed.append(task)
            else:
                task.status, task.finished_at = TaskStatus.FAILURE, now
                task.error = f"the worker running it stopped {task.abandoned + 1} times; it was given up"
                failed.append(task)
            task.updated_at = now
        waiting = list(
            session.scalars(
                select(Task)
                .where(
                    Task.status.in_([TaskStatus.PENDING, TaskStatus.RETRY]),
                    Task.updated_at < now - timedelta(seconds=lost_after),
                    or_(Task.run_after.is_(None), Task.run_after < now - timedelta(seconds=lost_after)),
                )
                .limit(500)
            )
        )
        removed = session.execute(
            delete(Task).where(and_(Task.finished_at.is_not(None), Task.finished_at < now - RETENTION))
        ).rowcount
        for task in failed:
            # As in _fail: what the task worked on says so before the task's failure commits (the
            # rows stay locked meanwhile), so a stop in between leaves the task to be reaped again
            # rather than failed with its message still "sending".
            log.warning("task %s (%s) lost its worker too often; failing it", task.id, task.kind)
            run_failure_hook(runtime, task.kind, _orphan_context(runtime, task), task.error or "", False)
    for task in resumed:
        log.warning("task %s (%s) lost its worker; resuming it", task.id, task.kind)
        push(runtime, task.id, _principal(task), task.kind)
    for task in waiting:
        if not _carrier_alive(runtime, task.carrier_id):
            log.warning("task %s (%s) had no carrier job (Redis lost it?); pushing it again", task.id, task.kind)
            push(runtime, task.id, _principal(task), task.kind)
            counts["repushed"] += 1
    counts.update(resumed=len(resumed), failed=len(failed), removed=removed or 0)
    return counts


def _principal(task: Task) -> Principal:
    return Principal(task.tenant_id, task.user_id)


def _orphan_context(runtime: Runtime, task: Task) -> TaskContext:
    """The context of a task no worker runs any more, for its failure hook."""
    return TaskContext(
        runtime=runtime,
        task_id=task.id,
        kind=task.kind,
        principal=_principal(task),
        account_id=task.account_id,
        message_id=task.message_id,
        params=dict(task.params or {}),
        attempt=task.attempts,
        carrier_id=task.carrier_id or "",
        started_at=task.started_at,
    )


# A carrier in any of these states will still run (rate-limited: held back by its tenant's limit).
_WAITING_JOB_STATES = {
    JobStatus.CREATED,
    JobStatus.QUEUED,
    JobStatus.SCHEDULED,
    JobStatus.DEFERRED,
    JobStatus.STARTED,
    JobStatus.RATE_LIMITED,
    JobStatus.READY_TO_ENQUEUE,
}


def _carrier_alive(runtime: Runtime, carrier_id: str | None) -> bool:
    if not carrier_id:
        return False
    try:
        job = Job.fetch(carrier_id, connection=runtime.redis)
    except NoSuchJobError:
        return False
    return job.get_status(refresh=False) in _WAITING_JOB_STATES
