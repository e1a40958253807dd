"""Account addresses are unique per user, compared by a canonical key.

The unique index was per tenant, so one user learned through 409 that a colleague had an
address. Addresses are now compared by ``email_key`` (the canonical address, case-folded; see
``email_service.addresses``), one live account per address and user.

Revision ID: 0007
Revises: 0005
"""

from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    op.execute("ALTER TABLE accounts ADD COLUMN email_key text")
    # FORCE ROW LEVEL SECURITY hides every row from the owner unless maintenance is switched on
    # for this transaction. Stored addresses were already email-validator's normal form, whose
    # domain is lower case, so lower() matches what the service computes for ASCII addresses.
    op.execute("SELECT set_config('app.maintenance', 'on', true)")
    op.execute("UPDATE accounts SET email_key = lower(email_address)")
    op.execute("SELECT set_config('app.maintenance', 'off', true)")
    op.execute("ALTER TABLE accounts ALTER COLUMN email_key SET NOT NULL")
    op.execute("DROP INDEX accounts_tenant_email_live")
    op.execute("""
        CREATE UNIQUE INDEX accounts_user_email_live
            ON accounts (tenant_id, user_id, email_key) WHERE deleted_at IS NULL
    """)


def downgrade(app_role: str) -> None:
    # Fails if two users of one tenant now share a live address; that is the point of going back.
    op.execute("DROP INDEX accounts_user_email_live")
    op.execute("ALTER TABLE accounts DROP COLUMN email_key")
    op.execute("""
        CREATE UNIQUE INDEX accounts_tenant_email_live
            ON accounts (tenant_id, lower(email_address)) WHERE deleted_at IS NULL
    """)
