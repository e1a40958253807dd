"""A user's mail server and login, and the one place that opens a session to it.

IMAP, POP3 and SMTP settings of an account all become a ``MailServer``; whoever needs a
connection (sync, write-back, delivery, Sent/Drafts filing) asks it for a session, so TLS
verification and timeouts are decided here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from email_service.config import Settings
from email_service.protocols.imap import ImapSession
from email_service.protocols.pop3 import Pop3Session
from email_service.protocols.smtp import SmtpSession

if TYPE_CHECKING:
    from email_service.oauth2.tokens import TokenSource


class Protocol(StrEnum):
    IMAP = "imap"
    POP3 = "pop3"
    SMTP = "smtp"


@dataclass(frozen=True)
class MailServer:
    protocol: Protocol
    host: str
    port: int
    encryption: str
    username: str
    password: str = field(repr=False)  # never let the password reach a log line through repr()
    # OAuth2 accounts log in with the token this hands out (and refreshes) instead of the password.
    token_source: TokenSource | None = field(default=None, repr=False, compare=False)

    def session(self, settings: Settings) -> ImapSession | Pop3Session | SmtpSession:
        """A session (not yet open) for a ``with`` block, with the service's TLS trust and timeouts."""
        login = (self.host, self.port, self.encryption, self.username, self.password)
        tokens = self.token_source.with_settings(settings) if self.token_source is not None else None
        if self.protocol is Protocol.SMTP:
            return SmtpSession(
                *login,
                ca_file=settings.ca_file,
                timeout=settings.smtp_timeout_seconds,
                data_timeout=settings.smtp_data_timeout_seconds,
                destinations=settings.destinations,
                token_source=tokens,
            )
        session_type = ImapSession if self.protocol is Protocol.IMAP else Pop3Session
        return session_type(
            *login,
            ca_file=settings.ca_file,
            timeout=settings.imap_timeout_seconds,
            destinations=settings.destinations,
            token_source=tokens,
        )

    def imap(self, settings: Settings) -> ImapSession:
        """The IMAP session, typed as such for callers that need IMAP (write-back, filing, refresh)."""
        session = self.session(settings)
        if not isinstance(session, ImapSession):
            raise ValueError(f"{self.protocol} server has no IMAP session")
        return session
