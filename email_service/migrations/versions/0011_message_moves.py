"""Moves and deletions made through the API that the mail server has not been told of yet.

Revision ID: 0011
Revises: 0010

A moved message shows in its new folder at once; until the server has moved it too, its UID
in the old folder is kept here, so a sync in between neither fetches it again from the old
folder nor loses it from the new one. A message deleted for good leaves the same record with
no target until the server has expunged it (or, for POP3, for as long as the server keeps it,
so it is not downloaded again).
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TENANT_MATCH = (
    "tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid "
    "AND user_id = nullif(current_setting('app.user_id', true), '')::uuid"
)


def upgrade(app_role: str) -> None:
    op.execute("""
        CREATE TABLE message_moves (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            account_id text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
            message_id text UNIQUE REFERENCES messages (id) ON DELETE SET NULL,
            source_folder_id text NOT NULL REFERENCES folders (id) ON DELETE CASCADE,
            uid bigint,
            pop3_uidl text,
            target_folder_id text REFERENCES folders (id) ON DELETE CASCADE,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute("CREATE INDEX message_moves_by_source ON message_moves (source_folder_id, uid)")
    op.execute("CREATE INDEX message_moves_by_account ON message_moves (account_id)")
    op.execute("ALTER TABLE message_moves ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE message_moves FORCE ROW LEVEL SECURITY")
    op.execute(
        f'CREATE POLICY message_moves_owner ON message_moves TO "{app_role}"'
        f" USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH})"
    )
    op.execute(
        "CREATE POLICY message_moves_maintenance ON message_moves TO CURRENT_USER"
        " USING (current_setting('app.maintenance', true) = 'on')"
    )
    op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON message_moves TO "{app_role}"')
    # POP3 keeps mail on the server unless the user asks that deleting here deletes there too.
    op.execute("ALTER TABLE accounts ADD COLUMN pop3_delete_on_server boolean NOT NULL DEFAULT false")


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE accounts DROP COLUMN pop3_delete_on_server")
    op.execute("DROP TABLE message_moves")
