"""Recording changes: the one way a change to messages or folders enters the log.

Call ``record`` inside the transaction that makes the change, with the session of that
transaction: the change and its log entry commit together or not at all. Taking sequence
numbers locks the account's row until commit, so an account's sequence is its commit order;
after commit, PostgreSQL tells listeners (``NOTIFY``) which account moved to which number.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, text, update
from sqlalchemy.orm import Session

from email_service.models import Account, Change, ChangeEntity, ChangeKind
from email_service.tenancy import Principal

CHANNEL = "email_service_changes"
# For the connections that LISTEN on CHANNEL: such a connection only ever reads, so one a NAT or
# load balancer dropped without a word would wait for ever while its listeners hear nothing.
# TCP keepalives find it dead within about a minute; the listener then reconnects and catches up.
LISTEN_CONNECTION = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


@dataclass(frozen=True)
class Entry:
    entity: ChangeEntity
    entity_id: str
    kind: ChangeKind
    folder_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def record(session: Session, principal: Principal, account_id: str, entries: Sequence[Entry]) -> int | None:
    """Append ``entries`` to the account's log in this transaction; returns the last sequence number."""
    if not entries:
        return None
    last = session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(change_seq=Account.change_seq + len(entries))
        .returning(Account.change_seq)
    ).scalar_one()
    first = last - len(entries) + 1
    session.execute(
        insert(Change),
        [
            {
                "account_id": account_id,
                "seq": first + offset,
                "tenant_id": principal.tenant_id,
                "user_id": principal.user_id,
                "entity": entry.entity,
                "entity_id": entry.entity_id,
                "kind": entry.kind,
                "folder_id": entry.folder_id,
                "detail": entry.detail,
            }
            for offset, entry in enumerate(entries)
        ],
    )
    # Delivered on commit only, in commit order; never for a transaction that rolls back.
    payload = {"t": str(principal.tenant_id), "u": str(principal.user_id), "a": account_id, "s": last}
    session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": json.dumps(payload)})
    return last
