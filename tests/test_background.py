"""Background work: tasks in the database, the account's backoff, joining syncs, resuming lost work.

Everything runs against the real worker process (``worker`` fixture), PostgreSQL, Redis and Dovecot.
Where a crash is the subject, the row a crashed worker leaves behind is written directly and the
real reaper and worker take it from there (the deployed journey kills a real worker mid-sync).
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from helpers import free_port
from messages import plain_message, to_bytes
from sqlalchemy import select, text
from syncing import add_task, create_account, imap_account, run_sync, tasks_of, wait_task

from email_service.mailbox.schedule import DueAccount
from email_service.models import Task, TaskKind, TaskStatus
from email_service.queue import runner, tasks
from email_service.queue import scheduler as scheduler_module
from email_service.queue.policy import PERMANENT_BACKOFF, TEMPORARY_BACKOFF, sync_backoff
from email_service.queue.runner import reap
from email_service.queue.scheduler import LEADER_KEY, Scheduler
from email_service.tenancy import Principal

MINUTE_MS = 60_000


@pytest.fixture
def client(sync_client):
    return sync_client


@pytest.fixture
def scheduler(runtime):
    runtime.redis.delete(LEADER_KEY)
    leader = Scheduler(runtime, f"test-{uuid.uuid4().hex[:8]}")
    yield leader
    runtime.redis.delete(LEADER_KEY)


def account(client, user, account_id) -> dict:
    response = client.get(f"/api/accounts/{account_id}", headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


def wait_account(client, user, account_id, condition, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = account(client, user, account_id)
        if condition(current):
            return current
        time.sleep(0.1)
    raise AssertionError(f"account never got there: {current}")


def test_a_scheduler_never_leads_on_a_lease_another_took(runtime, scheduler, monkeypatch):
    # The lease was read, then renewed: one that ran out and went to another scheduler in between
    # was renewed for that one, and both led (scheduling, reaping and re-pushing at once).
    runtime.redis.set(LEADER_KEY, scheduler.name, ex=30)
    read = runtime.redis.get

    def lease_passes_on(key):
        value = read(key)
        runtime.redis.set(LEADER_KEY, "another-scheduler", ex=30)  # taken right after this read
        return value

    monkeypatch.setattr(runtime.redis, "get", lease_passes_on)
    leads = scheduler.run_once() != {}
    assert not (leads and read(LEADER_KEY) != scheduler.name.encode())


def test_a_scheduler_whose_lease_passed_on_during_a_round_stops_there(runtime, scheduler, monkeypatch):
    # A round longer than the lease: another scheduler took it over, and this one's later steps
    # (scheduling, clean-ups) ran beside the new leader's.
    ran = []

    def slow_step(*args, **kwargs):
        ran.append("uploads")
        runtime.redis.set(LEADER_KEY, "another-scheduler", ex=30)  # the lease ran out meanwhile
        return 0

    monkeypatch.setattr(scheduler_module, "remove_unused_uploads", slow_step)
    monkeypatch.setattr(scheduler_module, "due_for_sync", lambda *args, **kwargs: ran.append("scheduled") or [])
    monkeypatch.setattr(scheduler_module, "requeue_cleanups", lambda *args, **kwargs: ran.append("clean-ups") or 0)
    scheduler.run_once()
    assert ran == ["uploads"]
    assert runtime.redis.get(LEADER_KEY) == b"another-scheduler"


def test_a_scheduler_that_loses_its_lease_while_scheduling_stops_there(runtime, scheduler, monkeypatch):
    due = [DueAccount(f"due-{n}", Principal(uuid.uuid4(), uuid.uuid4())) for n in range(250)]
    enqueued = []

    def enqueue(runtime_, kind, principal, *, account_id):
        enqueued.append(account_id)
        if len(enqueued) == 150:
            runtime.redis.set(LEADER_KEY, "another-scheduler", ex=30)  # the lease ran out meanwhile
        return tasks.Enqueued(task_id=account_id, status=TaskStatus.PENDING, created=True)

    monkeypatch.setattr(scheduler_module, "due_for_sync", lambda *args, **kwargs: due)
    monkeypatch.setattr(scheduler_module.tasks, "enqueue", enqueue)
    runtime.redis.set(LEADER_KEY, scheduler.name, ex=30)
    # Renewed every 100 accounts: the 200th finds it gone, and the last 50 are left to the new leader.
    assert scheduler._schedule_due() == 200
    assert enqueued == [account.id for account in due[:200]]


def test_backoff_grows_with_failures_and_stops_at_its_cap():
    temporary = [sync_backoff(n, permanent=False) for n in range(1, 10)]
    permanent = [sync_backoff(n, permanent=True) for n in range(1, 10)]
    assert temporary[:3] == [timedelta(minutes=1), timedelta(minutes=2), timedelta(minutes=4)]
    assert permanent[:3] == [timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1)]
    assert temporary == sorted(temporary) and permanent == sorted(permanent)
    assert temporary[-1] == TEMPORARY_BACKOFF[1] and permanent[-1] == PERMANENT_BACKOFF[1]
    assert all(p > t for p, t in zip(permanent, temporary, strict=True))


def test_a_refused_login_backs_off_the_schedule_and_a_fix_ends_it(
    client, runtime, user, dovecot, mail_user, worker, scheduler
):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("After the fix")))
    body = imap_account(dovecot, mail_user, password="wrong-password", isSyncEnabled=True, syncInterval=60)
    account_id = create_account(client, user, body)
    assert account(client, user, account_id)["nextSyncAt"] is not None

    scheduler.run_once()
    failed = wait_account(client, user, account_id, lambda a: a["lastSyncError"] is not None)
    assert (
        failed["lastSyncError"].startswith("authentication failed") and "wrong-password" not in failed["lastSyncError"]
    )
    assert failed["nextSyncAt"] - failed["lastSyncErrorAt"] >= 14 * MINUTE_MS

    # However often the scheduler runs, a backed-off account is not tried again before its time.
    for _ in range(5):
        scheduler.run_once()
        time.sleep(0.3)
    assert len(tasks_of(runtime, account_id)) == 1

    # Asking runs it at once, whatever the backoff; the failure doubles the wait.
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "failure"
    again = account(client, user, account_id)
    assert again["nextSyncAt"] - again["lastSyncErrorAt"] >= 29 * MINUTE_MS

    # A new password ends the backoff: due at once, and the next scheduler pass syncs it.
    fixed = client.put(f"/api/accounts/{account_id}", json={"password": mail_user.password}, headers=user.headers)
    assert fixed.status_code == 200 and fixed.json()["nextSyncAt"] <= time.time() * 1000 + 1000
    scheduler.run_once()
    synced = wait_account(client, user, account_id, lambda a: a["lastSyncAt"] is not None)
    assert synced["lastSyncError"] is None and synced["lastSyncErrorAt"] is None
    assert 50_000 <= synced["nextSyncAt"] - synced["lastSyncAt"] <= 70_000  # the interval again


def test_a_server_that_is_down_backs_off_briefly(client, user, dovecot, mail_user, worker):
    body = imap_account(dovecot, mail_user, port=free_port(), isSyncEnabled=True, syncInterval=3600)
    account_id = create_account(client, user, body)
    status, _ = run_sync(client, user, account_id)
    assert status["status"] == "failure" and status["error"].startswith("connection refused")
    failed = account(client, user, account_id)
    assert failed["lastSyncError"] == status["error"]
    assert 59_000 <= failed["nextSyncAt"] - failed["lastSyncErrorAt"] <= 61_000


def test_requests_join_a_waiting_or_running_sync_and_nothing_asked_for_is_dropped(
    client, user, dovecot, mail_user, worker, silent_server
):
    # A server that accepts and never answers keeps the first sync running for the worker's timeout.
    body = imap_account(dovecot, mail_user, hostname="127.0.0.1", port=silent_server.port, encryption="none")
    account_id = create_account(client, user, body)
    first = client.post(f"/api/sync/{account_id}", json={}, headers=user.headers).json()
    assert first["created"] is True
    wait_task(client, user, first["taskId"], until=("started",), timeout=30)

    plain = client.post(f"/api/sync/{account_id}", json={}, headers=user.headers).json()
    assert plain["taskId"] == first["taskId"] and plain["created"] is False and plain["status"] == "started"

    forced = client.post(f"/api/sync/{account_id}", json={"force": True}, headers=user.headers).json()
    assert forced["created"] is True and forced["taskId"] != first["taskId"]
    assert "after" in forced["message"]

    narrower = client.post(f"/api/sync/{account_id}", json={"folders": ["INBOX"]}, headers=user.headers).json()
    assert narrower["taskId"] == forced["taskId"] and narrower["created"] is False

    ended = wait_task(client, user, first["taskId"], timeout=60)
    assert ended["status"] == "failure" and "did not answer in time" in ended["error"]
    follow_up = wait_task(client, user, forced["taskId"], timeout=60)
    assert follow_up["status"] == "failure" and follow_up["attempts"] == 1


def insert_task(runtime, user, account_id, **values) -> str:
    """A started task whose worker stopped beating two minutes ago."""
    task_id = add_task(runtime, user, account_id, **{"carrier_id": "carrier-of-a-dead-worker", **values})
    with runtime.db.maintenance_session() as session:
        session.execute(
            text(
                "UPDATE tasks SET heartbeat_at = now() - interval '2 minutes',"
                " updated_at = now() - interval '2 minutes' WHERE id = :id"
            ),
            {"id": task_id},
        )
    return task_id


def test_a_task_whose_worker_died_is_resumed_and_finishes(client, runtime, user, dovecot, mail_user, worker):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Resumed")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    task_id = insert_task(runtime, user, account_id)
    seen = client.get(f"/api/sync/task/{task_id}", headers=user.headers).json()
    assert seen["status"] == "started" and seen["progress"] == 10

    assert reap(runtime)["resumed"] >= 1
    done = wait_task(client, user, task_id)
    assert done["status"] == "success" and done["result"]["messagesAdded"] == 1
    assert done["attempts"] == 2 and done["progress"] == 100


def test_a_task_whose_carrier_redis_lost_is_pushed_again(client, runtime, user, dovecot, mail_user, worker):
    dovecot.append(mail_user, "INBOX", to_bytes(plain_message("Pushed again")))
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    task_id = insert_task(runtime, user, account_id, status=TaskStatus.PENDING, attempts=0, carrier_id="lost")
    assert reap(runtime)["repushed"] >= 1
    done = wait_task(client, user, task_id)
    assert done["status"] == "success" and done["result"]["messagesAdded"] == 1


def test_a_task_claimed_while_the_reaper_pushes_it_again_stays_with_the_run_that_claimed_it(
    client, runtime, user, dovecot, mail_user, monkeypatch
):
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    task_id = insert_task(runtime, user, account_id, status=TaskStatus.PENDING, attempts=0, carrier_id="slow")
    claimed: list[runner.TaskContext | None] = []

    def lost_by_redis_but_claiming(runtime_, carrier_id):
        # Redis lost the carrier's job while a worker was already running it: the carrier claims
        # its task between the reaper reading the waiting tasks and pushing this one again.
        if carrier_id == "slow":
            claimed.append(runner._claim(runtime, user.principal, task_id, carrier_id))
        return False

    monkeypatch.setattr(runner, "_carrier_alive", lost_by_redis_but_claiming)
    reap(runtime)
    monkeypatch.undo()
    [context] = claimed
    assert context is not None
    # The run that claimed the task still holds it: its heartbeat and its outcome count, and
    # the reaper does not later take it for lost and run it a second time.
    assert [t.carrier_id for t in tasks_of(runtime, account_id)] == ["slow"]
    assert runner._finish(context, TaskStatus.SUCCESS, result={"messagesAdded": 0})
    done = client.get(f"/api/sync/task/{task_id}", headers=user.headers).json()
    assert done["status"] == "success" and done["attempts"] == 1


def test_a_task_that_keeps_losing_its_worker_is_given_up_and_the_account_says_so(
    client, runtime, user, dovecot, mail_user
):
    account_id = create_account(client, user, imap_account(dovecot, mail_user, isSyncEnabled=True))
    task_id = insert_task(runtime, user, account_id, abandoned=3)
    assert reap(runtime)["failed"] >= 1
    status = client.get(f"/api/sync/task/{task_id}", headers=user.headers).json()
    assert status["status"] == "failure" and "stopped 4 times" in status["error"]
    assert account(client, user, account_id)["lastSyncError"] == status["error"]


def test_finished_tasks_are_kept_a_week(client, runtime, user, dovecot, mail_user):
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    old = insert_task(runtime, user, account_id, status=TaskStatus.SUCCESS)
    recent = insert_task(runtime, user, account_id, status=TaskStatus.SUCCESS)
    with runtime.db.maintenance_session() as session:
        session.execute(text("UPDATE tasks SET finished_at = now() - interval '8 days' WHERE id = :id"), {"id": old})
        session.execute(text("UPDATE tasks SET finished_at = now() - interval '6 days' WHERE id = :id"), {"id": recent})
    reap(runtime)
    assert client.get(f"/api/sync/task/{old}", headers=user.headers).status_code == 404
    assert client.get(f"/api/sync/task/{recent}", headers=user.headers).status_code == 200


def test_tasks_are_rows_under_row_level_security(client, runtime, user, make_user, dovecot, mail_user, worker):
    account_id = create_account(client, user, imap_account(dovecot, mail_user))
    status, _ = run_sync(client, user, account_id)
    other = make_user()
    assert client.get(f"/api/sync/task/{status['taskId']}", headers=other.headers).status_code == 404
    with runtime.db.tenant_session(other.principal) as session:
        assert session.scalar(select(Task).where(Task.id == status["taskId"])) is None
    with runtime.db.tenant_session(user.principal) as session:
        assert session.scalar(select(Task.kind).where(Task.id == status["taskId"])) is TaskKind.SYNC


def test_object_storage_being_down_does_not_stop_syncs_being_scheduled(
    client, runtime, user, dovecot, mail_user, scheduler, monkeypatch
):
    account_id = create_account(client, user, imap_account(dovecot, mail_user, isSyncEnabled=True, syncInterval=60))
    upload = client.post(f"/api/{account_id}/attachments", files={"file": ("old.txt", b"o")}, headers=user.headers)
    with runtime.db.maintenance_session() as session:
        session.execute(
            text("UPDATE attachments SET created_at = now() - interval '2 days' WHERE id = :id"),
            {"id": upload.json()["id"]},
        )

    def storage_down(key: str) -> None:
        raise ConnectionRefusedError("object storage is down")

    # Removing the old upload fails; resuming lost tasks and scheduling due syncs go on.
    monkeypatch.setattr(runtime.objects, "delete", storage_down)
    counts = scheduler.run_once()
    assert "uploads removed" not in counts and counts["scheduled"] >= 1
    assert [t.kind for t in tasks_of(runtime, account_id)] == [TaskKind.SYNC]
    monkeypatch.undo()
    assert scheduler.run_once()["uploads removed"] >= 1
