"""Keep a sync's memory at what it holds, not at the most it ever held.

A sync passes hundreds of megabytes through buffers of a few hundred kilobytes to a few
megabytes each (fetched literals, parsed bodies, the rows of a batch), from several threads.
glibc's allocator raises its mmap threshold each time such a buffer is freed, after which the
next ones come from the heap and stay with the process when freed; and each thread that
allocates may get an arena of its own. Both made a 10,000-message sync's work horse grow by
tens of megabytes more than it ever held at once. A fixed threshold returns each large buffer
to the system when freed; two arenas are enough for a job's few busy threads.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, kept fixed
ARENA_MAX = 2

_done = False
_lock = threading.Lock()


def return_large_buffers() -> None:
    """Tune this process's allocator as above; once per process, and nothing where glibc is absent."""
    global _done
    with _lock:
        if _done:
            return
        _done = True
        try:
            # The process's own symbols: no library search (ctypes.util.find_library runs ldconfig).
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            return  # not glibc (musl, macOS): their allocators behave otherwise
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_ARENA_MAX, ARENA_MAX)):
            log.debug("mallopt refused the sync's allocator settings")
