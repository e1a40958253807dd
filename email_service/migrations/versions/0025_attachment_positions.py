"""Where each attachment of a message written through the API stands among its files.

Revision ID: 0025
Revises: 0024

A message's attachments were read back in no particular order, so a send could carry them in
another order than the request's ``attachmentIds`` (ids are random, and the heap order moves
with every update). Each attachment a message takes at compose now keeps its place in that
list; a nullable column with no default adds it without rewriting the table. Received mail and
uploads not yet attached have none, and sort after those that do, by id as before.
"""

from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute("ALTER TABLE attachments ADD COLUMN position integer")


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE attachments DROP COLUMN position")
