"""Account addresses are unique per user, compared by a canonical key.

The unique index was per tenant, so one user learned through 409 that a colleague had an
address. Addresses are now compared by ``email_key`` (the canonical address, case-folded; see
``email_service.addresses``), one live account per address and user.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from email_service.addresses import InvalidAddress, canonical, comparison_key

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute("ALTER TABLE accounts ADD COLUMN email_key text")
    # FORCE ROW LEVEL SECURITY hides every row from the owner unless maintenance is switched on
    # for this transaction.
    op.execute("SELECT set_config('app.maintenance', 'on', true)")
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT id, email_address FROM accounts")).all()
    keys = [{"id": row.id, "key": _key(row.email_address)} for row in rows]
    if keys:
        connection.execute(sa.text("UPDATE accounts SET email_key = :key WHERE id = :id"), keys)
    op.execute("SELECT set_config('app.maintenance', 'off', true)")
    op.execute("ALTER TABLE accounts ALTER COLUMN email_key SET NOT NULL")
    op.execute("DROP INDEX accounts_tenant_email_live")
    op.execute("""
        CREATE UNIQUE INDEX accounts_user_email_live
            ON accounts (tenant_id, user_id, email_key) WHERE deleted_at IS NULL
    """)


def _key(address: str) -> str:
    """The key the service computes, so stored and new addresses compare alike (a Unicode domain
    stored before this revision matches its IDNA spelling). An address stored before look-alikes
    were refused is kept, keyed by its own case-folded form."""
    try:
        return comparison_key(canonical(address))
    except InvalidAddress:
        return address.casefold()


def downgrade(app_role: str) -> None:
    # Fails if two users of one tenant now share a live address; that is the point of going back.
    op.execute("DROP INDEX accounts_user_email_live")
    op.execute("ALTER TABLE accounts DROP COLUMN email_key")
    op.execute("""
        CREATE UNIQUE INDEX accounts_tenant_email_live
            ON accounts (tenant_id, lower(email_address)) WHERE deleted_at IS NULL
    """)
