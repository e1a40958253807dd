"""A file-like view of an object being read, for APIs that want ``read()`` rather than chunks."""

from __future__ import annotations

import io
from collections.abc import Iterable


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
