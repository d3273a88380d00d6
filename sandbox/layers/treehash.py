"""The first level of a layer image's dm-verity tree, hashed by a forked child while the image is written.

Converting a layer is Python work on one core; hashing the image afterwards (SHA-256 of every block) would
follow it. Instead a child process, forked before the conversion starts, reads back each stretch of the
image as soon as the writer has put it down for good and hashes it on the other core. The writer says how
far it has written (Ext4Writer's WriteWatcher); what it writes at the end (superblock, descriptors) and the
blocks it writes again are hashed when the image is complete. format_verity then takes the digests instead
of hashing the data itself (its `first_level`).

The child shares nothing with the parent but the image's file descriptor, a scratch file for the digests
and a pipe of fixed-size messages; it exits as soon as the pipe closes. The fork happens only while the
process runs a single thread, native ones included; otherwise the caller hashes the image afterwards.
"""

from __future__ import annotations

import os
import signal
import struct
import tempfile

from sandbox.shared.errors import SandboxError
from sandbox.shared.verity import ZERO_SALT, BlockHasher, first_level_hasher, single_threaded

BLOCK_SIZE = 4096
_MSG = struct.Struct("<cQ")             # kind, value
_WRITTEN, _REWRITTEN, _DONE = b"W", b"R", b"D"
_STEP = 1 << 20                         # the writer's progress is passed on in steps of at least this much


class HashingFailed(SandboxError):
    """The child hashing the image failed (a read error, or it was killed)."""


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = os.read(fd, n - len(data))
        if not part:
            return b""
        data += part
    return data


def _child(image_fd: int, digests_fd: int, pipe_fd: int, reserved: int, salt: bytes) -> int:
    """Hash what the parent reports written; at the end the reserved and rewritten blocks. Exit status."""
    hasher = first_level_hasher(salt=salt)
    done_to = reserved                  # blocks [reserved, done_to) are hashed
    rewritten: set[int] = set()
    while msg := _read_exact(pipe_fd, _MSG.size):
        kind, value = _MSG.unpack(msg)
        if kind == _WRITTEN and value > done_to:
            _hash(hasher, image_fd, done_to, value - done_to, digests_fd)
            done_to = value
        elif kind == _REWRITTEN:
            rewritten.add(value)
        elif kind == _DONE:
            total = value
            if total > done_to:
                _hash(hasher, image_fd, done_to, total - done_to, digests_fd)
            _hash(hasher, image_fd, 0, min(reserved, total), digests_fd)
            for block in sorted(b for b in rewritten if b < total):
                _hash(hasher, image_fd, block, 1, digests_fd)
            return 0
    return 1                            # the parent went away without saying it was done


def _hash(hasher: BlockHasher, image_fd: int, first: int, count: int, digests_fd: int) -> None:
    """Digests of image blocks [first, first + count) into their places in the digests file."""
    hasher.hash_into(image_fd, first, count, digests_fd, first * hasher.slot)


class FirstLevelHasher:
    """Hashes an image into its tree's first level while it is written; a WriteWatcher for Ext4Writer."""

    def __init__(self, pid: int, pipe_fd: int, digests: int) -> None:
        self._pid = pid
        self._pipe = pipe_fd
        self.digests = digests          # the scratch file holding the digests (format_verity's first_level)
        self._sent = 0

    @classmethod
    def start(cls, image_fd: int, *, reserved_blocks: int, salt: bytes = ZERO_SALT) -> FirstLevelHasher | None:
        """Fork the hashing child, or None when forking is not safe (another thread runs)."""
        if not single_threaded():
            return None
        digests = tempfile.TemporaryFile()  # closed by close()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                    # the child: hash until told the image is done, then leave at once
            code = 1
            try:
                os.close(write_end)
                code = _child(image_fd, digests.fileno(), read_end, reserved_blocks, salt)
            finally:
                os._exit(code)
        os.close(read_end)
        hasher = cls(pid, write_end, os.dup(digests.fileno()))
        digests.close()
        return hasher

    def _send(self, kind: bytes, value: int) -> None:
        os.write(self._pipe, _MSG.pack(kind, value))

    def written(self, end: int) -> None:
        block = end // BLOCK_SIZE
        if block - self._sent >= _STEP // BLOCK_SIZE:
            self._send(_WRITTEN, block)
            self._sent = block

    def rewritten(self, block: int) -> None:
        self._send(_REWRITTEN, block)

    def finish(self, total_blocks: int) -> int:
        """The image is complete with `total_blocks` blocks: wait for the child; returns the digests' file."""
        self._send(_DONE, total_blocks)
        os.close(self._pipe)
        self._pipe = -1
        _, status = os.waitpid(self._pid, 0)
        self._pid = 0
        if os.waitstatus_to_exitcode(status) != 0:
            raise HashingFailed("hashing the layer image for its dm-verity tree failed")
        return self.digests

    def close(self) -> None:
        """Stop the child if it still runs and release the scratch file."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        if self._pid:
            os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = 0
        if self.digests >= 0:
            os.close(self.digests)
            self.digests = -1
