"""Accounts table, the application role and row-level security.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# A setting that is unset or empty yields NULL, and NULL matches no row: no context, no data.
TENANT_MATCH = (
    "tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid "
    "AND user_id = nullif(current_setting('app.user_id', true), '')::uuid"
)


def upgrade(app_role: str) -> None:
    op.execute(f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{app_role}') THEN
                CREATE ROLE "{app_role}" NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
            END IF;
        END
        $$;
    """)
    # The connecting role switches to the application role per transaction (SET LOCAL ROLE).
    op.execute(f'GRANT "{app_role}" TO CURRENT_USER')
    op.execute("""
        CREATE TABLE accounts (
            id text PRIMARY KEY,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            account_name text NOT NULL,
            email_address text NOT NULL,
            protocol text NOT NULL CHECK (protocol IN ('imap', 'pop3')),
            hostname text NOT NULL,
            port integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
            encryption text NOT NULL CHECK (encryption IN ('none', 'tls', 'starttls')),
            username text NOT NULL,
            password_encrypted bytea NOT NULL,
            smtp_hostname text,
            smtp_port integer CHECK (smtp_port BETWEEN 1 AND 65535),
            smtp_encryption text CHECK (smtp_encryption IN ('none', 'tls', 'starttls')),
            smtp_username text,
            smtp_password_encrypted bytea,
            is_sync_enabled boolean NOT NULL DEFAULT true,
            sync_interval integer NOT NULL DEFAULT 300 CHECK (sync_interval >= 60),
            last_sync_at timestamptz,
            is_syncing boolean NOT NULL DEFAULT false,
            is_enabled boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            deleted_at timestamptz
        )
    """)
    op.execute("""
        CREATE UNIQUE INDEX accounts_tenant_email_live
            ON accounts (tenant_id, lower(email_address)) WHERE deleted_at IS NULL
    """)
    op.execute("""
        CREATE INDEX accounts_owner_listing
            ON accounts (tenant_id, user_id, created_at, id) WHERE deleted_at IS NULL
    """)
    op.execute("ALTER TABLE accounts ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE accounts FORCE ROW LEVEL SECURITY")
    op.execute(f"""
        CREATE POLICY accounts_owner ON accounts TO "{app_role}"
            USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH})
    """)
    # FORCE subjects the owner to RLS as well; it sees rows only when a maintenance command
    # (key rotation) switches this on for its own transaction.
    op.execute("""
        CREATE POLICY accounts_maintenance ON accounts TO CURRENT_USER
            USING (current_setting('app.maintenance', true) = 'on')
    """)
    # No DELETE: accounts are soft-deleted, so the API role cannot destroy data.
    op.execute(f'GRANT SELECT, INSERT, UPDATE ON accounts TO "{app_role}"')


def downgrade(app_role: str) -> None:
    op.execute("DROP TABLE accounts")
