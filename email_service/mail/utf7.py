"""IMAP modified UTF-7 mailbox names (RFC 3501 section 5.1.3).

Printable ASCII stands for itself except ``&``, which is written ``&-``; everything else is
UTF-16BE, base64-encoded with ``,`` in place of ``/`` and no padding, between ``&`` and ``-``.
"""

from __future__ import annotations

import base64
import binascii


def _is_direct(ch: str) -> bool:
    return "\x20" <= ch <= "\x7e" and ch != "&"


def _encode_run(run: str) -> str:
    data = run.encode("utf-16-be")  # astral characters become surrogate pairs, as the RFC requires
    return "&" + base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") + "-"


def encode_mailbox_name(name: str) -> str:
    """The modified UTF-7 form of a mailbox name, as sent to the server."""
    out: list[str] = []
    run: list[str] = []
    for ch in name:
        if _is_direct(ch):
            if run:
                out.append(_encode_run("".join(run)))
                run.clear()
            out.append(ch)
        elif ch == "&":
            if run:
                out.append(_encode_run("".join(run)))
                run.clear()
            out.append("&-")
        else:
            run.append(ch)
    if run:
        out.append(_encode_run("".join(run)))
    return "".join(out)


class _Malformed(ValueError):
    pass


def _decode_run(encoded: str) -> str:
    if any(not (c.isascii() and (c.isalnum() or c in "+,")) for c in encoded):
        raise _Malformed(encoded)
    padded = encoded.replace(",", "/") + "=" * (-len(encoded) % 4)
    try:
        data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise _Malformed(encoded) from None
    if len(data) % 2:
        raise _Malformed(encoded)
    try:
        # Strict: a lone surrogate means the name was not produced by a modified UTF-7 encoder.
        return data.decode("utf-16-be")
    except UnicodeDecodeError:
        raise _Malformed(encoded) from None


def _decode(name: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise _Malformed(name)
        out.append("&" if end == i + 1 else _decode_run(name[i + 1 : end]))
        i = end + 1
    return "".join(out)


def decode_mailbox_name(name: str | bytes) -> str:
    """The Unicode form of a modified UTF-7 mailbox name.

    Never raises: a name that is not valid modified UTF-7 (a server that sends raw UTF-8, a stray
    ``&``) is returned as it came, decoded from UTF-8 when given as bytes.
    """
    if isinstance(name, bytes | bytearray):
        try:
            name = bytes(name).decode("ascii")
        except UnicodeDecodeError:
            return bytes(name).decode("utf-8", errors="replace")
    if not isinstance(name, str):
        return str(name)
    if "&" not in name or not name.isascii():
        return name
    try:
        return _decode(name)
    except _Malformed:
        return name
