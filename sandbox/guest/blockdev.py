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

from sandbox.guest import devmapper, sysapi
from sandbox.shared.verity import VerityLayout, read_verity_layout

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


def read_layout(device: Path) -> VerityLayout:
    """Parse the verity layout from the device's own bytes."""
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


def verity_target(device: Path, layout: VerityLayout) -> devmapper.Target:
    """The dm-verity target for data and tree on one device (format 1, verity.rst). No error-handling
    mode options: a corrupted block returns EIO, never data."""
    start, length, kind, params = layout.dm_table(str(device)).split(" ", 3)
    return devmapper.Target(int(start), int(length), kind, params)


def mount_verity(device: Path, dm_name: str, layout: VerityLayout, target: Path) -> VerityMount:
    dm = devmapper.create(dm_name, (verity_target(device, layout),), readonly=True)
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
