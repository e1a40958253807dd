"""Search reads an account's matches newest first, bounded by keys, through the plan that suits the words.

Revision ID: 0014
Revises: 0013

``email_search(account, query)`` found the newest 1,000 matches by reading every match through
the GIN index and sorting them: a word in half of a 100,000-message mailbox read 50,000 rows
(100-2,700 ms). ``email_search_range`` replaces it. With an index on (account, received_at,
message_id) a common word is found by walking the account's rows newest first and testing each
vector, stopping at the row limit (about two rows read per match for a word in half the mail);
a rare word is still found through the GIN index. Which of the two is cheaper depends on how
common the words are, which only the column statistics know: the statement is planned for each
call with the query's value (dynamic SQL; a plan made once for any query would assume every
query rare), as the table owner, whose plans may use those statistics. The analysis below gives
them to the planner at once instead of at the next automatic analysis.

The bounds (a received-at range for the ``after``/``before`` filters, and keyset bounds on
(received_at, message_id)) let the caller page through matches and continue a walk where the
last call stopped, which filters on ``messages`` need: the function cannot see those columns.
``email_search_among(account, query, ids)`` says which of some messages match, for the other
way round: reading the messages that pass such filters and testing only those. Like the
function they replace, both return only the caller's own tenant and user's matches.
"""

from alembic import op
from sqlalchemy import text

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

RANGE_ARGUMENTS = (
    "account text, query tsquery, after timestamptz, before timestamptz,"
    " floor_at timestamptz, floor_id text, older_than_at timestamptz, older_than_id text, max_rows integer"
)
RANGE_TYPES = "text, tsquery, timestamptz, timestamptz, timestamptz, text, timestamptz, text, integer"
# As 0012 made it, for the downgrade.
MAX_MATCHES = 1000
# The range's matches and their order, apart so that a later revision can add conditions.
RANGE_MATCHES = """
    SELECT s.message_id, s.received_at, ts_rank(s.vector, $2) FROM message_search s
    WHERE s.vector @@ $2 AND s.account_id = $1
      AND s.tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid
      AND s.user_id = nullif(current_setting('app.user_id', true), '')::uuid
      AND ($3 IS NULL OR s.received_at >= $3)
      AND ($4 IS NULL OR s.received_at < $4)
      AND ($5 IS NULL OR (s.received_at, s.message_id) >= ($5, $6))
      AND ($7 IS NULL OR (s.received_at, s.message_id) < ($7, $8))"""
RANGE_ORDER = "ORDER BY s.received_at DESC, s.message_id DESC LIMIT $9"


def upgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    op.execute(
        "CREATE INDEX message_search_by_account_received ON message_search (account_id, received_at, message_id)"
    )
    # The matches of `query` with after <= received_at < before and
    # (floor_at, floor_id) <= (received_at, message_id) < (older_than_at, older_than_id), newest
    # first, at most max_rows (NULL: every one); a NULL bound is no bound.
    op.execute(f"""
        CREATE FUNCTION email_search_range({RANGE_ARGUMENTS})
        RETURNS TABLE (message_id text, received_at timestamptz, rank real)
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        BEGIN
            RETURN QUERY EXECUTE $query$ {RANGE_MATCHES} {RANGE_ORDER} $query$
            USING account, query, after, before, floor_at, floor_id, older_than_at, older_than_id, max_rows;
        END
        $$
    """)
    op.execute(f"REVOKE ALL ON FUNCTION email_search_range({RANGE_TYPES}) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION email_search_range({RANGE_TYPES}) TO "{app_role}"')
    # Which of some messages (those that passed filters on messages) match, for a common word
    # with a filter that keeps few of its matches: read by primary key, not by walking matches.
    op.execute(f"""
        CREATE FUNCTION email_search_among(account text, query tsquery, ids text[])
        RETURNS TABLE (message_id text, rank real)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
            SELECT s.message_id, ts_rank(s.vector, query) FROM message_search s
            WHERE s.message_id = ANY (ids) AND s.account_id = account AND s.vector @@ query
              AND s.tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid
              AND s.user_id = nullif(current_setting('app.user_id', true), '')::uuid
        $$
    """)
    op.execute("REVOKE ALL ON FUNCTION email_search_among(text, tsquery, text[]) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION email_search_among(text, tsquery, text[]) TO "{app_role}"')
    op.execute("DROP FUNCTION email_search(text, tsquery)")
    op.execute("ANALYZE message_search")


def downgrade(app_role: str) -> None:
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    op.execute(f"""
        CREATE FUNCTION email_search(account text, query tsquery)
        RETURNS TABLE (message_id text, rank real)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
            SELECT newest.message_id, ts_rank(newest.vector, query) FROM (
                SELECT s.message_id, s.vector FROM message_search s
                WHERE s.vector @@ query AND s.account_id = account
                  AND s.tenant_id = nullif(current_setting('app.tenant_id', true), '')::uuid
                  AND s.user_id = nullif(current_setting('app.user_id', true), '')::uuid
                ORDER BY s.received_at DESC, s.message_id DESC
                LIMIT {MAX_MATCHES}
            ) newest
        $$
    """)
    op.execute("REVOKE ALL ON FUNCTION email_search(text, tsquery) FROM PUBLIC")
    op.execute(f'GRANT EXECUTE ON FUNCTION email_search(text, tsquery) TO "{app_role}"')
    op.execute("DROP FUNCTION email_search_among(text, tsquery, text[])")
    op.execute(f"DROP FUNCTION email_search_range({RANGE_TYPES})")
    op.execute("DROP INDEX message_search_by_account_received")
