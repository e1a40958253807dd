from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Called with a percentage 0-100 as the sync moves; the job stores it for the status API.
ProgressCallback = Callable[[int], None]


@dataclass
class SyncResult:
    messages_added: int = 0
    messages_updated: int = 0
    messages_removed: int = 0
    folders_synced: int = 0
    errors: list[str] = field(default_factory=list)
    # Folders synced only in part (a bounded sync took the newest mail); a queued sync finishes them.
    folders_left: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messagesAdded": self.messages_added,
            "messagesUpdated": self.messages_updated,
            "messagesRemoved": self.messages_removed,
            "foldersSync": self.folders_synced,
            "errors": list(self.errors),
        }
