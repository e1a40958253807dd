"""IMAP client used by sync.

This uses the standard library's ``imaplib``, not ``imaplib2``. imaplib2 3.6 takes no
``ssl.SSLContext``: without ``ca_certs`` it verifies nothing, with it it checks the chain but not
the host name, and its ``starttls()`` was seen to hang until the server's timeout. A service that
logs in with users' passwords must verify chain and host name on every connection and must not
hang, and ``imaplib`` does both (an ``SSLContext`` for implicit TLS and STARTTLS, and a socket
timeout on every read).
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from email_service.oauth2 import sasl
from email_service.protocols.connect import imap_client
from email_service.protocols.errors import AuthenticationFailed, ConnectionFailed, MailServerError, describe, reply_line
from email_service.protocols.session import MailSession
from email_service.protocols.tls import client_context

_STATUS_ITEM = re.compile(rb"(MESSAGES|UIDNEXT|UIDVALIDITY|UNSEEN|HIGHESTMODSEQ) (\d+)")
_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_MODSEQ = re.compile(rb"\bMODSEQ \((\d+)\)")
_INTERNALDATE = re.compile(rb'\bINTERNALDATE "([^"]+)"')
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


@dataclass(frozen=True)
class MailboxState:
    uidvalidity: int
    uidnext: int | None
    highestmodseq: int | None
    messages: int
    unseen: int | None = None


@dataclass(frozen=True)
class FetchedMessage:
    uid: int
    flags: tuple[str, ...]
    internaldate: datetime | None
    modseq: int | None
    raw: bytes


def quote(name: str) -> str:
    """A mailbox name as an IMAP quoted string (names may hold spaces, quotes, backslashes)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quotable(text: str) -> bool:
    """Whether ``text`` can be sent as an IMAP quoted string: 7-bit, without CR, LF or NUL (RFC 3501 9)."""
    return text.isascii() and not any(char in text for char in "\r\n\0")


def login_pieces(username: str, password: str) -> list[bytes]:
    """LOGIN's arguments as sent: the first piece on the command line, each further one after a "+".

    Each argument goes as a quoted string, escaped (a user name such as ``DOMAIN\\user`` or one with a
    space or '"' is one argument, not a BAD command); one that cannot be quoted (non-ASCII) goes
    as a literal ``{n}`` of its UTF-8 bytes (RFC 6855), sent after the server's continuation.
    """
    pieces = [b""]
    for value in (username, password):
        if quotable(value):
            pieces[-1] += b" " + quote(value).encode("ascii")
        else:
            data = value.encode("utf-8")
            pieces[-1] += b" {%d}" % len(data)
            pieces.append(data)
    pieces[0] = pieces[0].lstrip(b" ")
    return pieces


def plain_credentials(username: str, password: str) -> bytes:
    """The RFC 4616 PLAIN message in UTF-8: no authorization identity, the user name, the password."""
    return b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")


def use_plain(username: str, password: str, capabilities: Iterable[str]) -> bool:
    """Whether to log in with AUTHENTICATE PLAIN rather than LOGIN.

    Only for credentials that cannot be quoted, and only where the server offers PLAIN: PLAIN
    carries UTF-8 by definition (RFC 4616, as RFC 6855 advises for non-ASCII credentials), while
    how a server reads non-ASCII in LOGIN is up to it. Everything else keeps LOGIN, which every
    server takes.
    """
    return not (quotable(username) and quotable(password)) and "AUTH=PLAIN" in capabilities


def uid_set(uids: Sequence[int]) -> str:
    """Compact sequence set ("1:5,9,12:13") so a large batch stays a short command."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)


def expand_uid_set(text: bytes | str) -> list[int]:
    """The UIDs of a sequence set as a server writes it ("4:6,9" -> [4, 5, 6, 9]), in its order.

    Raises ValueError for anything else, and for a range far larger than a reply can mean.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii")
    uids: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition(":")
        # "6:4" is the same range as "4:6" (RFC 3501 9, seq-range).
        start, end = sorted((int(first), int(last or first)))
        if end - start > 1_000_000:
            raise ValueError("UID range too large")
        uids.extend(range(start, end + 1))
    return uids


class ImapSession(MailSession):
    """One logged-in connection; every failure surfaces as ``MailServerError`` with a readable message."""

    capabilities: frozenset[str] = frozenset()

    def _open(self) -> None:
        context = client_context(self.ca_file)
        conn = imap_client(
            self.host,
            self.port,
            tls=self.encryption == "tls",
            context=context,
            timeout=self.timeout,
            policy=self.destinations,
        )
        self._conn = conn  # set at once, so a failure below still closes the socket
        if self.encryption == "starttls":
            if "STARTTLS" not in conn.capabilities:
                raise MailServerError(f"{self.host}:{self.port} does not offer STARTTLS")
            conn.starttls(ssl_context=context)
        if self.token_source is not None:
            self._oauth2_login(lambda token: self._authenticate(conn, token))
        else:
            self._login(conn)
        typ, data = conn.capability()
        self.capabilities = frozenset(data[0].decode().upper().split()) if typ == "OK" and data else frozenset()
        if "CONDSTORE" in self.capabilities:
            conn.enable("CONDSTORE")

    def _login(self, conn: imaplib.IMAP4) -> None:
        """Log in with the password; raises ``AuthenticationFailed`` when the server refuses.

        Not imaplib's login(): it sends the user name unquoted (a space, '"' or '\\' in it makes
        the command BAD) and encodes as ASCII (a non-ASCII password raised UnicodeEncodeError).
        """
        refused = AuthenticationFailed(f"authentication failed for {self.username} at {self.host}")
        try:
            if use_plain(self.username, self._password, conn.capabilities):
                answers = iter([plain_credentials(self.username, self._password)])
                # A second challenge gets None, which imaplib sends as "*": the exchange is cancelled.
                conn.authenticate("PLAIN", lambda _challenge: next(answers, None))
                return
            pieces = login_pieces(self.username, self._password)
            if len(pieces) > 1:
                # imaplib sends what a bound method returns after each continuation, then CRLF.
                conn.literal = _Continuations(pieces[1:]).next
            typ, _ = conn._simple_command("LOGIN", pieces[0])  # noqa: SLF001 - login() cannot quote
        except imaplib.IMAP4.error:
            raise refused from None
        if typ != "OK":
            raise refused
        conn.state = "AUTH"  # what imaplib's login() would set

    def _authenticate(self, conn: imaplib.IMAP4, token: str) -> bool:
        """SASL with the bearer token; False when the server refused it."""
        offered = {c.split("=", 1)[1] for c in conn.capabilities if c.startswith("AUTH=")}
        mechanism = sasl.choose(offered)
        answers = iter([sasl.initial_response(mechanism, self.username, token, self.host, self.port)])

        def respond(_challenge: bytes) -> bytes:
            # The first challenge gets the token; one after it carries the refusal's details
            # (RFC 7628 3.2.3), answered with an empty response so the server ends with NO.
            return next(answers, b"")

        try:
            conn.authenticate(mechanism, respond)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error:
            return False
        return True

    def _quit(self, conn: imaplib.IMAP4) -> None:
        conn.logout()

    @property
    def condstore(self) -> bool:
        return "CONDSTORE" in self.capabilities

    def _call(self, command: str, *args: str, refusals: list[str] | None = None) -> list:
        """A command's untagged data. A refusal raises; a NO, given ``refusals``, is noted there instead."""
        conn = self.conn
        try:
            if command == "UID":
                typ, data = conn.uid(*args)
            else:
                # imaplib has no public call for LIST ... RETURN (...); its generic command path is used.
                typ, data = conn._simple_command(command, *args)
                typ, data = conn._untagged_response(typ, data, command)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None
        if typ != "OK":
            if typ == "NO" and refusals is not None:
                # A NO may come after data (RFC 3501 7.1.2: Gmail's "Some messages could not be
                # FETCHed"): the reason is noted, and what the server did send is the answer.
                refusals.append(reply_line(data[0] if data and isinstance(data[0], bytes) else typ))
                untagged = "FETCH" if command == "UID" and args[0].upper() == "FETCH" else command
                return conn.untagged_responses.pop(untagged, [])
            detail = reply_line(data[0] if data and isinstance(data[0], bytes) else typ)
            raise MailServerError(f"{self.host} refused {command} {reply_line(' '.join(args[:1]), 100)}: {detail}")
        return data

    def list_folders(self) -> list[bytes]:
        """Raw LIST lines; with SPECIAL-USE the server adds RFC 6154 attributes."""
        if "SPECIAL-USE" in self.capabilities:
            lines = self._call("LIST", '""', '"*"', "RETURN", "(SPECIAL-USE)")
        else:
            lines = self._call("LIST", '""', '"*"')
        return _join_literals(lines)

    def status(self, name: str) -> MailboxState:
        items = "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN" + (" HIGHESTMODSEQ)" if self.condstore else ")")
        data = self._call("STATUS", quote(name), items)
        values = {key.decode(): int(value) for key, value in _STATUS_ITEM.findall(b" ".join(_flatten(data)))}
        return MailboxState(
            uidvalidity=values["UIDVALIDITY"],
            uidnext=values.get("UIDNEXT"),
            highestmodseq=values.get("HIGHESTMODSEQ"),
            messages=values.get("MESSAGES", 0),
            unseen=values.get("UNSEEN"),
        )

    def examine(self, name: str) -> MailboxState:
        """Open a folder read-only, so syncing never changes what other clients see (\\Recent, \\Seen)."""
        conn = self.conn
        try:
            typ, data = conn.select(quote(name), readonly=True)
        except Exception as exc:  # noqa: BLE001
            raise describe(exc, self.host, self.port) from None
        if typ != "OK":
            raise MailServerError(f"{self.host} cannot open folder {reply_line(name, 100)}")
        codes = conn.untagged_responses

        def code(key: str) -> int | None:
            values = codes.get(key)
            return int(values[-1]) if values and values[-1] is not None else None

        return MailboxState(
            uidvalidity=code("UIDVALIDITY") or 0,
            uidnext=code("UIDNEXT"),
            highestmodseq=code("HIGHESTMODSEQ"),
            messages=int(data[0]) if data and data[0] else 0,
        )

    def select(self, name: str) -> MailboxState:
        """Open a folder read-write, for writing changes back."""
        conn = self.conn
        try:
            typ, data = conn.select(quote(name))
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None
        if typ != "OK":
            raise MailServerError(f"{self.host} cannot open folder {reply_line(name, 100)}")
        uidvalidity = conn.untagged_responses.get("UIDVALIDITY", [None])[-1]
        return MailboxState(
            uidvalidity=int(uidvalidity or 0),
            uidnext=None,
            highestmodseq=None,
            messages=int(data[0]) if data and data[0] else 0,
        )

    @property
    def gmail(self) -> bool:
        """Gmail's IMAP extensions (it files sent mail in Sent itself)."""
        return "X-GM-EXT-1" in self.capabilities

    def store(self, uid: int, *, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
        """Add and remove flags on one message, leaving every other flag as it is."""
        if add:
            self._call("UID", "STORE", str(uid), "+FLAGS.SILENT", f"({' '.join(add)})")
        if remove:
            self._call("UID", "STORE", str(uid), "-FLAGS.SILENT", f"({' '.join(remove)})")

    def move(self, uid: int, target: str) -> int | None:
        """Move one message (from the selected folder); returns its UID in ``target`` when the server says."""
        return self.move_uids([uid], target).get(uid)

    def move_uids(self, uids: Sequence[int], target: str) -> dict[int, int]:
        """Move messages from the selected folder to ``target``: UID MOVE (RFC 6851) where offered,
        else COPY, ``\\Deleted`` and UID EXPUNGE (RFC 4315). Returns old UID -> UID in ``target``
        for the messages the server reported (COPYUID); a server without UIDPLUS reports none.
        """
        if not uids:
            return {}
        self.conn.untagged_responses.pop("COPYUID", None)
        if "MOVE" in self.capabilities:
            self._call("UID", "MOVE", uid_set(uids), quote(target))
        else:
            self._call("UID", "COPY", uid_set(uids), quote(target))
            self.expunge_uids(uids)
        # The new UIDs arrive as [COPYUID uidvalidity old-set new-set]: untagged with MOVE, in
        # the tagged reply with COPY (imaplib keeps both among the untagged responses).
        moved: dict[int, int] = {}
        for code in self.conn.untagged_responses.pop("COPYUID", None) or []:
            parts = code.split() if isinstance(code, bytes) else []
            if len(parts) == 3:
                try:
                    moved.update(zip(expand_uid_set(parts[1]), expand_uid_set(parts[2]), strict=True))
                except ValueError:
                    continue  # a reply that does not parse tells nothing; the next sync finds the messages
        return moved

    def expunge_uids(self, uids: Sequence[int]) -> None:
        """Remove messages from the selected folder for good.

        With UIDPLUS only these UIDs go; without it EXPUNGE also removes whatever else another
        client marked ``\\Deleted`` in this folder, which is what that mark asks for.
        """
        if not uids:
            return
        self._call("UID", "STORE", uid_set(uids), "+FLAGS.SILENT", "(\\Deleted)")
        if "UIDPLUS" in self.capabilities:
            self._call("UID", "EXPUNGE", uid_set(uids))
        else:
            self._call("EXPUNGE")

    def create_folder(self, name: str, use: str | None = None) -> None:
        """CREATE a folder; ``use`` (an RFC 6154 attribute such as ``\\Drafts``) is passed on
        as ``CREATE name (USE (...))`` where the server offers CREATE-SPECIAL-USE."""
        if use and "CREATE-SPECIAL-USE" in self.capabilities:
            self._call("CREATE", quote(name), f"(USE ({use}))")
        else:
            self._call("CREATE", quote(name))
        try:
            self._call("SUBSCRIBE", quote(name))
        except ConnectionFailed:
            raise
        except MailServerError:
            pass  # created all the same; subscriptions only matter to other clients' folder lists

    def rename_folder(self, name: str, new_name: str) -> None:
        """RENAME a folder; its children move with it (RFC 3501 6.3.5)."""
        self._call("RENAME", quote(name), quote(new_name))

    def delete_folder(self, name: str) -> None:
        self._call("DELETE", quote(name))

    def ensure_folder(self, name: str, use: str | None = None) -> None:
        """Create a folder unless it exists (an existing one makes CREATE fail, which is fine here)."""
        try:
            self.create_folder(name, use)
        except ConnectionFailed:
            raise
        except MailServerError:
            pass

    def append(self, name: str, data: bytes, flags: Sequence[str], date: datetime) -> tuple[int, int] | None:
        """APPEND a message; returns (UIDVALIDITY, UID) when the server reports them (RFC 4315 APPENDUID)."""
        conn = self.conn
        try:
            typ, response = conn.append(quote(name), f"({' '.join(flags)})", imaplib.Time2Internaldate(date), data)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None
        if typ != "OK":
            raise MailServerError(f"{self.host} refused to store the message in {reply_line(name, 100)}")
        found = re.search(rb"APPENDUID (\d+) (\d+)", response[0] or b"") if response else None
        return (int(found.group(1)), int(found.group(2))) if found else None

    def find_message_id(self, name: str, message_id: str) -> tuple[int, int] | None:
        """(UIDVALIDITY, UID) of the newest message in folder ``name`` whose Message-ID is
        ``message_id``, as APPENDUID gives them; None when the folder has none."""
        if not quotable(message_id):
            return None
        state = self.examine(name)
        found = self.search_uids(f"HEADER Message-ID {quote(message_id)}")
        return (state.uidvalidity, found[-1]) if found else None

    def search_uids(self, criteria: str = "ALL") -> list[int]:
        data = self._call("UID", "SEARCH", criteria)
        return sorted(int(uid) for uid in b" ".join(d for d in data if d).split())

    def uids_from(self, first_uid: int) -> list[int]:
        # "n:*" also matches the highest UID when every UID is below n (RFC 3501), hence the filter.
        return [uid for uid in self.search_uids(f"UID {first_uid}:*") if uid >= first_uid]

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        if not uids:
            return {}
        result = {}
        for line in _flatten(self._call("UID", "FETCH", uid_set(uids), "(UID RFC822.SIZE)")):
            uid, size = _UID.search(line), _SIZE.search(line)
            if uid and size:
                result[int(uid.group(1))] = int(size.group(1))
        return result

    def fetch_messages(
        self, uids: Sequence[int], *, refusals: list[str] | None = None, headers_only: bool = False
    ) -> Iterator[FetchedMessage]:
        """Whole messages (or their header sections alone), without setting \\Seen (BODY.PEEK).

        With ``refusals``, a server that answers NO after sending some of them (a message it
        cannot read, one expunged meanwhile) gives those, and its reason is added to the list.
        """
        if not uids:
            return
        section = "BODY.PEEK[HEADER]" if headers_only else "BODY.PEEK[]"
        items = f"(UID FLAGS INTERNALDATE {section}" + (" MODSEQ)" if self.condstore else ")")
        data = self._call("UID", "FETCH", uid_set(uids), items, refusals=refusals)
        for meta, raw in _fetch_records(data):
            uid = _UID.search(meta)
            if uid is None:
                continue
            date = _INTERNALDATE.search(meta)
            modseq = _MODSEQ.search(meta)
            yield FetchedMessage(
                uid=int(uid.group(1)),
                flags=_parse_flags(meta),
                internaldate=_internaldate(date.group(1)) if date else None,
                modseq=int(modseq.group(1)) if modseq else None,
                raw=raw,
            )

    def flags(self, uids: str, changed_since: int | None = None) -> dict[int, tuple[tuple[str, ...], int | None]]:
        """UID -> (flags, modseq) for ``uids`` (a sequence set), only those changed since a MODSEQ if given."""
        items = "(UID FLAGS)"
        if changed_since is not None:
            items += f" (CHANGEDSINCE {changed_since})"
        result = {}
        for line in _flatten(self._call("UID", "FETCH", uids, items)):
            uid = _UID.search(line)
            if uid:
                modseq = _MODSEQ.search(line)
                result[int(uid.group(1))] = (_parse_flags(line), int(modseq.group(1)) if modseq else None)
        return result


class _Continuations:
    """The pieces of a command sent one per server continuation (imaplib's literal callback)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def next(self, _continuation: bytes) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def _flatten(data: list) -> list[bytes]:
    out = []
    for item in data:
        if isinstance(item, tuple):
            out.extend(part for part in item if isinstance(part, bytes))
        elif isinstance(item, bytes):
            out.append(item)
    return out


def _join_literals(data: list) -> list[bytes]:
    """LIST lines whose mailbox name came as a literal, put back into one line each.

    The name becomes a quoted string with backslashes escaped as well as quotes: the parser reads
    "\\x" as "x", which turned "Work\\Q1" into "WorkQ1" and left "C:\\" unparseable, and a folder
    missing from the list is removed with its messages.
    """
    lines = []
    for item in data:
        if isinstance(item, tuple):
            head, literal = item[0], item[1]
            escaped = literal.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            lines.append(re.sub(rb"\{\d+\}$", b"", head) + b'"' + escaped + b'"')
        elif isinstance(item, bytes) and item:
            lines.append(item)
    return lines


def _fetch_records(data: list) -> Iterator[tuple[bytes, bytes]]:
    """(everything but the literal, the literal) per FETCH response.

    imaplib hands a FETCH with a literal as (prefix, literal) followed by the rest of the line,
    so items that follow the body (UID, MODSEQ on some servers) sit in the next element.
    """
    pending: tuple[bytes, bytes] | None = None
    for item in data:
        if isinstance(item, tuple):
            if pending:
                yield pending
            pending = (item[0], item[1])
        elif isinstance(item, bytes) and pending is not None:
            yield pending[0] + b" " + item, pending[1]
            pending = None
    if pending:
        yield pending


def _parse_flags(line: bytes) -> tuple[str, ...]:
    found = _FLAGS.search(line)
    if not found:
        return ()
    return tuple(flag.decode("utf-8", "replace") for flag in found.group(1).split())


def _internaldate(value: bytes) -> datetime | None:
    try:
        return datetime.strptime(value.decode(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None
