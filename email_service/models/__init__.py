"""Tables of the service. Every tenant-owned row carries ``tenant_id`` and ``user_id``."""

from email_service.models.account import Account
from email_service.models.base import Base

__all__ = ["Account", "Base"]
