"""Decoding bytes whose declared charset may be missing, wrong or made up."""

from __future__ import annotations

import codecs
import re

# Labels senders use for something else in practice (the WHATWG Encoding Standard makes the same
# substitutions): Latin-1 mail is almost always Windows-1252, GB2312 mail often uses GBK/GB18030
# characters, and Korean mail labelled KS C 5601 is CP949.
_SUPERSETS = {
    "ascii": "utf-8",
    "us-ascii": "utf-8",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso-8859-9": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "big5": "big5hkscs",
    "utf8": "utf-8",
    "x-unicode20utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
}

# Labels mail clients send that Python's codec registry does not know (taken from the WHATWG
# Encoding Standard and what Outlook, Apple Mail and older Unix mailers write). Without them the
# text was decoded by guesswork: Thai mail from Outlook ("windows-874") or Hebrew mail
# ("iso-8859-8-i") came out as Latin mojibake.
_ALIASES = {
    "windows-874": "cp874",
    "dos-874": "cp874",
    "iso-8859-6-i": "iso8859-6",
    "iso-8859-6-e": "iso8859-6",
    "iso-8859-8-i": "iso8859-8",
    "iso-8859-8-e": "iso8859-8",
    "iso_8859-8-i": "iso8859-8",
    "logical": "iso8859-8",
    "visual": "iso8859-8",
    "x-mac-roman": "mac-roman",
    "mac": "mac-roman",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-ukrainian": "mac-cyrillic",
    "x-mac-ce": "mac-latin2",
    "x-mac-greek": "mac-greek",
    "x-mac-turkish": "mac-turkish",
    "x-mac-icelandic": "mac-iceland",
    "x-euc-jp": "euc-jp",
    "windows-31j": "cp932",
    "csshiftjis": "cp932",
    "windows-949": "cp949",
    "x-windows-949": "cp949",
    "ks_c_5601-1989": "cp949",
    "ksc_5601": "cp949",
    "iso-ir-149": "cp949",
    "cseuckr": "cp949",
    "windows-936": "gb18030",
    "csgb2312": "gb18030",
    "gb_2312-80": "gb18030",
    "cn-gb": "gb18030",
    "x-euc-cn": "gb18030",
    "x-x-big5": "big5hkscs",
    "cn-big5": "big5hkscs",
    "koi": "koi8-r",
    "cp-850": "cp850",
    "cp-866": "cp866",
    "x-unicode-2-0-utf-7": "utf-7",
    "x-unicode-2-0-utf-8": "utf-8",
    # Microsoft's "Unicode" is UTF-16; the codec reads a byte order mark and defaults to little-endian.
    "unicode": "utf-16",
    "csunicode": "utf-16",
    "ucs-2": "utf-16",
    "iso-10646-ucs-2": "utf-16",
    "x-iso-10646-ucs-2-le": "utf-16-le",
    "x-iso-10646-ucs-2-be": "utf-16-be",
}
# "x-cp1250" and the like: Windows code pages under a private prefix.
_X_CODE_PAGE = re.compile(r"x-(cp|windows-)(\d{3,4})")

_SURROGATE = re.compile("[\ud800-\udfff]")

# Labels that name no charset at all: the bytes are whatever the sender's machine used.
_UNKNOWN = {"unknown-8bit", "x-unknown", "unknown", "default", "8bit", "x-user-defined", ""}


def resolve(label: str | None) -> str | None:
    """The Python codec for a MIME charset label, or None when it names no usable text codec."""
    if not label:
        return None
    name = label.strip().strip("\"'").lower()
    # RFC 2231 lets a charset carry a language suffix ("utf-8*en").
    name = name.split("*", 1)[0]
    if name in _UNKNOWN:
        return None
    name = _ALIASES.get(name, name)
    code_page = _X_CODE_PAGE.fullmatch(name)
    if code_page:
        name = "cp" + code_page.group(2)
    name = _SUPERSETS.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):  # ValueError: a NUL in the label
        return None
    # codecs.lookup also knows bytes-to-bytes codecs (base64, zlib, rot13); they are not charsets.
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def decode_bytes(data: bytes, label: str | None, defects: list[str] | None = None, where: str = "") -> str:
    """Decode ``data`` as text, best effort, never raising.

    The declared charset is tried first; when it is unknown or the bytes do not fit it, UTF-8 and
    then Windows-1252 are tried, which between them cover nearly all mislabelled mail. Anything
    left over is replaced with U+FFFD. Problems are appended to ``defects``.
    """
    prefix = f"{where}: " if where else ""
    codec = resolve(label)
    if label and codec is None and label.strip().lower() not in _UNKNOWN and defects is not None:
        defects.append(f"{prefix}unknown charset {label.strip()[:60]!r}")
    if codec is not None:
        try:
            return data.decode(codec)
        except (UnicodeError, LookupError, ValueError, TypeError):
            if defects is not None:
                defects.append(f"{prefix}bytes not valid in declared charset {label!r}")
    if codec != "utf-8":
        try:
            return data.decode("utf-8")
        except UnicodeError:
            pass
    damaged = _mostly_valid(data, codec or "utf-8")
    if damaged is not None:
        return damaged
    if codec != "cp1252":
        try:
            return data.decode("cp1252")
        except UnicodeError:
            pass
    if codec is not None:
        try:
            return data.decode(codec, errors="replace")
        except (UnicodeError, LookupError, ValueError, TypeError):
            pass
    return data.decode("utf-8", errors="replace")


def _mostly_valid(data: bytes, codec: str) -> str | None:
    """``data`` in ``codec`` with U+FFFD for the few bytes that do not fit; None if many do not.

    Text cut inside its last character (clients that truncate by bytes), or with a stray byte,
    is still that charset: mail clients show it with a replacement character. Decoding it all as
    Windows-1252 instead garbled every accent and every CJK character. When the bytes that fit
    are not clearly most of the non-ASCII text, the charset is wrong and None is returned.
    """
    try:
        # Only the end is incomplete (everything before it decodes): one bad character.
        text, bad = codecs.getincrementaldecoder(codec)().decode(data, final=False) + "\ufffd", 1
    except (UnicodeError, LookupError, ValueError, TypeError):
        try:
            text = data.decode(codec, errors="replace")
        except (UnicodeError, LookupError, ValueError, TypeError):
            return None
        bad = text.count("\ufffd")
    good = len(text) - len(text.encode("ascii", "ignore")) - bad
    # Valid UTF-8 sequences almost never occur in text of another charset; valid characters of a
    # legacy multi-byte charset (GB18030, Shift_JIS...) often do, so those need a clearer majority.
    factor = 2 if codec == "utf-8" else 8
    return text if good > 0 and good >= factor * bad else None


def fix_surrogates(text: str) -> str:
    """Turn surrogate-escaped raw bytes (as the email parser leaves 8-bit header bytes) into text.

    Runs of escaped bytes are decoded as UTF-8 when valid (modern clients send raw UTF-8 headers),
    otherwise as Windows-1252. Any other lone surrogate becomes U+FFFD so the result can be
    encoded to UTF-8 and JSON.
    """
    if _SURROGATE.search(text) is None:
        return text
    try:
        # A value of ASCII and escaped bytes (a raw 8-bit header) is decoded as a whole, so one
        # charset is chosen for all of it and a damaged character does not decide it alone.
        raw = text.encode("ascii", "surrogateescape")
    except UnicodeError:
        raw = None
    if raw is not None:
        return decode_bytes(raw, None)
    out: list[str] = []
    run = bytearray()

    def flush() -> None:
        if run:
            out.append(decode_bytes(bytes(run), None))
            run.clear()

    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            run.append(code - 0xDC00)
            continue
        flush()
        out.append("\ufffd" if 0xD800 <= code <= 0xDFFF else ch)
    flush()
    return "".join(out)
