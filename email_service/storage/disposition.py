"""Headers for users' files served by the API: ``Content-Disposition`` values (RFC 6266) that every
browser reads the same way, and the headers that keep a browser from running what it downloads."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

# RFC 5987 attr-char: what may stay unencoded in ``filename*``.
_ATTR_CHARS = "!#$&+-.^_`|~"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# In the ASCII fallback, RFC 6266 appendix D advises against "\" (user agents disagree on escapes)
# and "%" (some decode it); '"' would end the quoted string and "/" names a directory.
_UNSAFE_IN_FALLBACK = re.compile(r'[\\"%/]')


def content_disposition(filename: str | None, *, inline: bool = False) -> str:
    """``attachment; filename="a.pdf"``, plus ``filename*=UTF-8''...`` when the name is not plain ASCII."""
    kind = "inline" if inline else "attachment"
    name = _CONTROL.sub("", filename or "").strip()
    if not name:
        return kind
    fallback = _ascii_fallback(name)
    value = f'{kind}; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe=_ATTR_CHARS)}"
    return value


# Every file the API serves is a user's or a sender's content (an HTML page, an SVG with a script)
# on the API's own origin: a browser must never sniff it into something else, and a page that
# embeds or opens it anyway gets an opaque origin with scripts, forms and plugins disabled.
UNTRUSTED_CONTENT_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


def file_headers(content_type: str, filename: str | None) -> dict[str, str]:
    """Content-Type, an ``attachment`` Content-Disposition and ``UNTRUSTED_CONTENT_HEADERS``."""
    return {
        "Content-Type": content_type,
        "Content-Disposition": content_disposition(filename),
        **UNTRUSTED_CONTENT_HEADERS,
    }


def _ascii_fallback(name: str) -> str:
    # Decompose accents so "résumé" falls back to "resume" rather than "rsum".
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    ascii_name = _UNSAFE_IN_FALLBACK.sub("_", ascii_name).strip()
    if not ascii_name.strip("._ "):
        return "download"
    if ascii_name.startswith(".") and not name.startswith("."):
        # Only the extension survived ("報告.pdf"): keep it, but not as a hidden file.
        return "download" + ascii_name
    return ascii_name
