from __future__ import annotations

import time

from email_service.handlers import runtime
from email_service.services import health


def health_check() -> tuple[dict, int]:
    health.check(runtime())
    return {"status": "healthy", "service": "email_service", "timestamp": int(time.time() * 1000)}, 200
