"""The change log: every change to an account's messages and folders, in commit order per account.

Revision ID: 0008
Revises: 0007

Written in the same transaction as the change itself, so it is the one source of events: a
restart, a lost Redis or a re-sync can neither invent nor lose one.
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TENANT_MATCH = (
    "tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid "
    "AND user_id = nullif(current_setting('app.user_id', true), '')::uuid"
)


def upgrade(app_role: str) -> None:
    # change_seq: the account's last sequence number. Taking the next one updates the account row,
    # whose lock is then held until commit, so sequence order is commit order within an account.
    # change_floor: every sequence number up to it has been pruned; older cursors cannot be served.
    op.execute("ALTER TABLE accounts ADD COLUMN change_seq bigint NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE accounts ADD COLUMN change_floor bigint NOT NULL DEFAULT 0")
    op.execute("""
        CREATE TABLE changes (
            account_id text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
            seq bigint NOT NULL,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            entity text NOT NULL CHECK (entity IN ('message', 'folder')),
            entity_id text NOT NULL,
            kind text NOT NULL CHECK (kind IN ('created', 'updated', 'destroyed')),
            folder_id text,
            detail jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (account_id, seq)
        )
    """)
    op.execute("CREATE INDEX changes_by_age ON changes (created_at)")
    op.execute("ALTER TABLE changes ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE changes FORCE ROW LEVEL SECURITY")
    op.execute(
        f'CREATE POLICY changes_owner ON changes TO "{app_role}" USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH})'
    )
    op.execute(
        "CREATE POLICY changes_maintenance ON changes TO CURRENT_USER"
        " USING (current_setting('app.maintenance', true) = 'on')"
    )
    # Append-only for the API's role: it records changes and reads them, never rewrites history.
    op.execute(f'GRANT SELECT, INSERT ON changes TO "{app_role}"')


def downgrade(app_role: str) -> None:
    op.execute("DROP TABLE changes")
    op.execute("ALTER TABLE accounts DROP COLUMN change_floor")
    op.execute("ALTER TABLE accounts DROP COLUMN change_seq")
