from __future__ import annotations

from typing import Any

from email_service.handlers.unavailable import unavailable


def list_messages(**_params: Any) -> None:
    unavailable("list_messages")


def get_message(**_params: Any) -> None:
    unavailable("get_message")


def update_message(**_params: Any) -> None:
    unavailable("update_message")
