"""A ranked search reads a bounded number of an account's rows per window, so no page waits on all of them.

Revision ID: 0018
Revises: 0017

A word query ranks a window of the newest matches. ``email_search_range`` finds them the way
the statistics of the words say is cheapest: through the GIN index when the words are rare,
or by walking the account's rows newest first and testing each vector until the window is
full. The walk is cheap when the words match often, but the index only knows words, not their
order or what a query excludes: a phrase of two common words that rarely stand together
(``"w15 w18"``: both words in a third of the mail, the phrase in 0.6%) or a word minus a
common one made the walk read every row of a 100,000-message account (120-370 ms) to fill a
window of 1,000 matches it could not fill.

``email_search_window`` finds a window's matches below a key with a bound on the rows it reads:
when the statement planned for the words reads the GIN index (the words are rare, and the
index gives few candidates), it runs that; otherwise it walks at most ``max_scanned`` rows
newest first and, when it stops there, marks the last row it read (``last_read``; returned with
a NULL rank when it does not match), so the caller knows where the window ends and the next one
begins. The choice is made from the
plan of the same statement with the same values, as ``email_search_range`` is planned. The
function is VOLATILE only because PostgreSQL allows EXPLAIN in no other: it writes nothing.
"""

from alembic import op
from sqlalchemy import text

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

ARGUMENTS = (
    "account text, query tsquery, after timestamptz, before timestamptz, older_than_at timestamptz,"
    " older_than_id text, max_rows integer, in_folder text, starred boolean, max_scanned integer"
)
TYPES = "text, tsquery, timestamptz, timestamptz, timestamptz, text, integer, text, boolean, integer"
# The caller's own rows of the account below the key, within the filters the index holds.
_ROWS = """
    FROM message_search s
    WHERE s.account_id = $1
      AND s.tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid
      AND s.user_id = nullif(current_setting('app.user_id', true), '')::uuid
      AND ($3 IS NULL OR s.received_at >= $3)
      AND ($4 IS NULL OR s.received_at < $4)
      AND ($5 IS NULL OR (s.received_at, s.message_id) < ($5, $6))
      AND ($8 IS NULL OR s.folder_id = $8)
      AND ($9 IS NULL OR s.is_starred = $9)"""
_NEWEST_FIRST = "ORDER BY s.received_at DESC, s.message_id DESC"
# Every match, by whichever plan the statistics choose.
_MATCHES = f"""
    SELECT s.message_id, s.received_at, ts_rank(s.vector, $2), false
    {_ROWS} AND s.vector @@ $2
    {_NEWEST_FIRST} LIMIT $7"""
# At most $10 rows read: the matches among them and, if rows remain below (one more is read to
# know), the last row read. Each row's vector is tested and ranked as it is read, so only narrow
# rows go on to the window functions (which keep what passes through them); every step keeps the
# newest-first order, so the walk stops as soon as $7 rows are out.
_BOUNDED = f"""
    SELECT s.message_id, s.received_at, s.rank, s.last_read
    FROM (
        SELECT s.message_id, s.received_at, s.rank, row_number() OVER newest AS n,
               row_number() OVER newest = $10 AND lead(true) OVER newest IS NOT NULL AS last_read
        FROM (
            SELECT s.message_id, s.received_at, CASE WHEN s.vector @@ $2 THEN ts_rank(s.vector, $2) END AS rank
            {_ROWS}
            {_NEWEST_FIRST} LIMIT $10 + 1
        ) s
        WINDOW newest AS ({_NEWEST_FIRST})
    ) s
    WHERE s.n <= $10 AND (s.rank IS NOT NULL OR s.last_read)
    {_NEWEST_FIRST} LIMIT $7"""


def upgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    using = "account, query, after, before, older_than_at, older_than_id, max_rows, in_folder, starred, max_scanned"
    op.execute(f"""
        CREATE FUNCTION email_search_window({ARGUMENTS})
        RETURNS TABLE (message_id text, received_at timestamptz, rank real, last_read boolean)
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        DECLARE
            plan text;
            sort text := current_setting('enable_sort');
        BEGIN
            EXECUTE $query$ EXPLAIN (FORMAT JSON) {_MATCHES} $query$ INTO plan USING {using};
            IF plan LIKE '%"Index Name": "message_search_vector"%' THEN
                RETURN QUERY EXECUTE $query$ {_MATCHES} $query$ USING {using};
            ELSE
                -- The walk reads in index order. The planner cannot see that the outer limit
                -- may end it after a few rows (the window functions hide it), and for a folder
                -- of about $10 rows would rather sort a bitmap read of all of them (36 ms where
                -- the walk takes 7 for a common word).
                PERFORM set_config('enable_sort', 'off', true);
                RETURN QUERY EXECUTE $query$ {_BOUNDED} $query$ USING {using};
                PERFORM set_config('enable_sort', sort, true);
            END IF;
        END
        $$
    """)
    op.execute(f"REVOKE ALL ON FUNCTION email_search_window({TYPES}) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION email_search_window({TYPES}) TO "{app_role}"')


def downgrade(app_role: str) -> None:
    op.execute(f"DROP FUNCTION email_search_window({TYPES})")
