"""Background tasks in the database; per-account sync backoff; sends that may or may not have gone.

Revision ID: 0006
Revises: 0005

Task outcomes, progress and retries must survive a lost Redis, so they live here; RQ only
carries "run task X now". The account keeps its own sync failures and the time of its next
automatic sync, so a failing account backs off instead of being retried on every scheduler pass.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TENANT_MATCH = (
    "tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid "
    "AND user_id = nullif(current_setting('app.user_id', true), '')::uuid"
)


def upgrade(app_role: str) -> None:
    op.execute("""
        CREATE TABLE tasks (
            id text PRIMARY KEY,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            -- NULL once a deleted account's rows are removed; the task keeps its outcome.
            account_id text REFERENCES accounts (id) ON DELETE SET NULL,
            message_id text,
            kind text NOT NULL CHECK (kind IN ('sync', 'send', 'draft', 'writeback', 'cleanup')),
            status text NOT NULL CHECK (status IN ('pending', 'started', 'retry', 'success', 'failure')),
            params jsonb NOT NULL DEFAULT '{}',
            progress integer NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
            result jsonb,
            error text,
            attempts integer NOT NULL DEFAULT 0,
            abandoned integer NOT NULL DEFAULT 0,
            run_after timestamptz,
            carrier_id text,
            heartbeat_at timestamptz,
            created_at timestamptz NOT NULL DEFAULT now(),
            started_at timestamptz,
            finished_at timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute(
        "CREATE INDEX tasks_active ON tasks (status, heartbeat_at) WHERE status IN ('pending', 'started', 'retry')"
    )
    op.execute("CREATE INDEX tasks_by_account ON tasks (account_id, kind, status)")
    op.execute("CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL")
    op.execute("ALTER TABLE tasks ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE tasks FORCE ROW LEVEL SECURITY")
    op.execute(f'CREATE POLICY tasks_owner ON tasks TO "{app_role}" USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH})')
    # Workers run and reap tasks across tenants through the owner's maintenance policy.
    op.execute(
        "CREATE POLICY tasks_maintenance ON tasks TO CURRENT_USER"
        " USING (current_setting('app.maintenance', true) = 'on')"
    )
    op.execute(f'GRANT SELECT, INSERT, UPDATE ON tasks TO "{app_role}"')

    op.execute("ALTER TABLE accounts ADD COLUMN sync_failures integer NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE accounts ADD COLUMN last_sync_error text")
    op.execute("ALTER TABLE accounts ADD COLUMN last_sync_error_at timestamptz")
    op.execute("ALTER TABLE accounts ADD COLUMN next_sync_at timestamptz")
    op.execute("UPDATE accounts SET next_sync_at = coalesce(last_sync_at + sync_interval * interval '1 second', now())")
    # Whether a sync runs is the tasks table's to say (a started sync task with a fresh heartbeat).
    op.execute("ALTER TABLE accounts DROP COLUMN is_syncing")
    op.execute("DROP INDEX accounts_sync_due")
    op.execute(
        "CREATE INDEX accounts_sync_due ON accounts (next_sync_at)"
        " WHERE deleted_at IS NULL AND is_enabled AND is_sync_enabled"
    )

    # sending: the message data went out and no reply has come yet (a worker lost there leaves it
    # so); ambiguous: the reply never came, so the server may or may not have accepted it.
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_delivery_status_check")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT messages_delivery_status_check"
        " CHECK (delivery_status IN ('queued', 'sending', 'sent', 'failed', 'ambiguous', 'draft'))"
    )


def downgrade(app_role: str) -> None:
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_delivery_status_check")
    op.execute("UPDATE messages SET delivery_status = 'failed' WHERE delivery_status IN ('sending', 'ambiguous')")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT messages_delivery_status_check"
        " CHECK (delivery_status IN ('queued', 'sent', 'failed', 'draft'))"
    )
    op.execute("DROP INDEX accounts_sync_due")
    op.execute(
        "CREATE INDEX accounts_sync_due ON accounts (last_sync_at)"
        " WHERE deleted_at IS NULL AND is_enabled AND is_sync_enabled"
    )
    op.execute("ALTER TABLE accounts ADD COLUMN is_syncing boolean NOT NULL DEFAULT false")
    for column in ("next_sync_at", "last_sync_error_at", "last_sync_error", "sync_failures"):
        op.execute(f"ALTER TABLE accounts DROP COLUMN {column}")
    op.execute("DROP TABLE tasks")
