"""What the rest of the host needs to know about a resolved image: its config and its layer devices.

This is the interface between image acquisition/conversion and its consumers (policy generation,
`up`). A ResolvedImage is a pure function of the image's content: the same image gives the same
root hashes on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config (`config` object) that shape a container."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()          # "KEY=VALUE", in image order
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""


@dataclass(frozen=True)
class LayerInfo:
    diff_id: str            # "sha256:<hex>" of the uncompressed tar
    media_type: str         # as in the manifest
    size: int               # compressed blob size
    root_hash: str          # dm-verity root hash (hex) of the ext4 + verity device image
    device_path: Path       # the device image: ext4 data, verity superblock, hash tree


@dataclass(frozen=True)
class ResolvedImage:
    reference: str          # as the user wrote it
    digest: str             # manifest digest "sha256:<hex>"
    config: ImageConfig
    layers: tuple[LayerInfo, ...]   # base first

    @property
    def layer_hashes(self) -> tuple[str, ...]:
        return tuple(layer.root_hash for layer in self.layers)
