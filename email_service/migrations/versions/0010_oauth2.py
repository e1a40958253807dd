"""OAuth2 accounts: how an account logs in, its encrypted tokens and their state; consent-flow states.

Revision ID: 0010
Revises: 0009

An ``oauth2`` account has no password: it logs in with an access token refreshed from its refresh
token (both Fernet tokens like passwords). ``oauth2_states`` holds each pending consent flow: the
``state`` is stored only as its SHA-256, bound to the tenant and user who started it, and is used
once (the callback deletes the row it consumes).
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TENANT_MATCH = (
    "tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid "
    "AND user_id = nullif(current_setting('app.user_id', true), '')::uuid"
)


def upgrade(app_role: str) -> None:
    op.execute("""
        ALTER TABLE accounts
            ADD COLUMN auth_type text NOT NULL DEFAULT 'password' CHECK (auth_type IN ('password', 'oauth2')),
            ADD COLUMN oauth2_provider text,
            ADD COLUMN oauth2_refresh_token_encrypted bytea,
            ADD COLUMN oauth2_access_token_encrypted bytea,
            ADD COLUMN oauth2_expires_at timestamptz,
            ADD COLUMN oauth2_token_state text CHECK (oauth2_token_state IN ('valid', 'refresh_failed')),
            ADD COLUMN oauth2_token_error text,
            ALTER COLUMN password_encrypted DROP NOT NULL,
            ADD CONSTRAINT accounts_login_present CHECK (
                (auth_type = 'password' AND password_encrypted IS NOT NULL)
                OR (auth_type = 'oauth2' AND oauth2_provider IS NOT NULL AND oauth2_refresh_token_encrypted IS NOT NULL)
            )
    """)
    op.execute("""
        CREATE TABLE oauth2_states (
            state_hash text PRIMARY KEY,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            provider text NOT NULL,
            code_verifier_encrypted bytea NOT NULL,
            return_url text NOT NULL,
            account jsonb NOT NULL,
            expires_at timestamptz NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute("CREATE INDEX oauth2_states_expiry ON oauth2_states (expires_at)")
    op.execute("ALTER TABLE oauth2_states ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE oauth2_states FORCE ROW LEVEL SECURITY")
    op.execute(
        f'CREATE POLICY oauth2_states_owner ON oauth2_states TO "{app_role}"'
        f" USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH})"
    )
    # The callback carries no JWT: it finds and consumes its state through the maintenance policy,
    # then acts as the principal the state names.
    op.execute(
        "CREATE POLICY oauth2_states_maintenance ON oauth2_states TO CURRENT_USER"
        " USING (current_setting('app.maintenance', true) = 'on')"
    )
    op.execute(f'GRANT SELECT, INSERT ON oauth2_states TO "{app_role}"')


def downgrade(app_role: str) -> None:
    op.execute("DROP TABLE oauth2_states")
    # A password-less account cannot exist before this revision.
    op.execute("DELETE FROM accounts WHERE auth_type = 'oauth2'")
    op.execute("""
        ALTER TABLE accounts
            DROP CONSTRAINT accounts_login_present,
            ALTER COLUMN password_encrypted SET NOT NULL,
            DROP COLUMN oauth2_token_error,
            DROP COLUMN oauth2_token_state,
            DROP COLUMN oauth2_expires_at,
            DROP COLUMN oauth2_access_token_encrypted,
            DROP COLUMN oauth2_refresh_token_encrypted,
            DROP COLUMN oauth2_provider,
            DROP COLUMN auth_type
    """)
