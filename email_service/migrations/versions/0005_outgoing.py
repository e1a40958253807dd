"""Outgoing mail: a message's delivery state, for mail written through the API.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    # NULL for mail that came from a server; queued/sent/failed for mail sent through the API,
    # draft for drafts saved through it.
    op.execute(
        "ALTER TABLE messages ADD COLUMN delivery_status text"
        " CHECK (delivery_status IN ('queued', 'sent', 'failed', 'draft'))"
    )
    op.execute("ALTER TABLE messages ADD COLUMN delivery_error text")


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE messages DROP COLUMN delivery_error")
    op.execute("ALTER TABLE messages DROP COLUMN delivery_status")
