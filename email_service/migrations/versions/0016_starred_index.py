"""Starred mail of an account, newest first, from an index of its own.

Revision ID: 0016
Revises: 0015

A search for a common word among starred mail walks the messages that pass the filter (see
``search.service``): without this index that walk read every message of the account to find
the few percent that are starred. The index holds starred rows only, so it costs nothing for
the rest of the mail. Its predicate is written as search's filter is (``is_starred IS TRUE``), so
the planner matches the two without having to prove one from the other.
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute("CREATE INDEX messages_starred ON messages (account_id, received_at, id) WHERE is_starred IS TRUE")


def downgrade(app_role: str) -> None:
    op.execute("DROP INDEX messages_starred")
