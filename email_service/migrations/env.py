"""Alembic environment: migrations run as the connecting (owner) role, one process at a time."""

from alembic import context
from sqlalchemy import create_engine, pool, text

config = context.config
# Two replicas starting together must not both run the same DDL.
MIGRATION_LOCK_ID = 0x656D61696C  # "email"


def run_migrations_online() -> None:
    engine = create_engine(config.attributes["url"], poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations(app_role=config.attributes["app_role"])
            connection.commit()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `email-service migrate`")
run_migrations_online()
