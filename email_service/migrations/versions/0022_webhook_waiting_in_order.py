"""An endpoint's waiting deliveries in the order they are sent: due time, then id.

Revision ID: 0022
Revises: 0021

A claim takes each endpoint's first few due deliveries in that order. While an endpoint fails,
all its waiting deliveries share one due time, so without the id in the index every claim sorted
the endpoint's whole backlog; in order, the same ones are retried until the endpoint recovers or
is disabled, rather than each in turn. The index replaces webhook_deliveries_waiting, whose look-
ups (an endpoint's deliveries due later than now) it serves as well.
"""

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute(
        "CREATE INDEX webhook_deliveries_waiting_in_order ON webhook_deliveries (endpoint_id, next_attempt_at, id)"
        " WHERE status = 'pending'"
    )
    op.execute("DROP INDEX webhook_deliveries_waiting")


def downgrade(app_role: str) -> None:
    op.execute(
        "CREATE INDEX webhook_deliveries_waiting ON webhook_deliveries (endpoint_id, next_attempt_at)"
        " WHERE status = 'pending'"
    )
    op.execute("DROP INDEX webhook_deliveries_waiting_in_order")
