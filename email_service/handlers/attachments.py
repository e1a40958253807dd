from __future__ import annotations

from typing import Any

from email_service.handlers.unavailable import unavailable


def download_attachment(**_params: Any) -> None:
    unavailable("download_attachment")
