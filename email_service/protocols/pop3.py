"""POP3 client used by sync: UIDL to tell what is new, RETR to download, never DELE."""

from __future__ import annotations

import poplib

from email_service.protocols.connect import pop3_client
from email_service.protocols.errors import AuthenticationFailed, MailServerError, describe
from email_service.protocols.session import MailSession
from email_service.protocols.tls import client_context


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
        try:
            _, lines, _ = self.conn.retr(number)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            raise describe(exc, self.host, self.port) from None
        # poplib strips line ends and un-stuffs leading dots; put the CRLFs back.
        return b"\r\n".join(lines) + b"\r\n"
