"""One job at a time works on an account's server state (sync, write-back, filing a copy).

The lock is a PostgreSQL session advisory lock held on a connection of its own for as long as
the job runs. PostgreSQL drops it the moment that connection goes, so a worker that crashes,
even by SIGKILL, holds no account a moment longer, and there is nothing to expire or renew.
"""

from __future__ import annotations

import logging
from types import TracebackType

from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from email_service.db import Database

log = logging.getLogger(__name__)
_KEY = "account:{account_id}"


class AccountLock:
    def __init__(self, db: Database, account_id: str) -> None:
        self._db = db
        self._key = _KEY.format(account_id=account_id)
        self._conn: Connection | None = None

    def acquire(self) -> bool:
        """Take the lock if no other job holds it; never waits."""
        conn = self._db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), {"key": self._key})
            if got.scalar():
                self._conn = conn
                return True
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        conn.close()
        return False

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), {"key": self._key})
        except SQLAlchemyError as exc:
            # The connection is gone, and the lock with it; make sure the pool does not reuse it.
            log.warning("account lock %s: unlock failed (%s); dropping the connection", self._key, type(exc).__name__)
            conn.invalidate()
        finally:
            conn.close()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
