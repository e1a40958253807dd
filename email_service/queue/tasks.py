"""The task API: the one way background work is started, followed and ended.

A task is a row in PostgreSQL (kind, owner, account, parameters, status, progress, result or
reason). RQ only carries "run task X now" (a *carrier* job, see ``runner``), so a lost Redis
loses no task: the reaper puts back a carrier for any task that waits without one.

Nothing outside ``email_service.queue`` imports ``rq``: services call ``enqueue`` and ``view``,
jobs raise ``TaskFailed``, ``TaskRetry`` or ``TaskDeferred``.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from rq import Queue
from rq.rate_limit import RateLimit
from sqlalchemy import event, func, select, text, update
from sqlalchemy.orm import Session

from email_service.models import Task, TaskKind, TaskStatus
from email_service.observability import logs
from email_service.queue.policy import STALE_SECONDS, policy
from email_service.runtime import Runtime
from email_service.tenancy import Principal

log = logging.getLogger(__name__)
TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class TaskFailed(Exception):
    """The task failed; ``message`` is meant for the user (the task API shows it).

    ``permanent``: nothing will change by trying again until someone changes something (a
    refused login, a certificate); it makes an account's automatic sync back off hardest.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class TaskRetry(Exception):
    """A failure worth trying again: the kind's policy says when, or fails the task when no try is left.

    ``otherwise``: the result the task succeeds with when no try is left, for work whose main
    part is done and only a courtesy after it failed (a delivered message whose Sent copy could
    not be filed is not a failed send).
    """

    def __init__(self, message: str, *, otherwise: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.otherwise = otherwise


class TaskDeferred(Exception):
    """The task cannot run now (its account is busy); it runs again after ``seconds`` without counting a try."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = seconds
        self.reason = reason


@dataclass(frozen=True)
class Enqueued:
    task_id: str
    status: TaskStatus
    created: bool  # False: the request joined a task that was already waiting or running
    after_running: bool = False  # True: created to run once the account's running sync ends


@dataclass(frozen=True)
class TaskView:
    task_id: str
    kind: TaskKind
    status: TaskStatus
    progress: int
    result: dict | None
    error: str | None
    attempts: int
    account_id: str | None
    message_id: str | None


def new_task_id() -> str:
    return secrets.token_hex(12)


def _covers(running: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a sync with ``running`` parameters does everything a request for ``wanted`` asks."""
    if wanted.get("force") and not running.get("force"):
        return False
    if running.get("folders") is None:
        return True
    return wanted.get("folders") is not None and set(wanted["folders"]) <= set(running["folders"])


def _widened(waiting: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """Parameters of a waiting sync that also does what ``wanted`` asks."""
    folders = None
    if waiting.get("folders") is not None and wanted.get("folders") is not None:
        folders = sorted(set(waiting["folders"]) | set(wanted["folders"]))
    return {"force": bool(waiting.get("force") or wanted.get("force")), "folders": folders}


def enqueue(
    runtime: Runtime,
    kind: TaskKind,
    principal: Principal,
    *,
    account_id: str | None = None,
    message_id: str | None = None,
    params: dict[str, Any] | None = None,
    join_running: bool = True,
    session: Session | None = None,
) -> Enqueued:
    """Create a task and hand it to the workers; a sync may instead join the account's sync.

    A sync request joins a sync of the same account that is still waiting (widening it with
    ``force``/``folders`` if asked), or one that is running when that one already does all the
    request asks; otherwise it is queued to run after the running one, never dropped.
    ``join_running=False`` is for a change the server reported just now: a running sync may have
    looked at the folder before it happened, so only a sync that has not started yet will do.

    With ``session``, the task is written in the caller's transaction, so it exists exactly
    when what it works on does (a message queued to send is never left without its task), and
    is handed to the workers once that transaction commits.
    """
    if session is None:
        with runtime.db.tenant_session(principal) as own:
            enqueued = _add(own, kind, principal, account_id, message_id, dict(params or {}), join_running)
        if enqueued.created:
            push(runtime, enqueued.task_id, principal, kind)
        return enqueued
    enqueued = _add(session, kind, principal, account_id, message_id, dict(params or {}), join_running)
    if enqueued.created:

        def push_after_commit(_session: Session) -> None:
            try:
                push(runtime, enqueued.task_id, principal, kind)
            except Exception:  # noqa: BLE001 - the commit stands; the reaper pushes a task left without a carrier
                log.exception("task %s was saved but not handed to the workers; the reaper will", enqueued.task_id)

        event.listen(session, "after_commit", push_after_commit, once=True)
    return enqueued


def _add(
    session: Session,
    kind: TaskKind,
    principal: Principal,
    account_id: str | None,
    message_id: str | None,
    params: dict[str, Any],
    join_running: bool,
) -> Enqueued:
    """The task row (or the waiting or running sync it joins), in ``session``'s transaction."""
    after_running = False
    if kind is TaskKind.SYNC:
        # Two requests for one account at once must not both decide to create a task.
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"sync-enqueue:{account_id}"}
        )
        active = list(
            session.scalars(
                select(Task)
                .where(
                    Task.account_id == account_id,
                    Task.kind == TaskKind.SYNC,
                    Task.status.in_([TaskStatus.PENDING, TaskStatus.RETRY, TaskStatus.STARTED]),
                )
                .order_by(Task.created_at)
                .with_for_update()
            )
        )
        waiting = next((t for t in active if t.status is not TaskStatus.STARTED), None)
        running = next((t for t in active if t.status is TaskStatus.STARTED), None)
        if waiting is not None:
            if not _covers(waiting.params, params):
                waiting.params = _widened(waiting.params, params)
                waiting.updated_at = func.now()
            return Enqueued(waiting.id, waiting.status, created=False)
        if running is not None and join_running and _covers(running.params, params):
            return Enqueued(running.id, running.status, created=False)
        after_running = running is not None
    task = Task(
        id=new_task_id(),
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        account_id=account_id,
        message_id=message_id,
        kind=kind,
        status=TaskStatus.PENDING,
        params=params,
        progress=0,
        attempts=0,
        abandoned=0,
    )
    session.add(task)
    session.flush()
    return Enqueued(task.id, TaskStatus.PENDING, created=True, after_running=after_running)


def push(
    runtime: Runtime,
    task_id: str,
    principal: Principal,
    kind: TaskKind,
    *,
    delay: float = 0,
    replacing: str | None = None,
) -> None:
    """Hand a task to the workers (after ``delay`` seconds): a new carrier job replaces any earlier one.

    Only the carrier named on the row may run the task, so a stray earlier carrier does nothing.
    At most ``tenant_concurrency`` carriers of one tenant are queued or running at once (RQ's
    rate limit holds the rest back), so one tenant's slow or failing work cannot take every worker.
    If Redis cannot take it now, the task keeps waiting in the database and the reaper pushes it later.
    With ``replacing``, only if that carrier is still the task's (a stray old carrier pushes nothing).
    Only a task that waits gets a new carrier: one a carrier claimed meanwhile (the reaper read it
    as waiting just before) stays with that run, whose heartbeat and outcome name its carrier.
    """
    from email_service.queue.runner import run_task  # the carrier's entry point; imported late (it imports jobs)

    carrier_id = f"{task_id}-{secrets.token_hex(4)}"
    with runtime.db.tenant_session(principal) as session:
        query = update(Task).where(Task.id == task_id, Task.status.in_([TaskStatus.PENDING, TaskStatus.RETRY]))
        if replacing is not None:
            query = query.where(Task.carrier_id == replacing)
        if not session.execute(query.values(carrier_id=carrier_id, updated_at=func.now())).rowcount:
            return
    rules = policy(kind, runtime.settings)
    options: dict[str, Any] = dict(
        job_id=carrier_id,
        job_timeout=rules.timeout,
        result_ttl=0,
        failure_ttl=24 * 3600,
        description=f"{kind} task {task_id}",
        rate_limit=RateLimit(f"email_service:tenant:{principal.tenant_id}", runtime.settings.tenant_concurrency),
        meta=logs.carried(),  # the job's log lines carry the id of the request that asked for it
    )
    args = (task_id, str(principal.tenant_id), str(principal.user_id), carrier_id)
    queue = Queue(rules.queue, connection=runtime.redis)
    try:
        if delay > 0:
            queue.enqueue_in(timedelta(seconds=delay), run_task, *args, **options)
        else:
            queue.enqueue(run_task, *args, **options)
    except RedisError as exc:
        log.warning("task %s waits for Redis to come back: %s", task_id, type(exc).__name__)


def view(runtime: Runtime, principal: Principal, task_id: str) -> TaskView | None:
    """The caller's task, or None for one that does not exist or belongs to someone else."""
    if not TASK_ID.match(task_id):
        return None
    with runtime.db.tenant_session(principal) as session:
        task = session.get(Task, task_id)
    if task is None:
        return None
    error = task.error if task.status in (TaskStatus.FAILURE, TaskStatus.RETRY) else None
    if task.status is TaskStatus.FAILURE and not error:
        error = "the task stopped before it finished"
    return TaskView(
        task_id=task.id,
        kind=task.kind,
        status=task.status,
        progress=100 if task.status is TaskStatus.SUCCESS else task.progress,
        result=task.result if task.status is TaskStatus.SUCCESS else None,
        error=error,
        attempts=task.attempts,
        account_id=task.account_id,
        message_id=task.message_id,
    )


def syncing_accounts(runtime: Runtime, principal: Principal, account_ids: list[str]) -> set[str]:
    """Which of these accounts a worker is syncing right now: a started sync task with a live heartbeat."""
    if not account_ids:
        return set()
    with runtime.db.tenant_session(principal) as session:
        return syncing_in(session, account_ids)


def syncing_in(session: Session, account_ids: list[str]) -> set[str]:
    """``syncing_accounts`` inside a transaction the caller already has (one less per request)."""
    if not account_ids:
        return set()
    fresh = datetime.now(UTC) - timedelta(seconds=STALE_SECONDS)
    rows = session.scalars(
        select(Task.account_id).where(
            Task.account_id.in_(account_ids),
            Task.kind == TaskKind.SYNC,
            Task.status == TaskStatus.STARTED,
            Task.heartbeat_at > fresh,
        )
    )
    return {row for row in rows if row is not None}
