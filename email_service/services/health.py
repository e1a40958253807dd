"""Whether the service's dependencies answer."""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from email_service.errors import DependencyUnavailableError
from email_service.runtime import Runtime

log = logging.getLogger(__name__)


def check(runtime: Runtime) -> None:
    """Raise ``DependencyUnavailableError`` naming each dependency that does not answer."""
    down = []
    try:
        runtime.db.ping()
    except SQLAlchemyError as exc:
        log.warning("health: database unreachable: %s", type(exc).__name__)
        down.append("database")
    try:
        runtime.redis.ping()
    except (RedisError, OSError) as exc:
        log.warning("health: redis unreachable: %s", type(exc).__name__)
        down.append("redis")
    if down:
        raise DependencyUnavailableError(f"{' and '.join(down)} unreachable")
