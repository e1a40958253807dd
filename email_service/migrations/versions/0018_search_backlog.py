"""A large sync's mail is indexed for search after it is stored, not while.

Revision ID: 0018
Revises: 0017

Computing search vectors is most of what PostgreSQL does when a first sync stores a large
mailbox (``to_tsvector`` over 10,000 realistic messages: 40 s of CPU, four times the rest of
the INSERTs), and while it runs inside the batches' transactions no message of a batch is
listable until its vectors are done. A transaction that sets ``app.search_deferred`` to ``on``
now stores its new messages without vectors: the insert trigger notes them in
``message_search_pending`` instead. The sync then indexes what is pending as its last step, so
the mail is listable first and searchable when the sync completes.

Indexing runs as the caller, under row-level security: ``email_search_claim_pending(account,
max_rows)`` locks and returns up to ``max_rows`` pending messages of the caller's own account
(skipping those another transaction has claimed, so two indexers share the work), the caller
computes their vectors from the messages it can read (locking them, so a move or a star change
made meanwhile waits and then updates the stored row, see 0017), and
``email_search_store_pending(ids, received, folders, starred, vectors)`` writes them, for
messages that are pending and the caller's own only. A pending message that is deleted leaves
the list with it (the foreign key cascades); one left pending by a sync that died is indexed
by the next.
"""

from alembic import op
from sqlalchemy import text

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_CALLER = """
    {alias}.tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid
    AND {alias}.user_id = nullif(current_setting('app.user_id', true), '')::uuid
"""

# As 0017 made the trigger's insert: the vector with the message's folder and star.
_INDEX_INSERTED = """
    INSERT INTO message_search (message_id, tenant_id, user_id, account_id, received_at, vector, folder_id, is_starred)
    SELECT n.id, n.tenant_id, n.user_id, n.account_id, n.received_at, email_search_vector(n::messages),
        n.folder_id, n.is_starred
    FROM inserted_messages n
    ON CONFLICT (message_id) DO UPDATE SET vector = EXCLUDED.vector, account_id = EXCLUDED.account_id,
        received_at = EXCLUDED.received_at, folder_id = EXCLUDED.folder_id, is_starred = EXCLUDED.is_starred;
"""


def _insert_trigger_function(schema: str, body: str) -> None:
    """(Re)define the statement trigger function of migration 0015 with ``body``."""
    op.execute(f"""
        CREATE OR REPLACE FUNCTION email_search_index_inserted() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        BEGIN
            {body}
            RETURN NULL;
        END
        $$
    """)


def upgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    # Like message_search: no policy, no privilege for the application role; definer functions only.
    op.execute("""
        CREATE TABLE message_search_pending (
            message_id text PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            account_id text NOT NULL
        )
    """)
    op.execute("REVOKE ALL ON message_search_pending FROM PUBLIC")
    op.execute("CREATE INDEX message_search_pending_account ON message_search_pending (account_id)")
    _insert_trigger_function(
        schema,
        f"""
        IF current_setting('app.search_deferred', true) = 'on' THEN
            INSERT INTO message_search_pending (message_id, tenant_id, user_id, account_id)
            SELECT n.id, n.tenant_id, n.user_id, n.account_id FROM inserted_messages n
            ON CONFLICT (message_id) DO NOTHING;
        ELSE
            {_INDEX_INSERTED}
        END IF;
        """,
    )
    op.execute(f"""
        CREATE FUNCTION email_search_claim_pending(account text, max_rows integer)
        RETURNS TABLE (message_id text)
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
            SELECT p.message_id FROM message_search_pending p
            WHERE p.account_id = account AND {_CALLER.format(alias="p")}
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED
        $$
    """)
    op.execute(f"""
        CREATE FUNCTION email_search_store_pending(
            ids text[], received timestamptz[], folders text[], starred boolean[], vectors tsvector[]
        )
        RETURNS integer
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        DECLARE
            stored integer;
        BEGIN
            WITH given AS (
                SELECT * FROM unnest(ids, received, folders, starred, vectors)
                    AS g (message_id, received_at, folder_id, is_starred, vector)
            ), done AS (
                DELETE FROM message_search_pending p USING given g
                WHERE p.message_id = g.message_id AND {_CALLER.format(alias="p")}
                RETURNING p.message_id, p.tenant_id, p.user_id, p.account_id, g.received_at, g.vector,
                    g.folder_id, g.is_starred
            )
            INSERT INTO message_search
                (message_id, tenant_id, user_id, account_id, received_at, vector, folder_id, is_starred)
            SELECT message_id, tenant_id, user_id, account_id, received_at, vector, folder_id, is_starred FROM done
            ON CONFLICT (message_id) DO UPDATE SET vector = EXCLUDED.vector, account_id = EXCLUDED.account_id,
                received_at = EXCLUDED.received_at, folder_id = EXCLUDED.folder_id, is_starred = EXCLUDED.is_starred;
            GET DIAGNOSTICS stored = ROW_COUNT;
            RETURN stored;
        END
        $$
    """)
    for function in (
        "email_search_claim_pending(text, integer)",
        "email_search_store_pending(text[], timestamptz[], text[], boolean[], tsvector[])",
    ):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f'GRANT EXECUTE ON FUNCTION {function} TO "{app_role}"')


def downgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    # What is still pending is indexed now: the downgraded trigger knows no pending list.
    op.execute("SELECT set_config('app.maintenance', 'on', true)")
    op.execute("""
        INSERT INTO message_search
            (message_id, tenant_id, user_id, account_id, received_at, vector, folder_id, is_starred)
        SELECT m.id, m.tenant_id, m.user_id, m.account_id, m.received_at, email_search_vector(m), m.folder_id,
            m.is_starred
        FROM messages m JOIN message_search_pending p ON p.message_id = m.id
        ON CONFLICT (message_id) DO NOTHING
    """)
    op.execute("DROP FUNCTION email_search_store_pending(text[], timestamptz[], text[], boolean[], tsvector[])")
    op.execute("DROP FUNCTION email_search_claim_pending(text, integer)")
    _insert_trigger_function(schema, _INDEX_INSERTED)
    op.execute("DROP TABLE message_search_pending")
