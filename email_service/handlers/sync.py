from __future__ import annotations

from typing import Any

from email_service.handlers.unavailable import unavailable


def sync_account(**_params: Any) -> None:
    unavailable("sync_account")


def get_sync_status(**_params: Any) -> None:
    unavailable("get_sync_status")
