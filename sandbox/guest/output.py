"""Captured stdout/stderr of a container process: a bounded buffer addressed by absolute offsets.

Readers ask for "everything from offset N"; when N has already been dropped to respect the size
bound, they get what is left and learn how many bytes they missed. Two pump threads copy the pipes in.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_CAPACITY = 4 << 20


@dataclass(frozen=True)
class Chunk:
    offset: int
    stream: str   # "stdout" | "stderr"
    data: bytes


@dataclass(frozen=True)
class ReadResult:
    chunks: tuple[Chunk, ...]
    next_offset: int
    dropped: int      # bytes between the requested offset and the oldest one still kept
    eof: bool         # every stream is closed and everything up to next_offset was returned


class OutputLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._cond = threading.Condition()
        self._chunks: list[Chunk] = []
        self._size = 0          # bytes currently kept
        self._end = 0           # absolute offset after the last byte ever written
        self._open_streams = 0

    def append(self, stream: str, data: bytes) -> None:
        with self._cond:
            self._chunks.append(Chunk(self._end, stream, data))
            self._end += len(data)
            self._size += len(data)
            while self._size > self.capacity and len(self._chunks) > 1:
                self._size -= len(self._chunks.pop(0).data)
            self._cond.notify_all()

    def open_stream(self) -> Callable[[], None]:
        """Count one more writer that has not reached EOF; call the returned function once when it has
        (`eof` waits for every writer). pump() does this itself."""
        with self._cond:
            self._open_streams += 1
        closed = threading.Event()

        def close() -> None:
            if closed.is_set():
                return
            closed.set()
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()
        return close

    def pump(self, stream: str, fd: int) -> None:
        """Copy a pipe into the log on a daemon thread until EOF; the fd is closed afterwards."""
        stream_closed = self.open_stream()

        def loop() -> None:
            try:
                while True:
                    try:
                        data = os.read(fd, 65536)
                    except InterruptedError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    self.append(stream, data)
            finally:
                os.close(fd)
                stream_closed()

        threading.Thread(target=loop, name=f"pump-{stream}", daemon=True).start()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._open_streams == 0

    def wait_closed(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._open_streams == 0, timeout)

    def read(self, offset: int, max_bytes: int = 65536, wait: float = 0.0) -> ReadResult:
        deadline = time.monotonic() + max(0.0, wait)
        with self._cond:
            self._cond.wait_for(lambda: self._end > offset or self._open_streams == 0,
                                max(0.0, deadline - time.monotonic()))
            oldest = self._chunks[0].offset if self._chunks else self._end
            start = max(offset, oldest)
            dropped = max(0, oldest - offset)
            out: list[Chunk] = []
            budget = max(1, max_bytes)
            pos = start
            for chunk in self._chunks:
                end = chunk.offset + len(chunk.data)
                if end <= pos:
                    continue
                piece = chunk.data[pos - chunk.offset:][:budget]
                out.append(Chunk(pos, chunk.stream, piece))
                pos += len(piece)
                budget -= len(piece)
                if budget <= 0:
                    break
            eof = self._open_streams == 0 and pos >= self._end
            return ReadResult(tuple(out), pos, dropped, eof)
