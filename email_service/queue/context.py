"""What a job needs (database, cipher, object store, Redis), built from the settings of the worker running it.

The worker resolves its settings once (on the embedded default that includes the URLs of the
servers it started) and hands them here before it forks; jobs never read the environment, so
a job runs with exactly the configuration of the worker that runs it.
"""

from __future__ import annotations

import os

from email_service.config import Settings
from email_service.runtime import Runtime

_settings: Settings | None = None
_cached: tuple[int, Runtime] | None = None


def use_settings(settings: Settings) -> None:
    """Jobs of this process (and of its forks) run with ``settings``."""
    global _settings, _cached
    if settings.database_url is None or settings.redis_url is None:
        raise ValueError("jobs need settings with resolved database and Redis URLs")
    _settings, _cached = settings, None


def job_runtime() -> Runtime:
    """The runtime for jobs in this process; rebuilt after a fork (pooled connections do not survive one)."""
    global _cached
    if _settings is None:
        raise RuntimeError("no worker settings: jobs run only inside `email-service worker`")
    if _cached is None or _cached[0] != os.getpid():
        _cached = (os.getpid(), Runtime.build(_settings))
    return _cached[1]
