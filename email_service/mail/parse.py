"""Parse a raw RFC 5322 message into the fields the service stores and shows.

Built on the standard ``email`` package with ``policy.default`` semantics: the message tree is
the one ``BytesParser`` builds (built faster, see ``mimetree``) and headers are the header
registry's (each distinct one parsed once, see ``headers.ParsePolicy``). Mail from the wild is
often broken, so ``parse_message`` never raises: whatever it cannot make sense of is reported
in ``ParsedMessage.defects`` and the rest is returned best effort.
"""

from __future__ import annotations

import copy
import hashlib
import io
import mimetypes
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import EmailPolicy
from typing import TypeVar

from email_service.mail.charsets import decode_bytes
from email_service.mail.headers import (
    BIDI_CONTROLS,
    MODERN_HEADER_BUDGET,
    PARSE_POLICY,
    addresses,
    base_subject,
    clean_text,
    describe_defect,
    fold_whitespace,
    header_object,
    message_ids,
    parse_date,
)
from email_service.mail.htmltext import MAX_HTML_DEPTH, html_to_text, nesting_depth, referenced_cids, sanitize_html
from email_service.mail.mimetree import parse_bytes

PREVIEW_LENGTH = 200
# Bounds against hostile nesting and part counts; real mail stays far below both.
_MAX_DEPTH = 30
_MAX_PARTS = 1000
_MAX_DEFECTS = 100
# Repeated trace fields read better one per line; other repeated headers are list-like.
_TRACE_HEADERS = {"received", "return-path", "authentication-results", "dkim-signature", "x-received"}
# The headers whose parsed objects are read after the walk (sender, recipients, threading, date).
_READ_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "in-reply-to", "references"}
)
_BODY_TYPES = ("text/plain", "text/html")
_EXTENSIONS = {
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "image/jpeg": ".jpg",
    "application/octet-stream": ".bin",
}
# A private instance: it knows only the built-in table, so names do not depend on /etc/mime.types.
_MIME_TYPES = mimetypes.MimeTypes()
_UNSAFE_FILENAME = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')
_CTE_COMMENT = re.compile(r"\([^()]*\)")
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")

T = TypeVar("T")


@dataclass(frozen=True)
class ParsedAttachment:
    filename: str
    mime_type: str
    size: int
    content_id: str | None
    is_inline: bool
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class ParsedMessage:
    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    subject: str
    from_address: str | None
    from_name: str | None
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: list[str]
    recipient_names: dict[str, str]  # address -> display name, for those in to, cc and bcc with one
    date: datetime | None
    text_body: str
    html_body: str | None
    preview: str
    headers: dict[str, str]
    attachments: list[ParsedAttachment]
    conversation_key: str
    size: int
    defects: list[str] = field(default_factory=list)

    @property
    def attachment_count(self) -> int:
        return len(self.attachments)


@dataclass
class _Bodies:
    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attachments: list[Message] = field(default_factory=list)

    def extend(self, other: _Bodies) -> None:
        self.plain.extend(other.plain)
        self.html.extend(other.html)
        self.attachments.extend(other.attachments)


class _Walker:
    """Splits a MIME tree into body text, body HTML and attachment parts."""

    def __init__(self, defects: list[str]) -> None:
        self.defects = defects
        self.parts_seen = 0
        self.visited: list[tuple[str, Message]] = []
        # By id(): the parts live in the message tree for as long as the walker is used.
        self._content_types: dict[int, str] = {}

    def guard(self, what: str, action: Callable[[], T], default: T) -> T:
        try:
            return action()
        except Exception:  # noqa: BLE001 - stdlib accessors have crash bugs on hostile MIME; skip the field
            self.defects.append(f"{what} could not be read")
            return default

    def content_type(self, part: Message) -> str:
        # Asked several times per part (walk, alternative, attachment); the answer cannot change.
        known = self._content_types.get(id(part))
        if known is None:
            known = self.guard("Content-Type", part.get_content_type, "text/plain").lower()
            if not _MIME_TYPE.fullmatch(known):
                # Stored, shown, and sent back as a response header: only a well-formed type.
                self.defects.append("Content-Type: not a valid type; treated as application/octet-stream")
                known = "application/octet-stream"
            self._content_types[id(part)] = known
        return known

    def walk(self, part: Message, depth: int = 0) -> _Bodies:
        self.parts_seen += 1
        if depth > _MAX_DEPTH or self.parts_seen > _MAX_PARTS:
            self.defects.append("MIME structure too deep or too many parts; the rest was skipped")
            return _Bodies()
        ctype = self.content_type(part)
        self.visited.append((ctype, part))
        maintype = ctype.split("/", 1)[0]
        if maintype == "message":
            return _Bodies(attachments=[part])
        if maintype == "multipart":
            children = part.get_payload()
            if not isinstance(children, list):
                # No usable boundary: the parser kept the body as one blob; show it as text.
                self.defects.append(f"{ctype} without parts; body kept as text")
                return _Bodies(plain=[self.text_of(part, "text/plain")])
            if not children:
                self.defects.append(f"{ctype} has no parts")
            if ctype == "multipart/alternative":
                return self.alternative(children, depth)
            if ctype == "multipart/related":
                return self.related(part, children, depth)
            bodies = _Bodies()
            for child in children:
                bodies.extend(self.walk(child, depth + 1))
            return bodies
        return self.leaf(part, ctype)

    def alternative(self, children: list[Message], depth: int) -> _Bodies:
        # RFC 2046: alternatives are in increasing order of preference, so the last one of each kind wins.
        chosen = _Bodies()
        for child in children:
            ctype = self.content_type(child)
            if not child.is_multipart() and ctype not in _BODY_TYPES and ctype != "text/calendar":
                continue  # another rendering of the same content (text/enriched, text/watch-html...)
            result = self.walk(child, depth + 1)
            if result.plain:
                chosen.plain = result.plain
            if result.html:
                chosen.html = result.html
            chosen.attachments.extend(result.attachments)
        return chosen

    def related(self, part: Message, children: list[Message], depth: int) -> _Bodies:
        start = self.guard("Content-Type start", lambda: part.get_param("start"), None)
        root_index = 0
        if isinstance(start, str):
            wanted = start.strip().strip("<>")
            for index, child in enumerate(children):
                if _content_id(child) == wanted:
                    root_index = index
                    break
        bodies = _Bodies()
        for index, child in enumerate(children):
            if index == root_index or child.is_multipart():
                bodies.extend(self.walk(child, depth + 1))
            else:
                # Everything beside the root is a resource the root refers to (images, CSS).
                self.parts_seen += 1
                self.visited.append((self.content_type(child), child))
                bodies.attachments.append(child)
        return bodies

    def leaf(self, part: Message, ctype: str) -> _Bodies:
        disposition = self.guard("Content-Disposition", part.get_content_disposition, None)
        filename = self.guard("filename", part.get_filename, None)
        if ctype in _BODY_TYPES and disposition != "attachment" and not filename:
            text = self.text_of(part, ctype)
            return _Bodies(plain=[text]) if ctype == "text/plain" else _Bodies(html=[text])
        return _Bodies(attachments=[part])

    def text_of(self, part: Message, ctype: str) -> str:
        data = self.payload(part)
        charset = self.guard("charset", lambda: part.get_param("charset"), None)
        text = decode_bytes(data, charset if isinstance(charset, str) else None, self.defects, ctype)
        # NUL cannot be stored in a PostgreSQL text column and never means anything in mail text.
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
        if ctype == "text/plain":
            fmt = self.guard("format", lambda: part.get_param("format"), None)
            if isinstance(fmt, str) and fmt.lower() == "flowed":
                delsp = self.guard("delsp", lambda: part.get_param("delsp"), None)
                text = _unflow(text, isinstance(delsp, str) and delsp.lower() == "yes")
        return text

    def part_defects(self) -> None:
        """Record the parser's defects; called last because decoding payloads adds some (bad base64)."""
        for ctype, part in self.visited:
            self.defects.extend(f"{ctype} part: {describe_defect(d)}" for d in getattr(part, "defects", ()))

    def payload(self, part: Message) -> bytes:
        source = self.guard("Content-Transfer-Encoding", lambda: _with_plain_cte(part), part)
        data = self.guard("body", lambda: source.get_payload(decode=True), b"")
        return data if isinstance(data, bytes) else b""


def _with_plain_cte(part: Message) -> Message:
    """``part``, or a copy of it whose Content-Transfer-Encoding is the bare mechanism name.

    ``Message.get_payload(decode=True)`` compares the whole header value with "base64" or
    "quoted-printable", so a value with trailing white space, a comment (RFC 2045 allows one) or
    quotes left the body undecoded: the text showed as base64 and an attachment was stored as
    its base64 text. The copy shares the payload and the defect list; the tree is left as it came.
    """
    value = part.get("Content-Transfer-Encoding")
    if value is None:
        return part
    seen = str(value).lower()
    plain = _CTE_COMMENT.sub("", seen).strip().strip('"').strip()
    if plain == seen:
        return part
    clone = copy.copy(part)
    # __delitem__ gives the copy a header list of its own, so the original's is not touched.
    del clone["Content-Transfer-Encoding"]
    clone["Content-Transfer-Encoding"] = plain
    return clone


def _unflow(text: str, delsp: bool) -> str:
    """Undo RFC 3676 format=flowed: join soft-broken lines (those ending in a space)."""
    out: list[str] = []
    paragraph: str | None = None
    paragraph_depth = 0

    def emit(content: str, depth: int) -> None:
        out.append(">" * depth + (" " if depth and content else "") + content)

    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]  # space-stuffing
        if paragraph is not None and depth != paragraph_depth:
            emit(paragraph, paragraph_depth)  # a change of quote depth ends a paragraph
            paragraph = None
        flowed = content.endswith(" ") and content != "-- "
        if flowed and delsp:
            content = content[:-1]
        paragraph = content if paragraph is None else paragraph + content
        paragraph_depth = depth
        if not flowed:
            emit(paragraph, depth)
            paragraph = None
    if paragraph is not None:
        emit(paragraph, paragraph_depth)
    return "\n".join(out)


def _content_id(part: Message) -> str | None:
    try:
        raw = part.get("Content-ID")
    except Exception:  # noqa: BLE001 - a malformed header must not lose the attachment
        return None
    if raw is None:
        return None
    value = clean_text(str(raw)).strip().strip("<>").strip()
    return value or None


def _safe_filename(name: str) -> str:
    name = BIDI_CONTROLS.sub("", clean_text(name)).strip()
    # Keep only the last path component so a name can never point outside a directory.
    name = re.split(r"[\\/]", name)[-1]
    name = _UNSAFE_FILENAME.sub("_", name).strip(" .")
    if len(name.encode("utf-8")) > 200:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and len(ext) <= 16 else ""
        stem = (stem if dot else name).encode("utf-8")[: 200 - len(ext) - 1].decode("utf-8", "ignore")
        name = f"{stem}.{ext}" if ext else stem
    return name


def _extension(mime_type: str) -> str:
    return _EXTENSIONS.get(mime_type) or _MIME_TYPES.guess_extension(mime_type) or ".bin"


def _serialize(message: Message) -> bytes:
    buffer = io.BytesIO()
    # refold_source="none" writes headers back as they came instead of re-wrapping them; CRLF is
    # the canonical line ending of a stored .eml.
    gen_policy = email_policy.default.clone(refold_source="none", cte_type="8bit", linesep="\r\n")
    BytesGenerator(buffer, mangle_from_=False, policy=gen_policy).flatten(message)
    return buffer.getvalue()


class _ReferencedCids:
    """The Content-IDs the HTML body refers to, found only if an attachment has a Content-ID to look up."""

    def __init__(self, html: str | None) -> None:
        self._html = html
        self._cids: set[str] | None = None

    def __contains__(self, content_id: str) -> bool:
        if self._cids is None:
            self._cids = referenced_cids(self._html) if self._html else set()
        return content_id in self._cids


def _attachment(part: Message, index: int, walker: _Walker, cids: _ReferencedCids) -> ParsedAttachment:
    mime_type = walker.content_type(part)
    name: str | None = None
    if mime_type.startswith("message/"):
        inner = part.get_payload()
        if isinstance(inner, list):
            data = walker.guard("attached message", lambda: b"".join(_serialize(m) for m in inner), b"")
            if mime_type in ("message/rfc822", "message/global") and inner:
                subject = walker.guard("attached subject", lambda: inner[0].get("Subject"), None)
                if subject:
                    name = _safe_filename(fold_whitespace(clean_text(str(subject)))[:100])
                    name = f"{name}.eml" if name else None
        else:
            data = walker.payload(part)
    else:
        data = walker.payload(part)
    filename = walker.guard("filename", part.get_filename, None)
    if isinstance(filename, str) and _safe_filename(filename):
        name = _safe_filename(filename)
    if not name:
        name = f"attachment-{index}{_extension(mime_type)}"
    content_id = _content_id(part)
    disposition = walker.guard("Content-Disposition", part.get_content_disposition, None)
    inline = disposition == "inline" or (content_id is not None and content_id.lower() in cids)
    return ParsedAttachment(
        filename=name, mime_type=mime_type, size=len(data), content_id=content_id, is_inline=inline, data=data
    )


def _headers(msg: Message, policy: EmailPolicy, defects: list[str]) -> tuple[dict[str, str], dict[str, list]]:
    """All headers decoded for display, and the parsed header objects by lower-case name."""
    shown: dict[str, str] = {}
    names: dict[str, str] = {}
    parsed: dict[str, list] = {}
    budget, over_budget = MODERN_HEADER_BUDGET, False
    for raw_name, raw_value in msg.raw_items():
        name = clean_text(raw_name).strip()
        if not name:
            continue
        key = name.lower()
        raw = raw_value if isinstance(raw_value, str) else str(raw_value)
        # A share of the modern parser per message; what does not fit is decoded plainly.
        modern = len(raw) <= budget
        if modern:
            budget -= len(raw)
        elif not over_budget:
            defects.append(f"headers: more than {MODERN_HEADER_BUDGET} characters; some decoded plainly")
            over_budget = True
        header = header_object(policy, name, raw, defects, modern=modern)
        text = str(header) if header is not None else " ".join(str(raw_value).split())
        text = clean_text(text).strip()
        # Only the header objects read later are kept: the others are large and done with.
        parsed.setdefault(key, []).append((text, header if key in _READ_HEADERS else None))
        if key in names:
            separator = "\n" if key in _TRACE_HEADERS else ", "
            shown[names[key]] = f"{shown[names[key]]}{separator}{text}"
        else:
            names[key] = name
            shown[name] = text
    return shown, parsed


def _first(parsed: dict[str, list], key: str, defects: list[str]) -> tuple[str, object | None] | None:
    values = parsed.get(key)
    if not values:
        return None
    if len(values) > 1 and key in ("from", "subject", "date", "message-id", "in-reply-to", "references"):
        defects.append(f"{key}: header repeated; the first is used")
    return values[0]


def _recipients(parsed: dict[str, list]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """To, Cc and Bcc as addresses, and the first display name each address is given in them.

    One pass over the headers: parsing addresses is most of the work for a long list.
    """
    lists: dict[str, dict[str, None]] = {}
    names: dict[str, str] = {}
    for key in ("to", "cc", "bcc"):
        found = lists[key] = {}
        for _text, header in parsed.get(key, ()):
            for name, spec in addresses(header):
                found.setdefault(spec, None)
                if name:
                    names.setdefault(spec, name)
    return {key: list(found) for key, found in lists.items()}, names


def _address_list(parsed: dict[str, list], key: str) -> list[str]:
    # Each address once, in order of first appearance; a dict, as a header of tens of thousands
    # of addresses (anyone can send one) made a search of the list so far for each quadratic.
    found: dict[str, None] = {}
    for _text, header in parsed.get(key, ()):
        for _name, spec in addresses(header):
            found.setdefault(spec, None)
    return list(found)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()


def conversation_of_new_thread(message_id: str) -> str:
    """The conversation key a message that starts a thread gets: the same as parsing it gives."""
    return _sha1("id:" + message_id)


def _preview(text: str) -> str:
    """The first PREVIEW_LENGTH characters of the text with whitespace runs collapsed.

    Collapsing a prefix of the text gives a prefix of the collapsed whole (a word cut at the end
    is a prefix of that word), so only as much of a long body is split as the preview needs.
    """
    size = 4 * PREVIEW_LENGTH
    while True:
        collapsed = " ".join(text[:size].split())
        if len(collapsed) >= PREVIEW_LENGTH or size >= len(text):
            return collapsed[:PREVIEW_LENGTH]
        size *= 4


def _dedupe(defects: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for defect in defects:
        seen.setdefault(clean_text(defect)[:300], None)
    result = list(seen)
    if len(result) > _MAX_DEFECTS:
        result = [*result[: _MAX_DEFECTS - 1], f"... and {len(result) - _MAX_DEFECTS + 1} more defects"]
    return result


def _parse(raw: bytes) -> ParsedMessage:
    defects: list[str] = []
    if not raw.strip():
        defects.append("empty message")
    policy = PARSE_POLICY
    try:
        msg = parse_bytes(raw, policy)
    except RecursionError:
        # Nesting deeper than the parser's recursion allows (only hostile mail has it): keep the
        # headers, so the message still shows its sender and subject, and skip the body.
        msg = BytesParser(policy=policy).parsebytes(raw, headersonly=True)
        msg.set_payload("")
        defects.append("MIME structure too deep or too many parts; the body was skipped")
    headers, parsed = _headers(msg, policy, defects)

    subject_entry = _first(parsed, "subject", defects)
    subject = fold_whitespace(subject_entry[0]) if subject_entry else ""

    from_entry = _first(parsed, "from", defects)
    senders = addresses(from_entry[1]) if from_entry else []
    if from_entry is None:
        defects.append("missing From header")
    elif not senders:
        defects.append("From header has no valid address")
    # No fallback to Sender: the author is who From names, and mail without one shows as unknown
    # (the API's unknown@unknown.invalid) rather than as whoever relayed it.
    from_name, from_address = senders[0] if senders else (None, None)

    date_entry = _first(parsed, "date", defects)
    date = parse_date(date_entry[0]) if date_entry else None
    if date_entry is None:
        defects.append("missing Date header")
    elif date is None:
        defects.append(f"invalid Date header {date_entry[0][:80]!r}")

    id_entry = _first(parsed, "message-id", defects)
    own_ids = message_ids(id_entry[0]) if id_entry else []
    message_id = own_ids[0] if own_ids else None
    if message_id is None:
        defects.append("missing Message-ID header" if id_entry is None else "invalid Message-ID header")
    reply_entry = _first(parsed, "in-reply-to", defects)
    reply_ids = message_ids(reply_entry[0]) if reply_entry else []
    refs_entry = _first(parsed, "references", defects)
    references = message_ids(refs_entry[0]) if refs_entry else []

    walker = _Walker(defects)
    bodies = walker.walk(msg)
    html = "\n".join(bodies.html) if bodies.html else None
    html_body = None
    text_body = "\n".join(t.strip("\n") for t in bodies.plain).strip("\n")
    # Each level of nesting needs a start tag, so HTML with few "<" cannot be too deep.
    if html is not None and html.count("<") > MAX_HTML_DEPTH and nesting_depth(html) > MAX_HTML_DEPTH:
        defects.append("HTML nested too deeply; only its text is kept")
        if not text_body.strip():
            text_body = html_to_text(html, sanitized=True)
    elif html is not None:
        html_body = sanitize_html(html).strip()
        if not text_body.strip():
            text_body = html_to_text(html_body, sanitized=True)
    cids = _ReferencedCids(html_body)
    attachments = [_attachment(part, i, walker, cids) for i, part in enumerate(bodies.attachments, start=1)]
    walker.part_defects()

    if references:
        thread_basis = "id:" + references[0]
    elif reply_ids:
        thread_basis = "id:" + reply_ids[0]
    elif message_id:
        thread_basis = "id:" + message_id
    elif subject or from_address:
        thread_basis = f"subject:{base_subject(subject)}\x00{from_address or ''}"
    else:
        # Nothing identifies the thread: keep the message on its own rather than lumping all such mail together.
        thread_basis = "raw:" + hashlib.sha256(raw).hexdigest()

    recipients, recipient_names = _recipients(parsed)
    return ParsedMessage(
        message_id=message_id,
        in_reply_to=reply_ids[0] if reply_ids else None,
        references=references,
        subject=subject,
        from_address=from_address,
        from_name=from_name or None,
        to=recipients["to"],
        cc=recipients["cc"],
        bcc=recipients["bcc"],
        reply_to=_address_list(parsed, "reply-to"),
        recipient_names=recipient_names,
        date=date,
        text_body=text_body,
        html_body=html_body,
        preview=_preview(text_body),
        headers=headers,
        attachments=attachments,
        conversation_key=_sha1(thread_basis),
        size=len(raw),
        defects=_dedupe(defects),
    )


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse raw message bytes; never raises, whatever the input."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    elif isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    elif not isinstance(raw, bytes):
        raw = b""
    try:
        return _parse(raw)
    except Exception as exc:  # noqa: BLE001 - the contract is "never raise"; report it as a defect
        return ParsedMessage(
            message_id=None,
            in_reply_to=None,
            references=[],
            subject="",
            from_address=None,
            from_name=None,
            to=[],
            cc=[],
            bcc=[],
            reply_to=[],
            recipient_names={},
            date=None,
            text_body="",
            html_body=None,
            preview="",
            headers={},
            attachments=[],
            conversation_key=_sha1("raw:" + hashlib.sha256(raw).hexdigest()),
            size=len(raw),
            defects=[f"message could not be parsed: {type(exc).__name__}"],
        )
