"""An endpoint's waiting deliveries by when they are due, from an index of their own.

Revision ID: 0019
Revises: 0018

While an endpoint fails, its waiting deliveries are held back to the failed one's next attempt,
and the first success makes the held ones due again. That success looks for the endpoint's
deliveries due later than now: without this index the look-up read every delivery the endpoint
ever had (the unique key leads with the endpoint but holds finished ones too), at every
success, which for an endpoint working through a backlog of 100,000 events is quadratic. The
index holds waiting rows only, so the look-up reads the held ones and nothing else.
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute(
        "CREATE INDEX webhook_deliveries_waiting ON webhook_deliveries (endpoint_id, next_attempt_at)"
        " WHERE status = 'pending'"
    )


def downgrade(app_role: str) -> None:
    op.execute("DROP INDEX webhook_deliveries_waiting")
