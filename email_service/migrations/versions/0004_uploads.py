"""Uploaded attachments that no message holds yet (for compose).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    # An upload is an attachment without a message until a send or draft takes it.
    op.execute("ALTER TABLE attachments ALTER COLUMN message_id DROP NOT NULL")
    op.execute("CREATE INDEX attachments_unattached ON attachments (created_at) WHERE message_id IS NULL")


def downgrade(app_role: str) -> None:
    op.execute("DELETE FROM attachments WHERE message_id IS NULL")
    op.execute("ALTER TABLE attachments ALTER COLUMN message_id SET NOT NULL")
