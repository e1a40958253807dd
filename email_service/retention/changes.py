"""Change log entries older than the retention time are removed, and each account's floor raised.

An account's ``change_floor`` is the highest sequence number removed: every entry after it is
still kept, so a feed cursor at or above it can be served and one below it cannot
(``CURSOR_EXPIRED``). Entries are removed by sequence, up to the highest one old enough, never
by age alone: an entry committed late by a long transaction can be younger than one after it,
and leaving it would keep a hole below the floor that a cursor could not see.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from email_service.runtime import Runtime

log = logging.getLogger(__name__)

# One statement, so the entries go and the floors rise in one transaction: a feed request that
# read entries before the commit sees the raised floor afterwards and answers CURSOR_EXPIRED
# instead of a window with a hole. Each pass takes at most ``per_account`` entries of at most
# ``accounts`` accounts (sequence numbers have no gaps, so the floor may rise by ``per_account``),
# so a backlog is worked off over several scheduler rounds instead of in one huge transaction.
_PRUNE = text("""
    WITH old AS (
        SELECT account_id, max(seq) AS newest FROM changes WHERE created_at < :cutoff GROUP BY account_id
    ), cut AS (
        SELECT old.account_id, least(old.newest, accounts.change_floor + :per_account) AS floor
        FROM old JOIN accounts ON accounts.id = old.account_id
        ORDER BY old.account_id
        LIMIT :accounts
    ), removed AS (
        DELETE FROM changes USING cut
        WHERE changes.account_id = cut.account_id AND changes.seq <= cut.floor
        RETURNING 1
    ), raised AS (
        UPDATE accounts SET change_floor = cut.floor FROM cut
        WHERE accounts.id = cut.account_id AND accounts.change_floor < cut.floor
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM removed) AS removed, (SELECT count(*) FROM raised) AS raised
""")


def prune_changes(runtime: Runtime, older_than: timedelta, *, per_account: int = 10_000, accounts: int = 50) -> int:
    """Remove log entries older than ``older_than`` (and all before them); returns how many went."""
    cutoff = datetime.now(UTC) - older_than
    with runtime.db.maintenance_session() as session:
        row = session.execute(_PRUNE, {"cutoff": cutoff, "per_account": per_account, "accounts": accounts}).one()
    if row.removed:
        log.info("pruned %d change log entries of %d accounts", row.removed, row.raised)
    return int(row.removed)
