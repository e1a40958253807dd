"""Cheaper search indexing of mail stored in batches.

Revision ID: 0015
Revises: 0014

Sync stores a batch of messages in one INSERT. The search vectors of the new rows are now
written by one statement-level trigger, in one INSERT ... SELECT over the statement's new rows,
instead of one trigger call and one INSERT per row. Updates keep the row trigger of 0012.

The attachments' statement triggers set each message's ``attachment_names``; now they leave a
message whose names are already right alone. Sync writes the names with the message, so
inserting its attachments no longer rewrites each such message and computes its vector twice.
"""

from alembic import op
from sqlalchemy import text

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_NAMES = "coalesce((SELECT string_agg(a.filename, ' ' ORDER BY a.id) FROM attachments a WHERE a.message_id = m.id), '')"


def _attachment_names(only_changed: bool) -> str:
    changed = f" AND m.attachment_names IS DISTINCT FROM {_NAMES}" if only_changed else ""
    return f"""
        CREATE OR REPLACE FUNCTION email_search_attachment_names() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE messages m SET attachment_names = {_NAMES}
            WHERE m.id IN (SELECT message_id FROM changed_rows WHERE message_id IS NOT NULL){changed};
            RETURN NULL;
        END
        $$
    """


def upgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    # As email_search_index(): a definer function (the application role has no privilege on
    # message_search) with its search path pinned.
    op.execute(f"""
        CREATE FUNCTION email_search_index_inserted() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        BEGIN
            INSERT INTO message_search (message_id, tenant_id, user_id, account_id, received_at, vector)
            SELECT n.id, n.tenant_id, n.user_id, n.account_id, n.received_at, email_search_vector(n::messages)
            FROM inserted_messages n
            ON CONFLICT (message_id) DO UPDATE
                SET vector = EXCLUDED.vector, account_id = EXCLUDED.account_id, received_at = EXCLUDED.received_at;
            RETURN NULL;
        END
        $$
    """)
    op.execute("DROP TRIGGER messages_search_insert ON messages")
    # Triggers on one event fire in name order: this one sorts before messages_counted_insert,
    # so the vectors (most of the statement's work) are computed before the folder's row is
    # locked for its counts, and two transactions storing into one folder compute them at once.
    op.execute("""
        CREATE TRIGGER messages_add_search_vectors AFTER INSERT ON messages
        REFERENCING NEW TABLE AS inserted_messages
        FOR EACH STATEMENT EXECUTE FUNCTION email_search_index_inserted()
    """)
    op.execute(_attachment_names(only_changed=True))


def downgrade(app_role: str) -> None:
    op.execute(_attachment_names(only_changed=False))
    op.execute("DROP TRIGGER messages_add_search_vectors ON messages")
    op.execute("""
        CREATE TRIGGER messages_search_insert AFTER INSERT ON messages
        FOR EACH ROW EXECUTE FUNCTION email_search_index()
    """)
    op.execute("DROP FUNCTION email_search_index_inserted()")
