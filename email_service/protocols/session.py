from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from email_service.observability import metrics
from email_service.protocols.destinations import DestinationPolicy
from email_service.protocols.errors import MailServerError, describe


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
