"""Automatic sync: every enabled account with sync on is synced about every ``syncInterval`` seconds.

Runs as a thread beside each worker. Only the process holding a short Redis leadership lease
enqueues, so many workers still make one schedule, and a dead leader's lease simply runs out.
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from email_service.db import Database
from email_service.queue import tasks
from email_service.sync.accounts import due_for_sync

log = logging.getLogger(__name__)
LEADER_KEY = "email_service:scheduler-leader"


class SyncScheduler:
    def __init__(self, db: Database, redis: Redis, name: str, *, interval: float = 15.0) -> None:
        self.db, self.redis, self.name = db, redis, name
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sync-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("sync scheduler started (every %.0f s)", self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _is_leader(self) -> bool:
        lease = int(self.interval * 3)
        if self.redis.set(LEADER_KEY, self.name, nx=True, ex=lease):
            return True
        if self.redis.get(LEADER_KEY) == self.name.encode():
            self.redis.expire(LEADER_KEY, lease)
            return True
        return False

    def run_once(self) -> int:
        """Enqueue a sync for every due account not already syncing; returns how many were enqueued."""
        if not self._is_leader():
            return 0
        enqueued = 0
        for account in due_for_sync(self.db):
            _, status = tasks.enqueue_sync(self.redis, account.principal, account.id)
            enqueued += status == "pending"
        return enqueued

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                count = self.run_once()
                if count:
                    log.info("scheduled %d account syncs", count)
            except (RedisError, SQLAlchemyError) as exc:
                log.warning("sync scheduler round failed: %s", type(exc).__name__)
            self._stop.wait(self.interval)
