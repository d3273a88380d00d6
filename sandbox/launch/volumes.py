"""`files` volumes: a directory shipped with the group becomes a read-only ext4 + dm-verity disk.

The directory is archived deterministically (sorted, owner root, mtime 0) and converted like an image
layer, so the root hash depends only on the content; the policy pins that hash and the guest derives
it from the disk. Results are cached by the archive's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

from sandbox.fsutil import atomic_write, file_lock
from sandbox.layers.convert import convert_layer
from sandbox.paths import cache_dir
from sandbox.shared.errors import InputError


def directory_tar(root: Path) -> bytes:
    """A reproducible tar of `root`: regular files, directories and symlinks only."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(dirnames) + sorted(filenames):
                path = base / name
                rel = path.relative_to(root).as_posix()
                st = path.lstat()
                info = tarfile.TarInfo(rel)
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
    return buf.getvalue()


def package_files_volume(source: Path) -> tuple[str, Path]:
    """(root hash, image path) for the directory `source`, converting it if not cached yet."""
    data = directory_tar(source)
    key = hashlib.sha256(data).hexdigest()
    out_dir = cache_dir() / "volumes"
    image = out_dir / f"{key}.img"
    hash_file = out_dir / f"{key}.roothash"
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / f".{key}.lock"):
        if image.is_file() and hash_file.is_file():
            return hash_file.read_text().strip(), image
        tar_path = out_dir / f".{key}.tar"
        atomic_write(tar_path, data)
        try:
            result = convert_layer(tar_path, image, name=f"files volume {source.name}")
        finally:
            tar_path.unlink(missing_ok=True)
        atomic_write(hash_file, (str(result.root_hash) + "\n").encode())
        return str(result.root_hash), image
