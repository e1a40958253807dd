"""SMTP delivery through the account's own submission server.

Failures are split by what a retry can achieve: ``TemporaryDeliveryError`` (4xx replies, broken
or refused connections, timeouts before the message data was complete) is worth retrying;
``PermanentDeliveryError`` (5xx replies, bad credentials, certificates that do not verify,
missing STARTTLS) is not. ``AmbiguousDeliveryError`` is the third case: the whole message went
out and the reply to its final dot never came (RFC 5321 6.1 and 4.5.3.2), or said neither yes nor
no, so the server may have accepted it. Retrying that could deliver it twice, so it is reported
as it is and never retried automatically.
"""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import ssl
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import idna

from email_service.oauth2 import sasl
from email_service.protocols.connect import smtp_client
from email_service.protocols.destinations import DestinationPolicy, DestinationRefused
from email_service.protocols.errors import (
    AuthenticationFailed,
    MailServerError,
    UnexpectedGreeting,
    describe,
    reply_line,
)
from email_service.protocols.session import MailSession
from email_service.protocols.tls import client_context

if TYPE_CHECKING:
    from email_service.oauth2.tokens import TokenSource

log = logging.getLogger(__name__)

_REFUSED: dict[type[smtplib.SMTPResponseException], str] = {
    smtplib.SMTPConnectError: "refused the connection",
    smtplib.SMTPHeloError: "refused the greeting",
    smtplib.SMTPSenderRefused: "refused the sender",
}


class TemporaryDeliveryError(MailServerError):
    """Worth retrying later: the server said 4xx, or could not be reached or answered in time."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class PermanentDeliveryError(MailServerError):
    """Retrying will not help; ``str()`` carries the server's reply when there was one."""

    permanent = True

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class AmbiguousDeliveryError(MailServerError):
    """The message data went out whole and no reply came: it may or may not have been accepted."""


class DataWithheld(Exception):
    """Raised by a ``before_data_end`` hook: the caller no longer wants the message sent.

    It reaches the caller as it is (not classified as a delivery failure), and no byte of the
    data has gone out.
    """


class SmtpAuthenticationFailed(PermanentDeliveryError, AuthenticationFailed):
    """The server refused the account's credentials (so the account needs new ones)."""


@dataclass
class SendOutcome:
    # Recipients the server refused while it accepted others: address -> (code, reply text).
    # 4xx codes here may succeed on a later attempt for those recipients alone.
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


def _text(reply: bytes | str) -> str:
    # smtplib joins multi-line replies with "\n"; one bounded, printable line is what users and logs see.
    return reply_line(reply)


def _envelope_address(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("envelope address must not contain line breaks")
    local, at, domain = value.rpartition("@")
    if not at or domain.isascii():
        return value
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except idna.IDNAError as exc:
        raise ValueError(f"invalid domain in envelope address {value!r}: {exc}") from None


class SmtpSession(MailSession):
    """One connection to a submission server, logged in when credentials are given and AUTH is offered.

    ``helo_name`` is what EHLO announces; by default the connection's local address as an address
    literal, which avoids ``socket.getfqdn()`` (an unbounded DNS lookup) and does not leak host names.
    """

    def __init__(
        self,
        host: str,
        port: int,
        encryption: str,
        username: str,
        password: str,
        *,
        ca_file: Path | None = None,
        timeout: float = 60.0,
        data_timeout: float = 600.0,
        helo_name: str | None = None,
        destinations: DestinationPolicy | None = None,
        token_source: TokenSource | None = None,
    ) -> None:
        super().__init__(
            host,
            port,
            encryption,
            username,
            password,
            ca_file=ca_file,
            timeout=timeout,
            destinations=destinations,
            token_source=token_source,
        )
        self.helo_name = helo_name
        self.data_timeout = data_timeout
        self._token_refusal = ""  # the server's last refusal of a bearer token, scrubbed

    # ---- connection

    def _open(self) -> None:
        try:
            self._connect()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one classified, readable error
            raise self._classify(exc) from None

    def _connect(self) -> None:
        if self.encryption not in ("tls", "starttls", "none"):
            raise PermanentDeliveryError(f"unknown SMTP encryption {self.encryption!r}")
        context = client_context(self.ca_file)
        # A placeholder local_hostname, replaced once connected: without one smtplib calls
        # socket.getfqdn(), a DNS lookup no socket timeout bounds. The constructor connects,
        # reads the greeting and raises SMTPConnectError on anything but 220.
        conn = smtp_client(
            self.host,
            self.port,
            tls=self.encryption == "tls",
            context=context,
            timeout=self.timeout,
            policy=self.destinations,
            local_hostname="localhost",
        )
        self._conn = conn
        conn.local_hostname = self.helo_name or _address_literal(conn.sock)
        conn.ehlo_or_helo_if_needed()
        if self.encryption == "starttls":
            # No fallback to plain text: a missing STARTTLS may be an attacker stripping it.
            if not conn.has_extn("starttls"):
                raise PermanentDeliveryError(f"{self.host}:{self.port} does not offer STARTTLS")
            conn.starttls(context=context)
            conn.ehlo()
        if self.token_source is not None and conn.has_extn("auth"):
            self._oauth2_login(lambda token: self._authenticate(conn, token))
        elif self.username and self._password and conn.has_extn("auth"):
            self._login(conn)

    def _authenticate(self, conn: smtplib.SMTP, token: str) -> bool:
        """AUTH with the bearer token; False when the server refused it (5xx), a temporary error on 4xx."""
        mechanism = sasl.choose(set(conn.esmtp_features.get("auth", "").upper().split()))
        answers = iter([sasl.initial_response(mechanism, self.username, token, self.host, self.port).decode()])

        def respond(_challenge: bytes | None = None) -> str:
            # An error challenge after the token (RFC 7628 3.2.3) gets the empty response.
            return next(answers, "")

        try:
            conn.auth(mechanism, respond, initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as exc:
            if 400 <= exc.smtp_code < 500:
                raise TemporaryDeliveryError(
                    f"authentication failed for {self.username} at {self.host}, temporarily: "
                    f"{self._scrub(exc.smtp_code, exc.smtp_error)}",
                    exc.smtp_code,
                ) from None
            self._token_refusal = self._scrub(exc.smtp_code, exc.smtp_error).replace(token, "***")
            return False
        return True

    def _refused_after_refresh(self, token: str) -> MailServerError:
        # The provider has just refreshed the grant, so the tokens are sound: this server does
        # not take OAuth2 logins for the mailbox (Microsoft 365 with SMTP AUTH turned off answers
        # 535 5.7.139). The send fails with its reply; the account's tokens, and with them its
        # sync, stay as they are, where marking them failed stopped the sync until a new sign-in
        # that the next send would undo again.
        return SmtpAuthenticationFailed(
            f"{self.host} refused the account's OAuth2 login for sending, also with a newly refreshed "
            f"token: {self._token_refusal}",
            535,
        )

    def _login(self, conn: smtplib.SMTP) -> None:
        try:
            if self.username.isascii() and self._password.isascii():
                conn.login(self.username, self._password)
            else:
                self._login_utf8(conn)
        except smtplib.SMTPAuthenticationError as exc:
            where = f"authentication failed for {self.username} at {self.host}"
            if 400 <= exc.smtp_code < 500:
                raise TemporaryDeliveryError(
                    f"{where}, temporarily: {self._scrub(exc.smtp_code, exc.smtp_error)}", exc.smtp_code
                ) from None
            raise SmtpAuthenticationFailed(
                f"{where}: {self._scrub(exc.smtp_code, exc.smtp_error)}", exc.smtp_code
            ) from None
        except (smtplib.SMTPResponseException, smtplib.SMTPServerDisconnected):
            raise
        except smtplib.SMTPException:  # "no suitable method", or AUTH not really supported
            raise PermanentDeliveryError(
                f"{self.host} offers no authentication method this service supports "
                f"({reply_line(conn.esmtp_features.get('auth', ''), 100)})"
            ) from None

    def _login_utf8(self, conn: smtplib.SMTP) -> None:
        # smtplib encodes credentials as ASCII; RFC 4616 PLAIN carries UTF-8, so send it ourselves.
        if "PLAIN" not in conn.esmtp_features.get("auth", "").upper().split():
            raise smtplib.SMTPException("non-ASCII credentials need AUTH PLAIN")
        token = b"\0" + self.username.encode() + b"\0" + self._password.encode()
        code, reply = conn.docmd("AUTH", "PLAIN " + base64.b64encode(token).decode("ascii"))
        if code == 334:  # the server ignored the initial response and asks for it
            code, reply = conn.docmd(base64.b64encode(token).decode("ascii"))
        if code not in (235, 503):
            raise smtplib.SMTPAuthenticationError(code, reply)

    def _quit(self, conn: smtplib.SMTP) -> None:
        try:
            conn.quit()
        finally:
            conn.close()

    # ---- sending

    def send(
        self,
        envelope_from: str,
        recipients: list[str],
        data: bytes,
        *,
        before_data_end: Callable[[], None] | None = None,
    ) -> SendOutcome:
        """Send ``data`` (CRLF lines, 7bit, e.g. from ``outgoing.build.wire_bytes``) to ``recipients``.

        ``before_data_end`` runs after the server agreed to take the data and before any of it is
        sent: the last moment at which the message certainly has not been accepted. The caller
        records there that the outcome may become unknowable; if it raises, nothing is sent
        (``DataWithheld`` comes back as it is, anything else as a temporary failure).

        Returns the recipients the message did not reach while it reached others. Those a server
        turned away with a 4xx while it took others (a limit of recipients per message) are tried
        at once in a further transaction of the session, as often as that reaches someone more.
        Raises ``PermanentDeliveryError`` when all were refused (``TemporaryDeliveryError`` if a
        retry could still reach one), ``AmbiguousDeliveryError`` when the reply to a final dot never
        came, and the other failures described in the module docstring.
        """
        sender = _envelope_address(envelope_from)
        targets = list(dict.fromkeys(_envelope_address(r) for r in recipients))
        if not targets:
            raise ValueError("no recipients")
        not_delivered: dict[str, tuple[int, str]] = {}
        remaining = targets
        first = True
        while remaining:
            # Each pass is one transaction. Recipients a server turned away with a 4xx while it took
            # others (its limit of recipients per message: 452, RFC 5321 4.5.3.1.10) go in the next.
            refused, failure = self._transaction(sender, remaining, data, before_data_end if first else None)
            if failure is not None:
                if first:
                    raise failure
                # Others have the message already, so nothing is retried: these are not reached.
                code = getattr(failure, "code", None) or 0
                for target in remaining:
                    own = refused.get(target)
                    not_delivered[target] = (own[0], _text(own[1])) if own else (code, str(failure))
                break
            first = False
            reached_some = len(refused) < len(remaining)
            again = [target for target, (code, _) in refused.items() if 400 <= code < 500]
            not_delivered.update(
                {t: (c, _text(r)) for t, (c, r) in refused.items() if not (reached_some and t in again)}
            )
            remaining = again if reached_some else []
        outcome = SendOutcome(not_delivered)
        log.debug(
            "smtp %s:%s accepted a message of %d bytes for %d of %d recipients",
            self.host,
            self.port,
            len(data),
            len(targets) - len(outcome.refused),
            len(targets),
        )
        return outcome

    def _transaction(
        self, sender: str, targets: list[str], data: bytes, before_data_end: Callable[[], None] | None
    ) -> tuple[dict[str, tuple[int, bytes]], MailServerError | None]:
        """One MAIL, RCPT..., DATA: (the recipients refused, the failure if the message was not taken).

        ``AmbiguousDeliveryError`` and ``DataWithheld`` are raised, never returned: either ends the send.
        """
        conn = self.conn
        try:
            refused = self._envelope(conn, sender, targets, len(data))
            code, reply = conn.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPDataError(code, reply)
            if before_data_end is not None:
                before_data_end()
            # Dot-stuffing as smtplib does it, and the terminating CRLF . CRLF.
            payload = re.sub(rb"(?m)^\.", b"..", data)
            if not payload.endswith(b"\r\n"):
                payload += b"\r\n"
            # A failure while sending means the final dot did not leave whole: nothing was accepted.
            conn.send(payload + b".\r\n")
        except DataWithheld:
            # The server waits for the data: a QUIT now would be read as data. Hanging up
            # makes it drop the transaction, and ends this session.
            self._conn = None
            with suppress(OSError):
                conn.close()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes one classified, readable error
            every = dict(exc.recipients) if isinstance(exc, smtplib.SMTPRecipientsRefused) else {}
            return every, self._classify(exc)
        code, reply = self._final_reply(conn)
        if not 200 <= code < 300:
            failure = self._refusal_of_data(code, reply)
            if isinstance(failure, AmbiguousDeliveryError):
                raise failure
            return {}, failure
        return refused, None

    def _envelope(self, conn: smtplib.SMTP, sender: str, targets: list[str], size: int) -> dict:
        conn.ehlo_or_helo_if_needed()
        options = [f"SIZE={size}"] if conn.does_esmtp and conn.has_extn("size") else []
        code, reply = conn.mail(sender, options)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, sender)
        refused: dict[str, tuple[int, bytes]] = {}
        for target in targets:
            code, reply = conn.rcpt(target)
            if code not in (250, 251):
                refused[target] = (code, reply)
        if len(refused) == len(targets):
            conn.rset()
            raise smtplib.SMTPRecipientsRefused(refused)
        return refused

    def _final_reply(self, conn: smtplib.SMTP) -> tuple[int, bytes]:
        """The reply to the final dot, waited for as long as RFC 5321 allows (10 minutes by default)."""
        where = f"{self.host}:{self.port}"
        if conn.sock is not None:
            conn.sock.settimeout(self.data_timeout)
        try:
            return conn.getreply()
        except Exception as exc:  # noqa: BLE001 - whatever broke, the outcome is unknown
            why = (
                f"did not answer within {self.data_timeout:g} s"
                if isinstance(exc.__context__, TimeoutError) or isinstance(exc, TimeoutError)
                else "closed the connection without answering"
            )
            raise AmbiguousDeliveryError(
                f"{where} {why} after receiving the whole message: it may or may not have been accepted, "
                "so it is not sent again unless asked to"
            ) from None
        finally:
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout)

    def _refusal_of_data(self, code: int, reply: bytes) -> MailServerError:
        """The error for a final reply that is not a 2xx (RFC 5321 4.2.1: any 2yz completes)."""
        if 400 <= code < 600:
            # A clear no: 4xx says to try again, 5xx not to.
            return self._classify(smtplib.SMTPDataError(code, reply))
        # A 1xx or 3xx, or a line that is no reply at all (smtplib's -1): nothing says whether
        # the server took the message, so it is reported as unknown and not sent again.
        # (smtplib keeps no whole line of a reply without a code to show.)
        shown = self._scrub(code, reply) if code > 0 else "a line without a reply code"
        return AmbiguousDeliveryError(
            f"{self.host}:{self.port} answered the whole message with neither yes nor no ({shown}):"
            " it may or may not have been accepted, so it is not sent again unless asked to"
        )

    def _all_refused(self, refusals: dict[str, tuple[int, bytes]]) -> MailServerError:
        details = "; ".join(f"{rcpt}: {code} {_text(reply)}" for rcpt, (code, reply) in refusals.items())
        message = f"{self.host} refused every recipient ({details})"
        codes = [code for code, _ in refusals.values()]
        # Any 4xx (greylisting, 421 closing) means a later attempt may still deliver to someone.
        if any(400 <= code < 500 for code in codes):
            return TemporaryDeliveryError(message, min(codes))
        return PermanentDeliveryError(message, codes[0] if codes else None)

    # ---- errors

    def _scrub(self, code: int, reply: bytes | str) -> str:
        # Servers have no business echoing credentials, but a reply is shown to users and logged.
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
        if self._password:
            text = text.replace(self._password, "***")
        return f"{code} {_text(text)}"

    def _classify(self, exc: BaseException) -> MailServerError:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, DestinationRefused | UnexpectedGreeting):
            # Neither changes until the account's settings (or the operator's allow-list) do.
            return PermanentDeliveryError(str(exc))
        if isinstance(exc, AuthenticationFailed) and not isinstance(exc, PermanentDeliveryError):
            # An OAuth2 login that is gone (refresh refused): a send fails for good, like a refused password.
            return SmtpAuthenticationFailed(str(exc))
        if isinstance(exc, MailServerError):
            return exc
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            return self._all_refused(exc.recipients)
        if isinstance(exc, smtplib.SMTPResponseException):
            code = exc.smtp_code
            text = f"{self.host} {_REFUSED.get(type(exc), 'refused the message')}: {self._scrub(code, exc.smtp_error)}"
            if 500 <= code < 600:
                return PermanentDeliveryError(text, code)
            return TemporaryDeliveryError(text, code)
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            # smtplib turns a read timeout or reset into this; the cause says which.
            if isinstance(exc.__context__, OSError):
                return TemporaryDeliveryError(str(describe(exc.__context__, self.host, self.port)))
            return TemporaryDeliveryError(f"connection to {where} was lost")
        if isinstance(exc, smtplib.SMTPNotSupportedError):
            return PermanentDeliveryError(f"{where} does not support a required extension: {exc}")
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
            return TemporaryDeliveryError(f"connection to {where} was lost during the TLS handshake")
        if isinstance(exc, ssl.SSLError):
            # Certificates and protocol mismatches stay as they are until someone changes them.
            return PermanentDeliveryError(str(describe(exc, self.host, self.port)))
        if isinstance(exc, smtplib.SMTPException):
            return PermanentDeliveryError(f"{where} broke the SMTP protocol: {reply_line(str(exc))}")
        if isinstance(exc, OSError | EOFError):
            return TemporaryDeliveryError(str(describe(exc, self.host, self.port)))
        if isinstance(exc, ValueError | UnicodeError):
            return PermanentDeliveryError(f"cannot send through {where}: {reply_line(str(exc))}")
        return TemporaryDeliveryError(str(describe(exc, self.host, self.port)))


def _address_literal(sock: Any) -> str:
    try:
        address = sock.getsockname()[0]
    except (OSError, AttributeError, IndexError):
        return "localhost"
    return f"[IPv6:{address}]" if ":" in address else f"[{address}]"
