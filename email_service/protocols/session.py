from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from email_service.observability import metrics
from email_service.protocols.destinations import DestinationPolicy
from email_service.protocols.errors import MailServerError, describe

if TYPE_CHECKING:
    from email_service.oauth2.tokens import TokenSource


class MailSession:
    """A connection to a user's mail server, opened with ``with``; subclasses say how to open and quit.

    Every connection goes through ``protocols.connect``, which applies ``destinations``.
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
        destinations: DestinationPolicy | None = None,
        token_source: TokenSource | None = None,
    ) -> None:
        self.host, self.port = host, port
        # Without a policy from the settings only public addresses are reachable.
        self.destinations = destinations or DestinationPolicy()
        self.encryption = encryption
        self.username = username
        self._password = password
        self.ca_file = ca_file
        self.timeout = timeout
        self._conn: Any = None
        # Set for OAuth2 accounts: the session logs in with an access token instead of the password.
        self.token_source = token_source

    def _oauth2_login(self, attempt: Callable[[str], bool]) -> None:
        """Log in with the account's token; ``attempt(token)`` says whether the server accepted it.

        A refused token is refreshed once and tried once more; refused again, the account's token
        state becomes refresh_failed and the permanent failure is raised (no retry storm).
        """
        assert self.token_source is not None
        token = self.token_source.access_token()
        if attempt(token):
            return
        token = self.token_source.refused(token)
        if attempt(token):
            return
        raise self._refused_after_refresh(token)

    def _refused_after_refresh(self, token: str) -> MailServerError:
        """The error for a server that refused even the freshly refreshed ``token``.

        For the mailbox's own server the account's OAuth2 login is gone: its tokens are marked.
        """
        assert self.token_source is not None
        return self.token_source.server_refused_refreshed(f"{self.host}:{self.port}", token)

    def _open(self) -> None:
        raise NotImplementedError

    def _quit(self, conn: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._open()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one readable error
            self.close()
            raise metrics.session_failed(self, describe(exc, self.host, self.port)) from None
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        with suppress(Exception):  # the connection is being dropped anyway
            self._quit(conn)

    @property
    def conn(self) -> Any:
        if self._conn is None:
            raise MailServerError(f"not connected to {self.host}:{self.port}")
        return self._conn
