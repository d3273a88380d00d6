"""`files` volumes for `up`: the layers work's converter (sandbox.layers.volumes) makes the read-only
ext4 + dm-verity disk, cached by content; the policy pins its root hash and the guest derives it."""

from __future__ import annotations

from pathlib import Path

from sandbox.layers.volumes import build_files_volume


def package_files_volume(source: Path) -> tuple[str, Path]:
    """(root hash, image path) of the disk for directory `source`."""
    volume = build_files_volume(source)
    return volume.root_hash, volume.image
