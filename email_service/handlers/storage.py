from __future__ import annotations

from typing import Any

from email_service.handlers.unavailable import unavailable


def get_stored_object(**_params: Any) -> None:
    unavailable("get_stored_object")
