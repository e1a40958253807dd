from __future__ import annotations

from redis import Redis

# Queues in the order a worker drains them: sending mail is more urgent than syncing it.
QUEUE_NAMES = ("send", "sync", "default")


def redis_from_url(url: str, *, timeout: float = 5.0) -> Redis:
    """A Redis client for redis://, rediss:// or unix:// URLs (the embedded default uses a socket)."""
    return Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
