"""Re-encrypting stored secrets under the newest credential key (``email-service rotate-keys``).

It runs while the API and workers keep working, and they write secrets too (a password changed
through the API, a refresh token the provider rotated). So each value is replaced only if it is
still the one read: a value written meanwhile is already under the newest key, and putting the
old one back would undo a change (and lose a rotated refresh token the provider no longer
accepts). Batches commit as they go; an interrupted run is simply run again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import Table, select, update

from email_service.crypto import CredentialCipher, CredentialError
from email_service.db import Database

log = logging.getLogger(__name__)


def rotate_columns(
    db: Database,
    cipher: CredentialCipher,
    table: Table,
    columns: Sequence[str],
    *,
    key: str = "id",
    batch_size: int = 500,
) -> int:
    """Re-encrypt ``columns`` of every row of ``table`` (primary key ``key``); returns how many values changed."""
    changed = 0
    after = None
    while True:
        with db.maintenance_session() as session:
            query = select(table.c[key], *(table.c[name] for name in columns)).order_by(table.c[key]).limit(batch_size)
            if after is not None:
                query = query.where(table.c[key] > after)
            rows = [row._mapping for row in session.execute(query)]
            for row in rows:
                for name in columns:
                    old = row[name]
                    if old is None or not cipher.needs_rotation(old):
                        continue
                    try:
                        new = cipher.rotate(old)
                    except CredentialError:
                        # No configured key reads it (its key was dropped, or it is damaged):
                        # re-encrypting cannot help it, and stopping here would leave every
                        # later row under the old keys on every run. It is kept as it is and
                        # named (never its value), so the operator can have it entered again.
                        log.warning(
                            "rotate-keys: %s.%s of %s %s decrypts with no key; left as it is",
                            table.name,
                            name,
                            key,
                            row[key],
                        )
                        continue
                    done = session.execute(
                        update(table).where(table.c[key] == row[key], table.c[name] == old).values({name: new})
                    )
                    changed += done.rowcount
        if len(rows) < batch_size:
            return changed
        after = rows[-1][key]
