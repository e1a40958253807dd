"""The text search language: which PostgreSQL configuration stems the indexed text."""

from __future__ import annotations

import re
from collections.abc import Mapping

SEARCH_LANGUAGE_VARIABLE = "EMAIL_SERVICE_SEARCH_LANGUAGE"
DEFAULT_SEARCH_LANGUAGE = "english"
# PostgreSQL's built-in configurations are lower-case words (english, german, french, simple...).
_NAME = re.compile(r"[a-z][a-z_]{0,62}")


def configured_language(env: Mapping[str, str]) -> str:
    """The configured language's name, checked for shape (the database checks that it exists)."""
    name = env.get(SEARCH_LANGUAGE_VARIABLE, "").strip() or DEFAULT_SEARCH_LANGUAGE
    if not _NAME.fullmatch(name):
        raise ValueError(f"{SEARCH_LANGUAGE_VARIABLE} must name a PostgreSQL text search configuration, like 'english'")
    return name
