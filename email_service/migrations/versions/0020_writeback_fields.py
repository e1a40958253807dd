"""Which of a message's fields wait to be written to the server, not only that some do.

Revision ID: 0020
Revises: 0019

A write-back used to send the row's whole state: \\Seen, \\Flagged and every keyword as the row
had them. A flag another client set on the server after the last sync (a star on a phone) was
then taken off again by a change of another flag here. The write-back now sends only the fields
changed here. A row pending from before this revision has none listed, and is written whole.
A constant default adds the column without rewriting the table.
"""

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute("ALTER TABLE messages ADD COLUMN writeback_fields text[] NOT NULL DEFAULT '{}'")


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE messages DROP COLUMN writeback_fields")
