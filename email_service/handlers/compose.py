from __future__ import annotations

from typing import Any

from email_service.handlers.unavailable import unavailable


def send_email(**_params: Any) -> None:
    unavailable("send_email")


def save_draft(**_params: Any) -> None:
    unavailable("save_draft")
