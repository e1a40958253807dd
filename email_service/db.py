"""Database engine and sessions scoped to one tenant and user.

Every API transaction runs as the unprivileged application role (``SET LOCAL ROLE``) with the
tenant and user set as transaction-local settings, so PostgreSQL's row-level security policies
filter every query, including one that forgets a WHERE clause. The role cannot bypass RLS and
does not own the tables. Only migrations and operator commands use the connecting role directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from email_service.tenancy import Principal


def sqlalchemy_url(url: str) -> str:
    """The driver-qualified form of a postgres URL (psycopg 3)."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The plain libpq form of a postgres URL, for psycopg used without SQLAlchemy."""
    return sqlalchemy_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


class Database:
    def __init__(self, url: str, app_role: str, *, pool_size: int = 10) -> None:
        self.engine: Engine = create_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"connect_timeout": 5, "application_name": "email_service"},
        )
        # Validated as an identifier by the settings; quoted anyway because it is spliced into SQL.
        self._set_role = text(f'SET LOCAL ROLE "{app_role}"')

    @contextmanager
    def tenant_session(self, principal: Principal) -> Iterator[Session]:
        """One transaction in which RLS shows only ``principal``'s rows."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.execute(self._set_role)
            session.execute(
                text("SELECT set_config('app.tenant_id', :tenant, true), set_config('app.user_id', :user, true)"),
                {"tenant": str(principal.tenant_id), "user": str(principal.user_id)},
            )
            yield session

    @contextmanager
    def maintenance_session(self) -> Iterator[Session]:
        """A transaction across all tenants, as the connecting (owner) role.

        For operator commands such as key rotation. The owner is subject to RLS too (FORCE),
        and only its maintenance policy, switched on here explicitly, lets it see rows.
        """
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.execute(text("SELECT set_config('app.maintenance', 'on', true)"))
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
