"""Opening IMAP, POP3 and SMTP connections under the destination policy.

Each standard-library client normally resolves the host name itself (``socket.create_connection``).
The classes here replace only that step: the name is resolved once, every address is checked by
``destinations.resolve``, and the socket connects to an address that passed. TLS still verifies
the certificate against the host name the user gave (and sends it as SNI), never the address.

A server whose greeting is not the protocol's greeting (another service on that port) fails as
``UnexpectedGreeting``, so nothing it said reaches an error message.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl

from email_service.protocols.destinations import DestinationPolicy, resolve
from email_service.protocols.errors import UnexpectedGreeting
from email_service.protocols.tls import sessions, wrap


def open_socket(host: str, port: int, timeout: float | None, policy: DestinationPolicy) -> socket.socket:
    """A TCP connection to the first permitted address of ``host`` that accepts one."""
    last_error: OSError | None = None
    for family, sockaddr in resolve(host, port, policy):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        return sock
    assert last_error is not None  # resolve() returns at least one address or raises
    raise last_error


# The longest response line read (literals are read apart). imaplib's own 1,000,000 bytes is a
# UID SEARCH of about 140,000 messages; this holds one of about 2,000,000, and still bounds what
# a hostile server can make a worker hold. A longer line ends the connection: the rest of it
# would be read as the next command's answer.
MAX_IMAP_LINE = 16 * 1024 * 1024
# The largest message downloaded, by IMAP or POP3: above what providers accept in one message
# (Microsoft 365 up to 150 MB), and a bound on what one message makes a worker hold. Parsing and
# storing take several times a message's size, and a larger one would fail its sync every time
# (and, out of memory, the other jobs of its worker with it).
MAX_FETCHED_MESSAGE = 160 * 1024 * 1024


def size_words(size: int) -> str:
    """A limit as a sync's errors name it ("160 MB", "19 KB")."""
    return f"{size // (1024 * 1024)} MB" if size >= 1024 * 1024 else f"{size // 1024} KB"


class _Imap(imaplib.IMAP4):
    def __init__(self, host: str, port: int, timeout: float, policy: DestinationPolicy) -> None:
        self._policy = policy
        super().__init__(host, port, timeout)

    def readline(self) -> bytes:
        line = self.file.readline(MAX_IMAP_LINE + 1)
        if len(line) > MAX_IMAP_LINE:
            raise self.abort(f"a response line longer than {MAX_IMAP_LINE} bytes")
        return line

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return open_socket(self.host, self.port, timeout, self._policy)

    def _connect(self) -> None:
        try:
            super()._connect()
        except imaplib.IMAP4.abort as exc:
            if str(exc).startswith("socket error"):  # imaplib's words for a connection closed mid-line
                raise ConnectionAbortedError("connection closed") from None
            raise UnexpectedGreeting("IMAP", self.host, self.port) from None
        except imaplib.IMAP4.error:
            raise UnexpectedGreeting("IMAP", self.host, self.port) from None


class _ImapTls(_Imap):
    def __init__(
        self, host: str, port: int, timeout: float, policy: DestinationPolicy, context: ssl.SSLContext
    ) -> None:
        self.ssl_context = context
        super().__init__(host, port, timeout, policy)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return wrap(self.ssl_context, super()._create_socket(timeout), self.host, self.port)

    def shutdown(self) -> None:
        sessions.keep(self.ssl_context, self.host, self.port, getattr(self, "sock", None))
        super().shutdown()


def imap_client(
    host: str, port: int, *, tls: bool, context: ssl.SSLContext, timeout: float, policy: DestinationPolicy
) -> imaplib.IMAP4:
    """An ``imaplib`` client past the greeting (implicit TLS when ``tls``), connected under ``policy``."""
    if tls:
        return _ImapTls(host, port, timeout, policy, context)
    return _Imap(host, port, timeout, policy)


class _Pop3(poplib.POP3):
    def __init__(self, host: str, port: int, timeout: float, policy: DestinationPolicy) -> None:
        self._policy = policy
        try:
            super().__init__(host, port, timeout)
        except poplib.error_proto as exc:
            # Only the greeting is read here: anything but "+OK" is not a POP3 server.
            self.close()
            if exc.args and exc.args[0] == "-ERR EOF":  # poplib's words for a closed connection
                raise ConnectionAbortedError("connection closed") from None
            raise UnexpectedGreeting("POP3", host, port) from None

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return open_socket(self.host, self.port, timeout, self._policy)


class _Pop3Tls(_Pop3):
    def __init__(
        self, host: str, port: int, timeout: float, policy: DestinationPolicy, context: ssl.SSLContext
    ) -> None:
        self.context = context
        super().__init__(host, port, timeout, policy)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return wrap(self.context, super()._create_socket(timeout), self.host, self.port)

    def close(self) -> None:
        sessions.keep(self.context, self.host, self.port, getattr(self, "sock", None))
        super().close()


def pop3_client(
    host: str, port: int, *, tls: bool, context: ssl.SSLContext, timeout: float, policy: DestinationPolicy
) -> poplib.POP3:
    """A ``poplib`` client past the greeting (implicit TLS when ``tls``), connected under ``policy``."""
    if tls:
        return _Pop3Tls(host, port, timeout, policy, context)
    return _Pop3(host, port, timeout, policy)


class _Smtp(smtplib.SMTP):
    def __init__(self, host: str, port: int, local_hostname: str, timeout: float, policy: DestinationPolicy) -> None:
        self._policy = policy
        try:
            super().__init__(host, port, local_hostname, timeout)
        except smtplib.SMTPConnectError as exc:
            # smtplib reports a greeting without a reply code as -1: another protocol is speaking.
            if 200 <= exc.smtp_code <= 599:
                raise
            raise UnexpectedGreeting("SMTP", host, port) from None

    def _get_socket(self, host: str, port: int, timeout: float | None) -> socket.socket:
        return open_socket(host, port, timeout, self._policy)


class _SmtpTls(_Smtp):
    default_port = smtplib.SMTP_SSL_PORT

    def __init__(
        self,
        host: str,
        port: int,
        local_hostname: str,
        timeout: float,
        policy: DestinationPolicy,
        context: ssl.SSLContext,
    ) -> None:
        self.context = context
        super().__init__(host, port, local_hostname, timeout, policy)

    def _get_socket(self, host: str, port: int, timeout: float | None) -> socket.socket:
        self._tls_port = port
        return wrap(self.context, super()._get_socket(host, port, timeout), self._host, port)

    def close(self) -> None:
        sessions.keep(self.context, self._host, getattr(self, "_tls_port", 0), self.sock)
        super().close()


def smtp_client(
    host: str,
    port: int,
    *,
    tls: bool,
    context: ssl.SSLContext,
    timeout: float,
    policy: DestinationPolicy,
    local_hostname: str,
) -> smtplib.SMTP:
    """An ``smtplib`` client past the 220 greeting (implicit TLS when ``tls``), connected under ``policy``."""
    if tls:
        return _SmtpTls(host, port, local_hostname, timeout, policy, context)
    return _Smtp(host, port, local_hostname, timeout, policy)
