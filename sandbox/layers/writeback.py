"""Start writing an image to disk while it is still being made.

A converted image is published with an fsync (sandbox.fsutil.atomic_output). Left to the end, that fsync
waits for the device to take every page of the image (tens of milliseconds for a 200 MB layer, a sixth
of the whole conversion). Instead, each stretch the writer has put down for good is handed to the kernel
for writeback at once (sync_file_range with SYNC_FILE_RANGE_WRITE: start the I/O, do not wait), so the
device writes while the converter is still working and the final fsync only waits for the tail.

It is only a hint: the bytes written and the fsync that makes them durable do not change, and where the
call is unavailable (not Linux/glibc, or an error) nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import queue
import threading
from collections.abc import Callable
from types import TracebackType

from sandbox.layers.ext4_writer import WriteWatcher

SYNC_FILE_RANGE_WRITE = 2               # <fcntl.h>: start writeback of dirty pages in the range, do not wait
STEP = 4 << 20                          # bytes handed over at a time


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start (not wait for) writing bytes [offset, offset + length) of `fd` to disk; a hint, errors ignored."""
    fn = _sync_file_range()
    if fn is not None and length > 0:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class Writeback:
    """A WriteWatcher that starts the writeback of each finished stretch, then tells `inner` (if any).

    A context manager: leaving it stops the thread (the writeback already started goes on in the kernel).
    """

    def __init__(self, fd: int, inner: WriteWatcher | None = None, *, step: int = STEP) -> None:
        self.fd = fd
        self.inner = inner
        self.step = step
        self.done = 0                   # bytes [0, done) handed over
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Writeback:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self) -> None:
        while (item := self._ranges.get()) is not None:
            start_writeback(self.fd, *item)

    def written(self, end: int) -> None:
        if end - self.done >= self.step:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="writeback", daemon=True)
                self._thread.start()
            self._ranges.put((self.done, end - self.done))
            self.done = end
        if self.inner is not None:
            self.inner.written(end)

    def close(self) -> None:
        """Stop the thread once it has handed over what it was given (it does not wait for the I/O)."""
        if self._thread is not None:
            self._ranges.put(None)
            self._thread.join()
            self._thread = None

    def rewritten(self, block: int) -> None:
        if self.inner is not None:
            self.inner.rewritten(block)
