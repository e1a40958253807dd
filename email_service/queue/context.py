"""What a job needs (database, cipher, object store, Redis), built once per work-horse process."""

from __future__ import annotations

import os

from email_service.config import load_settings
from email_service.runtime import Runtime

_cached: tuple[int, Runtime] | None = None


def job_runtime() -> Runtime:
    """The runtime for jobs in this process; rebuilt after a fork (pooled connections do not survive one)."""
    global _cached
    if _cached is None or _cached[0] != os.getpid():
        _cached = (os.getpid(), Runtime.build(load_settings()))
    return _cached[1]
