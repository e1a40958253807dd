"""Exact folder counts, kept by the database in the transaction that changes the messages.

Revision ID: 0013
Revises: 0012

``folders.message_count`` and ``unread_count`` answer ``pagination.total`` of every message
list (all, read = message_count - unread_count, unread), so they must never drift. Counting
under row-level security reads every heap page of the tenant (the policy's columns are not in
the index); keeping the counts here makes a page cost the same at 100 or 1,000,000 messages.

One trigger function sees every insert, update and delete of a message, whichever code path
(sync, compose, write-back, move, delete, cleanup, a cascade from a folder) makes it, so no
path can forget a count. The triggers are per statement with transition tables: a batch of
500 inserted rows or a folder cleared of 100,000 updates each folder row once, not per row.
Folder rows are updated in id order so two statements touching the same folders cannot
deadlock on them. A filter that is to answer its ``total`` the same way needs its own count
column here (TRUNCATE is not counted: nothing truncates messages).
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE FUNCTION messages_keep_folder_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    delta record;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR delta IN
            SELECT folder_id, count(*) AS messages, count(*) FILTER (WHERE NOT is_read) AS unread
            FROM inserted_messages GROUP BY folder_id ORDER BY folder_id
        LOOP
            UPDATE folders SET message_count = message_count + delta.messages,
                               unread_count = unread_count + delta.unread
            WHERE id = delta.folder_id;
        END LOOP;
    ELSIF TG_OP = 'DELETE' THEN
        FOR delta IN
            SELECT folder_id, count(*) AS messages, count(*) FILTER (WHERE NOT is_read) AS unread
            FROM deleted_messages GROUP BY folder_id ORDER BY folder_id
        LOOP
            UPDATE folders SET message_count = message_count - delta.messages,
                               unread_count = unread_count - delta.unread
            WHERE id = delta.folder_id;
        END LOOP;
    ELSE
        FOR delta IN
            SELECT folder_id, sum(messages) AS messages, sum(unread) AS unread
            FROM (
                SELECT before.folder_id, -1 AS messages, CASE WHEN before.is_read THEN 0 ELSE -1 END AS unread
                FROM before_messages AS before JOIN after_messages AS after USING (id)
                WHERE before.folder_id <> after.folder_id OR before.is_read <> after.is_read
                UNION ALL
                SELECT after.folder_id, 1, CASE WHEN after.is_read THEN 0 ELSE 1 END
                FROM before_messages AS before JOIN after_messages AS after USING (id)
                WHERE before.folder_id <> after.folder_id OR before.is_read <> after.is_read
            ) AS moved
            GROUP BY folder_id
            HAVING sum(messages) <> 0 OR sum(unread) <> 0
            ORDER BY folder_id
        LOOP
            UPDATE folders SET message_count = message_count + delta.messages,
                               unread_count = unread_count + delta.unread
            WHERE id = delta.folder_id;
        END LOOP;
    END IF;
    RETURN NULL;
END
$$
"""

TRIGGERS = (
    ("messages_counted_insert", "INSERT", "REFERENCING NEW TABLE AS inserted_messages"),
    ("messages_counted_delete", "DELETE", "REFERENCING OLD TABLE AS deleted_messages"),
    ("messages_counted_update", "UPDATE", "REFERENCING OLD TABLE AS before_messages NEW TABLE AS after_messages"),
)


def upgrade(app_role: str) -> None:
    op.execute(FUNCTION)
    for name, event, transition in TRIGGERS:
        op.execute(
            f"CREATE TRIGGER {name} AFTER {event} ON messages {transition}"
            " FOR EACH STATEMENT EXECUTE FUNCTION messages_keep_folder_counts()"
        )
    # From now on the triggers keep them; start from the exact figures. The owner sees rows only
    # through the maintenance policy (RLS is forced), switched on for this transaction alone.
    op.execute("SELECT set_config('app.maintenance', 'on', true)")
    op.execute("""
        UPDATE folders SET message_count = counted.messages, unread_count = counted.unread
        FROM (
            SELECT folders.id, count(messages.id) AS messages,
                   count(messages.id) FILTER (WHERE NOT messages.is_read) AS unread
            FROM folders LEFT JOIN messages ON messages.folder_id = folders.id
            GROUP BY folders.id
        ) AS counted
        WHERE folders.id = counted.id
          AND (folders.message_count, folders.unread_count) IS DISTINCT FROM (counted.messages, counted.unread)
    """)


def downgrade(app_role: str) -> None:
    for name, _event, _transition in TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON messages")
    op.execute("DROP FUNCTION messages_keep_folder_counts()")
