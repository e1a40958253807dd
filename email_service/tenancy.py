"""Who is asking: the tenant and user every tenant-owned query is scoped to."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    user_id: uuid.UUID

    @property
    def rate_limit_key(self) -> str:
        return f"{self.tenant_id}:{self.user_id}"
