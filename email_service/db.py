"""Database engine and sessions scoped to one tenant and user.

Every API transaction runs as the unprivileged application role (``SET LOCAL ROLE``) with the
tenant and user set as transaction-local settings, so PostgreSQL's row-level security policies
filter every query, including one that forgets a WHERE clause. The role cannot bypass RLS and
does not own the tables. Only migrations and operator commands use the connecting role directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from sqlalchemy import ColumnElement, Engine, any_, bindparam, create_engine, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from email_service.tenancy import Principal


def among(column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """``column = ANY(values)``, the values sent as one array parameter.

    ``IN (...)`` takes one parameter per value, and PostgreSQL's protocol allows at most 65,535 in
    a statement: a list drawn from a folder's contents (every UID of a large folder) would fail.
    """
    return column == any_(bindparam(None, list(values), type_=ARRAY(column.type), expanding=False))


def sqlalchemy_url(url: str) -> str:
    """The driver-qualified form of a postgres URL (psycopg 3)."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The plain libpq form of a postgres URL, for psycopg used without SQLAlchemy."""
    return sqlalchemy_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


_ENTER_TENANT = text(
    "SELECT set_config('role', :role, true), set_config('app.tenant_id', :tenant, true),"
    " set_config('app.user_id', :user, true)"
)
# The same, in the driver's own parameter style, for connections used without the ORM.
_ENTER_TENANT_DRIVER = (
    "SELECT set_config('role', %(role)s, true), set_config('app.tenant_id', %(tenant)s, true),"
    " set_config('app.user_id', %(user)s, true)"
)
_ENTER_MAINTENANCE = text("SELECT set_config('app.maintenance', 'on', true)")
_Opened = TypeVar("_Opened", Session, Connection)


class Database:
    def __init__(self, url: str, app_role: str, *, pool_size: int = 10, pre_ping: bool = True) -> None:
        self.engine: Engine = create_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=pool_size,
            # A ping is a round trip on every checkout. Without it, sessions still survive a
            # database restart: see _begin.
            pool_pre_ping=pre_ping,
            pool_recycle=1800,
            connect_args={"connect_timeout": 5, "application_name": "email_service"},
        )
        self._app_role = app_role

    def _begin(self, open_: Callable[[], _Opened], first: Callable[[_Opened], object]) -> tuple[_Opened, Any]:
        """A session or connection from ``open_()`` in a transaction whose ``first`` statement has run.

        A pooled connection that died while idle (the database restarted) fails on that first
        statement, before anything was done; SQLAlchemy then drops it and every connection older
        than it, so trying once more on a fresh one is safe and repeats nothing.
        """
        for attempt in (1, 2):
            opened = open_()
            transaction = opened.begin()
            try:
                first(opened)
            except DBAPIError as exc:
                opened.close()
                if attempt == 1 and exc.connection_invalidated:
                    continue
                raise
            return opened, transaction
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @contextmanager
    def tenant_session(self, principal: Principal) -> Iterator[Session]:
        """One transaction in which RLS shows only ``principal``'s rows.

        The role switch and both settings are one statement (``set_config('role', ...)`` is
        ``SET LOCAL ROLE``, with the name as a parameter rather than spliced into SQL): every API
        request pays for this round trip, so it is one, not two.
        """
        parameters = self._tenant_parameters(principal)
        session, transaction = self._begin(self._session, lambda session: session.execute(_ENTER_TENANT, parameters))
        with session, transaction:
            yield session

    @contextmanager
    def tenant_connection(self, principal: Principal) -> Iterator[psycopg.Connection]:
        """As ``tenant_session``, but the pooled psycopg connection itself, for fixed-SQL reads.

        For the busiest reads, whose SQL never changes: a session, its statement building and
        its row processing cost several times the database's own work there. The transaction
        commits when the block ends and rolls back if it raises.
        """
        parameters = self._tenant_parameters(principal)
        # The role switch goes through SQLAlchemy, so a connection that died while idle is
        # recognised (and the pool's older ones with it), as for a session.
        connection, transaction = self._begin(
            self.engine.connect, lambda connection: connection.exec_driver_sql(_ENTER_TENANT_DRIVER, parameters)
        )
        with connection, transaction:
            yield connection.connection.driver_connection

    def _tenant_parameters(self, principal: Principal) -> dict[str, str]:
        return {"role": self._app_role, "tenant": str(principal.tenant_id), "user": str(principal.user_id)}

    @contextmanager
    def maintenance_session(self) -> Iterator[Session]:
        """A transaction across all tenants, as the connecting (owner) role.

        For operator commands such as key rotation. The owner is subject to RLS too (FORCE),
        and only its maintenance policy, switched on here explicitly, lets it see rows.
        """
        session, transaction = self._begin(self._session, lambda session: session.execute(_ENTER_MAINTENANCE))
        with session, transaction:
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
