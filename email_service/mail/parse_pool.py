"""Parse messages in worker processes, so a sync uses every core while it fetches and writes.

Parsing is pure Python (the ``email`` package), so threads would take turns on the GIL; worker
processes do not. A pool lives for one sync job, which starts it (``ParsePool.start()``, None
where a pool would not help) and closes it when done, workers included (it is also a context
manager). Results are exactly ``parse_message``'s: the workers run that very function, and if
the pool breaks (a worker killed) the rest is parsed in this process.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import suppress
from types import TracebackType

from email_service.mail.parse import ParsedMessage, parse_message

log = logging.getLogger(__name__)

# Two workers use both cores of a small machine and bound the memory a sync can take on a big one
# (each worker holds a chunk of raw mail and its parsed form).
MAX_WORKERS = 2
# Small tasks keep both workers busy and let results come back while the rest is still parsing;
# each task costs a round trip through the pool's queues, so not too small either.
CHUNK_MESSAGES = 16
CHUNK_BYTES = 1 * 1024 * 1024
_PR_SET_PDEATHSIG = 1
_WORKER_NICENESS = 10


def _parse_chunk(raws: list[bytes]) -> list[ParsedMessage]:
    return [parse_message(raw) for raw in raws]


def _worker_init(parent: int) -> None:
    # Forked from the sync job: everything it had is inherited. Freezing keeps the collector away
    # from those objects (no copy-on-write of their pages, no finalizer of the parent's garbage
    # running here, such as a database connection closing).
    gc.freeze()
    # Die with the job, even one killed outright, rather than wait for work forever.
    # Not Linux (no prctl): the pool's own shutdown still ends the workers.
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)  # the job died before the line above took effect
    # The job's worker handles Ctrl-C and stops the job; the pool is shut down from there.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Parsing runs ahead of the writes (PostgreSQL, fsync) that the job has to wait for; on a
    # busy machine the workers should yield the CPU to those, not the other way round.
    with suppress(OSError):
        os.nice(_WORKER_NICENESS)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ParseJob:
    """The parse of one batch, in flight; ``result()`` waits and returns one result per message, in order."""

    def __init__(self, pool: ParsePool, chunks: list[list[bytes]], futures: list[Future | None]) -> None:
        self._pool, self._chunks, self._futures = pool, chunks, futures

    def result(self) -> list[ParsedMessage]:
        parsed: list[ParsedMessage] = []
        for chunk, future in zip(self._chunks, self._futures, strict=True):
            parsed.extend(self._pool._collect(chunk, future))
        self._chunks, self._futures = [], []  # the raw bytes are not needed any more
        return parsed


class ParsePool:
    def __init__(self, workers: int) -> None:
        self._closing = threading.Lock()
        # fork: a worker starts in milliseconds with the parser already imported; spawn would
        # start a fresh interpreter and import the service per worker, per job.
        self._executor: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )
        # The executor forks every worker at its first submit: do it now, from the caller's
        # thread, before the caller starts threads of its own that a fork would copy mid-step.
        self._executor.submit(int)

    @classmethod
    def start(cls, workers: int | None = None) -> ParsePool | None:
        """A pool, or None where one would not help (a single core) or cannot run (no fork)."""
        if "fork" not in multiprocessing.get_all_start_methods():
            return None
        if workers is None:
            cores = usable_cores()
            if cores < 2:
                return None  # the job's own threads already keep the one core busy
            workers = min(MAX_WORKERS, cores)
        return cls(workers) if workers >= 1 else None

    def parse(self, raws: Sequence[bytes]) -> ParseJob:
        """Start parsing ``raws``; returns at once."""
        chunks = _chunks(raws)
        futures: list[Future | None] = []
        for chunk in chunks:
            future = None
            if self._executor is not None:
                try:
                    future = self._executor.submit(_parse_chunk, chunk)
                except (BrokenProcessPool, RuntimeError) as exc:
                    self._broken(exc)
            futures.append(future)
        return ParseJob(self, chunks, futures)

    def _collect(self, chunk: list[bytes], future: Future | None) -> list[ParsedMessage]:
        if future is not None:
            try:
                return future.result()
            except BrokenProcessPool as exc:
                self._broken(exc)
            except Exception as exc:  # noqa: BLE001 - cancelled, or a result that would not pickle
                log.warning("parse task failed (%s); parsing it in the sync process", type(exc).__name__)
        return _parse_chunk(chunk)

    def _broken(self, exc: BaseException) -> None:
        if self._executor is not None:
            log.warning("parse pool failed (%s); parsing in the sync process", type(exc).__name__)
            self.close()

    def close(self) -> None:
        """Stop the workers and wait for them to exit; safe to call more than once, from any thread."""
        with self._closing:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ParsePool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _chunks(raws: Sequence[bytes]) -> list[list[bytes]]:
    chunks: list[list[bytes]] = []
    chunk: list[bytes] = []
    size = 0
    for raw in raws:
        if chunk and (len(chunk) >= CHUNK_MESSAGES or size + len(raw) > CHUNK_BYTES):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw)
    if chunk:
        chunks.append(chunk)
    return chunks
