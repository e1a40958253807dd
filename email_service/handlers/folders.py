from __future__ import annotations

from typing import Any

from email_service.handlers.unavailable import unavailable


def list_folders(**_params: Any) -> None:
    unavailable("list_folders")
