"""Layer tarballs to device images: plain ext4 (the UVM rootfs), or ext4 + dm-verity (a layer device).

A layer device is `ext4 | verity superblock (4096 bytes) | hash tree`, SHA-256, 4096-byte blocks, a salt
of 32 zero bytes, as hcsshim/ACI lay out their layer VHDs (without the VHD footer). Its root hash is a
pure function of the tar's bytes: every run on every machine gives the same image and hash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sandbox.fsutil import atomic_output
from sandbox.layers.decompress import Compression, open_layer
from sandbox.layers.ext4_format import BLOCK_SIZE
from sandbox.layers.ext4_writer import WriteWatcher, descriptor_blocks
from sandbox.layers.tar2ext4 import DEFAULT_OPTIONS, Ext4Options, convert_tar_stream
from sandbox.layers.treehash import FirstLevelHasher
from sandbox.layers.version import CONVERTER_VERSION
from sandbox.layers.writeback import Writeback
from sandbox.progress import step
from sandbox.shared.errors import CheckFailed, InputError
from sandbox.shared.verity import ZERO_SALT, VerityInfo, format_verity

__all__ = ["CONVERTER_VERSION", "ConvertResult", "DiffIdMismatch", "Ext4Result", "convert_layer", "convert_tar_to_ext4"]


class DiffIdMismatch(CheckFailed):
    """The uncompressed layer does not hash to the diff_id the image config promises (a failed check)."""


@dataclass(frozen=True)
class Ext4Result:
    diff_id: str                # "sha256:<hex>" of the uncompressed tar
    ext4_size: int              # bytes of ext4 image
    entries: int
    compression: Compression
    tar_size: int


@dataclass(frozen=True)
class ConvertResult:
    root_hash: str              # dm-verity root hash (hex)
    diff_id: str
    ext4_size: int              # the data part; the verity superblock starts here
    image_size: int             # ext4 + verity superblock + tree
    entries: int
    compression: Compression
    verity: VerityInfo


def _write_ext4(src: Path, fd: int, options: Ext4Options, expected_diff_id: str | None, what: str,
                watcher: WriteWatcher | None = None) -> Ext4Result:
    size = src.stat().st_size if src.exists() else None
    with step(f"Converting {what}", total=size, unit="B") as task, \
            open_layer(src, what=what, on_read=task.advance) as layer:
        try:
            stats = convert_tar_stream(layer.chunks, fd, options, watcher=watcher)
        except InputError as e:
            if not e.message.startswith(what):
                raise type(e)(f"{what}: {e.message}", hint=e.hint) from e
            raise
        if expected_diff_id is not None and layer.diff_id != expected_diff_id:
            raise DiffIdMismatch(f"{what}: uncompressed content is {layer.diff_id}, not the expected "
                                 f"{expected_diff_id}", hint="the image is corrupt or was tampered with")
        return Ext4Result(diff_id=layer.diff_id, ext4_size=stats.ext4.size, entries=stats.entries,
                          compression=layer.compression, tar_size=stats.tar_bytes)


def _open_image(tmp: Path) -> int:
    return os.open(tmp, os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC)


def convert_tar_to_ext4(src: Path, out: Path, *, options: Ext4Options = DEFAULT_OPTIONS,
                        expected_diff_id: str | None = None, name: str | None = None) -> Ext4Result:
    """Convert a (possibly compressed) tar into a plain ext4 image at `out`, written atomically."""
    src, out = Path(src), Path(out)
    what = name or f"layer {src}"
    with atomic_output(out) as tmp:
        fd = _open_image(tmp)
        try:
            with Writeback(fd) as watcher:
                return _write_ext4(src, fd, options, expected_diff_id, what, watcher=watcher)
        finally:
            os.close(fd)


def convert_layer(src: Path, out: Path, *, expected_diff_id: str | None = None, name: str | None = None,
                  options: Ext4Options = DEFAULT_OPTIONS) -> ConvertResult:
    """Convert a layer tar (plain, gzip or zstd) into a layer device image: ext4 with dm-verity appended."""
    src, out = Path(src), Path(out)
    what = name or f"layer {src}"
    with atomic_output(out) as tmp:
        fd = _open_image(tmp)
        hasher = None
        try:
            # Fork the tree's hashing before the conversion starts any thread (sandbox/layers/treehash.py).
            hasher = FirstLevelHasher.start(fd, reserved_blocks=1 + descriptor_blocks(options.max_disk_size),
                                            salt=ZERO_SALT)
            with Writeback(fd, hasher) as watcher:
                ext4 = _write_ext4(src, fd, options, expected_diff_id, what, watcher=watcher)
            first_level = hasher.finish(ext4.ext4_size // BLOCK_SIZE) if hasher is not None else None
            with step(f"Hashing {what}"):
                info = format_verity(tmp, salt=ZERO_SALT, superblock=True, first_level=first_level)
        finally:
            os.close(fd)
            if hasher is not None:
                hasher.close()
        image_size = tmp.stat().st_size
    return ConvertResult(root_hash=info.root_hash, diff_id=ext4.diff_id, ext4_size=ext4.ext4_size,
                         image_size=image_size, entries=ext4.entries, compression=ext4.compression, verity=info)
