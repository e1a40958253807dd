"""IMAP folders: their role (inbox, sent, ...), display names, parents and LIST responses."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from email_service.mail.utf7 import decode_mailbox_name

INBOX = "inbox"
SENT = "sent"
DRAFTS = "drafts"
SPAM = "spam"
TRASH = "trash"
CUSTOM = "custom"
FOLDER_TYPES = (INBOX, SENT, DRAFTS, SPAM, TRASH, CUSTOM)

# RFC 6154 SPECIAL-USE, plus the older Gmail XLIST names (\Spam, \AllMail, \Inbox, ...) that
# some servers still send. Roles the API has no type for stay custom.
_ATTRIBUTE_TYPES = {
    "\\sent": SENT,
    "\\drafts": DRAFTS,
    "\\junk": SPAM,
    "\\spam": SPAM,
    "\\trash": TRASH,
    "\\inbox": INBOX,
    "\\all": CUSTOM,
    "\\allmail": CUSTOM,
    "\\archive": CUSTOM,
    "\\flagged": CUSTOM,
    "\\starred": CUSTOM,
    "\\important": CUSTOM,
}

# Names servers and clients give these folders when the server does not announce SPECIAL-USE;
# compared case-folded against the last path component.
_NAMES: dict[str, tuple[str, ...]] = {
    SENT: (
        "sent", "sent items", "sent mail", "sent messages", "sent-mail", "sent e-mail", "sent email",
        "gesendet", "gesendete elemente", "gesendete objekte", "gesendete nachrichten",
        "envoyés", "envoyes", "éléments envoyés", "elements envoyes", "messages envoyés",
        "enviados", "elementos enviados", "correo enviado", "itens enviados", "mensagens enviadas",
        "inviata", "inviati", "posta inviata", "elementi inviati",
        "verzonden", "verzonden items", "verzonden berichten",
        "skickat", "skickade", "skickade objekt", "sendt", "sendte", "sendte elementer", "sendte objekter",
        "lähetetyt", "lähetetyt kohteet", "wysłane", "elementy wysłane", "odeslané", "odeslaná pošta",
        "elküldött", "elküldött elemek", "trimise", "gönderilmiş öğeler", "gönderilenler",
        "отправленные", "надіслані", "απεσταλμένα",
        "已发送", "已发送邮件", "已傳送", "寄件備份", "送信済み", "送信済みアイテム", "보낸편지함", "보낸 편지함",
    ),
    DRAFTS: (
        "drafts", "draft", "entwürfe", "entwurf", "brouillons", "brouillon", "borradores", "borrador",
        "rascunhos", "bozze", "concepten", "concept", "utkast", "kladder", "kladde", "luonnokset",
        "kopie robocze", "koncepty", "piszkozatok", "ciorne", "taslaklar",
        "черновики", "чернетки", "πρόχειρα", "草稿", "草稿箱", "下書き", "임시보관함", "임시 보관함",
    ),
    SPAM: (
        "junk", "spam", "junk e-mail", "junk email", "junk mail", "bulk mail", "bulk", "spamverdacht",
        "junk-e-mail", "unerwünscht", "courrier indésirable", "courrier indesirable", "indésirables",
        "pourriels", "pourriel", "correo no deseado", "no deseado", "lixo eletrônico", "lixo eletronico",
        "posta indesiderata", "indesiderata", "ongewenste e-mail", "ongewenst", "skräppost", "skräp",
        "uønsket e-post", "uønsket", "søppelpost", "roskaposti", "wiadomości-śmieci", "nevyžádaná pošta",
        "levélszemét", "спам", "нежелательная почта", "ανεπιθύμητα",
        "垃圾邮件", "垃圾郵件", "迷惑メール", "스팸", "스팸편지함", "스팸 편지함",
    ),
    TRASH: (
        "trash", "deleted items", "deleted messages", "deleted", "bin", "recycle bin", "rubbish",
        "papierkorb", "gelöschte elemente", "gelöschte objekte", "gelöscht",
        "corbeille", "éléments supprimés", "elements supprimes", "papelera", "elementos eliminados",
        "lixeira", "lixo", "itens excluídos", "cestino", "posta eliminata", "elementi eliminati",
        "prullenbak", "verwijderde items", "papperskorgen", "borttagna objekt", "papirkurv",
        "slettede elementer", "slettet", "roskakori", "poistetut", "kosz", "elementy usunięte", "koš",
        "odstraněná pošta", "törölt elemek", "çöp kutusu", "silinmiş öğeler",
        "корзина", "удаленные", "удалённые", "кошик", "κάδος απορριμμάτων",
        "已删除", "已删除邮件", "垃圾箱", "垃圾桶", "刪除的郵件", "ゴミ箱", "削除済みアイテム", "휴지통",
    ),
}  # fmt: skip
_NAME_TYPES = {
    unicodedata.normalize("NFC", name).casefold(): (kind, rank)
    for kind, names in _NAMES.items()
    for rank, name in enumerate(names)
}


def _normalise(component: str) -> str:
    return " ".join(unicodedata.normalize("NFC", component).casefold().split())


def _components(name: str, delimiter: str | None) -> list[str]:
    if not delimiter:
        return [name]
    return [part for part in name.split(delimiter) if part] or [name]


# A folder that cannot hold mail (a hierarchy node) never takes a role.
NOT_SELECTABLE = frozenset({"\\noselect", "\\nonexistent"})
ROLE_ATTRIBUTES = {SENT: "\\Sent", DRAFTS: "\\Drafts", SPAM: "\\Junk", TRASH: "\\Trash"}


def selectable(attributes: Iterable[str]) -> bool:
    return not ({str(a).strip().lower() for a in attributes or ()} & NOT_SELECTABLE)


def _attribute_type(attributes: Iterable[str]) -> str | None:
    """The role the server announced (SPECIAL-USE or XLIST), ``custom`` for a use the API has no
    type for (\\All, \\Archive, ...), None when it announced none."""
    for attribute in attributes or ():
        kind = _ATTRIBUTE_TYPES.get(str(attribute).strip().lower())
        if kind is not None:
            return kind
    return None


def _name_match(name: str, delimiter: str | None) -> tuple[str, int] | None:
    """(role, rank) for a well-known localised name; a lower rank is a more common name."""
    candidates = [_components(name, delimiter)[-1]]
    if not delimiter:
        # A flat listing can still carry a hierarchy in the name ("[Gmail]/Sent Mail", "INBOX.Sent").
        candidates.append(re.split(r"[/.]", name)[-1])
    for candidate in candidates:
        found = _NAME_TYPES.get(_normalise(decode_mailbox_name(candidate)))
        if found is not None:
            return found
    return None


def folder_type(name: str, attributes: Iterable[str] = (), delimiter: str | None = None) -> str:
    """One of ``inbox``, ``sent``, ``drafts``, ``spam``, ``trash``, ``custom``, for one folder alone.

    ``INBOX`` is special by RFC 3501 in any case; otherwise SPECIAL-USE attributes are trusted
    over names, and well-known names (in several languages) are the fallback for servers
    without SPECIAL-USE. A ``\\Noselect`` folder holds no mail and is always custom. Use
    ``assign_roles`` for a whole account: it also keeps each role to one folder.
    """
    if name.upper() == "INBOX":
        return INBOX
    if not selectable(attributes):
        return CUSTOM
    announced = _attribute_type(attributes)
    if announced is not None:
        return announced
    matched = _name_match(name, delimiter)
    return matched[0] if matched else CUSTOM


def assign_roles(entries: Sequence[ListEntry]) -> list[str]:
    """The type of each folder of one account (``entries`` as LIST gave them), one folder per role.

    The server's word decides: a role announced by SPECIAL-USE (RFC 6154) or XLIST goes to the
    folders it was announced on, and names decide a role only when no folder announced it (a
    server without SPECIAL-USE, or one that announces some roles only). Folders that cannot be
    selected take no role. Where several folders qualify, the choice does not depend on the
    order of the listing: a top-level folder first, then the more common name, then the name.
    """
    types = [CUSTOM] * len(entries)
    inbox = next((i for i, e in enumerate(entries) if e.name.upper() == "INBOX"), None)
    announced: dict[str, list[int]] = {}
    by_name: dict[str, list[tuple[int, int]]] = {}
    for index, entry in enumerate(entries):
        if index == inbox or not selectable(entry.attributes):
            continue
        kind = _attribute_type(entry.attributes)
        if kind is not None:
            if kind != CUSTOM and (kind != INBOX or inbox is None):
                announced.setdefault(kind, []).append(index)
            continue
        matched = _name_match(entry.name, entry.delimiter)
        if matched is not None:
            by_name.setdefault(matched[0], []).append((index, matched[1]))
    if inbox is not None:
        types[inbox] = INBOX

    def place(index: int, rank: int = 0) -> tuple[int, int, str]:
        entry = entries[index]
        return (len(_components(entry.name, entry.delimiter)), rank, entry.name)

    for kind in (INBOX, SENT, DRAFTS, SPAM, TRASH):
        if kind == INBOX and inbox is not None:
            continue
        if announced.get(kind):
            types[min(announced[kind], key=place)] = kind
        elif by_name.get(kind) and kind != INBOX:
            types[min(by_name[kind], key=lambda found: place(*found))[0]] = kind
    return types


def display_name(name: str, delimiter: str | None = None) -> str:
    """The last path component, decoded from modified UTF-7; ``INBOX`` is shown as ``Inbox``."""
    if name.upper() == "INBOX":
        return "Inbox"
    return decode_mailbox_name(_components(name, delimiter)[-1])


def parent_name(name: str, delimiter: str | None = None) -> str | None:
    """The raw (server) name of the parent folder, or None for a top-level folder."""
    if not delimiter:
        return None
    trimmed = name[: -len(delimiter)] if name.endswith(delimiter) and name != delimiter else name
    parent, separator, _leaf = trimmed.rpartition(delimiter)
    return parent if separator and parent else None


class ListEntry(NamedTuple):
    attributes: tuple[str, ...]
    delimiter: str | None
    name: str


_ATTRIBUTES = re.compile(r"\s*\(([^)]*)\)\s*")
_LITERAL = re.compile(r"\{(\d+)\+?\}")


def _text(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")  # UTF8=ACCEPT servers send raw UTF-8 names
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _quoted(text: str, start: int) -> tuple[str, int]:
    """The quoted string starting at ``text[start] == '"'`` and the index after it."""
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise ValueError("unterminated quoted string in LIST response")


def parse_list_response(line: bytes | str | tuple[bytes | str, bytes | str]) -> ListEntry:
    """Parse one LIST/LSUB response into (attributes, delimiter, raw name).

    Accepts what ``imaplib`` returns: a line such as ``(\\HasNoChildren) "/" "INBOX"``, with or
    without the ``* LIST`` prefix, or a ``(line, literal)`` tuple when the name came as a literal.
    The name is left in its server (modified UTF-7) form; use ``display_name`` to show it.
    Raises ``ValueError`` if the line is not a LIST response.
    """
    literal: str | None = None
    if isinstance(line, tuple):
        if len(line) != 2:
            raise ValueError("expected (line, literal)")
        line, literal = _text(line[0]), _text(line[1])
    text = _text(line).rstrip("\r\n")
    text = re.sub(r"^\*\s+(?:LIST|LSUB|XLIST)\s+", "", text, flags=re.IGNORECASE)
    match = _ATTRIBUTES.match(text)
    if not match:
        raise ValueError("LIST response without attribute list")
    attributes = tuple(match.group(1).split())
    rest = text[match.end() :]

    if rest[:3].upper() == "NIL":
        delimiter: str | None = None
        rest = rest[3:]
    elif rest.startswith('"'):
        delimiter, end = _quoted(rest, 0)
        rest = rest[end:]
        delimiter = delimiter or None
    else:
        raise ValueError("LIST response without hierarchy delimiter")
    rest = rest.lstrip(" ")

    literal_match = _LITERAL.match(rest)
    if literal_match:
        if literal is None:
            # The literal may have been left in the same string, after the CRLF; its size is in bytes.
            size = int(literal_match.group(1))
            after = re.sub(r"^\r?\n", "", rest[literal_match.end() :])
            if len(after.encode("utf-8")) < size:
                raise ValueError("LIST response literal missing or short")
            literal = after.encode("utf-8")[:size].decode("utf-8", errors="replace")
        name = literal
    elif rest.startswith('"'):
        name, _end = _quoted(rest, 0)
    elif rest:
        # An atom; LIST-EXTENDED data may follow it after a space.
        name = rest.split(" ", 1)[0]
    else:
        raise ValueError("LIST response without mailbox name")
    return ListEntry(attributes, delimiter, name)


def listed_once(entries: Iterable[ListEntry]) -> list[ListEntry]:
    """The entries with each mailbox once, as first listed.

    Some servers list a folder twice (and INBOX, which is one name in any case by RFC 3501 5.1,
    as "INBOX" and "Inbox"): a second listing is the same mailbox, not a folder of its own,
    and must not take the role the first was given, nor have its mail stored twice.
    """
    seen: set[str] = set()
    unique: list[ListEntry] = []
    for entry in entries:
        key = "INBOX" if entry.name.upper() == "INBOX" else entry.name
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique


def parse_list_line(line: bytes | str | tuple[bytes | str, bytes | str]) -> ListEntry | None:
    """Like ``parse_list_response``, but None for a line that is not a LIST response (for loops
    over everything ``imaplib`` returned, which may include stray continuation pieces)."""
    try:
        return parse_list_response(line)
    except ValueError:
        return None
