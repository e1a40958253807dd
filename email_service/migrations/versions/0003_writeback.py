"""Messages changed through the API and not yet written to the mail server.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    # While set, sync leaves the row's flags alone, so it cannot undo a change still on its way.
    op.execute("ALTER TABLE messages ADD COLUMN writeback_pending boolean NOT NULL DEFAULT false")
    op.execute("CREATE INDEX messages_writeback_pending ON messages (account_id) WHERE writeback_pending")


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE messages DROP COLUMN writeback_pending")
