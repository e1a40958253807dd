"""Turn a composed email into a standards-correct ``EmailMessage`` and its SMTP wire form.

Pure: no I/O except reading the attachments handed in. Addresses are validated by the caller;
this module still refuses anything that could add a header or break one (CR, LF, controls),
because a header-injection bug here would let a user forge Bcc, From or MIME structure.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email import policy as email_policy
from email.header import Header
from email.headerregistry import (
    Address,
    HeaderRegistry,
    UniqueAddressHeader,
    UniqueUnstructuredHeader,
    UnstructuredHeader,
)
from email.message import EmailMessage, MIMEPart
from email.policy import EmailPolicy
from typing import Any, BinaryIO

import idna

from email_service.mail.headers import BIDI_CONTROLS
from email_service.mail.htmltext import MAX_HTML_DEPTH, html_to_text, nesting_depth

_CHUNK = 64 * 1024
# Long threads would otherwise grow References without bound; RFC 5322 3.6.4 lets a reply keep
# the first id (the thread root) and the most recent ones, which is what threading relies on.
_MAX_REFERENCES = 30
_MAX_ID_LENGTH = 500

# Anything that ends a header line or that header syntax forbids. str.splitlines() also breaks on
# \v, \f, \x1c-\x1e, \x85, U+2028 and U+2029, and the email package splits on those too.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
# A line break in a written header that is not a fold (CRLF then white space) starts a new header.
_BARE_LINE_BREAK = re.compile(rb"\r\n(?![ \t])|\r(?!\n)|(?<!\r)\n|[\x00]")
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
_MIME_TYPE = re.compile(r"([A-Za-z0-9!#$&^_.+-]+)/([A-Za-z0-9!#$&^_.+-]+)")


class _MessageIdListHeader(UnstructuredHeader):
    """In-Reply-To/References folded between ids, one per line.

    The stock unstructured header turns an id longer than a line into RFC 2047 encoded-words,
    which no client recognises as an id any more, so threading breaks.
    """

    max_count = 1

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        super().parse(value, kwds)
        # Ids may contain "=?...?=", which unstructured parsing would decode.
        kwds["decoded"] = value

    def fold(self, *, policy: EmailPolicy) -> str:
        return f"{self.name}: {(policy.linesep + ' ').join(str(self).split())}{policy.linesep}"


# RFC 2047 section 5: text that a reader could take for an encoded word ("=?charset?q?...?=")
# must itself be encoded. The email package instead decodes such text when the header is set
# and writes it out for the recipient's client to decode: a subject typed as
# "=?utf-8?q?caf=C3=A9?=" would arrive as "café". Any "=?" is enough to encode the whole value.
_ENCODED_WORD_START = "=?"


def _encoded_words(text: str, policy: EmailPolicy, name: str | None = None) -> str:
    """``text`` wholly as UTF-8 encoded words, folded to the policy's line length.

    Without ``name`` the first word may take the whole first line: a display name of up to some
    fifty characters then stays one encoded word, which matters because Python's own address
    parser (unlike RFC 2047 and common mail clients) adds a space between adjacent words.
    """
    return Header(text, "utf-8", header_name=name).encode(linesep=policy.linesep, maxlinelen=policy.max_line_length)


class _TypedTextHeader(UniqueUnstructuredHeader):
    """Subject as the user typed it: never decoded, and encoded when it looks encoded."""

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        super().parse(value, kwds)
        kwds["decoded"] = value

    def fold(self, *, policy: EmailPolicy) -> str:
        if _ENCODED_WORD_START not in str(self):
            return super().fold(policy=policy)
        return f"{self.name}: {_encoded_words(str(self), policy, self.name)}{policy.linesep}"


class _SenderHeader(UniqueAddressHeader):
    """From with the account's name as written: encoded when it looks like an encoded word."""

    def fold(self, *, policy: EmailPolicy) -> str:
        names = [address.display_name for address in self.addresses]
        if not any(_ENCODED_WORD_START in name for name in names):
            return super().fold(policy=policy)
        # The parse tree behind the stock folding already holds the name decoded; the addresses
        # keep it as given.
        written = [
            f"{_encoded_words(a.display_name, policy)} <{a.addr_spec}>" if a.display_name else a.addr_spec
            for a in self.addresses
        ]
        return f"{self.name}: {', '.join(written)}{policy.linesep}"


_HEADERS = HeaderRegistry()
_HEADERS.map_to_type("in-reply-to", _MessageIdListHeader)
_HEADERS.map_to_type("references", _MessageIdListHeader)
_HEADERS.map_to_type("subject", _TypedTextHeader)
_HEADERS.map_to_type("from", _SenderHeader)
# CRLF and 7bit: set_content picks quoted-printable/base64 for anything non-ASCII, and the
# result can go to any SMTP server without 8BITMIME.
POLICY = email_policy.SMTP.clone(cte_type="7bit", header_factory=_HEADERS)


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    mime_type: str
    open: Callable[[], BinaryIO]
    size: int


@dataclass(frozen=True)
class Original:
    """The message being replied to."""

    message_id: str | None
    references: list[str]


def _single_line(value: str, what: str) -> str:
    if _FORBIDDEN.search(value):
        raise ValueError(f"{what} must not contain line breaks or control characters")
    return value


def _written_safely(name: str, value: Any, what: str) -> None:
    """Refuse a header whose written form would hold a line break of its own.

    ``_single_line`` sees the text as given; the stock header classes decode RFC 2047 encoded
    words in it ("=?utf-8?q?hi=0D=0ABcc:_x?="), and some Python versions write a decoded line
    break out raw: a forged header. Subject and From keep such text literal (see
    ``_TypedTextHeader``); this checks the written form whatever the header class does.
    """
    message = EmailMessage(policy=POLICY)
    message[name] = value
    written = POLICY.fold_binary(name, message[name]).removesuffix(b"\r\n")
    if _BARE_LINE_BREAK.search(written):
        raise ValueError(f"{what} must not contain line breaks or control characters, even encoded")


def _ascii_domain(domain: str, what: str) -> str:
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"{what} has an invalid domain: {exc}") from None


def _address(value: str, what: str, display_name: str | None = None) -> Address:
    _single_line(value, what)
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{what} is not an email address: {value!r}")
    if not local.isascii():
        raise ValueError(f"{what} has a non-ASCII local part, which needs SMTPUTF8 (not supported): {value!r}")
    addr_spec = f"{local}@{_ascii_domain(domain, what)}"
    try:
        address = Address(display_name=display_name or "", addr_spec=addr_spec)
    except Exception:  # noqa: BLE001 - the parser raises several unrelated types for bad input
        raise ValueError(f"{what} is not an email address: {value!r}") from None
    # Anything the parser dropped or rewrote (comments, trailing text) means the input was not a
    # plain addr-spec; refuse rather than send to something the user did not type.
    if address.addr_spec != addr_spec:
        raise ValueError(f"{what} is not an email address: {value!r}")
    return address


def _message_id_domain(domain: str) -> str:
    _single_line(domain, "message id domain")
    ascii_domain = _ascii_domain(domain, "message id domain")
    if not (_HOSTNAME.fullmatch(ascii_domain) or _ADDRESS_LITERAL.fullmatch(ascii_domain)):
        raise ValueError(f"invalid domain for a message id: {domain!r}")
    return ascii_domain


def new_message_id(domain: str) -> str:
    """``<random@domain>``: 192 random bits, so ids can neither collide nor be guessed."""
    return f"<{secrets.token_urlsafe(24)}@{_message_id_domain(domain)}>"


def _normalise_id(value: str | None) -> str | None:
    """A stored id in ``<id>`` form, or None when it is not a well-formed msg-id.

    Ids come from mail received from anywhere; a malformed one is left out of the reply's
    threading headers instead of failing the reply.
    """
    if not value:
        return None
    value = value.strip()
    if not value.startswith("<"):
        value = f"<{value}>"
    if len(value) > _MAX_ID_LENGTH or not _MSG_ID.fullmatch(value):
        return None
    return value


def reply_threading(original: Original) -> tuple[str | None, list[str]]:
    """(In-Reply-To, References) of a reply to ``original``, as the reply is written: the
    parent last, each id once, at most ``_MAX_REFERENCES`` (the root and the latest)."""
    parent = _normalise_id(original.message_id)
    # Each id once, in order of first appearance: a dict, since the original's References may
    # hold thousands of ids and a list searched for each one took minutes.
    unique: dict[str, None] = {}
    for ref in original.references:
        ref = _normalise_id(ref)
        if ref:
            unique.setdefault(ref, None)
    if parent:
        # The parent is last even when it already appeared in its own References (broken client).
        unique.pop(parent, None)
        unique[parent] = None
    references = list(unique)
    if len(references) > _MAX_REFERENCES:
        references = [references[0], *references[-(_MAX_REFERENCES - 1) :]]
    return parent, references


def check_html(html: str) -> None:
    """Refuse HTML written through the API that nests too deeply to be sanitised and shown in time."""
    if html.count("<") > MAX_HTML_DEPTH and nesting_depth(html) > MAX_HTML_DEPTH:
        raise ValueError(f"body: HTML nests deeper than {MAX_HTML_DEPTH} elements")


def _text_alternative(html: str) -> str:
    if nesting_depth(html) > MAX_HTML_DEPTH:
        # html.parser alone copes with any depth (it only keeps <title> text it should drop).
        return html_to_text(html, sanitized=True)
    return html_to_text(html)


def _read(attachment: OutgoingAttachment) -> bytes:
    chunks: list[bytes] = []
    total = 0
    with attachment.open() as stream:
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
            if total > attachment.size:
                break
            chunks.append(chunk)
    if total != attachment.size:
        # A short or long read means the stored object is not what was uploaded; sending a
        # truncated file silently would be worse than failing.
        got = "more" if total > attachment.size else str(total)
        raise ValueError(f"attachment {attachment.filename!r}: expected {attachment.size} bytes, read {got}")
    return b"".join(chunks)


def safe_filename(name: str) -> str:
    """A file name that can go into a header: what would break one becomes "_", never empty.

    Names come from uploads and from received mail, not from what the user typed into the
    message, so they are made safe rather than refused. Nor is a name only dots ("." or ".."):
    that names a directory, and a client saving attachments by name would write above its own.
    """
    name = BIDI_CONTROLS.sub("", _FORBIDDEN.sub("_", name)).strip()
    return name if name.strip(".") else "attachment"


def _attachment_part(attachment: OutgoingAttachment) -> MIMEPart:
    filename = safe_filename(attachment.filename)
    match = _MIME_TYPE.fullmatch(attachment.mime_type.strip())
    maintype, subtype = (match.group(1).lower(), match.group(2).lower()) if match else ("application", "octet-stream")
    if maintype in ("multipart", "message"):
        # These types may not be base64-encoded (RFC 2046 5.1, 5.2) and their contents would have
        # to be valid MIME; sent as opaque bytes, the recipient still gets the file by its name.
        maintype, subtype = "application", "octet-stream"
    part = MIMEPart(policy=POLICY)
    part.set_content(_read(attachment), maintype, subtype, disposition="attachment", filename=filename)
    # Older clients (Outlook) look for the name on Content-Type; both get RFC 2231 for non-ASCII.
    part.set_param("name", filename)
    return part


def check_composition(
    *,
    from_address: str,
    from_name: str | None,
    to: list[str],
    cc: list[str],
    bcc: list[str],
    reply_to: str | None,
    subject: str,
) -> None:
    """Raise ``ValueError`` naming the field for anything ``build_message`` (or the SMTP envelope) refuses.

    The API runs this before it queues a send or stores a draft, so a message that could never
    be built is a 400 at once, not a job failing in a worker.
    """
    if from_name is not None:
        _single_line(from_name, "sender name (the account's name)")
    _single_line(subject, "subject")
    sender = _address(from_address, "sender address", from_name)
    _written_safely("Subject", subject, "subject")
    _written_safely("From", sender, "sender name (the account's name)")
    for field, values in (("to", to), ("cc", cc), ("bcc", bcc)):
        for value in values:
            _address(value, f"{field} address")
    if reply_to:
        _address(reply_to, "replyTo address")


def build_message(
    *,
    from_address: str,
    from_name: str | None,
    to: list[str],
    cc: list[str],
    reply_to: str | None,
    subject: str,
    body: str,
    is_html: bool,
    attachments: list[OutgoingAttachment],
    message_id: str,
    date: datetime,
    in_reply_to: Original | None,
) -> EmailMessage:
    """The message as it goes out. Bcc recipients are never written into it: they are envelope-only.

    Raises ``ValueError`` for anything that cannot be written as a safe header.
    """
    check_composition(
        from_address=from_address, from_name=from_name, to=to, cc=cc, bcc=[], reply_to=reply_to, subject=subject
    )
    sender = _address(from_address, "sender address", from_name)
    to_addresses = [_address(a, "To address") for a in to]
    cc_addresses = [_address(a, "Cc address") for a in cc]
    reply_address = _address(reply_to, "Reply-To address") if reply_to else None
    _single_line(message_id, "message id")
    if not _MSG_ID.fullmatch(message_id):
        raise ValueError(f"message id must look like <random@domain>: {message_id!r}")
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")

    msg = EmailMessage(policy=POLICY)
    msg["From"] = sender
    if to_addresses:
        msg["To"] = to_addresses
    if cc_addresses:
        msg["Cc"] = cc_addresses
    if reply_address:
        msg["Reply-To"] = reply_address
    msg["Subject"] = subject
    msg["Date"] = date
    msg["Message-ID"] = message_id
    if in_reply_to is not None:
        parent, references = reply_threading(in_reply_to)
        if parent:
            msg["In-Reply-To"] = parent
        if references:
            msg["References"] = " ".join(references)
    msg["MIME-Version"] = "1.0"

    if is_html:
        msg.set_content(_text_alternative(body))
        msg.add_alternative(body, subtype="html")
    else:
        msg.set_content(body)
    if attachments:
        msg.make_mixed()
        for attachment in attachments:
            # One at a time: each is read, encoded into its part, and its raw bytes dropped.
            msg.attach(_attachment_part(attachment))

    # The email package stamps MIME-Version on parts it creates; it belongs on the top level only.
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    return msg


def wire_bytes(message: EmailMessage) -> bytes:
    """The bytes for SMTP DATA (and for an IMAP APPEND of the sent copy): CRLF, 7bit only."""
    if "Bcc" in message or "Resent-Bcc" in message:
        raise ValueError("a message for SMTP must not carry a Bcc header; Bcc recipients go in the envelope only")
    return message.as_bytes(policy=POLICY)
