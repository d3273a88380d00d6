"""Open a layer blob as an uncompressed tar stream, whatever its compression, and hash what comes out.

The compression is recognised by its magic bytes (the media type can lie or be absent for local files):
gzip (RFC 1952, multi-member allowed) through zlib, zstd (RFC 8878) through the `zstd` CLI streamed over a pipe,
anything else is read as a plain tar. The SHA-256 of the uncompressed bytes is the layer's diff_id.

zstd: Python 3.11 has no zstd module. The `zstd` program is already a host package, runs as a streaming
filter with bounded memory, and avoids a compiled PyPI dependency for one decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import zlib
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from sandbox.run import spawn
from sandbox.shared.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER = {b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2", b"\x04\x22\x4d\x18": "lz4"}
_READ = 1 << 20


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


class _Counting:
    """Reads from the compressed file and reports how many bytes went by."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None] | None) -> None:
        self.f = f
        self.on_read = on_read

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if data and self.on_read:
            self.on_read(len(data))
        return data


class _GzipRaw(io.RawIOBase):
    """Gzip members, one after another, decompressed with zlib; trailing zero padding is tolerated."""

    def __init__(self, src: _Counting, what: str) -> None:
        self.src = src
        self.what = what
        self.d = zlib.decompressobj(wbits=31)
        self.pending = b""
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001 - io protocol
        while not self.pending:
            if self.done:
                return 0
            self._fill()
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _fill(self) -> None:
        """Decompress some more input into `pending`, or move on to the next member, or finish."""
        if self.d.eof:
            self._next_member(self.d.unused_data)
            return
        data = self.d.unconsumed_tail or self.src.read(_READ)
        if not data:
            raise CorruptLayer(f"{self.what}: the gzip stream is truncated",
                               hint="the download is incomplete or the file is damaged")
        try:
            self.pending = self.d.decompress(data, _READ)
        except zlib.error as e:
            raise CorruptLayer(f"{self.what}: corrupt gzip data ({e})") from e

    def _next_member(self, rest: bytes) -> None:
        """After a member ends: another member, zero padding up to EOF, or an error."""
        while len(rest) < 2 and (more := self.src.read(_READ)):
            rest += more
        if rest.startswith(GZIP_MAGIC):
            self.d = zlib.decompressobj(wbits=31)
            try:
                self.pending = self.d.decompress(rest, _READ)
            except zlib.error as e:
                raise CorruptLayer(f"{self.what}: corrupt gzip data ({e})") from e
            return
        while rest:
            if rest.strip(b"\0"):
                raise CorruptLayer(f"{self.what}: unexpected data after the gzip stream")
            rest = self.src.read(_READ)
        self.done = True


class _PlainRaw(io.RawIOBase):
    def __init__(self, src: _Counting) -> None:
        self.src = src

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001
        data = self.src.read(len(buf))
        buf[:len(data)] = data
        return len(data)


class _PipeRaw(io.RawIOBase):
    """The stdout of a decompressor that reads the layer file itself (its stdin); a failing exit is an error."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        self.proc = proc
        self.what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001
        assert self.proc.stdout is not None
        n = self.proc.stdout.readinto(buf)
        if n == 0:
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
            if self.proc.wait() != 0:
                detail = err.splitlines()[-1] if err else f"exit code {self.proc.returncode}"
                raise CorruptLayer(f"{self.what}: corrupt or truncated zstd data ({detail})",
                                   hint="the download is incomplete or the file is damaged")
        return n


class _Hashing(io.RawIOBase):
    """Passes bytes through and hashes them: the diff_id of the uncompressed layer."""

    def __init__(self, inner: io.RawIOBase) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001
        n = self.inner.readinto(buf)
        if n:
            self.sha.update(memoryview(buf)[:n])
        return n


class LayerStream:
    """An open layer: `stream` yields the uncompressed tar; `diff_id` is valid once it has been read to EOF."""

    def __init__(self, stream: io.BufferedReader, hashing: _Hashing, compression: Compression) -> None:
        self.stream = stream
        self._hashing = hashing
        self.compression = compression

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._hashing.sha.hexdigest()


@contextlib.contextmanager
def open_layer(path: Path, *, what: str, on_read: Callable[[int], None] | None = None) -> Iterator[LayerStream]:
    """Open `path` (a tar, tar.gz or tar.zst) for streaming; `what` names the layer in errors."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below; unbuffered: zstd reads the fd
    except OSError as e:
        raise InputError(f"{what}: cannot read {path}: {e.strerror}") from e
    proc: subprocess.Popen[bytes] | None = None
    try:
        compression = detect(os.pread(f.fileno(), 8, 0), what)
        src = _Counting(f, on_read)
        raw: io.RawIOBase
        if compression == Compression.gzip:
            raw = _GzipRaw(src, what)
        elif compression == Compression.zstd:
            proc = spawn(["zstd", "-d", "-c", "-q"], stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if on_read:
                on_read(path.stat().st_size)        # the process reads the file; report it up front
            raw = _PipeRaw(proc, what)
        else:
            raw = _PlainRaw(src)
        hashing = _Hashing(raw)
        yield LayerStream(io.BufferedReader(hashing, _READ), hashing, compression)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        f.close()
