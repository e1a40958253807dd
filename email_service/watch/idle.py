"""One IMAP connection waiting in IDLE (RFC 2177) on a folder, on aioimaplib (asyncio).

The connection goes to an address the destination policy permitted (resolved once, so the name
cannot be rebound between the check and the connect), and TLS verifies the certificate against
the account's host name, like every other connection of the service (``protocols.connect``).
aioimaplib connects by host name and has no STARTTLS; both are supplied here.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from contextlib import suppress
from typing import Any

import aioimaplib
from aioimaplib.aioimaplib import Command

from email_service.config import Settings
from email_service.oauth2 import sasl
from email_service.oauth2.tokens import TokenSource
from email_service.protocols import destinations
from email_service.protocols.errors import AuthenticationFailed, ConnectionFailed, HostNotFound, MailServerError
from email_service.protocols.imap import login_pieces, plain_credentials, quote, use_plain
from email_service.protocols.servers import MailServer

# RFC 2177: servers may drop an IDLE after 30 minutes; renew well before.
IDLE_RENEW_SECONDS = 25 * 60
CHANGE_RESPONSES = (b"EXISTS", b"EXPUNGE", b"FETCH", b"VANISHED")


class _Protocol(aioimaplib.IMAP4ClientProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, conn_lost_cb: Any, command_timeout: float) -> None:
        super().__init__(loop, conn_lost_cb)
        self.command_timeout = command_timeout
        # What the pending LOGIN or AUTHENTICATE sends after each server continuation, in turn.
        self.continuations: list[bytes] = []
        # Set when the server hangs up. aioimaplib wakes no waiter then: an IDLE would wait for
        # pushes that can no longer come, and a command for an answer, until their time limits.
        self.lost = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        super().connection_lost(exc)

    async def execute(self, command: Command, scrub: str | None = None) -> aioimaplib.Response:
        # aioimaplib sends some commands with no time limit (the CAPABILITY after the greeting and
        # the protocol-level one): a server that stops answering would hold the watch for ever,
        # its lease renewed all along. Every command but IDLE (which sets its own) gets one.
        if command.name != "IDLE" and command._timeout is None:  # noqa: SLF001 - no public setter
            command._timeout = self.command_timeout  # noqa: SLF001
            command._reset_timer()  # noqa: SLF001
        return await super().execute(command, scrub=scrub)

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name in ("LOGIN", "AUTHENTICATE") and self.transport is not None:
            if self.continuations:
                # The next literal of a LOGIN, or the PLAIN response of an AUTHENTICATE.
                self.transport.write(self.continuations.pop(0) + b"\r\n")
                return
            if command.name == "AUTHENTICATE":
                # A challenge after the initial response carries a refused token's details (RFC
                # 7628 3.2.3); the empty response lets the server finish with NO instead of waiting.
                self.transport.write(b"\r\n")
                return
        super()._continuation(line)


class _CheckedImap(aioimaplib.IMAP4):
    """aioimaplib's client, connecting to a checked address while TLS verifies the host name."""

    def __init__(self, address: str, server_hostname: str, port: int, tls: ssl.SSLContext | None, timeout: float):
        self._address, self._server_hostname = address, server_hostname
        super().__init__(host=server_hostname, port=port, timeout=timeout, ssl_context=tls)

    def create_client(self, host, port, loop, conn_lost_cb=None, ssl_context=None) -> None:  # noqa: ANN001
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb, self.timeout)
        server_hostname = self._server_hostname if ssl_context is not None else None
        self._client_task = local_loop.create_task(
            local_loop.create_connection(
                lambda: self.protocol, self._address, port, ssl=ssl_context, server_hostname=server_hostname
            )
        )


class IdleConnection:
    """A logged-in connection with one folder examined, ready to wait for changes."""

    def __init__(self, client: _CheckedImap, where: str) -> None:
        self.client, self.where = client, where

    @classmethod
    async def open(
        cls, server: MailServer, settings: Settings, tls: ssl.SSLContext, folder: str = "INBOX"
    ) -> IdleConnection:
        loop = asyncio.get_running_loop()
        where = f"{server.host}:{server.port}"
        timeout = float(settings.imap_timeout_seconds)
        try:
            addresses = await loop.run_in_executor(
                None, destinations.resolve, server.host, server.port, settings.destinations
            )
        except OSError:
            raise HostNotFound(f"host not found: {server.host}") from None
        _, sockaddr = addresses[0]
        implicit = tls if server.encryption == "tls" else None
        client = _CheckedImap(sockaddr[0], server.host, server.port, implicit, timeout)
        connection = cls(client, where)
        try:
            await client.wait_hello_from_server()
            if server.encryption == "starttls":
                await connection._starttls(tls, server.host)
            if server.token_source is not None:
                await connection._oauth2_login(server, server.token_source.with_settings(settings))
            else:
                await connection._login(server)
            await client.protocol.capability()
            # EXAMINE, not SELECT: watching never changes the folder (not even \Recent). aioimaplib
            # moves to the selected state only for its own SELECT, so the state is set here.
            response = await client.examine(folder)
            if response.result != "OK":
                raise MailServerError(f"{where} refused to open {folder}")
            client.protocol.state = aioimaplib.SELECTED
        except MailServerError:
            await connection.close()
            raise
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            await connection.close()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise ConnectionFailed(f"certificate verify failed for {where}: {exc.verify_message}") from None
            raise ConnectionFailed(f"connection to {where} failed ({type(exc).__name__})") from None
        return connection

    async def _login(self, server: MailServer) -> None:
        """Log in with the password as ``ImapSession._login`` does; ``AuthenticationFailed`` when refused.

        Not aioimaplib's login(): it sends the user name unquoted (a space, '"' or '\\' in it makes
        the command BAD) and a non-ASCII password as raw UTF-8 inside a quoted string, which IMAP
        does not allow.
        """
        protocol = self.client.protocol
        if use_plain(server.username, server.password, protocol.capabilities):
            credentials = base64.b64encode(plain_credentials(server.username, server.password))
            command = Command("AUTHENTICATE", protocol.new_tag(), "PLAIN", loop=protocol.loop)
            protocol.continuations = [credentials]
        else:
            pieces = login_pieces(server.username, server.password)
            command = Command("LOGIN", protocol.new_tag(), pieces[0].decode("ascii"), loop=protocol.loop)
            protocol.continuations = pieces[1:]
        try:
            # scrub keeps a quoted password out of aioimaplib's debug log (the rest is never logged).
            result = await asyncio.wait_for(
                protocol.execute(command, scrub=quote(server.password)), self.client.timeout
            )
        finally:
            protocol.continuations = []
        if result.result != "OK":
            raise AuthenticationFailed(f"authentication failed for {server.username} at {server.host}")
        protocol.state = aioimaplib.AUTH

    async def _oauth2_login(self, server: MailServer, tokens: TokenSource) -> None:
        """As ``MailSession._oauth2_login``: one refresh and one retry, then the token state says refresh_failed."""
        loop = asyncio.get_running_loop()
        token = await loop.run_in_executor(None, tokens.access_token)
        if await self._authenticate(server, token):
            return
        token = await loop.run_in_executor(None, tokens.refused, token)
        if await self._authenticate(server, token):
            return
        raise await loop.run_in_executor(None, tokens.server_refused_refreshed, self.where, token)

    async def _authenticate(self, server: MailServer, token: str) -> bool:
        protocol = self.client.protocol
        offered = {c.split("=", 1)[1] for c in protocol.capabilities if c.startswith("AUTH=")}
        mechanism = sasl.choose(offered)
        response = base64.b64encode(sasl.initial_response(mechanism, server.username, token, server.host, server.port))
        command = Command("AUTHENTICATE", protocol.new_tag(), mechanism, response.decode(), loop=protocol.loop)
        # scrub keeps the token out of aioimaplib's debug log.
        result = await asyncio.wait_for(protocol.execute(command, scrub=response.decode()), self.client.timeout)
        if result.result != "OK":
            return False
        protocol.state = aioimaplib.AUTH
        return True

    async def _starttls(self, tls: ssl.SSLContext, host: str) -> None:
        protocol = self.client.protocol
        if "STARTTLS" not in protocol.capabilities:
            # No fallback to plain text: a missing STARTTLS may be an attacker stripping it.
            raise MailServerError(f"{self.where} does not offer STARTTLS")
        response = await asyncio.wait_for(
            protocol.execute(Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)), self.client.timeout
        )
        if response.result != "OK":
            raise MailServerError(f"{self.where} refused STARTTLS")
        loop = asyncio.get_running_loop()
        protocol.transport = await loop.start_tls(protocol.transport, protocol, tls, server_hostname=host)
        await protocol.capability()  # what was announced before TLS cannot be trusted

    @property
    def supports_idle(self) -> bool:
        return "IDLE" in self.client.protocol.capabilities

    async def wait_for_change(self, *stops: asyncio.Event, renew: float = IDLE_RENEW_SECONDS) -> bool:
        """IDLE until the server reports a change (True), or renewal time or any of ``stops`` comes (False).

        Raises ``ConnectionFailed`` when the server refuses IDLE or the connection breaks.
        """
        try:
            return await self._idle(stops, renew)
        except (TimeoutError, aioimaplib.AioImapException, OSError) as exc:
            raise ConnectionFailed(f"IDLE on {self.where} ended ({type(exc).__name__})") from None

    async def _idle(self, stops: tuple[asyncio.Event, ...], renew: float) -> bool:
        client = self.client
        lost = asyncio.ensure_future(client.protocol.lost.wait())
        stop_waits = {asyncio.ensure_future(stop.wait()) for stop in stops}
        changed = False
        try:
            # The server may have hung up while a change was being fetched: an IDLE sent then
            # would wait for ever for its "+". A live server answers it within the IMAP timeout.
            start = asyncio.ensure_future(client.idle_start(timeout=renew))
            await asyncio.wait({start, lost}, timeout=client.timeout, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                start.cancel()
                if lost.done():
                    raise ConnectionFailed(f"{self.where} closed the connection")
                raise ConnectionFailed(f"{self.where} did not start IDLE within {client.timeout:.0f} s")
            idle = start.result()
            while client.has_pending_idle():
                push = asyncio.ensure_future(client.wait_server_push(timeout=renew + 60))
                done, _ = await asyncio.wait({push, lost, *stop_waits}, return_when=asyncio.FIRST_COMPLETED)
                if push not in done:
                    push.cancel()
                    if lost in done:
                        raise ConnectionFailed(f"{self.where} closed the connection during IDLE")
                    client.idle_done()
                    break
                lines = push.result()
                if lines == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    client.idle_done()
                    break
                if any(line.startswith(b"BYE") for line in lines):
                    # A shutdown, an autologout, an administrator's kick: the server hangs up next.
                    # Its words are not repeated (they are the server's, not ours).
                    raise ConnectionFailed(f"{self.where} ended the session (BYE) during IDLE")
                if any(marker in line for line in lines for marker in CHANGE_RESPONSES):
                    changed = True
                    client.idle_done()
                    break
            await asyncio.wait_for(idle, client.timeout)
        finally:
            lost.cancel()
            for stop_wait in stop_waits:
                stop_wait.cancel()
        return changed

    async def close(self) -> None:
        protocol = self.client.protocol
        transport = protocol.transport if protocol is not None else None
        # A LOGOUT would queue behind a pending IDLE: then just hang up, which servers expect too.
        polite = not self.client.has_pending_idle() and self.client.get_state() in ("AUTH", "SELECTED", "NONAUTH")
        polite = polite and protocol is not None and not protocol.lost.is_set()
        # An IDLE ended by a hang-up leaves its renewal timer set, holding the client until it fires.
        if self.client._idle_waiter is not None:  # noqa: SLF001 - no public way to cancel it
            self.client._idle_waiter.cancel()  # noqa: SLF001
        if transport is not None and polite:
            with suppress(Exception):  # the connection is being dropped either way
                await asyncio.wait_for(self.client.logout(), 2)
        if transport is not None:
            transport.close()
