"""Full-text search over messages: a tsvector per message kept by triggers, and its GIN index.

Revision ID: 0012
Revises: 0011

The vectors live in ``message_search``, beside ``messages`` rather than in it: PostgreSQL never
uses an index for a condition whose operator is not leakproof (``@@`` is not) on a table under
row-level security, so a GIN index on ``messages`` would only ever be scanned whole. The side
table has no policy and the application role has no privilege on it; it is written by a trigger
on ``messages`` and read only through ``email_search(account, query)``, a SECURITY DEFINER
function that returns the matches of the caller's own tenant and user (the same settings the
policies read), joined back to ``messages`` under its policy.

Weights say where a word was: A the subject, B the sender, C the recipients, D the body and
attachment names; the ``from``/``to``/``subject`` filters are weight-restricted prefix queries
on the same index. The short texts are indexed both as written ('simple': names, addresses,
words of any language) and with the configured language's stemming
(``EMAIL_SERVICE_SEARCH_LANGUAGE`` when this migration runs, 'english' by default), which
``email_search_language()`` names for queries. Attachment names live in another table;
statement triggers copy them onto their message.
"""

import os

from alembic import op
from sqlalchemy import text

from email_service.search.language import SEARCH_LANGUAGE_VARIABLE, configured_language

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# Text beyond this is not indexed: tsvector values are capped at 1 MB and a very long body would
# fail the row's INSERT. 50,000 characters
# (some 8,000 words) is more than any person searches through.
BODY_INDEXED_CHARS = 50_000
# A search returns at most the newest this many matches (see email_search below).
MAX_MATCHES = 1000


def _vector(row: str) -> str:
    """The message's vector, from the columns of ``row`` (a record of type messages)."""

    def both(expression: str, weight: str) -> str:
        return (
            f"setweight(to_tsvector('simple'::regconfig, {expression}), '{weight}') || "
            f"setweight(to_tsvector(email_search_language(), {expression}), '{weight}')"
        )

    # An address is indexed whole and split at '@', so "alice" and "example.com" find it too.
    sender = f"coalesce({row}.from_name, '') || ' ' || email_search_addresses(ARRAY[{row}.from_address])"
    recipients = f"email_search_addresses({row}.to_addresses || {row}.cc_addresses || {row}.bcc_addresses)"
    # File names are split at dots, dashes and underscores too, so "report" finds report_q3.pdf.
    names = f"{row}.attachment_names || ' ' || translate({row}.attachment_names, '._-', '   ')"
    # The body, the bulk of the text, only with the language's stemming: tokenising it twice
    # doubled the cost of storing mail, and a word of another language is indexed as written.
    body = f"setweight(to_tsvector(email_search_language(), left({row}.body_text, {BODY_INDEXED_CHARS})), 'D')"
    return " || ".join([both(f"{row}.subject", "A"), both(sender, "B"), both(recipients, "C"), both(names, "D"), body])


def upgrade(app_role: str) -> None:
    try:
        language = configured_language(os.environ)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    known = op.get_bind().scalar(text("SELECT count(*) FROM pg_ts_config WHERE cfgname = :name"), {"name": language})
    if not known:
        raise SystemExit(f"{SEARCH_LANGUAGE_VARIABLE}: PostgreSQL has no text search configuration {language!r}")
    op.execute(f"""
        CREATE FUNCTION email_search_language() RETURNS regconfig
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT '{language}'::regconfig $$
    """)
    # array_to_string is only STABLE in general; on text[] it is immutable, as email_search_vector is.
    op.execute("""
        CREATE FUNCTION email_search_addresses(text[]) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT array_to_string($1, ' ') || ' ' || replace(array_to_string($1, ' '), '@', ' ')
        $$
    """)
    # The from/to/subject filters: each word of the input as a prefix of a word of one field
    # (weight). Lexemes are quoted as tsquery input wants: '' for a quote, a backslash escaped.
    op.execute(r"""
        CREATE FUNCTION email_search_prefixes(words text, weight text) RETURNS tsquery
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT coalesce(string_agg(
                '''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || ''':*' || weight, ' & '
            ), '')::tsquery
            FROM unnest(to_tsvector('simple'::regconfig, words))
        $$
    """)
    # Existing mail is indexed below, across tenants: through the owner's maintenance policy.
    op.execute("SELECT set_config('app.maintenance', 'on', true)")
    op.execute("ALTER TABLE messages ADD COLUMN attachment_names text NOT NULL DEFAULT ''")
    op.execute("""
        UPDATE messages m SET attachment_names = a.names
        FROM (
            SELECT message_id, string_agg(filename, ' ' ORDER BY id) AS names
            FROM attachments WHERE message_id IS NOT NULL GROUP BY message_id
        ) a
        WHERE a.message_id = m.id
    """)
    schema = op.get_bind().scalar(text("SELECT current_schema()"))
    op.execute(f"""
        CREATE FUNCTION email_search_vector(m messages) RETURNS tsvector
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT {_vector("m")} $$
    """)
    op.execute("""
        CREATE TABLE message_search (
            message_id text PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
            tenant_id uuid NOT NULL,
            user_id uuid NOT NULL,
            account_id text NOT NULL,
            received_at timestamptz NOT NULL,
            vector tsvector NOT NULL
        )
    """)
    op.execute("REVOKE ALL ON message_search FROM PUBLIC")
    op.execute("CREATE INDEX message_search_vector ON message_search USING gin (vector)")
    # Definer functions pin their search path, so no caller's objects can stand in for ours.
    op.execute(f"""
        CREATE FUNCTION email_search_index() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_catalog AS $$
        BEGIN
            INSERT INTO message_search (message_id, tenant_id, user_id, account_id, received_at, vector)
            VALUES (NEW.id, NEW.tenant_id, NEW.user_id, NEW.account_id, NEW.received_at, email_search_vector(NEW))
            ON CONFLICT (message_id) DO UPDATE
                SET vector = EXCLUDED.vector, account_id = EXCLUDED.account_id, received_at = EXCLUDED.received_at;
            RETURN NULL;
        END
        $$
    """)
    op.execute("""
        CREATE TRIGGER messages_search_insert AFTER INSERT ON messages
        FOR EACH ROW EXECUTE FUNCTION email_search_index()
    """)
    op.execute("""
        CREATE TRIGGER messages_search_update AFTER UPDATE OF
            subject, from_name, from_address, to_addresses, cc_addresses, bcc_addresses, body_text, attachment_names,
            received_at
        ON messages FOR EACH ROW EXECUTE FUNCTION email_search_index()
    """)
    # The caller's matches only: the tenant and user come from the settings the policies read.
    # Only the newest MAX_MATCHES are ranked and returned: ranking reads every match's vector,
    # and a common word matches most of a mailbox.
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
    op.execute("""
        INSERT INTO message_search (message_id, tenant_id, user_id, account_id, received_at, vector)
        SELECT m.id, m.tenant_id, m.user_id, m.account_id, m.received_at, email_search_vector(m) FROM messages m
    """)
    # Search without words, and a conversation across folders, read an account newest first.
    op.execute("CREATE INDEX messages_by_account_received ON messages (account_id, received_at, id)")
    op.execute("CREATE INDEX messages_by_conversation ON messages (account_id, conversation_id, received_at, id)")
    op.execute("DROP INDEX messages_conversation")
    # Mail written through the API before conversations were kept: each stands alone.
    op.execute("UPDATE messages SET conversation_id = id WHERE conversation_id IS NULL")

    # The attachment names of the messages a statement touched, recomputed once per message.
    op.execute("""
        CREATE FUNCTION email_search_attachment_names() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE messages m SET attachment_names = coalesce((
                SELECT string_agg(a.filename, ' ' ORDER BY a.id) FROM attachments a WHERE a.message_id = m.id
            ), '')
            WHERE m.id IN (SELECT message_id FROM changed_rows WHERE message_id IS NOT NULL);
            RETURN NULL;
        END
        $$
    """)
    for event, table in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
        op.execute(f"""
            CREATE TRIGGER attachments_names_{event.lower()} AFTER {event} ON attachments
            REFERENCING {table} TABLE AS changed_rows
            FOR EACH STATEMENT EXECUTE FUNCTION email_search_attachment_names()
        """)
    # An upload taken by a message changes its message_id: the message it left needs it too.
    op.execute("""
        CREATE TRIGGER attachments_names_update_old AFTER UPDATE ON attachments
        REFERENCING OLD TABLE AS changed_rows
        FOR EACH STATEMENT EXECUTE FUNCTION email_search_attachment_names()
    """)


def downgrade(app_role: str) -> None:
    for name in ("insert", "update", "delete", "update_old"):
        op.execute(f"DROP TRIGGER attachments_names_{name} ON attachments")
    op.execute("DROP FUNCTION email_search_attachment_names()")
    op.execute("CREATE INDEX messages_conversation ON messages (account_id, conversation_id)")
    op.execute("DROP INDEX messages_by_conversation")
    op.execute("DROP INDEX messages_by_account_received")
    op.execute("DROP FUNCTION email_search(text, tsquery)")
    op.execute("DROP TRIGGER messages_search_update ON messages")
    op.execute("DROP TRIGGER messages_search_insert ON messages")
    op.execute("DROP FUNCTION email_search_index()")
    op.execute("DROP TABLE message_search")
    op.execute("DROP FUNCTION email_search_vector(messages)")
    op.execute("ALTER TABLE messages DROP COLUMN attachment_names")
    op.execute("DROP FUNCTION email_search_prefixes(text, text)")
    op.execute("DROP FUNCTION email_search_addresses(text[])")
    op.execute("DROP FUNCTION email_search_language()")
