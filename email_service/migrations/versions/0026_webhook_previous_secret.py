"""A webhook endpoint's previous signing secret, which keeps signing until it expires.

Revision ID: 0026
Revises: 0025

Rotating an endpoint's secret keeps the one it replaces for a grace period, so receivers can
switch over without dropping deliveries: while it lasts each delivery carries a signature under
both. It is encrypted like the current one. Nullable columns with no default add it without
rewriting the table; an endpoint that was never rotated has neither.
"""

from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute(
        "ALTER TABLE webhook_endpoints ADD COLUMN previous_secret_encrypted bytea,"
        " ADD COLUMN previous_secret_expires_at timestamptz"
    )


def downgrade(app_role: str) -> None:
    op.execute(
        "ALTER TABLE webhook_endpoints DROP COLUMN previous_secret_encrypted, DROP COLUMN previous_secret_expires_at"
    )
