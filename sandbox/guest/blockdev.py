"""Disks by serial or WWN, and read-only dm-verity devices for layers and `files` volumes.

The host names a disk by its serial: a virtio-blk disk (/sys/block/vdX/serial) or a SCSI LUN on a
virtio-scsi controller (the unit serial number, VPD page 0x80, /sys/block/sdX/device/vpd_pg80); a SCSI
disk can also be named by its NAA world wide name (VPD page 0x83, /sys/block/sdX/device/wwid). All of it
is read from sysfs: the UVM has no udev, and no /dev/disk/by-id.

The agent reads the ext4 superblock and the verity superblock and hash tree from that device itself
(sandbox.shared.verity.read_verity_layout), so the root hash it reports to the policy engine is the one
dm-verity will enforce on every read. Nothing the host says about the device's content is trusted, and
which disk carries which serial is the host's word too: a serial only says which disk to look at.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox.guest import devmapper, sysapi
from sandbox.shared.errors import GuestOperationFailed
from sandbox.shared.verity import VerityLayout, read_verity_layout

SYS_BLOCK = Path("/sys/block")
DEV_DIR = Path("/dev")
VPD_UNIT_SERIAL = 0x80      # SPC-4 7.8.16 Unit Serial Number VPD page: 4-byte header, then ASCII
VPD_HEADER = 4


class BlockError(GuestOperationFailed):
    pass


@dataclass(frozen=True)
class VerityMount:
    device: Path           # /dev/vdX
    dm: devmapper.DmDevice
    root_hash: str
    data_blocks: int
    target: Path


def scsi_unit_serial(vpd_page: bytes) -> str | None:
    """The serial in a Unit Serial Number VPD page (None when the page is not one), without the space or
    NUL padding some targets add."""
    if len(vpd_page) < VPD_HEADER or vpd_page[1] != VPD_UNIT_SERIAL:
        return None
    length = int.from_bytes(vpd_page[2:4], "big")
    return vpd_page[VPD_HEADER:VPD_HEADER + length].decode("ascii", "replace").strip(" \0")


def disk_serial(entry: Path) -> str | None:
    """The serial of the disk at /sys/block/<name>: virtio-blk's `serial`, or a SCSI disk's VPD page 0x80."""
    try:
        return (entry / "serial").read_text().strip()
    except OSError:
        pass
    try:
        return scsi_unit_serial((entry / "device" / "vpd_pg80").read_bytes())
    except OSError:
        return None


def disk_wwn(entry: Path) -> int | None:
    """A SCSI disk's NAA world wide name, from its device identification (VPD page 0x83) as the kernel shows
    it in `wwid` ("naa.5000c0de00000001")."""
    try:
        wwid = (entry / "device" / "wwid").read_text().strip()
    except OSError:
        return None
    if not wwid.startswith("naa.") or len(wwid) != 20:
        return None       # 16-byte (registered extended) NAA names and other designators are not ours
    try:
        return int(wwid[4:], 16)
    except ValueError:
        return None


def _block_names() -> list[str]:
    try:
        return sorted(os.listdir(SYS_BLOCK))
    except OSError as e:
        raise BlockError(f"cannot list {SYS_BLOCK}: {e}") from None


def _read(entry: Path, name: str) -> str | None:
    try:
        return (entry / name).read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class _Disk:
    dev: str | None           # "major:minor", to notice a name that now stands for another disk
    serial: str | None
    wwn: int | None


class _DiskIndex:
    """Serials and WWNs of /sys/block, read once per disk: a group attaches hundreds of disks, and reading
    every disk's VPD page for every lookup costs seconds under emulation. The listing is re-read on each
    lookup (one directory read); disks that appeared are read, disks that went are dropped, and the disk
    a lookup returns is read again, so a disk the host swapped since is not taken for the old one."""

    def __init__(self) -> None:
        self._disks: dict[str, _Disk] = {}

    def _describe(self, name: str) -> _Disk:
        entry = SYS_BLOCK / name
        return _Disk(_read(entry, "dev"), disk_serial(entry), disk_wwn(entry))

    def _refresh(self) -> None:
        names = _block_names()
        self._disks = {n: self._disks.get(n) or self._describe(n) for n in names}

    def find(self, matches: Callable[[_Disk], bool], what: str) -> Path:
        for attempt in range(2):
            self._refresh()
            found = [n for n, d in self._disks.items() if matches(d)]
            if len(found) > 1:
                raise BlockError(f"{len(found)} disks carry {what} ({', '.join(found)}): refusing to choose one")
            if found:
                again = self._describe(found[0])
                if again == self._disks[found[0]]:
                    return device_node(SYS_BLOCK / found[0])
            if attempt == 0:
                self._disks = {}    # something changed under the cache, or nothing matched: read it all again
        raise BlockError(f"no disk with {what}")


_INDEX = _DiskIndex()


def find_by_serial(serial: str) -> Path:
    """The /dev node of the disk (virtio-blk or SCSI) whose serial is `serial`. Two disks with one serial
    are an error, not a choice."""
    return _INDEX.find(lambda d: d.serial == serial, f"serial {serial!r}")


def find_by_wwn(wwn: int) -> Path:
    """The /dev node of the SCSI disk whose NAA world wide name is `wwn`."""
    return _INDEX.find(lambda d: d.wwn == wwn, f"WWN {wwn:#018x}")


def device_node(entry: Path) -> Path:
    """/dev/<name> for /sys/block/<name>, created from the kernel's major:minor when devtmpfs has not (yet)
    made it, or replaced when it is not that block device."""
    node = DEV_DIR / entry.name
    try:
        major, minor = (int(x) for x in (entry / "dev").read_text().strip().split(":"))
    except (OSError, ValueError) as e:
        raise BlockError(f"cannot read the device number of {entry.name}: {e}") from None
    try:
        st = os.stat(node)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(major, minor):
            return node
        os.unlink(node)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise BlockError(f"cannot check {node}: {e}") from None
    try:
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
    except FileExistsError:
        pass
    except OSError as e:
        raise BlockError(f"cannot create {node} ({major}:{minor}): {e}") from None
    return node


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
        except Exception as e:  # any parse failure means "not a valid verity device"
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


def unmount_verity(mount: VerityMount) -> str | None:
    """Unmount (raises OSError when that fails: nothing changed) and remove the dm-verity device. Once
    unmounted it is unmounted: a device that cannot be removed yet (still open) is reported, not raised."""
    sysapi.umount(mount.target)
    try:
        devmapper.remove(mount.dm.name)
    except OSError as e:
        return f"its device {mount.dm.name} stays for now: {e}"
    return None
