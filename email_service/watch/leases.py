"""Which watcher process watches which account: Redis leases that move when a watcher dies.

Every watcher registers itself with a heartbeat and takes a fair share of the accounts
(accounts / live watchers), each by a short lease (``SET NX EX``) that it renews while it
watches. An account has at most one lease, so at most one watcher. A watcher that dies stops
renewing; its leases run out and the others take its accounts. Losing Redis loses only leases,
which are taken again as soon as it is back; a watcher whose leases ran out unrenewed stops
watching their accounts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from redis import Redis

KEY = "email_service:watch:{account_id}"
WATCHERS = "email_service:watchers"
# Renew each owned lease only while we still own it; returns the ids renewed.
_RENEW = """
local kept = {}
for i, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then
    redis.call('expire', key, ARGV[2])
    table.insert(kept, key)
  end
end
return kept
"""
# Register a heartbeat and count the live watchers, on Redis's clock: each watcher's own clock
# may be off, and one ahead by more than a lease would count every other watcher as dead.
_HEARTBEAT = """
redis.replicate_commands()
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('zadd', KEYS[1], now, ARGV[1])
redis.call('zremrangebyscore', KEYS[1], 0, now - tonumber(ARGV[2]))
return redis.call('zcard', KEYS[1])
"""
_RELEASE = """
for i, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then redis.call('del', key) end
end
return 0
"""


class Leases:
    def __init__(self, redis: Redis, watcher_id: str, ttl: int = 30) -> None:
        self.redis, self.watcher_id, self.ttl = redis, watcher_id, ttl
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        # When the last renewal that went through began: every lease held now was set after it,
        # so none outlives it by more than ``ttl`` (a clock of this process: Redis's may differ).
        self._renewed = time.monotonic()

    def live_watchers(self) -> int:
        """Register this watcher's heartbeat; returns how many watchers are alive (this one included)."""
        return max(1, int(self._heartbeat(keys=[WATCHERS], args=[self.watcher_id, self.ttl])))

    @staticmethod
    def fair_share(accounts: int, watchers: int) -> int:
        # A little slack, so a watcher that starts does not make every other one give accounts up.
        return math.ceil(accounts / watchers * 1.05) if accounts else 0

    def renew(self, account_ids: Iterable[str]) -> set[str]:
        """Renew the leases still ours; returns their account ids (the rest were lost)."""
        started = time.monotonic()
        keys = [KEY.format(account_id=a) for a in account_ids]
        if not keys:
            self._renewed = started
            return set()
        kept = self._renew(keys=keys, args=[self.watcher_id, self.ttl])
        self._renewed = started
        prefix = len(KEY.format(account_id=""))
        return {(k.decode() if isinstance(k, bytes) else k)[prefix:] for k in kept}

    def lapsed(self) -> bool:
        """Whether every lease this watcher holds has surely run out for want of renewal."""
        return time.monotonic() - self._renewed >= self.ttl

    def claim(self, account_ids: Iterable[str], limit: int) -> list[str]:
        """Take free leases, up to ``limit`` of them; returns the accounts now ours."""
        taken: list[str] = []
        for account_id in account_ids:
            if len(taken) >= limit:
                break
            if self.redis.set(KEY.format(account_id=account_id), self.watcher_id, nx=True, ex=self.ttl):
                taken.append(account_id)
        return taken

    def release(self, account_ids: Iterable[str]) -> None:
        keys = [KEY.format(account_id=a) for a in account_ids]
        if keys:
            self._release(keys=keys, args=[self.watcher_id])

    def leave(self, account_ids: Iterable[str]) -> None:
        """Give everything back at a clean stop, so other watchers take over at once."""
        self.release(account_ids)
        self.redis.zrem(WATCHERS, self.watcher_id)

    def holder(self, account_id: str) -> str | None:
        value = self.redis.get(KEY.format(account_id=account_id))
        return value.decode() if value else None
