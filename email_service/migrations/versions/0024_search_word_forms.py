"""A word of a search matches as written or stemmed wherever the message holds it, also when excluded.

Revision ID: 0024
Revises: 0023

The body is indexed only with the configured language's stemming, the short fields also as
written ('simple'). A search used to be the query as written OR the query stemmed, each whole:
``budget -numbers`` became ``('budget' & !'numbers') | ('budget' & !'number')``, and a message
with "budget" in its subject and "numbers" only in its body matched the first half (its vector
has no 'numbers' as written), so the word it excluded did not exclude it.

``email_search_words`` gives one query: the stemmed one, each stemmed word widened to the words
of the query as written that stem to it (``'budget' & !('number' | 'numbers')``), so a word is
found, or excluded, in either form wherever it is. Stop words are left out as the stemmed query
leaves them out (a phrase keeps their place); a query of stop words alone is searched as written.
"""

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade(app_role: str) -> None:
    # A lexeme is quoted as tsquery input wants: '' for a quote, a backslash escaped (as in
    # email_search_prefixes).
    op.execute(r"""
        CREATE FUNCTION email_search_words(words text) RETURNS tsquery
        LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
        DECLARE
            found tsquery := websearch_to_tsquery(email_search_language(), words);
            word text;
            written tsquery;
            stemmed tsquery;
        BEGIN
            IF numnode(found) = 0 THEN
                RETURN websearch_to_tsquery('simple'::regconfig, words);
            END IF;
            FOR word IN SELECT lexeme FROM unnest(to_tsvector('simple'::regconfig, words)) LOOP
                written := ('''' || replace(replace(word, '\', '\\'), '''', '''''') || '''')::tsquery;
                stemmed := plainto_tsquery(email_search_language(), word);
                IF numnode(stemmed) > 0 AND stemmed <> written THEN
                    found := ts_rewrite(found, stemmed, stemmed || written);
                END IF;
            END LOOP;
            RETURN found;
        END
        $$
    """)


def downgrade(app_role: str) -> None:
    op.execute("DROP FUNCTION email_search_words(text)")
