"""Protocol failures in words a user understands, without secrets or stack traces."""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl


class MailServerError(Exception):
    """Talking to the user's mail server failed; ``str()`` is safe to show to the user.

    ``permanent`` says whether trying again later can help without anyone changing anything;
    it decides how hard an account's automatic sync backs off.
    """

    permanent = False


class AuthenticationFailed(MailServerError):
    """The server refused the login: nothing changes until someone changes the credentials."""

    permanent = True


class ConnectionFailed(MailServerError):
    """The server cannot be reached or the connection broke: nothing more can be done in this session."""


class CertificateFailed(ConnectionFailed):
    """The server's certificate does not verify: it stays so until the server or the account changes."""

    permanent = True


class HostNotFound(ConnectionFailed):
    """The host name does not resolve: a typo, or a domain that is gone."""

    permanent = True


def describe(exc: BaseException, host: str, port: int) -> MailServerError:
    """Turn a low-level exception into a message like "connection refused by imap.example.com:993"."""
    where = f"{host}:{port}"
    if isinstance(exc, MailServerError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CertificateFailed(f"certificate verify failed for {where}: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return ConnectionFailed(f"TLS handshake with {where} failed: {exc.reason or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailed(f"connection refused by {where}")
    if isinstance(exc, socket.gaierror):
        return HostNotFound(f"host not found: {host}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return ConnectionFailed(f"{where} did not answer in time")
    if isinstance(exc, ConnectionError | EOFError | imaplib.IMAP4.abort):
        return ConnectionFailed(f"connection to {where} was lost")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"cannot reach {where}: {exc.strerror or exc}")
    if isinstance(exc, imaplib.IMAP4.error | poplib.error_proto):
        text = exc.args[0] if exc.args else exc
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return MailServerError(f"{where} refused the request: {text}")
    return MailServerError(f"unexpected failure talking to {where}")
