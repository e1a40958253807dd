"""POP3 client used by sync: UIDL to tell what is new, RETR to download, never DELE.

LIST gives every message's size in one command, TOP n 0 the header section of one too large to download.
"""

from __future__ import annotations

import poplib
from typing import BinaryIO

from email_service.protocols.connect import MAX_FETCHED_MESSAGE, MAX_IMAP_LINE, pop3_client, size_words
from email_service.protocols.errors import AuthenticationFailed, MailServerError, describe
from email_service.protocols.session import MailSession
from email_service.protocols.tls import client_context

# poplib refuses any line over 2,048 bytes ("line too long"), and unwrapped HTML or base64 mail
# has longer ones: as messages come in server order, one such message stopped every sync at the
# same place. Message lines are read here up to the IMAP side's generous cap instead.
MAX_POP3_LINE = MAX_IMAP_LINE
# The most of one message held in memory (a server announces no size it must keep to).
MAX_POP3_MESSAGE = MAX_FETCHED_MESSAGE


class MessageTooLarge(MailServerError):
    """One message is over the limits above; it was read to its end, so the session goes on.

    ``size`` is how large it was as read, all of it: a server's LIST may give another.
    """

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class Pop3Session(MailSession):
    def _open(self) -> None:
        if self.token_source is not None:
            # Refused when the account is made; kept here so no path logs in with an empty password.
            raise MailServerError("OAuth2 accounts use IMAP; POP3 logins with OAuth2 are not supported")
        context = client_context(self.ca_file)
        conn = pop3_client(
            self.host,
            self.port,
            tls=self.encryption == "tls",
            context=context,
            timeout=self.timeout,
            policy=self.destinations,
        )
        self._conn = conn  # set at once, so a failure below still closes the socket
        if self.encryption == "starttls":
            conn.stls(context=context)
        try:
            conn.user(self.username)
            conn.pass_(self._password)
        except poplib.error_proto:
            raise AuthenticationFailed(f"authentication failed for {self.username} at {self.host}") from None

    def _quit(self, conn: poplib.POP3) -> None:
        # QUIT without DELE leaves every message on the server; after DELE it deletes those.
        conn.quit()

    def uidls(self) -> dict[str, int]:
        """UIDL -> message number for every message in the maildrop."""
        try:
            _, lines, _ = self.conn.uidl()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None
        result = {}
        for line in lines:
            number, _, uidl = line.decode("utf-8", "replace").partition(" ")
            result[uidl.strip()] = int(number)
        return result

    def sizes(self) -> dict[int, int]:
        """Message number -> size in octets for every message, as the server's LIST says (one command)."""
        try:
            _, lines, _ = self.conn.list()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None
        result = {}
        for line in lines:
            fields = line.split()
            # A line that is not two numbers leaves that size unknown: RETR's own guard still holds.
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                result[int(fields[0])] = int(fields[1])
        return result

    def delete(self, number: int) -> None:
        """Mark a message for deletion; the server deletes it when the session ends with QUIT."""
        try:
            self.conn.dele(number)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None

    def quit(self) -> None:
        """End the session with QUIT, which makes the server delete what DELE marked; raises when it did not confirm."""
        conn, self._conn = self.conn, None
        try:
            conn.quit()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None

    def retrieve(self, number: int) -> bytes:
        """The whole message ``number`` with CRLF line ends; ``MessageTooLarge`` when over the limits."""
        return self._read_message(f"RETR {number}", number)

    def headers(self, number: int) -> bytes:
        """The header section of message ``number`` (TOP n 0), read within the same limits as RETR.

        TOP is optional (RFC 1939 7): a server without it answers -ERR, a ``MailServerError``
        that leaves the session usable.
        """
        return self._read_message(f"TOP {number} 0", number)

    def _read_message(self, command: str, number: int) -> bytes:
        conn = self.conn
        try:
            # poplib's retr() and top() read the message through its 2,048-byte line limit; only
            # the command and its status line (short by definition) go through poplib here.
            conn._putcmd(command)  # noqa: SLF001 - poplib has no public way to send a command alone
            conn._getresp()  # noqa: SLF001 - raises error_proto for -ERR
            raw, size = _read_multiline(conn.file)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None
        if raw is None:
            raise MessageTooLarge(
                f"message {number} at {self.host}:{self.port} is over {size_words(MAX_POP3_MESSAGE)} "
                f"or has a line over {size_words(MAX_POP3_LINE)}; it was not downloaded",
                size,
            )
        return raw


def _read_multiline(file: BinaryIO) -> tuple[bytes | None, int]:
    """A multi-line POP3 response up to its terminating ".", dots un-stuffed and lines ended with CRLF,
    and its size (what it is or would have been so, counted also when over the limits).

    None when a line or the whole is over the limits: the rest is still read (and dropped), so the
    next command's answer is not mistaken for part of this one and memory stays bounded.
    """
    data = bytearray()
    fits = True
    size = 0
    while True:
        line = file.readline(MAX_POP3_LINE + 1)
        if not line.endswith(b"\n"):
            if len(line) <= MAX_POP3_LINE:
                raise ConnectionAbortedError("connection closed")  # the server hung up mid-response
            fits = False
            data = bytearray()
            while line and not line.endswith(b"\n"):  # the rest of the over-long line
                size += len(line)
                line = file.readline(MAX_POP3_LINE + 1)
            if not line:
                raise ConnectionAbortedError("connection closed")
            size += len(line)
            continue
        # Servers end lines with CRLF, some with a bare LF; the stored message has CRLF throughout.
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if line == b".":
            return (bytes(data) if fits else None), size
        if line.startswith(b"."):
            line = line[1:]  # RFC 1939 3: a line starting with "." was sent with one more
        size += len(line) + 2
        if fits and size > MAX_POP3_MESSAGE:
            fits = False
            data = bytearray()
        if fits:
            data += line
            data += b"\r\n"
