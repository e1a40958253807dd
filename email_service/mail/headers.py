"""Header decoding: RFC 2047 words with bad charsets, 8-bit bytes, addresses, message ids, dates."""

from __future__ import annotations

import base64
import binascii
import functools
import re
import unicodedata
from datetime import UTC, datetime
from email import quoprimime
from email.errors import HeaderParseError
from email.header import decode_header
from email.headerregistry import Address, BaseHeader, DateHeader, HeaderRegistry, UnstructuredHeader
from email.policy import EmailPolicy
from email.utils import format_datetime, getaddresses, parsedate_to_datetime

from email_service.mail.charsets import decode_bytes, fix_surrogates, resolve

LONG_HEADER = 32768
# How many characters of one message's headers, in all, the modern parser takes: past that they
# are decoded the linear way. Ten 32 KB address headers took 5.6 s and 425 MB through it.
MODERN_HEADER_BUDGET = 65536
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
# Encoded words with only white space between them: RFC 2047 6.2 drops that white space.
_ENCODED_WORD_RUN = re.compile(rf"{_ENCODED_WORD.pattern}(?:[ \t\r\n]+{_ENCODED_WORD.pattern})*")
_MSG_ID = re.compile(r"<([^<>]*)>")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Bidirectional controls: in a file name they reverse what is shown ("invoice\u202efdp.exe" reads
# as "invoiceexe.pdf"), so names lose them wherever they come from.
BIDI_CONTROLS = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_WHITESPACE = re.compile(r"\s+")
# Reply/forward markers in the languages mail clients commonly localise them to.
_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|fwd?|aw|wg|sv|vs|tr|antw|rif|res|enc|odp|ref|r\u00e9f)\s*(?:\[\d+\]|\(\d+\))?\s*[:\uff1a]"
    r"|(?:\u56de\u590d|\u56de\u8986|\u7b54\u590d|\u8f6c\u53d1|\u8f49\u5bc4)\s*[:\uff1a]"
    r"|\[[^\]]{1,40}\])\s*",
    re.IGNORECASE,
)
_DOMAIN_FORBIDDEN = set(' \t<>()[]\\,;:@"')


class _HeaderClasses(HeaderRegistry):
    """The standard registry, minus building a new class for every header it parses.

    ``HeaderRegistry.__getitem__`` calls ``type()`` on each lookup; the class only depends on
    which specialised parser the name maps to, so one per parser is made and kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[type, type] = {}
        self._plain: dict[type, bool] = {}

    def parses_as_date(self, name: str) -> bool:
        """Whether the header is parsed by ``DateHeader.parse`` (Date, Resent-Date)."""
        cls = self.registry.get(name.lower(), self.default_class)
        return issubclass(cls, DateHeader) and cls.parse.__func__ is DateHeader.parse.__func__  # type: ignore[attr-defined]

    def parses_as_unstructured(self, name: str) -> bool:
        """Whether the header is parsed by ``UnstructuredHeader.parse`` (everything unnamed, Subject)."""
        cls = self.registry.get(name.lower(), self.default_class)
        plain = self._plain.get(cls)
        if plain is None:
            plain = self._plain[cls] = (
                issubclass(cls, UnstructuredHeader)
                and cls.parse.__func__ is UnstructuredHeader.parse.__func__  # type: ignore[attr-defined]
                and cls.value_parser is UnstructuredHeader.value_parser
            )
        return plain

    def __getitem__(self, name: str) -> type:
        cls = self.registry.get(name.lower(), self.default_class)
        made = self._made.get(cls)
        if made is None:
            made = self._made[cls] = type("_" + cls.__name__, (cls, self.base_class), {})
        return made


# Enough for the values that repeat (Content-Type, Content-Transfer-Encoding, MIME-Version) to
# stay while each message's own ones (Date, Message-ID, Subject) come and go. Only short values:
# a parsed 2 KB address header weighs about a megabyte, which the cache would keep for good.
_PARSED_CACHE_ENTRIES = 256
_PARSED_MAX_CHARS = 256


class ParsePolicy(EmailPolicy):
    """``policy.default`` whose parsed headers are remembered.

    With ``policy.default`` every ``Message.get()`` parses the header again through the header
    registry, and the feed parser and the MIME walk ask each part for its Content-Type several
    times; most values (Content-Type, Content-Transfer-Encoding, MIME-Version) also repeat from
    message to message. Header objects are immutable, so one parsed from the same name and value
    is handed out again: the results are the ones ``policy.default`` gives, computed once.
    """

    def header_fetch_parse(self, name: str, value: str) -> BaseHeader:  # type: ignore[override]
        # Header objects (str subclasses) and very long values go the ordinary way.
        if type(value) is not str or len(value) > _PARSED_MAX_CHARS:
            return super().header_fetch_parse(name, value)
        return _parsed_header(self, name, value)


@functools.lru_cache(maxsize=_PARSED_CACHE_ENTRIES)
def _parsed_header(policy: EmailPolicy, name: str, value: str) -> BaseHeader:
    return EmailPolicy.header_fetch_parse(policy, name, value)


PARSE_POLICY = ParsePolicy(header_factory=_HeaderClasses())


def _decode_word_payload(encoding: str, payload: str) -> bytes | None:
    try:
        if encoding in "bB":
            return base64.b64decode(payload + "=" * (-len(payload) % 4))
        return quoprimime.header_decode(payload).encode("latin-1")
    except (binascii.Error, ValueError, UnicodeError):
        return None


def _repair_encoded_words(value: str, defects: list[str], name: str) -> str:
    """Re-encode RFC 2047 words whose charset is unknown or wrong as UTF-8, so decoding succeeds.

    The standard parser turns such words into U+FFFD; guessing UTF-8 then Windows-1252 recovers
    the text in the usual cases (a typo in the label, Latin-1 labelled as ASCII). A run of adjacent
    words (only white space between them) is decoded as a whole by ``email.header.decode_header``,
    which joins the words of one charset first, as RFC 2047 6.2 asks: a character whose bytes are
    split across two words is only valid once they are joined.
    """

    def fix(match: re.Match[str]) -> str:
        run = match.group(0)
        try:
            chunks = decode_header(run)
        except (HeaderParseError, ValueError, LookupError, IndexError):
            return _ENCODED_WORD.sub(fix_word, run)
        repaired: list[str] = []
        # Joined words go to the header parser as one: its address parser decodes the words of a
        # display name one by one, and would split a character again.
        changed = len(chunks) < len(_ENCODED_WORD.findall(run))
        for data, label in chunks:
            if isinstance(data, str) or label is None:
                # decode_header found a word it could not decode; leave the run to the word-by-word path.
                return _ENCODED_WORD.sub(fix_word, run)
            codec = resolve(label)
            if codec is not None and _decodes(data, codec):
                changed = changed or codec != label.lower()
                text = data.decode(codec)
            else:
                changed = True
                text = decode_bytes(data, label, defects, name)
            repaired.append(_utf8_word(text))
        # Words that decode as labelled, one to a charset, are left to the header parser.
        return " ".join(repaired) if changed else run

    def fix_word(match: re.Match[str]) -> str:
        label, encoding, payload = match.group(1), match.group(2), match.group(3)
        data = _decode_word_payload(encoding, payload)
        if data is None:
            return match.group(0)
        codec = resolve(label)
        if codec is not None and _decodes(data, codec):
            return match.group(0) if codec == label.lower() else f"=?{codec}?{encoding}?{payload}?="
        return _utf8_word(decode_bytes(data, label, defects, name))

    if "=?" not in value:
        return value
    return _ENCODED_WORD_RUN.sub(fix, value)


def _decodes(data: bytes, codec: str) -> bool:
    try:
        data.decode(codec)
    except (UnicodeError, LookupError, ValueError, TypeError):
        return False
    return True


def _utf8_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii") + "?="


def clean_text(value: str) -> str:
    """Text safe to store and JSON-encode: no raw bytes, no lone surrogates, no control characters."""
    return _CONTROL.sub(" ", fix_surrogates(value)).replace("\t", " ")


def header_object(
    policy: EmailPolicy, name: str, raw: str, defects: list[str], *, modern: bool = True
) -> object | None:
    """The modern (``policy.default``) header object for a raw value, or None if it cannot be built.

    When the structured parser for a header crashes (the stdlib has IndexError bugs on inputs
    such as ``<a@``), the value is parsed as unstructured text instead, which only decodes
    RFC 2047 words and cannot fail the same way. ``modern=False`` (the message's headers have
    used up their share of the modern parser) decodes the old, linear way at once.
    """
    prepared = _repair_encoded_words(fix_surrogates(raw), defects, name)
    if len(prepared) > LONG_HEADER or not modern:
        # The modern parser is quadratic in the number of encoded words, and an address header's
        # parse tree weighs about 1 KB per character; a value this long (or past the message's
        # share) is decoded the old, linear way (and its addresses parsed by the compat32 parser).
        if modern:
            defects.append(f"{name}: header longer than {LONG_HEADER} characters")
        return _decode_plainly(prepared, defects, name)
    text = _plain_unstructured(policy, name, prepared)
    if text is None:
        text = _plain_date(policy, name, prepared)
    if text is not None:
        return text
    try:
        header = policy.header_fetch_parse(name, prepared)
    except Exception:  # noqa: BLE001 - the stdlib header parser has crash bugs on hostile input
        defects.append(f"{name}: header could not be parsed")
        try:
            header = policy.header_fetch_parse("X-Unparsed", prepared)
        except Exception:  # noqa: BLE001 - as above; fall back to the raw text
            return None
    defects.extend(f"{name}: {describe_defect(d)}" for d in getattr(header, "defects", ()))
    return header


def _plain_unstructured(policy: EmailPolicy, name: str, value: str) -> str | None:
    """``str()`` of the header object, when that is the value itself; else None.

    An unstructured header (Received, X-..., Subject) without RFC 2047 words is split by the
    parser into runs of white space and of other characters, which join back to the value once
    line breaks are removed (as ``header_fetch_parse`` does), and such a header object carries
    no defects (they stay in its parse tree). Real mail has many such headers; building a parse
    tree for each only to join it back was a large part of parsing a message.
    """
    if "=?" in value:
        return None
    factory = getattr(policy, "header_factory", None)
    if not isinstance(factory, _HeaderClasses) or not factory.parses_as_unstructured(name):
        return None
    return value.replace("\r", "").replace("\n", "")


def _plain_date(policy: EmailPolicy, name: str, value: str) -> str | None:
    """``str()`` of a date header object whose value parses as a date; else None.

    ``DateHeader.parse`` shows such a date as ``format_datetime`` writes it and records no
    defect; everything else (no value, no date) is left to it.
    """
    factory = getattr(policy, "header_factory", None)
    if not isinstance(factory, _HeaderClasses) or not factory.parses_as_date(name):
        return None
    value = value.replace("\r", "").replace("\n", "")
    if not value:
        return None
    try:
        return format_datetime(parsedate_to_datetime(value))
    except Exception:  # noqa: BLE001 - whatever it is, the header registry reports it its own way
        return None


def _decode_plainly(value: str, defects: list[str], name: str) -> str:
    value = "".join(value.splitlines())
    try:
        chunks = decode_header(value)
    except (HeaderParseError, ValueError, LookupError, IndexError):
        return value
    return "".join(
        chunk if isinstance(chunk, str) else decode_bytes(chunk, charset, defects, name) for chunk, charset in chunks
    )


def fold_whitespace(value: str) -> str:
    return _WHITESPACE.sub(" ", value).strip()


def describe_defect(defect: object) -> str:
    """``ClassName: detail`` for an ``email.errors`` defect."""
    detail = str(defect)
    kind = type(defect).__name__
    return f"{kind}: {detail}" if detail and detail != kind else kind


def _valid_domain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        return len(domain) > 2
    labels = domain.split(".")
    return all(labels) and not any(ch in _DOMAIN_FORBIDDEN or ord(ch) < 32 for ch in domain)


def _candidates(header: object | None) -> list[tuple[str, str, str]]:
    if header is None:
        return []
    parsed = getattr(header, "addresses", None)
    if parsed is not None:
        return [(a.display_name or "", a.username or "", a.domain or "") for a in parsed]
    # A header the modern parser could not handle: the lenient compat32 address parser instead.
    try:
        pairs = getaddresses([str(header)])
    except (ValueError, IndexError, TypeError, AttributeError, RecursionError):
        return []
    found = []
    for display, spec in pairs:
        local, at, domain = spec.rpartition("@")
        if at:
            found.append((display, local, domain))
    return found


def addresses(header: object | None) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs from an address header; invalid addresses are left out.

    The domain is lower-cased (domains are case-insensitive, local parts are not) so the same
    mailbox compares equal wherever it appears.
    """
    found: list[tuple[str, str]] = []
    for display, raw_username, raw_domain in _candidates(header):
        username = fix_surrogates(raw_username)
        domain = fix_surrogates(raw_domain).strip().rstrip(".").lower()
        if not username or not domain or not _valid_domain(domain) or _CONTROL.search(username):
            continue
        try:
            spec = Address(username=username, domain=domain).addr_spec
        except (ValueError, TypeError):
            continue
        found.append((fold_whitespace(clean_text(display)), spec))
    return found


def message_ids(value: str) -> list[str]:
    """Message ids in ``<id>`` form, in order, without duplicates.

    Folding can leave whitespace inside the brackets and some clients omit the brackets
    altogether; both are normalised so ids compare equal across a thread.
    """
    # A dict keeps the first of each id in order; a list searched for each id made a References
    # header of thousands of ids (anyone can send one) take minutes to read.
    ids: dict[str, None] = {}
    found = [_WHITESPACE.sub("", m) for m in _MSG_ID.findall(value)]
    if not found:
        found = [tok.strip("<>") for tok in re.split(r"[\s,]+", value) if "@" in tok]
    for token in found:
        token = clean_text(token).replace(" ", "")
        if token:
            ids.setdefault(f"<{token}>", None)
    return list(ids)


def parse_date(value: str) -> datetime | None:
    """An aware datetime, or None when the value is not a date. Unknown zones (-0000) count as UTC."""
    if not value.strip():
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def base_subject(subject: str) -> str:
    """The subject without Re:/Fwd:/[list] prefixes, case-folded, for grouping a thread."""
    text = unicodedata.normalize("NFC", fold_whitespace(subject))
    previous = None
    while previous != text:
        previous = text
        text = _REPLY_PREFIX.sub("", text, count=1)
    return text.casefold()
