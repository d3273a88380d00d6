"""Device-mapper control through ioctls on /dev/mapper/control (no dmsetup/libdevmapper in the UVM).

Structures and command numbers follow include/uapi/linux/dm-ioctl.h (interface version 4):
`struct dm_ioctl` (312 bytes) followed at `data_start` by `struct dm_target_spec` (40 bytes) and the
target's NUL-terminated parameter string, padded to 8 bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

CONTROL = Path("/dev/mapper/control")
CONTROL_DEV = (10, 236)  # misc major, MAPPER_CTRL_MINOR

DM_VERSION = (4, 0, 0)   # the kernel accepts any minor/patch <= its own for major 4
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16

# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags, event_nr,
# padding, dev (u64), name[128], uuid[129], data[7].
DM_IOCTL_FMT = "=3IIIIiIIIQ128s129s7s"
DM_IOCTL_SIZE = struct.calcsize(DM_IOCTL_FMT)
# struct dm_target_spec: sector_start, length, status, next, target_type[16].
DM_TARGET_SPEC_FMT = "=QQiI16s"
DM_TARGET_SPEC_SIZE = struct.calcsize(DM_TARGET_SPEC_FMT)
assert DM_IOCTL_SIZE == 312 and DM_TARGET_SPEC_SIZE == 40

# Commands (enum in dm-ioctl.h) and flags.
DM_DEV_CREATE_CMD = 3
DM_DEV_REMOVE_CMD = 4
DM_DEV_SUSPEND_CMD = 6
DM_DEV_STATUS_CMD = 7
DM_TABLE_LOAD_CMD = 9
DM_TABLE_STATUS_CMD = 12

DM_READONLY_FLAG = 1 << 0
DM_SUSPEND_FLAG = 1 << 1
DM_STATUS_TABLE_FLAG = 1 << 4
DM_BUFFER_FULL_FLAG = 1 << 8

SECTOR = 512


def _iowr(nr: int, size: int) -> int:
    """_IOWR(DM_IOCTL=0xfd, nr, struct dm_ioctl) from asm-generic/ioctl.h."""
    return (3 << 30) | (size << 16) | (0xFD << 8) | nr


class DeviceMapperError(OSError):
    pass


@dataclass(frozen=True)
class Target:
    start: int          # in 512-byte sectors
    length: int         # in 512-byte sectors
    type: str           # "verity", "linear", ...
    params: str


@dataclass(frozen=True)
class DmDevice:
    name: str
    major: int
    minor: int

    @property
    def node(self) -> Path:
        return Path(f"/dev/dm-{self.minor}")


def _ensure_control() -> Path:
    if not CONTROL.exists():
        CONTROL.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(CONTROL, 0o600 | stat.S_IFCHR, os.makedev(*CONTROL_DEV))
    return CONTROL


def _pack(name: str, *, flags: int = 0, targets: tuple[Target, ...] = (), buffer: int = 0) -> bytearray:
    if not name or len(name.encode()) >= DM_NAME_LEN or "/" in name:
        raise ValueError(f"invalid device-mapper name {name!r}")
    payload = bytearray()
    for t in targets:
        params = t.params.encode() + b"\0"
        params += b"\0" * (-(DM_TARGET_SPEC_SIZE + len(params)) % 8)
        next_off = DM_TARGET_SPEC_SIZE + len(params)
        payload += struct.pack(DM_TARGET_SPEC_FMT, t.start, t.length, 0, next_off, t.type.encode())
        payload += params
    payload += b"\0" * buffer
    size = DM_IOCTL_SIZE + len(payload)
    header = struct.pack(DM_IOCTL_FMT, *DM_VERSION, size, DM_IOCTL_SIZE, len(targets), 0, flags, 0, 0, 0,
                         name.encode(), b"", b"")
    return bytearray(header + payload)


def _call(cmd: int, buf: bytearray, what: str) -> bytearray:
    fd = os.open(_ensure_control(), os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _iowr(cmd, DM_IOCTL_SIZE), buf, True)
    except OSError as e:
        raise DeviceMapperError(e.errno, f"device-mapper {what}: {os.strerror(e.errno or 0)}") from None
    finally:
        os.close(fd)
    return buf


def _header(buf: bytes) -> tuple:
    return struct.unpack_from(DM_IOCTL_FMT, buf, 0)


def create(name: str, targets: tuple[Target, ...], *, readonly: bool = True) -> DmDevice:
    """DM_DEV_CREATE + DM_TABLE_LOAD + resume; the device is removed again if any step fails."""
    out = _call(DM_DEV_CREATE_CMD, _pack(name), f"create {name}")
    dev = _header(out)[10]
    try:
        _call(DM_TABLE_LOAD_CMD, _pack(name, flags=DM_READONLY_FLAG if readonly else 0, targets=targets),
              f"load table of {name}")
        _call(DM_DEV_SUSPEND_CMD, _pack(name), f"resume {name}")  # SUSPEND without the flag = resume
    except OSError:
        try:
            remove(name)
        except OSError:
            pass
        raise
    # dev is the kernel's huge_encode_dev(): major in bits 8-19, minor in bits 0-7 and 20-31.
    major = (dev >> 8) & 0xFFF
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    device = DmDevice(name, major, minor)
    _ensure_node(device)
    return device


def _ensure_node(device: DmDevice) -> None:
    """devtmpfs creates /dev/dm-N; create it ourselves if it is not there (yet)."""
    node = device.node
    try:
        st = os.stat(node)
        if stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == device.major and os.minor(st.st_rdev) == device.minor:
            return
        os.unlink(node)
    except FileNotFoundError:
        pass
    try:
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(device.major, device.minor))
    except FileExistsError:
        pass


def remove(name: str) -> None:
    _call(DM_DEV_REMOVE_CMD, _pack(name), f"remove {name}")


def status(name: str, *, table: bool = False) -> list[Target]:
    """DM_TABLE_STATUS: the live targets with their status (or, with table=True, their table lines)."""
    size = 16384
    while True:
        buf = _call(DM_TABLE_STATUS_CMD, _pack(name, flags=DM_STATUS_TABLE_FLAG if table else 0, buffer=size),
                    f"status of {name}")
        hdr = _header(buf)
        flags = hdr[7]
        if flags & DM_BUFFER_FULL_FLAG:
            size *= 4
            if size > 1 << 22:
                raise DeviceMapperError(errno.E2BIG, f"device-mapper status of {name} is too large")
            continue
        break
    data_start, count = hdr[4], hdr[5]
    targets = []
    pos = data_start
    for _ in range(count):
        start, length, _status, nxt, ttype = struct.unpack_from(DM_TARGET_SPEC_FMT, buf, pos)
        text_start = pos + DM_TARGET_SPEC_SIZE
        end = buf.index(b"\0", text_start)
        targets.append(Target(start, length, ttype.rstrip(b"\0").decode(), buf[text_start:end].decode()))
        # On output `next` counts from the first target spec (right after the header).
        pos = data_start + nxt
    return targets
