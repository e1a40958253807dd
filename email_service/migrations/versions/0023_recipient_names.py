"""The display names of a message's recipients, by address.

Revision ID: 0023
Revises: 0022

To, Cc and Bcc were kept as addresses alone, so a list of sent mail could show only addresses.
Each message now keeps the names its headers give the recipients, as an object from address to
name. A constant default adds the column without rewriting the table; mail stored before this
revision shows no names.
"""

from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute("ALTER TABLE messages ADD COLUMN recipient_names jsonb NOT NULL DEFAULT '{}'::jsonb")


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE messages DROP COLUMN recipient_names")
