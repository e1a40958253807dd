"""Folders, messages and attachments, each under the same row-level security as accounts.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TENANT_MATCH = (
    "tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid "
    "AND user_id = nullif(current_setting('app.user_id', true), '')::uuid"
)
OWNER_COLUMNS = """
    tenant_id uuid NOT NULL,
    user_id uuid NOT NULL,
    account_id text NOT NULL REFERENCES accounts (id),
"""


def _secure(table: str, app_role: str) -> None:
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    op.execute(
        f'CREATE POLICY {table}_owner ON {table} TO "{app_role}" USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH})'
    )
    op.execute(
        f"CREATE POLICY {table}_maintenance ON {table} TO CURRENT_USER"
        " USING (current_setting('app.maintenance', true) = 'on')"
    )
    # Sync removes what the server removed, so unlike accounts these rows can be deleted.
    op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO "{app_role}"')


def upgrade(app_role: str) -> None:
    op.execute(f"""
        CREATE TABLE folders (
            id text PRIMARY KEY,
            {OWNER_COLUMNS}
            name text NOT NULL,
            display_name text NOT NULL,
            type text NOT NULL CHECK (type IN ('inbox', 'sent', 'drafts', 'spam', 'trash', 'custom')),
            delimiter text,
            parent_id text REFERENCES folders (id) ON DELETE SET NULL,
            attributes text[] NOT NULL DEFAULT '{{}}',
            uidvalidity bigint,
            uidnext bigint,
            highestmodseq bigint,
            message_count integer NOT NULL DEFAULT 0,
            unread_count integer NOT NULL DEFAULT 0,
            synced_at timestamptz,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (account_id, name)
        )
    """)
    op.execute(f"""
        CREATE TABLE messages (
            id text PRIMARY KEY,
            {OWNER_COLUMNS}
            folder_id text NOT NULL REFERENCES folders (id) ON DELETE CASCADE,
            uid bigint,
            pop3_uidl text,
            modseq bigint,
            message_id_header text,
            conversation_id text,
            subject text NOT NULL DEFAULT '',
            from_address text NOT NULL DEFAULT '',
            from_name text,
            to_addresses text[] NOT NULL DEFAULT '{{}}',
            cc_addresses text[] NOT NULL DEFAULT '{{}}',
            bcc_addresses text[] NOT NULL DEFAULT '{{}}',
            preview text NOT NULL DEFAULT '',
            body_text text NOT NULL DEFAULT '',
            body_html text,
            headers jsonb NOT NULL DEFAULT '{{}}',
            received_at timestamptz NOT NULL,
            is_read boolean NOT NULL DEFAULT false,
            is_starred boolean NOT NULL DEFAULT false,
            is_spam boolean NOT NULL DEFAULT false,
            is_deleted boolean NOT NULL DEFAULT false,
            is_draft boolean NOT NULL DEFAULT false,
            keywords text[] NOT NULL DEFAULT '{{}}',
            size integer NOT NULL DEFAULT 0,
            attachment_count integer NOT NULL DEFAULT 0,
            raw_object_key text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (folder_id, uid),
            UNIQUE (folder_id, pop3_uidl)
        )
    """)
    # Every page the API serves is one of these orders within one folder, so each is an index scan.
    op.execute("CREATE INDEX messages_by_received ON messages (folder_id, received_at, id)")
    op.execute("CREATE INDEX messages_by_from ON messages (folder_id, from_address, id)")
    op.execute("CREATE INDEX messages_unread_by_received ON messages (folder_id, received_at, id) WHERE NOT is_read")
    op.execute("CREATE INDEX messages_read_by_received ON messages (folder_id, received_at, id) WHERE is_read")
    op.execute("CREATE INDEX messages_conversation ON messages (account_id, conversation_id)")
    op.execute(f"""
        CREATE TABLE attachments (
            id text PRIMARY KEY,
            {OWNER_COLUMNS}
            message_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            filename text NOT NULL,
            mime_type text NOT NULL,
            size bigint NOT NULL,
            content_id text,
            is_inline boolean NOT NULL DEFAULT false,
            object_key text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute("CREATE INDEX attachments_by_message ON attachments (message_id)")
    op.execute("CREATE INDEX folders_by_account ON folders (account_id)")
    for table in ("folders", "messages", "attachments"):
        _secure(table, app_role)
    # The scheduler reads due accounts across tenants through the owner's maintenance policy.
    op.execute(
        "CREATE INDEX accounts_sync_due ON accounts (last_sync_at)"
        " WHERE deleted_at IS NULL AND is_enabled AND is_sync_enabled"
    )


def downgrade(app_role: str) -> None:
    op.execute("DROP INDEX accounts_sync_due")
    op.execute("DROP TABLE attachments")
    op.execute("DROP TABLE messages")
    op.execute("DROP TABLE folders")
