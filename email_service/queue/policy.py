"""Every retry and backoff rule of the service's background work, in one place.

Two kinds of rule live here:

- ``TaskPolicy``: per task kind, which queue it runs on, how long one run may take, how often a
  failure worth retrying is tried again and after what waits, and how often a task whose worker
  died is resumed.
- ``sync_backoff``: when an account whose sync failed is next synced automatically.
- ``webhook_retry_delay``: when a webhook delivery that failed is tried again, and when the
  endpoint is given up on and disabled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from email_service.config import Settings
from email_service.models import TaskKind

# A started task whose heartbeat is older than this has lost its worker (heartbeats come every 10 s).
HEARTBEAT_SECONDS = 10
STALE_SECONDS = 45
# Finished tasks stay visible through the task API this long, then the reaper removes them.
RETENTION = timedelta(days=7)


@dataclass(frozen=True)
class TaskPolicy:
    queue: str
    timeout: int  # seconds one run may take before it is stopped and counted as failed
    retry_delays: tuple[int, ...] = ()  # waits before each retry of a temporary failure
    abandoned_retries: int = 3  # resumptions after the worker running it died
    jitter: float = 0.2  # +/- share of each wait, so failures that came together do not return together
    # Runs only while it holds its account (no other such task of the account runs meanwhile);
    # one that finds the account busy waits, unclaimed, and is tried again a few seconds later.
    holds_account: bool = False

    @property
    def max_attempts(self) -> int:
        return 1 + len(self.retry_delays)

    def retry_delay(self, attempt: int) -> int | None:
        """Seconds to wait after failed attempt ``attempt`` (1-based), or None when none is left."""
        if attempt > len(self.retry_delays):
            return None
        base = self.retry_delays[attempt - 1]
        return max(1, round(base * random.uniform(1 - self.jitter, 1 + self.jitter)))


def policy(kind: TaskKind, settings: Settings) -> TaskPolicy:
    if kind is TaskKind.SYNC:
        # A failed sync is not retried as a task: the account's backoff decides when it runs
        # next. It commits as it goes, so a run stopped by its timeout loses nothing.
        return TaskPolicy(queue="sync", timeout=30 * 60, holds_account=True)
    if kind is TaskKind.SEND:
        # Exponential from the configured base (30 s: about an hour in all over six retries).
        # The run may wait the full RFC 5321 time for the reply to the final dot. Delivering does
        # not wait for the account (a sync may run meanwhile); only filing the Sent copy does.
        base = settings.send_retry_base_seconds
        return TaskPolicy(
            queue="send",
            timeout=settings.smtp_timeout_seconds * 6 + settings.smtp_data_timeout_seconds + 60,
            retry_delays=tuple(base * 2**n for n in range(6)),
        )
    if kind is TaskKind.CLEANUP:
        # Removing a deleted account: object storage may be down for a while; keep trying for hours
        # (and once these tries run out, the scheduler queues a new clean-up: CLEANUP_AGAIN_AFTER).
        return TaskPolicy(queue="default", timeout=30 * 60, retry_delays=(60, 300, 900, 3600, 3600), holds_account=True)
    # Write-back and filing a draft: a mail server that is down for a while still gets the change.
    return TaskPolicy(queue="default", timeout=5 * 60, retry_delays=(10, 30, 60, 300, 900), holds_account=True)


# A deleted account whose clean-up task failed (its tries ran out, or its worker kept dying) gets
# a new one this long after: a deleted account's mail and files are never kept for good.
CLEANUP_AGAIN_AFTER = timedelta(hours=1)


# Automatic sync after failures: temporary ones (server down, timeouts) from 1 minute doubling
# up to 1 hour; permanent ones (login refused, certificate, unknown host) from 15 minutes doubling
# up to 6 hours, since nothing changes until someone fixes the account. Success resets it.
TEMPORARY_BACKOFF = (timedelta(minutes=1), timedelta(hours=1))
PERMANENT_BACKOFF = (timedelta(minutes=15), timedelta(hours=6))


def sync_backoff(failures: int, *, permanent: bool) -> timedelta:
    """How long after its ``failures``-th failure in a row an account is next synced automatically."""
    first, cap = PERMANENT_BACKOFF if permanent else TEMPORARY_BACKOFF
    return min(first * 2 ** max(0, min(failures - 1, 20)), cap)


# Webhook deliveries: about a day of retries in all (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h),
# as receivers that are down for a deploy or a night still get every event. After the last
# failure the endpoint is disabled, so a dead receiver does not collect an ever longer queue.
# Enabling it again starts the schedule over for every delivery still waiting.
# EMAIL_SERVICE_WEBHOOK_RETRY_SCHEDULE replaces the waits (tests make them short).
WEBHOOK_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
WEBHOOK_JITTER = 0.2
# While an endpoint fails, its other waiting deliveries wait for the failed one's next attempt
# instead of each trying on its own: a receiver that is down sees a few requests per retry step
# (its concurrency limit), not one per queued event. The first success to the endpoint ends the
# wait: deliveries held back only for others' failures are due at once, and those that failed
# themselves go back to their own next retry. The deliveries that were tried carry the attempt
# count that disables the endpoint.
WEBHOOK_ENDPOINT_BACKOFF = True


def webhook_retry_delay(attempt: int, settings: Settings) -> float | None:
    """Seconds to wait after failed attempt ``attempt`` (1-based), or None: give up and disable the endpoint.

    Jitter spreads the retries of deliveries that failed together (a receiver that was down for
    everyone), so they do not all return in the same second.
    """
    schedule = settings.webhook_retry_schedule or WEBHOOK_RETRY_SCHEDULE
    if attempt > len(schedule):
        return None
    return schedule[attempt - 1] * random.uniform(1 - WEBHOOK_JITTER, 1 + WEBHOOK_JITTER)
