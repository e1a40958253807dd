"""parse_message: bodies, sanitising, attachments, headers, threading and broken input."""

from __future__ import annotations

import base64
import json
import random
import time
from datetime import UTC, datetime, timedelta, timezone
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP

import pytest
from messages import attachments_message, malformed_message, realistic_mix, to_bytes

from email_service.mail import parse as parse_module
from email_service.mail.htmltext import nesting_depth
from email_service.mail.parse import PREVIEW_LENGTH, ParsedMessage, _preview, parse_message

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def build(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    defaults = {
        "From": "Alice Example <alice@Example.COM>",
        "To": "bob@example.org",
        "Subject": "Hello",
        "Date": "Tue, 02 Jan 2024 10:30:00 +0100",
        "Message-ID": "<m1@example.com>",
    }
    given = {name.replace("_", "-"): value for name, value in headers.items()}
    defaults = {name: value for name, value in defaults.items() if name.lower() not in {g.lower() for g in given}}
    defaults.update(given)
    for name, value in defaults.items():
        msg[name] = value
    return msg


def parse(msg: EmailMessage) -> ParsedMessage:
    return parse_message(msg.as_bytes(policy=SMTP))


def assert_json_safe(parsed: ParsedMessage) -> None:
    # Everything except attachment bytes ends up in JSON responses or text columns.
    json.dumps(
        {
            "subject": parsed.subject,
            "headers": parsed.headers,
            "text": parsed.text_body,
            "html": parsed.html_body,
            "defects": parsed.defects,
            "names": [a.filename for a in parsed.attachments],
        },
        ensure_ascii=False,
    ).encode("utf-8")


# --- simple messages ----------------------------------------------------------------------------


def test_plain_message_fields():
    msg = build(Cc="Carol <carol@EXAMPLE.net>, dave@example.net", Reply_To="replies@example.com")
    msg.set_content("Hi Bob,\n\nSee you tomorrow.\n")
    parsed = parse(msg)
    assert parsed.message_id == "<m1@example.com>"
    assert parsed.subject == "Hello"
    assert parsed.from_address == "alice@example.com"
    assert parsed.from_name == "Alice Example"
    assert parsed.to == ["bob@example.org"]
    assert parsed.cc == ["carol@example.net", "dave@example.net"]
    assert parsed.bcc == []
    assert parsed.reply_to == ["replies@example.com"]
    assert parsed.date == datetime(2024, 1, 2, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    assert parsed.date.tzinfo is not None
    assert parsed.text_body == "Hi Bob,\n\nSee you tomorrow."
    assert parsed.html_body is None
    assert parsed.preview == "Hi Bob, See you tomorrow."
    assert parsed.attachments == []
    assert parsed.headers["Subject"] == "Hello"
    assert parsed.headers["From"] == "Alice Example <alice@Example.COM>"
    assert parsed.size == len(msg.as_bytes(policy=SMTP))
    assert parsed.defects == []
    assert len(parsed.conversation_key) == 40
    assert_json_safe(parsed)


def test_local_part_case_is_kept_domain_lowered():
    parsed = parse(build(From="Bob.Smith@MAIL.Example.ORG"))
    assert parsed.from_address == "Bob.Smith@mail.example.org"
    assert parsed.from_name is None


def test_multipart_alternative_prefers_each_kind():
    msg = build()
    msg.set_content("Plain version")
    msg.add_alternative("<p>HTML <b>version</b></p>", subtype="html")
    parsed = parse(msg)
    assert parsed.text_body == "Plain version"
    assert parsed.html_body == "<p>HTML <b>version</b></p>"
    assert parsed.attachments == []


def test_html_only_derives_text():
    msg = build()
    msg.set_content(
        "<html><head><title>Newsletter</title><style>p {color: red}</style></head><body>"
        "<h1>Big&nbsp;news</h1><p>First &amp; foremost<br>second line</p>"
        "<ul><li>one</li><li>two</li></ul><script>var x = 'hidden';</script>"
        "<table><tr><td>a</td><td>b</td></tr></table><p>caf&eacute; &lt;3</p></body></html>",
        subtype="html",
    )
    parsed = parse(msg)
    text = parsed.text_body
    assert "Newsletter" not in text
    assert "color" not in text and "hidden" not in text
    assert "<" not in text.replace("<3", "")
    assert text.startswith("Big news")
    assert "First & foremost\nsecond line" in text
    assert "- one\n- two" in text
    assert "a\tb" in text
    assert text.endswith("café <3")
    assert parsed.preview.startswith("Big news First & foremost second line - one - two")
    assert parsed.html_body is not None and "<script" not in parsed.html_body


def test_html_is_sanitised_and_cid_kept():
    msg = build()
    msg.set_content(
        '<div onclick="steal()" style="color: red; background: url(https://track.example/x)">Hi</div>'
        "<script>alert(1)</script>"
        '<a href="javascript:alert(1)">bad link</a> <a href="https://example.com/ok">good link</a> '
        '<a href="mailto:alice@example.com">mail</a> <a href="data:text/html,x">data</a> '
        '<img src="cid:logo@example.com" alt="logo" onerror="x()"><img src="https://example.com/p.png">'
        '<iframe src="https://evil.example"></iframe><form action="https://evil.example"><input></form>'
        '<svg onload="alert(1)"><a xlink:href="javascript:alert(1)">x</a></svg>',
        subtype="html",
    )
    html = parse(msg).html_body
    assert html is not None
    lowered = html.lower()
    assert "<script" not in lowered and "alert" not in lowered
    assert " on" not in lowered.replace("only", "")
    assert "javascript:" not in lowered and "data:" not in lowered
    assert "url(" not in lowered and "<iframe" not in lowered and "<form" not in lowered
    assert 'style="color:red"' in html
    assert 'href="https://example.com/ok"' in html
    assert 'href="mailto:alice@example.com"' in html
    assert 'src="cid:logo@example.com"' in html
    assert 'src="https://example.com/p.png"' in html
    assert "bad link" in html and "good link" in html


# --- attachments --------------------------------------------------------------------------------


def test_inline_image_with_content_id_in_related():
    msg = build()
    msg.set_content("See the logo")
    msg.add_alternative('<p>Logo: <img src="cid:logo123@example.com"></p>', subtype="html")
    html_part = msg.get_payload()[1]
    html_part.add_related(PNG, maintype="image", subtype="png", cid="<logo123@example.com>")
    parsed = parse(msg)
    assert parsed.text_body == "See the logo"
    assert 'src="cid:logo123@example.com"' in (parsed.html_body or "")
    [image] = parsed.attachments
    assert image.mime_type == "image/png"
    assert image.content_id == "logo123@example.com"
    assert image.is_inline is True
    assert image.data == PNG and image.size == len(PNG)
    assert image.filename == "attachment-1.png"


def test_content_id_not_referenced_and_no_disposition_is_not_inline():
    msg = build()
    msg.set_content("body")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="a.png", cid="<other@x>")
    [image] = parse(msg).attachments
    assert image.content_id == "other@x"
    assert image.is_inline is False


def test_inline_disposition_counts_as_inline():
    msg = build()
    msg.set_content("body")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="photo.png", disposition="inline")
    [image] = parse(msg).attachments
    assert image.is_inline is True and image.filename == "photo.png"


def test_attachment_filename_rfc2231():
    raw = (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: files\r\nDate: Tue, 02 Jan 2024 10:30:00 +0000\r\n"
        b"Message-ID: <x@y>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attached\r\n"
        b"--B\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''Pr%C3%BCfbericht%20%E2%82%AC.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n"
    )
    parsed = parse_message(raw)
    [pdf] = parsed.attachments
    assert pdf.filename == "Prüfbericht €.pdf"
    assert pdf.mime_type == "application/pdf"
    assert pdf.data == b"%PDF-1.4\n"
    assert pdf.size == 9
    assert pdf.is_inline is False and pdf.content_id is None
    assert parsed.text_body == "see attached"


def test_attachment_filename_rfc2231_continuations():
    raw = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain\r\n\r\nbody\r\n--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment;\r\n filename*0*=utf-8''%E6%97%A5%E6%9C%AC;\r\n filename*1*=%E8%AA%9E.txt\r\n"
        b"\r\ndata\r\n--B--\r\n"
    )
    [att] = parse_message(raw).attachments
    assert att.filename == "日本語.txt"


def test_attachment_filename_rfc2047_and_builder():
    msg = build()
    msg.set_content("body")
    msg.add_attachment(b"hello", maintype="text", subtype="plain", filename="Übersicht.txt")
    [built] = parse(msg).attachments
    assert built.filename == "Übersicht.txt" and built.data == b"hello"
    raw = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain\r\n\r\nbody\r\n--B\r\n"
        b'Content-Type: application/octet-stream; name="=?ISO-8859-1?Q?R=E9sum=E9=2Edoc?="\r\n'
        b'Content-Disposition: attachment; filename="=?utf-8?B?0J7RgtGH0ZHRgi5kb2M=?="\r\n'
        b"\r\ndata\r\n--B--\r\n"
    )
    [att] = parse_message(raw).attachments
    assert att.filename == "Отчёт.doc"
    disposition = b'Content-Disposition: attachment; filename="=?utf-8?B?0J7RgtGH0ZHRgi5kb2M=?="\r\n'
    raw_name_only = raw.replace(disposition, b"")
    [att] = parse_message(raw_name_only).attachments
    assert att.filename == "Résumé.doc"


def test_missing_filename_falls_back_to_type():
    msg = build()
    msg.set_content("body")
    msg.add_attachment(b"%PDF", maintype="application", subtype="pdf")
    msg.add_attachment(b"\x00\x01", maintype="application", subtype="x-unknown-thing")
    names = [a.filename for a in parse(msg).attachments]
    assert names == ["attachment-1.pdf", "attachment-2.bin"]


def test_dangerous_filenames_are_made_safe():
    raw = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain\r\n\r\nbody\r\n--B\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="../../etc/passwd"\r\n\r\nx\r\n--B\r\n'
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="C:\\\\temp\\\\evil.exe"\r\n\r\nx\r\n--B\r\n'
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename=".."\r\n\r\nx\r\n--B--\r\n'
    )
    names = [a.filename for a in parse_message(raw).attachments]
    assert names[0] == "passwd"
    assert names[1] == "evil.exe"
    assert names[2] == "attachment-3.bin"


def test_nested_mixed_alternative_related():
    msg = build()
    msg.set_content("plain body")
    msg.add_alternative('<p>html body <img src="cid:pic@x"></p>', subtype="html")
    msg.get_payload()[1].add_related(PNG, maintype="image", subtype="png", cid="<pic@x>")
    msg.add_attachment(b"col1,col2\n", maintype="text", subtype="csv", filename="data.csv")
    assert msg.get_content_type() == "multipart/mixed"
    parsed = parse(msg)
    assert parsed.text_body == "plain body"
    assert "html body" in (parsed.html_body or "")
    assert [(a.filename, a.mime_type, a.is_inline) for a in parsed.attachments] == [
        ("attachment-1.png", "image/png", True),
        ("data.csv", "text/csv", False),
    ]


def test_attached_message_is_an_eml_attachment():
    inner = build(Subject="Original report", Message_ID="<inner@example.com>")
    inner.set_content("inner body")
    outer = build(Subject="Fwd: Original report")
    outer.set_content("see forwarded")
    outer.add_attachment(inner)
    parsed = parse(outer)
    assert parsed.text_body == "see forwarded"
    [eml] = parsed.attachments
    assert eml.mime_type == "message/rfc822"
    assert eml.filename.endswith(".eml")
    assert eml.filename == "Original report.eml"
    assert eml.size == len(eml.data)
    reparsed = parse_message(eml.data)
    assert reparsed.message_id == "<inner@example.com>"
    assert reparsed.text_body == "inner body"


def test_attached_message_without_subject_gets_fallback_name():
    raw = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain\r\n\r\nbody\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: x@example.com\r\n\r\ninner\r\n--B--\r\n"
    )
    [eml] = parse_message(raw).attachments
    assert eml.filename == "attachment-1.eml"
    assert b"inner" in eml.data


def test_text_attachment_with_disposition_is_not_body():
    msg = build()
    msg.set_content("the body")
    msg.add_attachment("notes", filename="notes.txt")
    parsed = parse(msg)
    assert parsed.text_body == "the body"
    assert [a.filename for a in parsed.attachments] == ["notes.txt"]


# --- headers and charsets -----------------------------------------------------------------------


def test_rfc2047_subject_in_two_charsets():
    raw = (
        b"From: =?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>\r\n"
        b"Subject: =?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=\r\n"
        b"  =?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?= =?utf-8?q?_caf=C3=A9?=\r\n"
        b"  and =?koi8-r?b?8NLJ18XU?=\r\n\r\nbody\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "If you can read this you understand the example. café and Привет"
    assert parsed.from_name == "André Pirard"
    assert parsed.from_address == "PIRARD@vm1.ulg.ac.be"
    assert " ".join(parsed.headers["Subject"].split()) == parsed.subject


def test_character_split_across_two_encoded_words_is_joined():
    # "Привет мир" in UTF-8, cut inside "р" (0xD1 0x80): neither word decodes on its own.
    raw = (
        b"From: =?utf-8?B?0J/R?= =?utf-8?B?gNC40LLQtdGC?= <ivan@example.ru>\r\n"
        b"Subject: =?utf-8?B?0J/R?=\r\n =?utf-8?B?gNC40LLQtdGCINC80LjRgA==?= and =?utf-8?q?caf=C3?= =?utf-8?q?=A9?=\r\n"
        b"\r\nbody\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "Привет мир and café"
    assert parsed.headers["Subject"] == parsed.subject
    assert parsed.from_name == "Привет"
    assert not [d for d in parsed.defects if "Subject" in d or "From" in d]


def test_split_character_in_a_mislabelled_run_is_joined_too():
    # Labelled with a charset alias the codec table spells differently: repaired as one run.
    raw = b"From: a@example.com\r\nSubject: =?UTF8?B?0J/R?= =?UTF8?B?gNC4?=\r\n\r\nbody\r\n"
    assert parse_message(raw).subject == "При"


def test_from_without_an_address_is_unknown_not_the_sender():
    raw = (
        b'From: "System" <>\r\nSender: relay@lists.example.org\r\nTo: bob@example.org\r\n'
        b"Subject: Nightly report\r\nMessage-ID: <n1@example.org>\r\n\r\nAll green.\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.from_address is None
    assert "From header has no valid address" in parsed.defects


def test_subject_whitespace_is_folded():
    raw = b"From: a@example.com\r\nSubject: a\r\n\t  long\r\n   subject  \r\n\r\nbody"
    assert parse_message(raw).subject == "a long subject"


def test_bad_charset_label_in_body_and_header():
    raw = (
        b"From: a@example.com\r\nSubject: =?x-made-up?q?caf=C3=A9?= and =?iso-8859-1?q?na=EFve?=\r\n"
        b"Content-Type: text/plain; charset=x-made-up\r\n\r\nna\xc3\xafve caf\xc3\xa9\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "café and naïve"
    assert parsed.text_body == "naïve café"
    assert any("x-made-up" in d for d in parsed.defects)
    assert_json_safe(parsed)


def test_wrong_charset_label_falls_back():
    # Declared UTF-8 but really Latin-1: decoded as Windows-1252 instead of failing.
    raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xe9 \x93quoted\x94\r\n"
    parsed = parse_message(raw)
    assert parsed.text_body == "café \u201cquoted\u201d"
    assert any("utf-8" in d for d in parsed.defects)


def test_text_with_a_few_bad_bytes_keeps_its_charset():
    # One stray byte, or a character cut at the end (a client that truncates by bytes), used to
    # send the whole text to the Windows-1252 fallback: every accent and every CJK character
    # came out as mojibake. Mail clients show the text with a replacement character instead.
    german = "Grüße aus München – schön"
    raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + german.encode() + b"\xff!\r\n"
    assert parse_message(raw).text_body == german + "\ufffd!"
    chinese = "你好，世界。这是一封测试邮件"
    cut = chinese.encode("gb18030")[:-1]
    raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=gb2312\r\n\r\n" + cut
    assert parse_message(raw).text_body == chinese[:-1] + "\ufffd"
    word = base64.b64encode("Grüße aus München".encode() + "–".encode()[:2]).decode()
    raw = f"From: a@example.com\r\nSubject: =?utf-8?b?{word}?=\r\n\r\nbody".encode()
    assert parse_message(raw).subject == "Grüße aus München\ufffd"
    raw = b"From: a@example.com\r\nSubject: " + "Grüße aus München".encode() + b"\xe2\x80\r\n\r\nbody"
    assert parse_message(raw).subject == "Grüße aus München\ufffd"
    # Text with no valid UTF-8 at all is still read as the Windows-1252 it almost always is.
    raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nFu\xdf\x94 und caf\xe9"
    assert parse_message(raw).text_body == "Fu\u00df\u201d und caf\u00e9"


def test_latin1_label_decodes_windows_1252_characters():
    raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\n\x80 5\r\n"
    assert parse_message(raw).text_body == "€ 5"


@pytest.mark.parametrize(
    ("label", "text", "codec"),
    [
        ("windows-874", "สวัสดีครับ", "cp874"),  # Outlook's label for Thai
        ("iso-8859-8-i", "שלום עולם", "iso8859_8"),  # Hebrew in logical order
        ("x-mac-roman", "Café crème", "mac_roman"),
        ("x-mac-cyrillic", "Привет", "mac_cyrillic"),
        ("x-euc-jp", "日本語のメール", "euc_jp"),
        ("windows-949", "안녕하세요", "cp949"),
        ("windows-31j", "日本語のメール", "cp932"),
        ("cseuckr", "안녕하세요", "cp949"),
        ("x-cp1250", "Zażółć gęślą jaźń", "cp1250"),
    ],
)
def test_charset_labels_mail_clients_use_that_python_does_not_know(label, text, codec):
    data = text.encode(codec)
    raw = (
        f"From: a@example.com\r\nSubject: =?{label}?b?".encode()
        + base64.b64encode(data)
        + f"?=\r\nContent-Type: text/plain; charset={label}\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.text_body == text
    assert parsed.subject == text
    assert not any("charset" in d for d in parsed.defects)


def test_eight_bit_headers():
    raw = (
        b"From: J\xc3\xb6rg M\xc3\xbcller <joerg@example.de>\r\nTo: Ren\xe9 <rene@example.fr>\r\n"
        b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\nX-Latin: caf\xe9\r\n\r\nbody\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "Grüße aus Köln"
    assert parsed.from_name == "Jörg Müller"
    assert parsed.from_address == "joerg@example.de"
    assert parsed.to == ["rene@example.fr"]
    assert parsed.headers["X-Latin"] == "café"
    assert_json_safe(parsed)


def test_invalid_addresses_are_dropped_not_fatal():
    raw = (
        b"From: not an address\r\nTo: good@example.com, bad, @nodomain, x@, <also@Good.example>,"
        b" undisclosed-recipients:;\r\nCc: Group: m1@example.com, m2@example.com;\r\n"
        b"Bcc: b@example.com\r\nReply-To: \r\n\r\nbody"
    )
    parsed = parse_message(raw)
    assert parsed.to == ["good@example.com", "also@good.example"]
    assert parsed.cc == ["m1@example.com", "m2@example.com"]
    assert parsed.bcc == ["b@example.com"]
    assert parsed.reply_to == []
    assert parsed.from_address is None
    assert "From header has no valid address" in parsed.defects


def test_repeated_headers_are_joined():
    raw = (
        b"Received: from a by b; Tue, 02 Jan 2024 10:30:00 +0000\r\n"
        b"Received: from c by d; Tue, 02 Jan 2024 10:29:00 +0000\r\n"
        b"X-Tag: one\r\nx-tag: two\r\nFrom: a@example.com\r\n\r\nbody"
    )
    headers = parse_message(raw).headers
    assert headers["Received"].split("\n") == [
        "from a by b; Tue, 02 Jan 2024 10:30:00 +0000",
        "from c by d; Tue, 02 Jan 2024 10:29:00 +0000",
    ]
    assert headers["X-Tag"] == "one, two"
    assert "x-tag" not in headers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Tue, 02 Jan 2024 10:30:00 -0500", datetime(2024, 1, 2, 15, 30, tzinfo=UTC)),
        ("2 Jan 2024 10:30:00 GMT", datetime(2024, 1, 2, 10, 30, tzinfo=UTC)),
        ("Tue, 02 Jan 2024 10:30:00 -0000", datetime(2024, 1, 2, 10, 30, tzinfo=UTC)),
        ("Tue, 2 Jan 24 10:30 +0000", datetime(2024, 1, 2, 10, 30, tzinfo=UTC)),
        ("yesterday-ish", None),
        ("Tue, 99 Foo 2024 99:99:99 +9999", None),
    ],
)
def test_dates(value, expected):
    parsed = parse_message(f"From: a@example.com\r\nDate: {value}\r\n\r\nx".encode())
    assert parsed.date == expected
    if expected is None:
        assert any("Date" in d for d in parsed.defects)
    else:
        assert parsed.date.tzinfo is not None


def test_message_ids_are_normalised():
    raw = (
        b"From: a@example.com\r\nMessage-ID:   <abc@Example.com>  (comment)\r\nIn-Reply-To: parent@example.com\r\n"
        b"References: <root@example.com>\r\n <mid\r\n dle@example.com> <root@example.com>\r\n\r\nx"
    )
    parsed = parse_message(raw)
    assert parsed.message_id == "<abc@Example.com>"
    assert parsed.in_reply_to == "<parent@example.com>"
    assert parsed.references == ["<root@example.com>", "<middle@example.com>"]


# --- threading ----------------------------------------------------------------------------------


def thread_message(mid: str, subject: str, parents: list[str]) -> bytes:
    msg = build(Message_ID=mid, Subject=subject)
    if parents:
        msg["In-Reply-To"] = parents[-1]
        msg["References"] = " ".join(parents)
    msg.set_content("text")
    return msg.as_bytes(policy=SMTP)


def test_reply_chain_shares_conversation_key():
    root = parse_message(thread_message("<root@a>", "Plan", []))
    reply = parse_message(thread_message("<r1@b>", "Re: Plan", ["<root@a>"]))
    reply2 = parse_message(thread_message("<r2@a>", "Re: Re: Plan", ["<root@a>", "<r1@b>"]))
    only_in_reply_to = parse_message(build(Message_ID="<r3@c>", In_Reply_To="<root@a>").as_bytes())
    other = parse_message(thread_message("<other@a>", "Plan", []))
    other_reply = parse_message(thread_message("<o1@b>", "Re: Plan", ["<other@a>"]))
    assert root.conversation_key == reply.conversation_key == reply2.conversation_key
    assert only_in_reply_to.conversation_key == root.conversation_key
    assert other.conversation_key == other_reply.conversation_key
    assert other.conversation_key != root.conversation_key
    assert all(len(p.conversation_key) == 40 for p in (root, reply, other))
    int(root.conversation_key, 16)


def test_thousands_of_references_thread_in_linear_time():
    # A hostile or broken References header of 50,000 ids (about 1.2 MB): the message parses in
    # well under a second, not in the minutes a pairwise check of every id against the others took.
    refs = [f"<r{i}@example.org>" for i in range(50_000)]
    raw = thread_message("<last@example.org>", "Re: Plan", [*refs, "<r7@example.org>", "<last@example.org>"])
    start = time.perf_counter()
    parsed = parse_message(raw)
    assert time.perf_counter() - start < 3
    assert parsed.references == [*refs, "<last@example.org>"]  # in order, each once
    assert parsed.conversation_key == parse_message(thread_message("<r0@example.org>", "Plan", [])).conversation_key


def test_a_to_header_of_tens_of_thousands_of_addresses_parses_in_linear_time():
    # Anyone can send one (2 MB of To is within the size limit): each address was looked up in
    # the list so far, which took about 20 s for these 50,000 and grows with the square.
    to = [f"user{i}@example.org" for i in range(50_000)]
    raw = (
        f"From: a@example.com\r\nTo: {', '.join(to)}, user7@example.org\r\n"
        'Cc: "Carol" <user9@example.org>\r\nSubject: All hands\r\n\r\nHi.\r\n'
    ).encode()
    start = time.perf_counter()
    parsed = parse_message(raw)
    assert time.perf_counter() - start < 10
    assert parsed.to == to and parsed.cc == ["user9@example.org"]  # in order, each once
    assert parsed.recipient_names == {"user9@example.org": "Carol"}


def test_conversation_key_without_ids_uses_subject_and_sender():
    def no_ids(subject: str, sender: str) -> ParsedMessage:
        return parse_message(f"From: {sender}\r\nSubject: {subject}\r\n\r\nx".encode())

    first = no_ids("Budget", "a@example.com")
    assert first.conversation_key == no_ids("RE: Fwd: budget", "a@EXAMPLE.com").conversation_key
    assert first.conversation_key == no_ids("AW: [team] Budget", "a@example.com").conversation_key
    assert first.conversation_key != no_ids("Budget", "b@example.com").conversation_key
    assert first.conversation_key != no_ids("Budget 2", "a@example.com").conversation_key


# --- preview ------------------------------------------------------------------------------------


def test_preview_is_at_most_200_characters_and_collapsed():
    msg = build()
    msg.set_content("word\n\n\t  " * 100)
    parsed = parse(msg)
    assert len(parsed.preview) == 200
    assert "  " not in parsed.preview and "\n" not in parsed.preview
    short = parse_message(b"From: a@example.com\r\n\r\n  just\n  this  ")
    assert short.preview == "just this"


def test_format_flowed_is_unwrapped():
    raw = (
        b"From: a@example.com\r\nContent-Type: text/plain; charset=utf-8; format=flowed\r\n\r\n"
        b"This is a long \r\nparagraph.\r\n> quoted \r\n> text\r\n-- \r\nsig\r\n"
    )
    assert parse_message(raw).text_body == "This is a long paragraph.\n> quoted text\n-- \nsig"


# --- broken input -------------------------------------------------------------------------------


def test_truncated_mime():
    msg = build()
    msg.set_content("plain body")
    msg.add_alternative("<p>html body</p>", subtype="html")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="cut.png")
    raw = msg.as_bytes(policy=SMTP)
    cut = raw[: raw.index(b"filename") + 200]
    parsed = parse_message(cut)
    assert parsed.text_body == "plain body"
    assert parsed.subject == "Hello"
    assert parsed.defects  # the missing closing boundary is reported
    assert [a.filename for a in parsed.attachments] == ["cut.png"]


def test_multipart_without_boundary():
    raw = b"From: a@example.com\r\nContent-Type: multipart/mixed\r\n\r\nsome text\r\n"
    parsed = parse_message(raw)
    assert parsed.text_body == "some text"
    assert parsed.defects


def test_missing_headers_entirely():
    parsed = parse_message(b"just some text without any header\r\nsecond line\r\n")
    assert parsed.text_body.startswith("just some text")
    assert parsed.subject == "" and parsed.from_address is None and parsed.date is None
    assert parsed.message_id is None and parsed.to == []
    assert "missing From header" in parsed.defects
    assert len(parsed.conversation_key) == 40


def test_empty_and_garbage_input():
    for raw in (b"", b"\r\n\r\n", b"\x00\xff\xfe" * 50, b":\r\n:\r\n\r\n", b"--\r\n--\r\n"):
        parsed = parse_message(raw)
        assert isinstance(parsed, ParsedMessage)
        assert parsed.size == len(raw)
        assert_json_safe(parsed)
    assert "empty message" in parse_message(b"").defects


def test_bad_transfer_encoding_and_content_type():
    raw = (
        b"From: a@example.com\r\nContent-Type: ;;;===\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64@@@\r\n"
    )
    parsed = parse_message(raw)
    assert isinstance(parsed.text_body, str)
    assert_json_safe(parsed)


@pytest.mark.parametrize("cte", ["base64 ", "BASE64\t", "base64 (attachment)", '"base64"'])
def test_transfer_encoding_with_spaces_or_a_comment_is_still_decoded(cte):
    # Some bulk mailers and gateways leave trailing white space; RFC 2045 allows comments.
    raw = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
        + cte.replace("base64", "quoted-printable").replace("BASE64", "Quoted-Printable").encode()
        + b"\r\n\r\ncaf=C3=A9 au=\r\n lait\r\n--B\r\nContent-Type: application/pdf; name=report.pdf\r\n"
        b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.text_body == "café au lait"
    [pdf] = parsed.attachments
    assert pdf.data == b"%PDF-1.4\n"
    assert pdf.size == 9


def test_deep_nesting_is_bounded():
    depth = 200
    head = b"From: a@example.com\r\n"
    body = b""
    for i in range(depth):
        body += f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode()
    body += b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    for i in reversed(range(depth)):
        body += f"--b{i}--\r\n".encode()
    parsed = parse_message(head + body)
    assert any("too deep" in d for d in parsed.defects)


def test_nesting_past_the_recursion_limit_keeps_the_headers():
    # Thousands of nested multiparts exhaust the parser's recursion: the message must still show
    # who sent it and what it is about, not come out blank.
    depth = 5000
    raw = b"From: Alice <a@example.com>\r\nSubject: deep\r\nMessage-ID: <deep@x>\r\n"
    raw += b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, depth):
        raw += f"--b{i - 1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n".encode()
    raw += f"--b{depth - 1}\r\nContent-Type: text/plain\r\n\r\ndeep\r\n".encode()
    started = time.perf_counter()
    parsed = parse_message(raw)
    assert time.perf_counter() - started < 5
    assert (parsed.subject, parsed.from_address, parsed.message_id) == ("deep", "a@example.com", "<deep@x>")
    assert parsed.text_body == ""
    assert any("too deep" in d for d in parsed.defects)


def test_never_raises_on_mutilated_messages():
    msg = build(Subject="Ünïcödé subject")
    msg.set_content("plain body é")
    msg.add_alternative('<p onclick="x">html <img src="cid:i@x"></p>', subtype="html")
    msg.get_payload()[1].add_related(PNG, maintype="image", subtype="png", cid="<i@x>")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="Fötö.png")
    raw = msg.as_bytes(policy=SMTP)
    rng = random.Random(1234)
    samples = [raw[:n] for n in range(0, len(raw), 37)]
    for _ in range(150):
        mutated = bytearray(raw)
        for _ in range(rng.randint(1, 30)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        samples.append(bytes(mutated))
    samples += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))) for _ in range(50)]
    for sample in samples:
        parsed = parse_message(sample)
        assert isinstance(parsed, ParsedMessage)
        assert len(parsed.preview) <= 200
        assert len(parsed.conversation_key) == 40
        assert_json_safe(parsed)


def test_non_bytes_input_is_tolerated():
    assert parse_message("From: a@example.com\n\nhi").text_body == "hi"  # type: ignore[arg-type]
    assert parse_message(bytearray(b"From: a@example.com\n\nhi")).from_address == "a@example.com"  # type: ignore[arg-type]
    assert parse_message(None).defects  # type: ignore[arg-type]


def test_headers_that_crash_the_stdlib_parser_fall_back():
    raw = (
        b"From: =?utf-8?b?w5xuw68=?= <a@\r\nTo: ok@example.com, Bob <b@\r\nMessage-ID: <,@b>\r\n"
        b"Cc: " + b"(" * 3000 + b"c@example.com\r\nMIME-Version: 1.0\xc2\xb9\r\n\r\nbody"
    )
    parsed = parse_message(raw)
    assert parsed.text_body == "body"
    assert parsed.to == ["ok@example.com"]
    assert parsed.headers["From"] == "Ünï <a@"
    assert any("could not be parsed" in d for d in parsed.defects)
    assert_json_safe(parsed)


def test_hostile_sizes_stay_fast_and_bounded():
    long_subject = b"Subject: " + b"=?utf-8?q?caf=C3=A9?= " * 3000 + b"\r\n"
    deep_html = b"Content-Type: text/html\r\n\r\n<script>evil()</script><p>top</p>" + b"<div>" * 20000 + b"bottom"
    parsed = parse_message(b"From: a@example.com\r\n" + long_subject + deep_html)
    assert parsed.subject.startswith("cafécafé")
    assert parsed.html_body is None
    assert parsed.text_body == "top\n\nbottom"
    assert any("nested too deeply" in d for d in parsed.defects)
    many = b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    many += b"--B\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n" * 3000 + b"--B--\r\n"
    parsed = parse_message(many)
    assert len(parsed.attachments) < 1000
    assert any("too many parts" in d for d in parsed.defects)


def test_html_that_nests_through_ignored_end_tags_is_kept_as_text_in_time():
    # HTML ignores an end tag whose element lies under a block element such as <div>: "</span>"
    # here closes nothing, so each repetition nests one level deeper (80,000 in all), which the
    # sanitiser takes seconds (quadratic) to build. It must count as too deep.
    hostile = b"<span><div></span>" * 40000
    started = time.monotonic()
    parsed = parse_message(b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n<p>top</p>" + hostile + b"end")
    assert time.monotonic() - started < 5  # about 0.5 s; the tree builder took 9.5 s
    assert parsed.html_body is None
    assert parsed.text_body == "top\n\nend"
    assert any("nested too deeply" in d for d in parsed.defects)
    # Well-formed markup that closes what it opens is as shallow as it looks.
    fine = parse_message(
        b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n" + b"<div><span>x</span></div>" * 40000
    )
    assert fine.html_body is not None and not any("nested too deeply" in d for d in fine.defects)
    # Nor is a formatting element closed around a block, as mail programs write it: a browser
    # closes it there (the adoption agency), so it does not nest deeper with each repetition.
    misnested = b"<font face=Arial><div>Line</font></div><a href='https://example.com'><div>x</a></div>" * 1500
    shown = parse_message(b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n" + misnested)
    assert shown.html_body is not None and not any("nested too deeply" in d for d in shown.defects)


# --- the fast paths give the standard library's results -------------------------------------------


def test_fast_parser_and_header_cache_match_the_stdlib(monkeypatch):
    rng = random.Random(99)
    samples = [*realistic_mix(40, seed=21), to_bytes(attachments_message()), malformed_message()]
    for raw in list(samples[:10]):
        samples.append(raw[: rng.randrange(len(raw))])
        damaged = bytearray(raw)
        for _ in range(20):
            damaged[rng.randrange(len(damaged))] = rng.choice(b'-\r\n=?:<>"\xc3')
        samples.append(bytes(damaged))
    odd_headers = [
        "Date: Tue, 2 Jan 24 10:30 -0000\r\nResent-Date: 31 Feb 2024 25:00:00 +9999",
        "Date:\r\nX-Empty:\r\nSubject: \t tabs\x0b and \x1c separators  ",
        "Date: Mon, 01 Jan 2024 00:00:60 GMT (comment)\r\nReceived: from a\r\n by b; Mon, 1 Jan 2024",
        "Subject: plain =? not a word ?= \x00\r\nX-Tag: caf\xe9\r\nKeywords: a, b,  c",
    ]
    samples += [f"From: a@example.com\r\n{headers}\r\n\r\nbody".encode("latin-1") for headers in odd_headers]
    fast = [parse_message(raw) for raw in samples]
    assert [parse_message(raw) for raw in samples] == fast  # now answered from the header cache
    monkeypatch.setattr(parse_module, "PARSE_POLICY", email_policy.default)
    monkeypatch.setattr(parse_module, "parse_bytes", lambda raw, chosen: BytesParser(policy=chosen).parsebytes(raw))
    assert [parse_message(raw) for raw in samples] == fast


def test_preview_of_a_prefix_equals_preview_of_the_whole():
    rng = random.Random(7)
    pieces = ["word", " ", "\n", "\t", "\u2003", "\x1c", "é", "  ", "\r\n", "x" * 300, "\u3000", ""]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 400)))
        assert _preview(text) == " ".join(text.split())[:PREVIEW_LENGTH]


def test_headers_past_the_modern_parsers_share_are_decoded_plainly_and_lose_nothing():
    # Ten address headers of 32 KB each: through the modern parser that took seconds and
    # hundreds of megabytes; past the message's share they are decoded the linear way.
    crowd = [f"person{n}@example.org" for n in range(5_000)]
    raw = (
        "From: Alice <alice@example.com>\r\n"
        + "".join(f"To: {', '.join(crowd[n * 500 : (n + 1) * 500])}\r\n" for n in range(10))
        + "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nhello\r\n"
    ).encode()
    parsed = parse_message(raw)
    assert parsed.to == crowd
    assert parsed.from_address == "alice@example.com" and parsed.subject == "Grüße"
    assert any("decoded plainly" in defect for defect in parsed.defects)


def with_one_attachment(part_headers: bytes) -> bytes:
    """A message of a text part and one attachment, "data", whose part has ``part_headers``."""
    return (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--B\r\n" + part_headers + b"\r\ndata\r\n--B--\r\n"
    )


@pytest.mark.parametrize(
    "content_type",
    [b"application/x\x00y", b"application/x\x0bq", "application/x\u2028y".encode(), b"application/" + b"x" * 300],
)
def test_an_attachment_type_that_is_not_a_valid_type_becomes_octet_stream(content_type):
    # It is stored, shown and sent back as a response header: only a well-formed type may be.
    part = b"Content-Type: " + content_type + b"\r\nContent-Disposition: attachment; filename=a.bin\r\n"
    [attachment] = parse_message(with_one_attachment(part)).attachments
    assert attachment.mime_type == "application/octet-stream" and attachment.data == b"data"


def test_bidirectional_controls_leave_attachment_names():
    # "invoice\u202efdp.exe" shows as "invoiceexe.pdf".
    part = (
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''invoice%E2%80%AEfdp.exe\r\n"
    )
    [attachment] = parse_message(with_one_attachment(part)).attachments
    assert attachment.filename == "invoicefdp.exe"


@pytest.mark.parametrize(
    "markup",
    ["<div/>" * 5000, "<div></span>" * 5000, "<b>" * 3000 + "</i>" * 3000],
    ids=["self-closed", "stray-ends", "unmatched"],
)
def test_html_that_only_looks_shallow_is_measured_as_the_tree_builder_builds_it(markup):
    # The HTML5 tree builder opens an element for "<div/>" and ignores end tags that close nothing.
    assert nesting_depth(markup) > 1000
    assert nesting_depth("<div>" * 800 + "</div>" * 800 + "<br/><img/>" * 2000) == 800
