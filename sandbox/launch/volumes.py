"""`files` volumes: a directory shipped with the group becomes a read-only ext4 + dm-verity disk.

The directory is archived deterministically (sorted, owner root, mtime 0) and converted like an image
layer, so the root hash depends only on the content; the policy pins that hash and the guest derives
it from the disk. Results are cached by the archive's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from sandbox.fsutil import atomic_output, atomic_write, file_lock
from sandbox.launch import deps
from sandbox.layers.volumes import write_directory_tar
from sandbox.paths import cache_dir


def directory_tar(root: Path) -> bytes:
    """A reproducible tar of `root`: regular files, directories and symlinks only."""
    buf = io.BytesIO()
    write_directory_tar(root, buf)
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
        convert = deps.convert_layer()
        tar_path = out_dir / f".{key}.tar"
        atomic_write(tar_path, data)
        try:
            with atomic_output(image) as tmp:
                result = convert(tar_path, tmp)
        finally:
            tar_path.unlink(missing_ok=True)
        atomic_write(hash_file, (str(result.root_hash) + "\n").encode())
        return str(result.root_hash), image
