"""Find the webhook endpoints whose previous secret has expired without reading them all.

Revision ID: 0027
Revises: 0026

The dispatcher drops expired previous secrets at each catch-up (every few seconds). Only
endpoints rotated within a grace period have one, so a partial index holds a handful of rows
however many endpoints there are, and the sweep reads only those.
"""

from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute(
        "CREATE INDEX webhook_endpoints_previous_secret_expiry ON webhook_endpoints (previous_secret_expires_at)"
        " WHERE previous_secret_expires_at IS NOT NULL"
    )


def downgrade(app_role: str) -> None:
    op.execute("DROP INDEX webhook_endpoints_previous_secret_expiry")
