"""Webhooks: endpoints, one delivery per endpoint and change, every attempt, fan-out positions.

Revision ID: 0009
Revises: 0008

Deliveries are made from the change log in the transaction that moves the account's fan-out
position, and are unique per (endpoint, account, sequence): a restart, a lost notification or two
dispatchers at once can neither drop nor duplicate one.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TENANT_MATCH = (
    "tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid "
    "AND user_id = nullif(current_setting('app.user_id', true), '')::uuid"
)
TABLES = ("webhook_endpoints", "webhook_deliveries", "webhook_attempts", "webhook_cursors")


def upgrade(app_role: str) -> None:
    op.execute("""
        CREATE TABLE webhook_endpoints (
            id text PRIMARY KEY,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            url text NOT NULL,
            description text,
            event_types text[],
            account_id text REFERENCES accounts (id) ON DELETE CASCADE,
            secret_encrypted bytea NOT NULL,
            status text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
            disabled_reason text,
            disabled_at timestamptz,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute("CREATE INDEX webhook_endpoints_by_user ON webhook_endpoints (tenant_id, user_id, created_at)")
    op.execute("""
        CREATE TABLE webhook_deliveries (
            id text PRIMARY KEY,
            endpoint_id text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            account_id text NOT NULL,
            seq bigint NOT NULL,
            event_type text NOT NULL,
            payload jsonb NOT NULL,
            status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz,
            claimed_by text,
            claimed_until timestamptz,
            created_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (endpoint_id, account_id, seq)
        )
    """)
    op.execute("CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending'")
    # Claimed deliveries are the requests open now: counted at every claim to apply the limits.
    op.execute(
        "CREATE INDEX webhook_deliveries_claimed ON webhook_deliveries (claimed_until) WHERE claimed_until IS NOT NULL"
    )
    op.execute("""
        CREATE TABLE webhook_attempts (
            id bigserial PRIMARY KEY,
            delivery_id text NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
            endpoint_id text NOT NULL,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            attempt integer NOT NULL,
            event_type text NOT NULL,
            attempted_at timestamptz NOT NULL,
            status_code integer,
            error text,
            duration_ms integer NOT NULL,
            next_attempt_at timestamptz
        )
    """)
    op.execute("CREATE INDEX webhook_attempts_recent ON webhook_attempts (endpoint_id, attempted_at DESC)")
    op.execute("CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id)")
    op.execute("""
        CREATE TABLE webhook_cursors (
            account_id text PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            seq bigint NOT NULL DEFAULT 0
        )
    """)
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f'CREATE POLICY {table}_owner ON {table} TO "{app_role}" USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH})'
        )
        # Fan-out and the dispatcher work across tenants through the owner's maintenance policy.
        op.execute(
            f"CREATE POLICY {table}_maintenance ON {table} TO CURRENT_USER"
            " USING (current_setting('app.maintenance', true) = 'on')"
        )
    # The API manages a user's endpoints and reads what was sent; sending is the dispatcher's.
    op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_endpoints TO "{app_role}"')
    op.execute(f'GRANT SELECT, UPDATE ON webhook_deliveries TO "{app_role}"')
    op.execute(f'GRANT SELECT ON webhook_attempts TO "{app_role}"')


def downgrade(app_role: str) -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP TABLE {table}")
