"""One sync per account at a time, whatever the number of workers.

The lock lives in Redis with a short expiry that a heartbeat keeps extending, so a worker that
crashes (even by SIGKILL) holds it for at most ``ttl`` seconds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from redis import Redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

log = logging.getLogger(__name__)
PREFIX = "email_service:sync-lock:"


class AccountLock:
    def __init__(self, redis: Redis, account_id: str, ttl: int = 60) -> None:
        self._lock: Lock = redis.lock(PREFIX + account_id, timeout=ttl, blocking=False, thread_local=False)
        self._ttl = ttl
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self._lock.acquire():
            return False
        self._heartbeat = threading.Thread(target=self._beat, name="sync-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                self._lock.reacquire()
            except LockError:
                log.warning("sync lock %s was lost; another sync may start", self._lock.name)
                return
            except RedisError as exc:
                # A passing Redis fault: try again next beat, the lease still has time left.
                log.warning("could not renew sync lock %s: %s", self._lock.name, type(exc).__name__)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self._lock.owned():
            self._lock.release()


def locked_accounts(redis: Redis, account_ids: Iterable[str]) -> set[str]:
    """Which of these accounts a sync holds right now (one round trip)."""
    ids = list(account_ids)
    if not ids:
        return set()
    pipe = redis.pipeline(transaction=False)
    for account_id in ids:
        pipe.exists(PREFIX + account_id)
    return {account_id for account_id, held in zip(ids, pipe.execute(), strict=True) if held}
