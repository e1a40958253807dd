"""The scheduler beside the workers: automatic syncs as they fall due, and the reaper.

Runs as a thread in each ``email-service worker``. Only the process holding a short Redis
leadership lease acts, so any number of workers make one schedule; a dead leader's lease runs
out, and a stopping one hands it back at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from datetime import timedelta

from redis.exceptions import RedisError

from email_service.mailbox.schedule import due_for_sync
from email_service.models import TaskKind
from email_service.queue import tasks
from email_service.queue.runner import reap
from email_service.retention.changes import prune_changes
from email_service.retention.cleanup import requeue_cleanups
from email_service.retention.uploads import remove_unused_uploads
from email_service.runtime import Runtime

log = logging.getLogger(__name__)
LEADER_KEY = "email_service:scheduler-leader"
LEASE_CHECK_EVERY = 100  # accounts scheduled between renewals of the lease within the step
# Compare-and-delete: give the lease back only if it is still ours.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Take the lease if it is free, or renew it if it is ours, in one step: a read and a renewal apart
# could renew the lease of another scheduler that took it in between, and both would lead.
_LEAD = (
    "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end "
    "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('expire', KEYS[1], ARGV[2]) return 1 end "
    "return 0"
)


class Scheduler:
    def __init__(self, runtime: Runtime, name: str, *, interval: float = 15.0) -> None:
        self.runtime, self.name = runtime, name
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("scheduler started as %s (every %.0f s)", self.name, self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with suppress(RedisError):  # if not given back, the lease runs out by itself
            self.runtime.redis.eval(_RELEASE, 1, LEADER_KEY, self.name)

    def _is_leader(self) -> bool:
        lease = max(5, int(self.interval * 3))
        return bool(self.runtime.redis.eval(_LEAD, 1, LEADER_KEY, self.name, lease))

    def run_once(self) -> dict[str, int]:
        """One pass: enqueue due syncs, resume or fail tasks whose worker died, retention. Only the leader acts."""
        if not self._is_leader():
            return {}
        settings = self.runtime.settings
        steps: dict[str, Callable[[], dict[str, int] | int]] = {
            "reaping": lambda: reap(self.runtime),
            "uploads removed": lambda: remove_unused_uploads(
                self.runtime, timedelta(hours=settings.upload_retention_hours)
            ),
            "changes pruned": lambda: prune_changes(self.runtime, timedelta(days=settings.change_retention_days)),
            "clean-ups queued again": lambda: requeue_cleanups(self.runtime),
            "scheduled": self._schedule_due,
        }
        counts: dict[str, int] = {}
        for index, (name, step) in enumerate(steps.items()):
            # A pass may outlast the lease (a slow database, thousands of due accounts): renewed
            # before each step, or the pass ends, so a scheduler that took the lease over
            # meanwhile is never joined by this one's late steps.
            if index and not self._is_leader():
                log.info("scheduler: lease lost during the round; %s and after left to the new leader", name)
                break
            # Each step on its own: object storage being down must not stop syncs being scheduled
            # or dead workers' tasks being resumed.
            try:
                done = step()
            except Exception as exc:  # noqa: BLE001 - logged; the step runs again next round
                log.warning("scheduler: %s failed this round: %s", name, type(exc).__name__)
                continue
            counts.update(done if isinstance(done, dict) else {name: done})
        return counts

    def _schedule_due(self) -> int:
        scheduled = 0
        for index, account in enumerate(due_for_sync(self.runtime.db)):
            # Hundreds of due accounts take a while: the lease is renewed on the way, as between steps.
            if index and index % LEASE_CHECK_EVERY == 0 and not self._is_leader():
                log.info("scheduler: lease lost while scheduling; the rest is left to the new leader")
                break
            enqueued = tasks.enqueue(self.runtime, TaskKind.SYNC, account.principal, account_id=account.id)
            scheduled += enqueued.created
        return scheduled

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                counts = self.run_once()
                if any(counts.values()):
                    log.info("scheduler: %s", ", ".join(f"{k} {v}" for k, v in counts.items() if v))
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one round
                log.warning("scheduler round failed: %s", type(exc).__name__)
            self._stop.wait(self.interval)
