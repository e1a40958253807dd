"""Where in each account's change log a webhook endpoint starts.

Revision ID: 0021
Revises: 0020

An endpoint gets the changes committed after it was made. That was told by the entry's
created_at, which is when its transaction began: a sync batch that began before the endpoint and
committed after it (it waits for its uploads before committing) was skipped, and receivers saw
gaps. The endpoint now keeps each account's sequence number as it was when the endpoint was made
(committed entries are numbered in commit order), and gets every entry after it. Endpoints made
before this revision have none, and keep the old rule.
"""

from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute("ALTER TABLE webhook_endpoints ADD COLUMN start_seqs jsonb")


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE webhook_endpoints DROP COLUMN start_seqs")
