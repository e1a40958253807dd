"""Modified UTF-7 mailbox names, folder roles, display/parent names and LIST response parsing."""

from __future__ import annotations

import pytest

from email_service.mail.folders import (
    ListEntry,
    assign_roles,
    display_name,
    folder_type,
    parent_name,
    parse_list_line,
    parse_list_response,
)
from email_service.mail.utf7 import decode_mailbox_name, encode_mailbox_name

# --- modified UTF-7 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoded", "encoded"),
    [
        ("INBOX", "INBOX"),
        ("Entwürfe", "Entw&APw-rfe"),
        ("日本語", "&ZeVnLIqe-"),
        ("A&B", "A&-B"),
        ("&", "&-"),
        ("Tom & Jerry & Co", "Tom &- Jerry &- Co"),
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("Envoyés", "Envoy&AOk-s"),
        ("📧", "&2D3c5w-"),
        ("", ""),
    ],
)
def test_known_vectors(decoded, encoded):
    assert encode_mailbox_name(decoded) == encoded
    assert decode_mailbox_name(encoded) == decoded
    assert decode_mailbox_name(encoded.encode("ascii")) == decoded


@pytest.mark.parametrize(
    "name",
    ["Entwürfe", "日本語", "A&B", "😀 party 🎉", "a&-b", "x\x00y\x7f", "Ω/&/–/𝄞", "~&~", "Корзина", "-&-"],
)
def test_round_trip(name):
    encoded = encode_mailbox_name(name)
    assert encoded.isascii()
    assert all(0x20 <= ord(ch) <= 0x7E for ch in encoded)
    assert decode_mailbox_name(encoded) == name


def test_round_trip_all_of_unicode_in_chunks():
    # Every code point except surrogates, which cannot be encoded as UTF-16 on their own.
    points = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    for start in range(0, len(points), 4096):
        text = "".join(map(chr, points[start : start + 4096]))
        assert decode_mailbox_name(encode_mailbox_name(text)) == text


@pytest.mark.parametrize(
    "malformed",
    ["A&B", "&", "foo&bar", "&Jjo!", "&2D0-", "&ZeVnLIqe", "&AB-", "&====-", "Grüße & co"],
)
def test_malformed_names_are_returned_as_is(malformed):
    assert decode_mailbox_name(malformed) == malformed


def test_non_ascii_bytes_decode_leniently():
    assert decode_mailbox_name("Entwürfe".encode()) == "Entwürfe"


# --- folder types -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["INBOX", "inbox", "Inbox", "iNbOx"])
def test_inbox_any_case(name):
    assert folder_type(name, [], "/") == "inbox"


def test_inbox_child_is_not_inbox():
    assert folder_type("INBOX/Projects", [], "/") == "custom"


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        (["\\HasNoChildren", "\\Sent"], "sent"),
        (["\\Drafts"], "drafts"),
        (["\\Junk"], "spam"),
        (["\\Trash", "\\HasChildren"], "trash"),
        (["\\sent"], "sent"),
        (["\\All"], "custom"),
        (["\\Archive"], "custom"),
        (["\\Flagged"], "custom"),
        (["\\HasNoChildren"], "custom"),
    ],
)
def test_special_use_attributes(attributes, expected):
    assert folder_type("Whatever", attributes, "/") == expected


def test_attributes_win_over_names():
    assert folder_type("Sent", ["\\Trash"], "/") == "trash"
    assert folder_type("[Gmail]/All Mail", ["\\All", "\\HasNoChildren"], "/") == "custom"
    assert folder_type("Trash", ["\\Archive"], "/") == "custom"


@pytest.mark.parametrize(
    ("name", "delimiter", "expected"),
    [
        ("Sent", "/", "sent"),
        ("Sent Items", "/", "sent"),
        ("SENT MAIL", "/", "sent"),
        ("[Gmail]/Sent Mail", "/", "sent"),
        ("[Google Mail]/Gesendet", "/", "sent"),
        ("INBOX.Sent", ".", "sent"),
        ("Gesendet", ".", "sent"),
        ("Gesendete Elemente", "/", "sent"),
        ("Envoy&AOk-s", "/", "sent"),
        ("&AMk-l&AOk-ments envoy&AOk-s", "/", "sent"),
        ("Elementos enviados", "/", "sent"),
        ("Drafts", "/", "drafts"),
        ("INBOX.Drafts", ".", "drafts"),
        ("Entw&APw-rfe", "/", "drafts"),
        ("Brouillons", "/", "drafts"),
        ("Borradores", "/", "drafts"),
        ("Junk", "/", "spam"),
        ("Spam", "/", "spam"),
        ("Junk E-mail", "/", "spam"),
        ("Bulk Mail", "/", "spam"),
        ("[Gmail]/Spam", "/", "spam"),
        ("Courrier ind&AOk-sirable", "/", "spam"),
        ("Trash", "/", "trash"),
        ("Deleted Items", "/", "trash"),
        ("Deleted Messages", "/", "trash"),
        ("[Gmail]/Trash", "/", "trash"),
        ("Papierkorb", "/", "trash"),
        ("Corbeille", "/", "trash"),
        ("Papelera", "/", "trash"),
        ("Cestino", "/", "trash"),
        ("&BBoEPgRABDcEOAQ9BDA-", "/", "trash"),
        ("[Gmail]/Sent Mail", None, "sent"),
        ("Projects", "/", "custom"),
        ("Sent/Archive 2023", "/", "custom"),
        ("Unsent ideas", "/", "custom"),
    ],
)
def test_names_as_fallback(name, delimiter, expected):
    assert folder_type(name, ["\\HasNoChildren"], delimiter) == expected


# --- display and parent names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "delimiter", "expected"),
    [
        ("INBOX", "/", "Inbox"),
        ("inbox", None, "Inbox"),
        ("[Gmail]/Sent Mail", "/", "Sent Mail"),
        ("INBOX.Entw&APw-rfe", ".", "Entwürfe"),
        ("~peter/mail/&U,BTFw-/&ZeVnLIqe-", "/", "日本語"),
        ("Tom &- Jerry", "/", "Tom & Jerry"),
        ("a/b", None, "a/b"),
        ("Projects/", "/", "Projects"),
    ],
)
def test_display_name(name, delimiter, expected):
    assert display_name(name, delimiter) == expected


@pytest.mark.parametrize(
    ("name", "delimiter", "expected"),
    [
        ("INBOX", "/", None),
        ("[Gmail]/Sent Mail", "/", "[Gmail]"),
        ("INBOX.Work.Clients", ".", "INBOX.Work"),
        ("~peter/mail/&U,BTFw-/&ZeVnLIqe-", "/", "~peter/mail/&U,BTFw-"),
        ("a/b", None, None),
        ("a/b", "", None),
        ("/top", "/", None),
        ("Projects/", "/", None),
    ],
)
def test_parent_name(name, delimiter, expected):
    assert parent_name(name, delimiter) == expected


# --- LIST responses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'(\\HasNoChildren \\Sent) "/" "Sent"', (("\\HasNoChildren", "\\Sent"), "/", "Sent")),
        (b'(\\HasNoChildren) "/" INBOX', (("\\HasNoChildren",), "/", "INBOX")),
        (b'() "." "INBOX.Sent Items"', ((), ".", "INBOX.Sent Items")),
        (b'(\\Noselect) NIL ""', (("\\Noselect",), None, "")),
        (b'(\\HasNoChildren) NIL "Flat"', (("\\HasNoChildren",), None, "Flat")),
        (b'(\\HasNoChildren) "\\\\" "Work\\\\Clients"', (("\\HasNoChildren",), "\\", "Work\\Clients")),
        (b'(\\HasNoChildren) "/" "Say \\"hi\\""', (("\\HasNoChildren",), "/", 'Say "hi"')),
        (b'(\\HasChildren \\Noselect) "/" "[Gmail]"', (("\\HasChildren", "\\Noselect"), "/", "[Gmail]")),
        (b'* LIST (\\Drafts) "/" "Entw&APw-rfe"', (("\\Drafts",), "/", "Entw&APw-rfe")),
        (b'* LSUB () "/" Archive', ((), "/", "Archive")),
        (b'(\\Subscribed) "/" "Inbox" ("CHILDINFO" ("SUBSCRIBED"))', (("\\Subscribed",), "/", "Inbox")),
        (b'(\\HasNoChildren) "/" Archive ("CHILDINFO" ("SUBSCRIBED"))', (("\\HasNoChildren",), "/", "Archive")),
        ('(\\Trash) "/" "Papierkorb"', (("\\Trash",), "/", "Papierkorb")),
        (b'(\\HasNoChildren) "/" {10}\r\nSent Items', (("\\HasNoChildren",), "/", "Sent Items")),
    ],
)
def test_parse_list_lines(line, expected):
    entry = parse_list_response(line)
    assert isinstance(entry, ListEntry)
    assert tuple(entry) == expected
    assert (entry.attributes, entry.delimiter, entry.name) == expected


def test_parse_list_literal_as_imaplib_returns_it():
    entry = parse_list_response((b'(\\HasNoChildren \\Junk) "/" {14}', b'Junk "Mail" &-'))
    assert entry == ListEntry(("\\HasNoChildren", "\\Junk"), "/", 'Junk "Mail" &-')
    assert folder_type(entry.name, entry.attributes, entry.delimiter) == "spam"
    assert display_name(entry.name, entry.delimiter) == 'Junk "Mail" &'


@pytest.mark.parametrize(
    "line",
    [b"", b"garbage", b'(\\HasNoChildren) "/', b'(\\HasNoChildren) "/" "unterminated', b"(\\X) / INBOX", b"(\\X) {3}"],
)
def test_parse_list_rejects_garbage(line):
    with pytest.raises(ValueError, match="LIST|quoted"):
        parse_list_response(line)


def test_parse_list_line_is_lenient():
    assert parse_list_line(b"garbage") is None
    assert parse_list_line(b")") is None
    assert parse_list_line(b'(\\HasNoChildren) "/" "Sent"') == ListEntry(("\\HasNoChildren",), "/", "Sent")
    assert parse_list_line((b'() "/" {5}', b"Inbox")) == ListEntry((), "/", "Inbox")


def test_list_then_classify():
    lines = [
        b'(\\HasNoChildren) "/" "INBOX"',
        b'(\\HasNoChildren \\Sent) "/" "[Gmail]/Sent Mail"',
        b'(\\HasNoChildren \\Junk) "/" "[Gmail]/Spam"',
        b'(\\HasNoChildren) "/" "Entw&APw-rfe"',
        b'(\\HasNoChildren) "/" "Work/Clients"',
    ]
    entries = [parse_list_response(line) for line in lines]
    assert [folder_type(e.name, e.attributes, e.delimiter) for e in entries] == [
        "inbox",
        "sent",
        "spam",
        "drafts",
        "custom",
    ]
    assert [display_name(e.name, e.delimiter) for e in entries] == ["Inbox", "Sent Mail", "Spam", "Entwürfe", "Clients"]
    assert [parent_name(e.name, e.delimiter) for e in entries] == [None, "[Gmail]", "[Gmail]", None, "Work"]


# --- roles across one account -------------------------------------------------------------------


def roles(*lines: bytes) -> dict[str, str]:
    entries = [parse_list_response(line) for line in lines]
    return {entry.name: kind for entry, kind in zip(entries, assign_roles(entries), strict=True)}


def test_announced_role_wins_over_localised_names_and_noselect_takes_none():
    # A German mailbox as a real user's looks: the server marks Drafts, "Entwürfe" is only a
    # hierarchy node above "Entwürfe/Ärger". Only Drafts is the drafts folder.
    found = roles(
        b'(\\HasNoChildren) "/" INBOX',
        b'(\\HasNoChildren \\Drafts) "/" Drafts',
        b'(\\Noselect \\HasChildren) "/" "Entw&APw-rfe"',
        b'(\\HasNoChildren) "/" "Entw&APw-rfe/&AMQ-rger"',
        b'(\\HasNoChildren \\Sent) "/" Sent',
    )
    assert found == {
        "INBOX": "inbox",
        "Drafts": "drafts",
        "Entw&APw-rfe": "custom",
        "Entw&APw-rfe/&AMQ-rger": "custom",
        "Sent": "sent",
    }


def test_a_noselect_folder_never_takes_a_role_by_name():
    assert folder_type("Entw&APw-rfe", ["\\Noselect", "\\HasChildren"], "/") == "custom"
    assert roles(b'(\\Noselect) "/" Trash', b'(\\HasNoChildren) "/" "Trash/Old"')["Trash"] == "custom"


def test_names_decide_roles_the_server_did_not_announce():
    found = roles(
        b'(\\HasNoChildren) "/" INBOX',
        b'(\\HasNoChildren \\Sent) "/" "Gesendete Objekte"',
        b'(\\HasNoChildren) "/" Sent',  # \\Sent is announced elsewhere: this one is a plain folder
        b'(\\HasNoChildren) "/" Papierkorb',  # no \\Trash anywhere: the name decides
    )
    assert found["Gesendete Objekte"] == "sent"
    assert found["Sent"] == "custom"
    assert found["Papierkorb"] == "trash"


@pytest.mark.parametrize(
    ("drafts", "sent", "trash", "spam"),
    [
        ("Drafts", "Sent Items", "Deleted Items", "Junk E-mail"),  # English
        ("Entwürfe", "Gesendet", "Papierkorb", "Spamverdacht"),  # German
        ("Brouillons", "Éléments envoyés", "Corbeille", "Courrier indésirable"),  # French
        ("Borradores", "Enviados", "Papelera", "Correo no deseado"),  # Spanish
        ("Bozze", "Posta inviata", "Cestino", "Posta indesiderata"),  # Italian
        ("Concepten", "Verzonden items", "Prullenbak", "Ongewenste e-mail"),  # Dutch
        ("Rascunhos", "Itens enviados", "Lixeira", "Lixo eletrônico"),  # Portuguese
        ("Черновики", "Отправленные", "Корзина", "Спам"),  # Russian
        ("草稿箱", "已发送", "已删除", "垃圾邮件"),  # Chinese
        ("下書き", "送信済み", "ゴミ箱", "迷惑メール"),  # Japanese
    ],
)
def test_localised_names_without_special_use(drafts, sent, trash, spam):
    found = roles(
        b'(\\HasNoChildren) "." INBOX',
        *(f'(\\HasNoChildren) "." "{encode_mailbox_name(name)}"'.encode() for name in (drafts, sent, trash, spam)),
    )
    named = [found[encode_mailbox_name(name)] for name in (drafts, sent, trash, spam)]
    assert named == ["drafts", "sent", "trash", "spam"]


def test_one_folder_per_role_chosen_the_same_whatever_the_listing_order():
    lines = [
        b'(\\HasNoChildren) "/" INBOX',
        b'(\\HasNoChildren) "/" "Archive/Trash"',
        b'(\\HasNoChildren) "/" Papierkorb',
        b'(\\HasNoChildren) "/" Trash',
        b'(\\HasNoChildren \\Drafts) "/" "Work/Drafts"',
        b'(\\HasNoChildren \\Drafts) "/" Drafts',
    ]
    first = roles(*lines)
    assert [name for name, kind in first.items() if kind == "trash"] == ["Trash"]
    assert [name for name, kind in first.items() if kind == "drafts"] == ["Drafts"]
    assert roles(*reversed(lines)) == first
