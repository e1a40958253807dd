"""Apply the schema migrations (alembic) shipped inside the package."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from email_service.db import sqlalchemy_url


def upgrade(database_url: str, app_role: str, revision: str = "head") -> None:
    config = Config()
    config.set_main_option("script_location", "email_service:migrations")
    # Passed as attributes, not main options: configparser would choke on '%' in a password.
    config.attributes["url"] = sqlalchemy_url(database_url)
    config.attributes["app_role"] = app_role
    command.upgrade(config, revision)
