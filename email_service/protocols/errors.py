"""Protocol failures in words a user understands, without secrets or stack traces.

Messages are the service's own words: a category, the host and port, and at most one reply line
of the protocol the service was speaking, bounded and stripped of control characters
(``reply_line``). What a server says before it has answered as the expected protocol is never
quoted: another service on that port would otherwise reveal its banner to whoever chose the port.
"""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
import unicodedata

REPLY_LIMIT = 200


class MailServerError(Exception):
    """Talking to the user's mail server failed; ``str()`` is safe to show to the user.

    ``permanent`` says whether trying again later can help without anyone changing anything;
    it decides how hard an account's automatic sync backs off.
    """

    permanent = False


class AuthenticationFailed(MailServerError):
    """The server refused the login: nothing changes until someone changes the credentials."""

    permanent = True


class FolderReadOnly(MailServerError):
    """The server lets this login only read the folder (a shared one): nothing can be changed in it."""

    permanent = True


class ConnectionFailed(MailServerError):
    """The server cannot be reached or the connection broke: nothing more can be done in this session."""


class CertificateFailed(ConnectionFailed):
    """The server's certificate does not verify: it stays so until the server or the account changes."""

    permanent = True


class HostNotFound(ConnectionFailed):
    """The host name does not resolve: a typo, or a domain that is gone."""

    permanent = True


class UnexpectedGreeting(ConnectionFailed):
    """Something answered, but not as the protocol's server (its greeting is deliberately not kept)."""

    def __init__(self, protocol: str, host: str, port: int) -> None:
        article = "a" if protocol == "POP3" else "an"
        super().__init__(f"{host}:{port} did not answer as {article} {protocol} server")


def reply_line(reply: bytes | str, limit: int = REPLY_LIMIT) -> str:
    """A server's reply as one printable line of at most ``limit`` characters, fit to show and log.

    Control and formatting characters (terminal escapes, bidi overrides, NULs) become spaces, so a
    reply can neither rewrite a log line nor disguise what it says.
    """
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text[: limit * 4])
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def describe(exc: BaseException, host: str, port: int) -> MailServerError:
    """Turn a low-level exception into a message like "connection refused by imap.example.com:993"."""
    where = f"{host}:{port}"
    if isinstance(exc, MailServerError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CertificateFailed(f"certificate verify failed for {where}: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return ConnectionFailed(f"TLS handshake with {where} failed: {reply_line(exc.reason or 'protocol error')}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailed(f"connection refused by {where}")
    if isinstance(exc, socket.gaierror):
        return HostNotFound(f"host not found: {host}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return ConnectionFailed(f"{where} did not answer in time")
    if isinstance(exc, imaplib.IMAP4.readonly):
        # imaplib's readonly subclasses abort, but nothing was lost: the folder is read-only for us.
        return FolderReadOnly(f"{where} lets this account only read the folder: nothing can be changed in it")
    if isinstance(exc, ConnectionError | EOFError | imaplib.IMAP4.abort):
        return ConnectionFailed(f"connection to {where} was lost")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"cannot reach {where}: {exc.strerror or type(exc).__name__}")
    if isinstance(exc, imaplib.IMAP4.error | poplib.error_proto):
        return MailServerError(f"{where} refused the request: {reply_line(exc.args[0] if exc.args else '')}")
    return MailServerError(f"unexpected failure talking to {where}")
