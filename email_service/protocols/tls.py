"""TLS for connections to users' mail servers: one verifying context per CA store, resumed sessions.

Building a context loads the whole CA store (about 100 ms against the system store on a busy
two-core machine), and a full handshake verifies the server's chain again: both were paid on every
connection, most of the cost of a sync with nothing to do. A process keeps one context per CA
file (rebuilt when the file changes) and the last TLS session per server, so the next connection
to that server resumes it (RFC 8446 §2.2) instead of verifying the same chain again.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path


def client_context(ca_file: Path | str | None) -> ssl.SSLContext:
    """A client context that verifies the chain and the host name, against the system store or ``ca_file``.

    Shared by every connection of the process: nothing may change it after it is built.
    """
    if ca_file is None:
        return _context(None, 0)
    try:
        changed = Path(ca_file).stat().st_mtime_ns
    except OSError:
        changed = 0  # let ssl report the missing file, as it did before
    return _context(str(ca_file), changed)


@lru_cache(maxsize=8)
def _context(ca_file: str | None, changed: int) -> ssl.SSLContext:
    # ``changed`` is only part of the cache key: a replaced CA file builds a new context.
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class SessionCache:
    """The last resumable TLS session per (context, host name, port), least recently used first out.

    Keyed by the host name the user gave, which is what the session's certificate was verified
    against: a session is only offered to the server name it was made with.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._sessions: OrderedDict[tuple[int, str, int], tuple[ssl.SSLContext, ssl.SSLSession]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, context: ssl.SSLContext, host: str, port: int) -> ssl.SSLSession | None:
        key = (id(context), host.lower(), port)
        with self._lock:
            found = self._sessions.get(key)
            if found is None or found[0] is not context:
                return None
            self._sessions.move_to_end(key)
            return found[1]

    def keep(self, context: ssl.SSLContext, host: str, port: int, sock: socket.socket | None) -> None:
        """Remember the session of a connection about to close, when the server gave one to resume."""
        session = getattr(sock, "session", None) if isinstance(sock, ssl.SSLSocket) else None
        if session is None or not session.has_ticket:
            return
        key = (id(context), host.lower(), port)
        with self._lock:
            # The context is held too, so its id cannot be reused by another context while cached.
            self._sessions[key] = (context, session)
            self._sessions.move_to_end(key)
            while len(self._sessions) > self._size:
                self._sessions.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


sessions = SessionCache()


def wrap(context: ssl.SSLContext, sock: socket.socket, host: str, port: int) -> ssl.SSLSocket:
    """``sock`` under TLS to ``host``, resuming the last session with that server when there is one."""
    return context.wrap_socket(sock, server_hostname=host, session=sessions.get(context, host, port))
