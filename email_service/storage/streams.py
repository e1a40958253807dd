"""Objects being read: a file-like view for APIs that want ``read()``, and chunks for responses."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Protocol


class _ClosingChunks(Protocol):
    def __iter__(self) -> Iterator[bytes]: ...
    def __enter__(self) -> object: ...
    def __exit__(self, *exc: object) -> None: ...


def closing_chunks(reader: _ClosingChunks) -> Iterator[bytes]:
    """A reader's chunks for a streamed response; the reader is closed when the response ends."""
    with reader:
        yield from reader


class ChunkStream(io.RawIOBase):
    """Reads through an iterable of byte chunks without joining them, so large objects stay streamed."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size
