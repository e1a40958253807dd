"""Search knows each message's folder and star, so it walks a folder's or the starred matches alone.

Revision ID: 0017
Revises: 0016

A common word in one folder (a tenth of the mail) or among starred mail (a few percent) was
found by two walks outside the index (see ``search.service``): the account's matches joined
to ``messages``, or the messages that pass the filter asked one by one whether they match,
about 1,000 rows read and sent back and forth per pass. ``message_search`` now holds the
message's ``folder_id`` and ``is_starred`` beside its vector, with an index for each walk:
(folder_id, received_at, message_id) and the starred rows' (account_id, received_at,
message_id). ``email_search_range`` takes both as filters, so such a search is one walk newest
first in the database, as a search of the whole account is, and a rare word is still read
through the GIN index; the statistics of the new columns let the planner choose.

A statement trigger copies a changed folder or star to ``message_search`` (a move, a flag
change), in one UPDATE per statement; the vector is left as it is.
"""

import importlib

from alembic import op
from sqlalchemy import text

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# 0014's function, which this revision replaces and its downgrade restores.
_RECENCY = importlib.import_module("email_service.migrations.versions.0014_search_recency")
OLD_ARGUMENTS, OLD_TYPES = _RECENCY.RANGE_ARGUMENTS, _RECENCY.RANGE_TYPES
ARGUMENTS = OLD_ARGUMENTS + ", in_folder text, starred boolean"
TYPES = OLD_TYPES + ", text, boolean"
PLACE = """
      AND ($10 IS NULL OR s.folder_id = $10)
      AND ($11 IS NULL OR s.is_starred = $11)"""


def _range_function(schema: str, arguments: str, more: str, using: str) -> str:
    # As 0014 made it: planned for each call with the values (dynamic SQL), so a NULL filter
    # folds away and the statistics of the words and filters choose the plan.
    return f"""
        CREATE FUNCTION email_search_range({arguments})
        RETURNS TABLE (message_id text, received_at timestamptz, rank real)
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        BEGIN
            RETURN QUERY EXECUTE $query$ {_RECENCY.RANGE_MATCHES}{more} {_RECENCY.RANGE_ORDER} $query$
            USING {using};
        END
        $$
    """


# The rows each function writes and their folder and star: for 0015's statement trigger on inserts and
# 0012's row trigger on updates of the indexed text.
_ROWS = {
    "email_search_index_inserted": (
        "SELECT n.id, n.tenant_id, n.user_id, n.account_id, n.received_at, email_search_vector(n::messages){place}"
        " FROM inserted_messages n",
        ", n.folder_id, n.is_starred",
    ),
    "email_search_index": (
        "VALUES (NEW.id, NEW.tenant_id, NEW.user_id, NEW.account_id, NEW.received_at, email_search_vector(NEW){place})",
        ", NEW.folder_id, NEW.is_starred",
    ),
}


def _index_function(schema: str, name: str, with_place: bool) -> str:
    """One of the trigger functions that write vectors, as before this revision or with the folder and star."""
    rows, place = _ROWS[name]
    columns = ", folder_id, is_starred" if with_place else ""
    # A row already there is brought up to date whole.
    also = ", folder_id = EXCLUDED.folder_id, is_starred = EXCLUDED.is_starred" if with_place else ""
    return f"""
        CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        BEGIN
            INSERT INTO message_search (message_id, tenant_id, user_id, account_id, received_at, vector{columns})
            {rows.format(place=place if with_place else "")}
            ON CONFLICT (message_id) DO UPDATE SET vector = EXCLUDED.vector,
                account_id = EXCLUDED.account_id, received_at = EXCLUDED.received_at{also};
            RETURN NULL;
        END
        $$
    """


def upgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    # Existing mail is read across tenants: through the owner's maintenance policy.
    op.execute("SELECT set_config('app.maintenance', 'on', true)")
    op.execute("ALTER TABLE message_search ADD COLUMN folder_id text, ADD COLUMN is_starred boolean")
    op.execute("""
        UPDATE message_search s SET folder_id = m.folder_id, is_starred = m.is_starred
        FROM messages m WHERE m.id = s.message_id
    """)
    op.execute("ALTER TABLE message_search ALTER COLUMN folder_id SET NOT NULL, ALTER COLUMN is_starred SET NOT NULL")
    op.execute("CREATE INDEX message_search_by_folder_received ON message_search (folder_id, received_at, message_id)")
    # Written as the function's condition reads once its parameter is known (is_starred = true
    # folds to is_starred), so the planner matches the predicate without proving it.
    op.execute(
        "CREATE INDEX message_search_starred ON message_search (account_id, received_at, message_id) WHERE is_starred"
    )
    for name in _ROWS:
        op.execute(_index_function(schema, name, with_place=True))
    # One UPDATE per statement, for the rows whose folder or star changed: moving or flagging
    # thousands of messages at once costs one join, not a trigger call per row. A column list
    # cannot go with transition tables, so it runs on every UPDATE of messages and finds
    # nothing to do when neither changed.
    op.execute(f"""
        CREATE FUNCTION email_search_place() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        BEGIN
            UPDATE message_search s SET folder_id = after.folder_id, is_starred = after.is_starred
            FROM before_messages AS before JOIN after_messages AS after USING (id)
            WHERE s.message_id = after.id
              AND (before.folder_id <> after.folder_id OR before.is_starred <> after.is_starred);
            RETURN NULL;
        END
        $$
    """)
    op.execute("""
        CREATE TRIGGER messages_search_place AFTER UPDATE ON messages
        REFERENCING OLD TABLE AS before_messages NEW TABLE AS after_messages
        FOR EACH STATEMENT EXECUTE FUNCTION email_search_place()
    """)
    op.execute(
        _range_function(
            schema,
            ARGUMENTS,
            PLACE,
            "account, query, after, before, floor_at, floor_id, older_than_at, older_than_id, max_rows,"
            " in_folder, starred",
        )
    )
    op.execute(f"REVOKE ALL ON FUNCTION email_search_range({TYPES}) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION email_search_range({TYPES}) TO "{app_role}"')
    op.execute(f"DROP FUNCTION email_search_range({OLD_TYPES})")
    op.execute("ANALYZE message_search")


def downgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    op.execute(
        _range_function(
            schema,
            OLD_ARGUMENTS,
            "",
            "account, query, after, before, floor_at, floor_id, older_than_at, older_than_id, max_rows",
        )
    )
    op.execute(f"REVOKE ALL ON FUNCTION email_search_range({OLD_TYPES}) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION email_search_range({OLD_TYPES}) TO "{app_role}"')
    op.execute(f"DROP FUNCTION email_search_range({TYPES})")
    op.execute("DROP TRIGGER messages_search_place ON messages")
    op.execute("DROP FUNCTION email_search_place()")
    for name in _ROWS:
        op.execute(_index_function(schema, name, with_place=False))
    op.execute("DROP INDEX message_search_starred")
    op.execute("DROP INDEX message_search_by_folder_received")
    op.execute("ALTER TABLE message_search DROP COLUMN is_starred, DROP COLUMN folder_id")
