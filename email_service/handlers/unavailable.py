from __future__ import annotations

from typing import NoReturn

from email_service.errors import NotImplementedYetError


def unavailable(operation: str) -> NoReturn:
    """Operations whose features are not built yet answer 501, documented in the spec."""
    raise NotImplementedYetError(f"{operation} is not available in this version of the service")
