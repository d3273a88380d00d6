"""Open a layer blob as an uncompressed tar stream, whatever its compression, and hash what comes out.

The compression is recognised by its magic bytes (the media type can lie or be absent for local files):
gzip (RFC 1952, multi-member allowed) through zlib, zstd (RFC 8878) through the `zstd` CLI streamed over a pipe,
anything else is read as a plain tar. The SHA-256 of the uncompressed bytes is the layer's diff_id.

Reading, decompressing and hashing run in a thread of their own, a few chunks ahead of the converter:
file reads, zlib and SHA-256 release the GIL, so they take the second core while the converter parses
tar headers and writes ext4 on the first. An uncompressed tar is read by a forked process instead, into
buffers shared with the converter: a thread still needs the GIL between its reads and hashes, and handing
it back and forth cost the converter a fifth of its time. The converter parses exactly the bytes that
process hashed (the diff_id stays the hash of what was converted). The fork happens only while the process
runs a single thread (sandbox.shared.verity.single_threaded); otherwise the thread reads.

zstd: Python 3.11 has no zstd module. The `zstd` program is already a host package, runs as a streaming
filter with bounded memory, and avoids a compiled PyPI dependency for one decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
import signal
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from sandbox.shared.errors import InputError
from sandbox.shared.verity import single_threaded

if TYPE_CHECKING:
    import io
    import subprocess

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER = {b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2", b"\x04\x22\x4d\x18": "lz4"}
CHUNK = 1 << 20                 # bytes per chunk handed to the converter
AHEAD = 4                       # chunks the reading thread may have ready (bounds memory)


class Compression(StrEnum):
    none = "none"
    gzip = "gzip"
    zstd = "zstd"


class CorruptLayer(InputError):
    """A layer blob whose compression stream is damaged or truncated."""


def detect(head: bytes, what: str) -> Compression:
    if head.startswith(GZIP_MAGIC):
        return Compression.gzip
    if head.startswith(ZSTD_MAGIC):
        return Compression.zstd
    for magic, name in _OTHER.items():
        if head.startswith(magic):
            raise InputError(f"{what}: {name} compression is not supported (OCI layers use gzip or zstd)",
                             hint="use an uncompressed, gzip or zstd tar")
    return Compression.none


# A source fills a buffer with the next uncompressed bytes: it returns (bytes put in the buffer, compressed
# bytes read for them), or None at the end.
_Source = Callable[[memoryview], "tuple[int, int] | None"]


class _Plain:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0

    def __call__(self, view: memoryview) -> tuple[int, int] | None:
        n = os.preadv(self.fd, [view], self.offset)
        if not n:
            return None
        self.offset += n
        return n, n


class _Gzip:
    """Gzip members, one after another, decompressed with zlib; trailing zero padding is tolerated."""

    def __init__(self, f: BinaryIO, what: str) -> None:
        self.f = f
        self.what = what
        self.d = zlib.decompressobj(wbits=31)
        self.done = False

    def __call__(self, view: memoryview) -> tuple[int, int] | None:
        read = 0
        while not self.done:
            if self.d.eof:
                rest = self.d.unused_data
                while len(rest) < 2 and (more := self.f.read(CHUNK)):
                    rest += more
                    read += len(more)
                if not rest.startswith(GZIP_MAGIC):
                    while rest:
                        if rest.strip(b"\0"):
                            raise CorruptLayer(f"{self.what}: unexpected data after the gzip stream")
                        rest = self.f.read(CHUNK)
                        read += len(rest)
                    self.done = True
                    break
                self.d = zlib.decompressobj(wbits=31)       # another member
                data = rest
            elif self.d.unconsumed_tail:
                data = self.d.unconsumed_tail
            else:
                data = self.f.read(CHUNK)
                read += len(data)
                if not data:
                    raise CorruptLayer(f"{self.what}: the gzip stream is truncated",
                                       hint="the download is incomplete or the file is damaged")
            try:
                out = self.d.decompress(data, len(view))
            except zlib.error as e:
                raise CorruptLayer(f"{self.what}: corrupt gzip data ({e})") from e
            if out:
                view[:len(out)] = out
                return len(out), read
        return (0, read) if read else None


class _Pipe:
    """The stdout of `zstd -d` reading the layer file itself; a failing exit is an error."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        assert proc.stdout is not None
        self.proc = proc
        # typeshed says IO[bytes]; spawn's Popen (default bufsize) gives a BufferedReader, which has readinto
        self.stdout = cast("io.BufferedReader", proc.stdout)
        self.what = what

    def __call__(self, view: memoryview) -> tuple[int, int] | None:
        n = self.stdout.readinto(view)
        if n:
            return n, 0
        err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        if self.proc.wait() != 0:
            detail = err.splitlines()[-1] if err else f"exit code {self.proc.returncode}"
            raise CorruptLayer(f"{self.what}: corrupt or truncated zstd data ({detail})",
                               hint="the download is incomplete or the file is damaged")
        return None


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Stopped(Exception):
    """The consumer went away; the reading thread ends."""


class _ReadAhead:
    """Runs a source in a thread, hashing its output, and hands the chunks over in order.

    The chunks live in a fixed pool of buffers (allocating one per chunk fragments the heap and grows the
    process); the consumer hands a buffer back by asking for the next chunk, so a chunk's bytes are valid
    until then.
    """

    def __init__(self, source: _Source, name: str) -> None:
        self.sha = hashlib.sha256()
        self._source = source
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(AHEAD + 2):
            self._free.put(bytearray(CHUNK))
        # (buffer, bytes in it, bytes read from the file), a failure, or None at the end
        self._ready: queue.SimpleQueue[tuple[bytearray, int, int] | _Failed | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _take(self) -> bytearray:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped from None

    def _run(self) -> None:
        try:
            update = self.sha.update
            while True:
                buf = self._take()
                view = memoryview(buf)
                got = self._source(view)
                if got is None:
                    self._ready.put(None)
                    return
                n, read = got
                if n:
                    update(view[:n])
                self._ready.put((buf, n, read))
        except _Stopped:
            pass
        except BaseException as e:  # handed to the consumer, which raises it
            self._ready.put(_Failed(e))

    def chunks(self, on_read: Callable[[int], None] | None) -> Iterator[memoryview]:
        held: bytearray | None = None
        while True:
            if held is not None:
                self._free.put(held)                # the consumer is done with the previous chunk
                held = None
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, _Failed):
                raise item.error
            buf, n, read = item
            if on_read is not None and read:
                on_read(read)
            held = buf
            if n:
                yield memoryview(buf)[:n]

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


_SLOT_MSG = struct.Struct("<iq")            # (slot, bytes in it): -1 ends the stream, -2 reports an errno


class _ReadingProcess:
    """Reads and hashes an uncompressed layer file in a forked process, a few chunks ahead of the converter.

    The chunks live in AHEAD + 2 slots of an anonymous shared mapping. The child fills a free slot with the
    next bytes of the file, hashes them, and names the slot on one pipe; the converter hands the slot back
    on another pipe when it asks for the next chunk, so a chunk's bytes are valid until then. At the end
    the child sends the SHA-256 of everything it sent and exits.
    """

    SLOTS = AHEAD + 2

    def __init__(self, fd: int, what: str) -> None:
        self.what = what
        self._digest = b""
        self._shm = mmap.mmap(-1, self.SLOTS * CHUNK)
        ready_r, ready_w = os.pipe()
        free_r, free_w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            for end in (ready_r, ready_w, free_r, free_w):
                os.close(end)
            raise
        if pid == 0:                                # the child: read until the end, then leave at once
            code = 1
            try:
                os.close(ready_r)
                os.close(free_w)
                code = self._child(fd, ready_w, free_r)
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(free_r)
        self._pid = pid
        self._ready = ready_r
        self._free = free_w

    def _child(self, fd: int, ready: int, free: int) -> int:
        sha = hashlib.sha256()
        view = memoryview(self._shm)
        slots = list(range(self.SLOTS))
        offset = 0
        while True:
            if not slots:
                got = os.read(free, 64)
                if not got:
                    return 1                        # the converter went away
                slots.extend(got)
            slot = slots.pop(0)
            buf = view[slot * CHUNK:(slot + 1) * CHUNK]
            try:
                n = os.preadv(fd, [buf], offset)
            except OSError as e:
                os.write(ready, _SLOT_MSG.pack(-2, e.errno or 0))
                return 0
            if not n:
                os.write(ready, _SLOT_MSG.pack(-1, offset) + sha.digest())
                return 0
            sha.update(buf[:n])
            offset += n
            os.write(ready, _SLOT_MSG.pack(slot, n))

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = os.read(self._ready, n - len(data))
            if not part:
                raise InputError(f"{self.what}: the process reading the layer failed")
            data += part
        return data

    def chunks(self, on_read: Callable[[int], None] | None) -> Iterator[memoryview]:
        view = memoryview(self._shm)
        held = -1
        while True:
            if held >= 0:
                with contextlib.suppress(BrokenPipeError):     # the child has ended after the last chunk
                    os.write(self._free, bytes((held,)))    # the consumer is done with the previous chunk
                held = -1
            slot, n = _SLOT_MSG.unpack(self._read(_SLOT_MSG.size))
            if slot == -1:
                self._digest = self._read(32)
                return
            if slot == -2:
                raise InputError(f"{self.what}: cannot read the layer: {os.strerror(n)}")
            if on_read is not None:
                on_read(n)
            held = slot
            yield view[slot * CHUNK:slot * CHUNK + n]

    def hexdigest(self) -> str:
        if not self._digest:
            raise RuntimeError("the layer has not been read to its end")
        return self._digest.hex()

    def close(self) -> None:
        for fd in (self._ready, self._free):
            if fd >= 0:
                os.close(fd)
        self._ready = self._free = -1
        if self._pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = 0


class LayerStream:
    """An open layer: `chunks` yields the uncompressed tar, each chunk valid until the next is asked for;
    `diff_id` is valid once they have all been read."""

    def __init__(self, ahead: _ReadAhead | _ReadingProcess, compression: Compression,
                 on_read: Callable[[int], None] | None) -> None:
        self._ahead = ahead
        self.compression = compression
        self.chunks = ahead.chunks(on_read)

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._ahead.hexdigest()


@contextlib.contextmanager
def open_layer(path: Path, *, what: str, on_read: Callable[[int], None] | None = None) -> Iterator[LayerStream]:
    """Open `path` (a tar, tar.gz or tar.zst) for streaming; `what` names the layer in errors."""
    try:
        f = open(path, "rb", buffering=0)  # closed below; unbuffered: zstd reads the fd
    except OSError as e:
        raise InputError(f"{what}: cannot read {path}: {e.strerror}") from e
    proc: subprocess.Popen[bytes] | None = None
    ahead: _ReadAhead | _ReadingProcess | None = None
    try:
        compression = detect(os.pread(f.fileno(), 8, 0), what)
        source: _Source
        if compression == Compression.gzip:
            source = _Gzip(f, what)
        elif compression == Compression.zstd:
            import subprocess  # only zstd layers run a program; plain and gzip ones start without it

            from sandbox.run import spawn

            proc = spawn(["zstd", "-d", "-c", "-q"], stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if on_read:
                on_read(path.stat().st_size)        # the process reads the file; report it up front
            source = _Pipe(proc, what)
        else:
            if single_threaded():
                with contextlib.suppress(OSError):      # no process to spare: the thread reads
                    ahead = _ReadingProcess(f.fileno(), what)
            source = _Plain(f.fileno())
        if ahead is None:
            ahead = _ReadAhead(source, f"read {what}")
        yield LayerStream(ahead, compression, on_read)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()                             # before joining the thread, which may be reading its output
            proc.wait()
        if ahead is not None:
            ahead.close()
        if proc is not None:
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        f.close()
