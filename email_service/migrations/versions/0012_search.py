"""Full-text search over messages: a stored tsvector kept by PostgreSQL itself, and its GIN index.

Revision ID: 0012
Revises: 0009

The vector is a generated column, so no write path (sync, compose, moves, flag changes) can
forget it. Weights say where a word was: A the subject, B the sender, C the recipients, D the
body and attachment names; the ``from``/``to``/``subject`` filters are weight-restricted queries
on the same index. The short texts are indexed both as written ('simple': names, addresses,
words of any language) and with the configured language's stemming (``EMAIL_SERVICE_SEARCH_LANGUAGE`` when
this migration runs, 'english' by default), which ``email_search_language()`` names for queries.
Attachment names live in another table; statement triggers copy them onto their message.
"""

import os

from alembic import op
from sqlalchemy import text

from email_service.search.language import SEARCH_LANGUAGE_VARIABLE, configured_language

revision = "0012"
down_revision = "0009"
branch_labels = None
depends_on = None

# Text beyond this is not indexed: tsvector values are capped at 1 MB and a very long body would
# fail the row's INSERT. 50,000 characters
# (some 8,000 words) is more than any person searches through.
BODY_INDEXED_CHARS = 50_000


def _vector() -> str:
    def both(expression: str, weight: str) -> str:
        return (
            f"setweight(to_tsvector('simple'::regconfig, {expression}), '{weight}') || "
            f"setweight(to_tsvector(email_search_language(), {expression}), '{weight}')"
        )

    # An address is indexed whole and split at '@', so "alice" and "example.com" find it too.
    sender = "coalesce(from_name, '') || ' ' || email_search_addresses(ARRAY[from_address])"
    recipients = "email_search_addresses(to_addresses || cc_addresses || bcc_addresses)"
    # File names are split at dots, dashes and underscores too, so "report" finds report_q3.pdf.
    names = "attachment_names || ' ' || translate(attachment_names, '._-', '   ')"
    # The body, the bulk of the text, only with the language's stemming: tokenising it twice
    # doubled the cost of storing mail, and a word of another language is indexed as written.
    body = f"setweight(to_tsvector(email_search_language(), left(body_text, {BODY_INDEXED_CHARS})), 'D')"
    return " || ".join([both("subject", "A"), both(sender, "B"), both(recipients, "C"), both(names, "D"), body])


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
    # array_to_string is only STABLE in general; on text[] it is immutable, as a generated column needs.
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
    op.execute("ALTER TABLE messages ADD COLUMN attachment_names text NOT NULL DEFAULT ''")
    op.execute("""
        UPDATE messages m SET attachment_names = a.names
        FROM (
            SELECT message_id, string_agg(filename, ' ' ORDER BY id) AS names
            FROM attachments WHERE message_id IS NOT NULL GROUP BY message_id
        ) a
        WHERE a.message_id = m.id
    """)
    op.execute(f"ALTER TABLE messages ADD COLUMN search_vector tsvector GENERATED ALWAYS AS ({_vector()}) STORED")
    op.execute("CREATE INDEX messages_search ON messages USING gin (search_vector)")
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
    op.execute("DROP INDEX messages_search")
    op.execute("ALTER TABLE messages DROP COLUMN search_vector")
    op.execute("ALTER TABLE messages DROP COLUMN attachment_names")
    op.execute("DROP FUNCTION email_search_prefixes(text, text)")
    op.execute("DROP FUNCTION email_search_addresses(text[])")
    op.execute("DROP FUNCTION email_search_language()")
