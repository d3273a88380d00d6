"""Read-only dm-verity devices for layers and `files` volumes.

The host names a virtio-blk device by its serial. The agent reads the ext4 superblock and the verity
superblock and hash tree from that device itself (sandbox.shared.verity.read_verity_layout), so the
root hash it reports to the policy engine is the one dm-verity will enforce on every read. Nothing
the host says about the device's content is trusted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.guest import devmapper, sysapi

SYS_BLOCK = Path("/sys/block")


class BlockError(Exception):
    pass


@dataclass(frozen=True)
class VerityMount:
    device: Path           # /dev/vdX
    dm: devmapper.DmDevice
    root_hash: str
    data_blocks: int
    target: Path


def find_by_serial(serial: str) -> Path:
    """The /dev node of the virtio-blk disk whose serial is `serial` (sysfs, no udev needed)."""
    try:
        entries = sorted(SYS_BLOCK.iterdir())
    except OSError as e:
        raise BlockError(f"cannot list {SYS_BLOCK}: {e}") from None
    for entry in entries:
        try:
            if (entry / "serial").read_text().strip() == serial:
                return Path("/dev") / entry.name
        except OSError:
            continue
    raise BlockError(f"no disk with serial {serial!r}")


def read_layout(device: Path) -> Any:
    """Parse the verity layout from the device's own bytes."""
    try:
        from sandbox.shared.verity import read_verity_layout  # noqa: PLC0415 - provided by the layers work
    except ImportError as e:
        raise BlockError(f"this agent cannot read verity layouts ({e})") from None
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        def read_at(offset: int, size: int) -> bytes:
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise BlockError(f"{device}: short read at {offset} ({len(data)} of {size} bytes)")
            return data
        try:
            return read_verity_layout(read_at)
        except BlockError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure means "not a valid verity device"
            raise BlockError(f"{device} is not a valid ext4 + dm-verity image: {e}") from None
    finally:
        os.close(fd)


def _salt_hex(salt: Any) -> str:
    if isinstance(salt, bytes | bytearray):
        return bytes(salt).hex() or "-"
    return str(salt) or "-"


def verity_table(device: Path, layout: Any) -> devmapper.Target:
    """The dm-verity target (Documentation/admin-guide/device-mapper/verity.rst, format version 1).

    Data and hash tree live on the same device: the tree starts at hash_start_block (in hash
    blocks), right after the verity superblock that follows the ext4 data. No error-handling mode
    options: a corrupted block returns EIO, never data.
    """
    data_bs = int(getattr(layout, "data_block_size", 4096))
    hash_bs = int(getattr(layout, "hash_block_size", 4096))
    algorithm = str(getattr(layout, "hash_algorithm", getattr(layout, "algorithm", "sha256")))
    blocks = int(layout.data_blocks)
    params = " ".join([
        "1", str(device), str(device), str(data_bs), str(hash_bs), str(blocks), str(int(layout.hash_start_block)),
        algorithm, str(layout.root_hash), _salt_hex(layout.salt),
    ])
    return devmapper.Target(0, blocks * data_bs // devmapper.SECTOR, "verity", params)


def mount_verity(device: Path, dm_name: str, layout: Any, target: Path) -> VerityMount:
    dm = devmapper.create(dm_name, (verity_table(device, layout),), readonly=True)
    try:
        target.mkdir(parents=True, exist_ok=True)
        sysapi.mount(str(dm.node), target, "ext4", sysapi.MS_RDONLY | sysapi.MS_NODEV | sysapi.MS_NOSUID,
                     "noload")
    except OSError as e:
        try:
            devmapper.remove(dm_name)
        except OSError:
            pass
        raise BlockError(f"cannot mount {device} (verity {dm.node}) at {target}: {e.strerror or e}") from None
    return VerityMount(device, dm, str(layout.root_hash), int(layout.data_blocks), target)


def unmount_verity(mount: VerityMount) -> None:
    sysapi.umount(mount.target)
    devmapper.remove(mount.dm.name)
