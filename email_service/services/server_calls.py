"""How many API requests may wait on the outside world for a user at once, per user and in all.

An API process answers from a small pool of threads (ten, a2wsgi's). A request that talks to a
user's mail server (a folder created, renamed or deleted there) or looks up the host name a user
gave holds its thread for as long as that takes: up to the IMAP timeout for a server that
accepts connections and then says nothing, as long as a name server that drops queries makes
the resolver wait. Unbounded, one user's servers could hold every thread, and every other
tenant's requests, however quick, would wait behind them. So a user has at most
``PER_USER`` such requests under way in a process (more answer 429 at once), and all users
together at most ``IN_ALL`` (more answer 503 at once), which leaves the other threads to
requests that only read and write the service's own data.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from email_service.errors import DependencyUnavailableError, TooManyRequestsError
from email_service.tenancy import Principal

PER_USER = 2
IN_ALL = 5


class ServerCallSlots:
    def __init__(self, per_user: int = PER_USER, in_all: int = IN_ALL) -> None:
        self.per_user, self.in_all = per_user, in_all
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], int] = {}
        self._total = 0

    @contextmanager
    def slot(self, principal: Principal) -> Iterator[None]:
        """Hold one of the user's slots while the block runs; refused at once when none is free."""
        key = (str(principal.tenant_id), str(principal.user_id))
        with self._lock:
            if self._held.get(key, 0) >= self.per_user:
                raise TooManyRequestsError(
                    f"at most {self.per_user} requests that wait on your mail servers may run at once;"
                    " try again when one has answered",
                    code="TOO_MANY_SERVER_CALLS",
                )
            if self._total >= self.in_all:
                raise DependencyUnavailableError(
                    "the service is waiting on other mail servers; try again in a moment", code="SERVER_CALLS_BUSY"
                )
            self._held[key] = self._held.get(key, 0) + 1
            self._total += 1
        try:
            yield
        finally:
            with self._lock:
                self._total -= 1
                left = self._held[key] - 1
                if left:
                    self._held[key] = left
                else:
                    del self._held[key]


# One per process: the bound is on this process's threads.
SLOTS = ServerCallSlots()
