"""`files` volumes: a directory shipped with a group becomes a read-only ext4 + dm-verity device.

The directory is archived reproducibly (GNU tar; entries in sorted walk order; owner 0:0, no owner names,
mtime 0; permissions kept; regular files, directories and symlinks only), then converted like an image layer.
The root hash therefore depends only on names, permissions, link targets and content. The archive's digest
keys the converted-layer cache. sandbox.launch.volumes builds its archive with write_directory_tar too, so
policy generation and `up` agree on the root hash.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sandbox.images.store import LayerCache
from sandbox.layers.convert import convert_layer
from sandbox.paths import cache_dir
from sandbox.shared.errors import InputError


@dataclass(frozen=True)
class FilesVolume:
    root_hash: str
    image: Path                 # ext4 + verity superblock + tree
    diff_id: str                # sha256 of the reproducible archive


def write_directory_tar(root: Path, out: BinaryIO) -> None:
    """Archive `root` reproducibly into `out` (streamed: file contents are never held in memory)."""
    if not root.is_dir():
        raise InputError(f"files volume source {root} is not a directory")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(dirnames) + sorted(filenames):
                path = base / name
                st = path.lstat()
                info = tarfile.TarInfo(path.relative_to(root).as_posix())
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    info.size = st.st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    raise InputError(f"{path}: only files, directories and symlinks can be in a files volume")


def build_files_volume(source: Path) -> FilesVolume:
    """The read-only device for directory `source`, converted once per distinct content."""
    tmp_dir = cache_dir() / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".volume.", suffix=".tar", dir=tmp_dir)
    tar = Path(name)
    try:
        with open(fd, "w+b") as f:
            write_directory_tar(Path(source), f)
            f.flush()
            f.seek(0)
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
        diff_id = "sha256:" + h.hexdigest()
        record = LayerCache().ensure(diff_id, lambda out: convert_layer(
            tar, out, expected_diff_id=diff_id, name=f"files volume {source}"))
    finally:
        tar.unlink(missing_ok=True)
    return FilesVolume(root_hash=record.root_hash, image=record.device_path, diff_id=diff_id)
