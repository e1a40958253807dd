"""compose.build: outgoing messages are standards-correct, round-trip through the parser, and
refuse anything that could inject a header."""

from __future__ import annotations

import io
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, BinaryIO

import pytest

from email_service.mail.parse import ParsedMessage, parse_message
from email_service.outgoing.build import (
    POLICY,
    Original,
    OutgoingAttachment,
    build_message,
    new_message_id,
    wire_bytes,
)

DATE = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\r\n.\r\n\x00\xff"


class Opened:
    """Records when each attachment is opened, to check they are read one by one."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def attachment(self, filename: str, data: bytes, mime_type: str = "application/octet-stream") -> OutgoingAttachment:
        def opener() -> BinaryIO:
            self.events.append(f"open {filename}")
            return _Stream(data, lambda: self.events.append(f"close {filename}"))

        return OutgoingAttachment(filename=filename, mime_type=mime_type, open=opener, size=len(data))


class _Stream(io.BytesIO):
    def __init__(self, data: bytes, on_close: Any) -> None:
        super().__init__(data)
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed:
            self._on_close()
        super().close()


def build(**overrides: Any) -> EmailMessage:
    args: dict[str, Any] = dict(
        from_address="alice@example.com",
        from_name="Alice Example",
        to=["bob@example.org"],
        cc=[],
        reply_to=None,
        subject="Meeting tomorrow",
        body="Hi Bob,\n\nLet's meet at 2pm.\n\nAlice",
        is_html=False,
        attachments=[],
        message_id="<abc123@example.com>",
        date=DATE,
        in_reply_to=None,
    )
    args.update(overrides)
    return build_message(**args)


def roundtrip(msg: EmailMessage) -> ParsedMessage:
    parsed = parse_message(wire_bytes(msg))
    assert parsed.defects == []
    return parsed


def header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return [line.split(":", 1)[0].lower() for line in head.split("\r\n") if line and not line[0].isspace()]


def test_plain_message_headers_and_wire_form() -> None:
    msg = build(cc=["carol@example.net"], reply_to="replies@example.com")
    raw = wire_bytes(msg)
    assert raw.isascii()
    # Every line ends in CRLF: no bare LF or CR anywhere.
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert header_names(raw) == [
        "from",
        "to",
        "cc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    ]
    assert b"From: Alice Example <alice@example.com>\r\n" in raw
    assert b"Date: Mon, 06 May 2024 07:08:09 +0200\r\n" in raw

    parsed = roundtrip(msg)
    assert parsed.from_address == "alice@example.com" and parsed.from_name == "Alice Example"
    assert parsed.to == ["bob@example.org"] and parsed.cc == ["carol@example.net"]
    assert parsed.reply_to == ["replies@example.com"]
    assert parsed.subject == "Meeting tomorrow"
    assert parsed.message_id == "<abc123@example.com>"
    assert parsed.date == DATE
    assert parsed.text_body == "Hi Bob,\n\nLet's meet at 2pm.\n\nAlice"
    assert parsed.html_body is None and parsed.attachments == []
    assert parsed.in_reply_to is None and parsed.references == []


def test_non_ascii_body_lines_and_dots_survive_in_7bit() -> None:
    body = "Grüße aus Köln ☕\n.\n.leading dot\nFrom the start\n" + "long line " * 60 + "\nend"
    msg = build(body=body)
    raw = wire_bytes(msg)
    assert raw.isascii()
    assert msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert roundtrip(msg).text_body == body.rstrip()


def test_html_body_becomes_alternative_with_derived_text() -> None:
    html = (
        "<html><head><style>p{color:red}</style></head><body>"
        "<h1>Quarterly report</h1><p>Numbers are <b>up</b> &amp; costs down.</p>"
        "<ul><li>one</li><li>two</li></ul><p>Café – naïve</p></body></html>"
    )
    msg = build(body=html, is_html=True)
    assert msg.get_content_type() == "multipart/alternative"
    plain, rich = msg.get_payload()
    assert plain.get_content_type() == "text/plain" and rich.get_content_type() == "text/html"
    # MIME-Version belongs on the top level only.
    assert [p["MIME-Version"] for p in msg.walk()] == ["1.0", None, None]

    raw = wire_bytes(msg)
    assert raw.isascii()
    reparsed = message_from_bytes(raw, policy=policy.default)
    text_part = reparsed.get_body(("plain",))
    html_part = reparsed.get_body(("html",))
    # The HTML travels as written (not sanitised); only line ends become CRLF on the wire.
    assert html_part.get_content().replace("\r\n", "\n") == html + "\n"
    text = text_part.get_content().replace("\r\n", "\n")
    assert "Quarterly report" in text and "Numbers are up & costs down." in text
    assert "- one\n- two" in text and "Café – naïve" in text
    assert "color:red" not in text and "<" not in text

    parsed = roundtrip(msg)
    assert "Quarterly report" in parsed.text_body and parsed.html_body and "<b>up</b>" in parsed.html_body


def test_deeply_nested_html_still_gets_a_text_alternative() -> None:
    html = "<div>" * 3000 + "deep text" + "</div>" * 3000
    msg = build(body=html, is_html=True)
    assert "deep text" in msg.get_body(("plain",)).get_content()


def test_attachments_come_back_byte_for_byte_and_are_read_one_at_a_time() -> None:
    opened = Opened()
    text_data = b"line one\nline two\r\nno final newline"
    attachments = [
        opened.attachment("report.pdf", PDF, "application/pdf"),
        opened.attachment("notes.txt", text_data, "text/plain"),
        opened.attachment("empty.bin", b""),
        opened.attachment("pixel.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "IMAGE/PNG"),
    ]
    msg = build(body="<p>See <i>attached</i></p>", is_html=True, attachments=attachments)
    assert opened.events == [f"{verb} {a.filename}" for a in attachments for verb in ("open", "close")]
    assert msg.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
        "text/plain",
        "application/octet-stream",
        "image/png",
    ]
    assert sum(1 for p in msg.walk() if p["MIME-Version"]) == 1

    parsed = roundtrip(msg)
    assert [(a.filename, a.mime_type, a.size, a.data) for a in parsed.attachments] == [
        ("report.pdf", "application/pdf", len(PDF), PDF),
        ("notes.txt", "text/plain", len(text_data), text_data),
        ("empty.bin", "application/octet-stream", 0, b""),
        ("pixel.png", "image/png", 208, attachments[3].open().read()),
    ]
    assert parsed.text_body == "See attached" and "<i>attached</i>" in (parsed.html_body or "")


def test_attachment_on_a_plain_text_message() -> None:
    opened = Opened()
    msg = build(attachments=[opened.attachment("data.csv", b"a,b\n1,2\n", "text/csv")])
    assert [p.get_content_type() for p in msg.walk()] == ["multipart/mixed", "text/plain", "text/csv"]
    parsed = roundtrip(msg)
    assert parsed.text_body.startswith("Hi Bob,")
    assert parsed.attachments[0].data == b"a,b\n1,2\n"


def test_message_and_multipart_types_are_sent_as_opaque_files() -> None:
    # base64 is not allowed for message/* and multipart/* (RFC 2046), and the bytes must not change.
    eml = b"From: x@example.com\r\nSubject: old\r\n\r\nold body\r\n"
    opened = Opened()
    msg = build(attachments=[opened.attachment("old.eml", eml, "message/rfc822")])
    part = list(msg.iter_attachments())[0]
    assert part.get_content_type() == "application/octet-stream"
    assert roundtrip(msg).attachments[0].data == eml


def test_attachment_size_mismatch_is_refused() -> None:
    short = OutgoingAttachment("a.bin", "application/octet-stream", lambda: io.BytesIO(b"abc"), 10)
    with pytest.raises(ValueError, match="expected 10 bytes, read 3"):
        build(attachments=[short])
    long = OutgoingAttachment("a.bin", "application/octet-stream", lambda: io.BytesIO(b"abcdef"), 2)
    with pytest.raises(ValueError, match="expected 2 bytes, read more"):
        build(attachments=[long])


@pytest.mark.parametrize("mime_type", ["", "text", "text/plain; charset=utf-8", "a/b\r\nBcc: x@example.com"])
def test_an_attachment_with_an_invalid_mime_type_goes_as_octet_stream(mime_type: str) -> None:
    # Types come from uploads and received mail, not from the user's message: made safe, never refused.
    attachment = OutgoingAttachment("a.bin", mime_type, lambda: io.BytesIO(b"x"), 1)
    wire = wire_bytes(build(attachments=[attachment]))
    assert b"Bcc" not in wire
    received = message_from_bytes(wire, policy=policy.default)
    [part] = [p for p in received.walk() if p.get_filename() == "a.bin"]
    assert part.get_content_type() == "application/octet-stream" and part.get_content() == b"x"


def test_non_ascii_subject_name_filename_and_domain_round_trip() -> None:
    subject = "Grüße – 会议 " + "очень длинная тема " * 8
    opened = Opened()
    filename = "Résumé Jürgen Müller — 履歴書 (final).pdf"
    msg = build(
        from_address="zoe@exämple.net",
        from_name="Zoë Ångström-Øberg",
        to=["bob@bücher.example"],
        subject=subject,
        attachments=[opened.attachment(filename, PDF, "application/pdf")],
    )
    raw = wire_bytes(msg)
    assert raw.isascii()
    assert b"=?utf-8?" in raw  # RFC 2047 for the subject and display name
    assert b"filename*" in raw and b"utf-8''" in raw  # RFC 2231 for the filename
    assert b"zoe@xn--exmple-cua.net" in raw and b"bob@xn--bcher-kva.example" in raw
    parsed = roundtrip(msg)
    assert parsed.subject == subject.strip()
    assert parsed.from_name == "Zoë Ångström-Øberg"
    assert parsed.attachments[0].filename == filename and parsed.attachments[0].data == PDF


def test_display_names_with_specials_are_quoted() -> None:
    msg = build(from_name='Example, Alice "Boss" (CEO)')
    parsed = roundtrip(msg)
    assert parsed.from_name == 'Example, Alice "Boss" (CEO)'
    assert parsed.from_address == "alice@example.com" and parsed.to == ["bob@example.org"]


def test_no_name_and_multiple_recipients() -> None:
    msg = build(from_name=None, to=["b1@example.org", "b2@example.org"], cc=["c1@example.org", "c2@example.org"])
    assert str(msg["From"]) == "alice@example.com"
    parsed = roundtrip(msg)
    assert parsed.to == ["b1@example.org", "b2@example.org"] and parsed.cc == ["c1@example.org", "c2@example.org"]


def test_bcc_is_never_a_header() -> None:
    msg = build(to=["bob@example.org"], cc=["carol@example.org"])
    raw = wire_bytes(msg)
    assert "Bcc" not in msg and b"bcc" not in raw.lower()
    assert roundtrip(msg).bcc == []
    # build_message takes no Bcc at all, and the wire form refuses a message that carries one.
    with pytest.raises(TypeError):
        build(bcc=["secret@example.org"])
    msg["Bcc"] = "secret@example.org"
    with pytest.raises(ValueError, match="Bcc"):
        wire_bytes(msg)


def test_reply_threading_headers() -> None:
    original = Original(message_id="<parent@example.org>", references=["<root@example.org>", "<middle@example.org>"])
    msg = build(subject="Re: Meeting tomorrow", in_reply_to=original)
    assert msg["In-Reply-To"] == "<parent@example.org>"
    assert msg["References"] == "<root@example.org> <middle@example.org> <parent@example.org>"
    parsed = roundtrip(msg)
    assert parsed.in_reply_to == "<parent@example.org>"
    assert parsed.references == ["<root@example.org>", "<middle@example.org>", "<parent@example.org>"]
    # The thread is the original's thread.
    assert parsed.conversation_key == parse_message(_message_with_references(["<root@example.org>"])).conversation_key


def _message_with_references(refs: list[str]) -> bytes:
    msg = EmailMessage(policy=POLICY)
    msg["From"] = "x@example.org"
    msg["Message-ID"] = "<other@example.org>"
    msg["References"] = " ".join(refs)
    msg.set_content("x")
    return msg.as_bytes()


def test_reply_to_a_message_without_references_or_id() -> None:
    msg = build(in_reply_to=Original(message_id="<only@example.org>", references=[]))
    assert msg["In-Reply-To"] == "<only@example.org>" and msg["References"] == "<only@example.org>"
    msg = build(in_reply_to=Original(message_id=None, references=["<root@example.org>"]))
    assert "In-Reply-To" not in msg and msg["References"] == "<root@example.org>"
    msg = build(in_reply_to=Original(message_id=None, references=[]))
    assert "In-Reply-To" not in msg and "References" not in msg


def test_long_ids_are_folded_between_ids_never_encoded() -> None:
    ids = [f"<{c * 90}@example.com>" for c in "abc"]
    msg = build(in_reply_to=Original(message_id=ids[-1], references=ids[:-1]))
    raw = wire_bytes(msg)
    assert b"=?" not in raw
    assert ("References: " + "\r\n ".join(ids) + "\r\n").encode() in raw
    assert parse_message(raw).references == ids


def test_references_are_bounded_keeping_root_and_latest() -> None:
    refs = [f"<r{i}@example.org>" for i in range(100)]
    msg = build(in_reply_to=Original(message_id="<parent@example.org>", references=refs))
    kept = str(msg["References"]).split()
    assert len(kept) == 30 and kept[0] == "<r0@example.org>" and kept[-1] == "<parent@example.org>"
    assert kept[-2] == "<r99@example.org>"


def test_a_reply_to_thousands_of_references_is_built_in_linear_time() -> None:
    refs = [f"<r{i}@example.org>" for i in range(50_000)]
    start = time.perf_counter()
    msg = build(in_reply_to=Original(message_id="<parent@example.org>", references=[*refs, "<r3@example.org>"]))
    assert time.perf_counter() - start < 3
    kept = str(msg["References"]).split()
    assert len(kept) == 30 and kept[0] == "<r0@example.org>" and kept[-1] == "<parent@example.org>"
    assert kept[-2] == "<r49999@example.org>"


def test_malformed_original_ids_are_left_out() -> None:
    original = Original(
        message_id="parent@example.org",  # brackets missing: added
        references=["<ok@example.org>", "no-at-sign", "<a b@example.org>", "<x@y>\r\nBcc: evil@example.com", ""],
    )
    msg = build(in_reply_to=original)
    assert msg["In-Reply-To"] == "<parent@example.org>"
    assert msg["References"] == "<ok@example.org> <parent@example.org>"
    assert b"evil" not in wire_bytes(msg)


def test_new_message_id() -> None:
    ids = {new_message_id("example.com") for _ in range(1000)}
    assert len(ids) == 1000
    for mid in ids:
        assert re.fullmatch(r"<[A-Za-z0-9_-]{32}@example\.com>", mid)
    assert new_message_id("exämple.net").endswith("@xn--exmple-cua.net>")
    assert new_message_id("[192.0.2.1]").endswith("@[192.0.2.1]>")
    for bad in ["", "example.com\r\nBcc: x", "exa mple.com", "a@b", "-bad.com", "<x>"]:
        with pytest.raises(ValueError):
            new_message_id(bad)
    msg = build(message_id=new_message_id("example.com"))
    assert roundtrip(msg).message_id == msg["Message-ID"]


INJECTIONS = [
    "x\r\nBcc: evil@example.com",
    "x\nBcc: evil@example.com",
    "x\rBcc: evil@example.com",
    "x\x00",
    "x\u2028y",
]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("field", ["subject", "from_name"])
def test_line_breaks_in_subject_or_name_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        build(**{field: value})


@pytest.mark.parametrize(
    "address",
    [
        "bob@example.org\r\nBcc: evil@example.com",
        "bob@example.org\nBcc: evil@example.com",
        "bob@example.org\r",
        "bob@example.org, evil@example.com",
        "Bob <bob@example.org>",
        "bob@example.org>\r\n",
        "(comment)bob@example.org",
        "bob",
        "@example.org",
        "bob@",
        "bøb@example.org",  # needs SMTPUTF8
    ],
)
@pytest.mark.parametrize("field", ["from_address", "to", "cc", "reply_to"])
def test_malformed_addresses_never_make_headers(field: str, address: str) -> None:
    value: Any = [address] if field in ("to", "cc") else address
    with pytest.raises(ValueError):
        build(**{field: value})


@pytest.mark.parametrize(
    ("name", "sent_as"),
    [
        ("a.pdf\r\nContent-Type: text/html", "a.pdf__Content-Type: text/html"),
        ("line\u2028separator\x85nel\x0bvt.txt", "line_separator_nel_vt.txt"),
        ("  ", "attachment"),
        ("..", "attachment"),
        (" . ", "attachment"),
    ],
)
def test_attachment_filenames_that_would_break_a_header_are_made_safe(name: str, sent_as: str) -> None:
    opened = Opened()
    wire = wire_bytes(build(attachments=[opened.attachment(name, b"x")]))
    received = message_from_bytes(wire, policy=policy.default)
    assert [p.get_filename() for p in received.walk() if p.get_filename()] == [sent_as]
    assert received["Content-Type"].startswith("multipart/mixed") and "text/html" not in received["Content-Type"]


def test_invalid_message_id_and_naive_date_are_refused() -> None:
    for bad in ["abc@example.com", "<abc@example.com>\r\nBcc: x@y", "<no-at>", "<a b@example.com>"]:
        with pytest.raises(ValueError):
            build(message_id=bad)
    with pytest.raises(ValueError, match="timezone"):
        build(date=datetime(2024, 1, 1))
    assert build(date=datetime(2024, 1, 1, tzinfo=UTC))["Date"] == "Mon, 01 Jan 2024 00:00:00 +0000"


@pytest.mark.parametrize(
    "typed",
    [
        "=?utf-8?q?caf=C3=A9?=",
        "Re: =?utf-8?b?aGk=?= there",
        "Grüße =?iso-8859-1?q?x?= und so",
        # Encoded line breaks are text like any other: nothing decodes them into a header.
        "=?utf-8?q?hi=0D=0ABcc:_evil@example.com?=",
        "=?utf-8?b?aGkNCkJjYzogZXZpbEBleGFtcGxlLmNvbQ==?=",
        "Bank =?utf-8?q?=0AReply-To:_a@evil.example?=",
    ],
)
def test_typed_encoded_word_text_reaches_the_recipient_as_typed(typed: str) -> None:
    # RFC 2047 section 5: text that looks like an encoded word must itself be encoded, or the
    # recipient's client decodes it and shows something the sender never wrote.
    wire = wire_bytes(build(subject=typed, from_name=typed))
    received = message_from_bytes(wire, policy=policy.default)
    assert str(received["Subject"]) == typed
    assert received["From"].addresses[0].display_name == typed
    assert received["From"].addresses[0].addr_spec == "alice@example.com"
    assert "Bcc" not in received and "Reply-To" not in received and b"\r\nBcc" not in wire
    parsed = roundtrip(build(subject=typed, from_name=typed))
    assert parsed.subject == typed and parsed.from_name == typed


def test_a_long_subject_that_looks_encoded_is_folded_and_arrives_as_typed() -> None:
    typed = "How to write =?utf-8?q?...?= in a header" + " and a long tail" * 6
    wire = wire_bytes(build(subject=typed))
    assert all(len(line) <= 78 for line in wire.split(b"\r\n"))
    assert str(message_from_bytes(wire, policy=policy.default)["Subject"]) == typed
    assert roundtrip(build(subject=typed)).subject == typed
