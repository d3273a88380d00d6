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
# The kernel wipes its copy of the ioctl buffer after use: set on table loads that carry a key.
DM_SECURE_DATA_FLAG = 1 << 15

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
    type: str           # "verity", "linear", "integrity", "crypt", ...
    params: str | bytearray   # a bytearray for parameters that hold a key: create(secret=True) wipes it


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
    """The ioctl buffer: header, then each target spec followed by its NUL-terminated parameters padded to 8
    bytes, then `buffer` bytes of room for the kernel's answer. Written in place into one allocation, so a
    key in the parameters is copied once, into the buffer the caller wipes."""
    if not name or len(name.encode()) >= DM_NAME_LEN or "/" in name:
        raise ValueError(f"invalid device-mapper name {name!r}")
    params = [t.params.encode() if isinstance(t.params, str) else t.params for t in targets]
    spans = [DM_TARGET_SPEC_SIZE + len(p) + 1 + (-(DM_TARGET_SPEC_SIZE + len(p) + 1) % 8) for p in params]
    size = DM_IOCTL_SIZE + sum(spans) + buffer
    buf = bytearray(size)
    struct.pack_into(DM_IOCTL_FMT, buf, 0, *DM_VERSION, size, DM_IOCTL_SIZE, len(targets), 0, flags, 0, 0, 0,
                     name.encode(), b"", b"")
    pos = DM_IOCTL_SIZE
    for t, p, span in zip(targets, params, spans, strict=True):
        struct.pack_into(DM_TARGET_SPEC_FMT, buf, pos, t.start, t.length, 0, span, t.type.encode())
        buf[pos + DM_TARGET_SPEC_SIZE:pos + DM_TARGET_SPEC_SIZE + len(p)] = p
        pos += span
    return buf


def wipe(buf: bytearray) -> None:
    """Overwrite a buffer that held key material (best effort: it is the only copy this module makes)."""
    buf[:] = bytes(len(buf))


def _call(cmd: int, buf: bytearray, what: str) -> bytearray:
    fd = os.open(_ensure_control(), os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _iowr(cmd, DM_IOCTL_SIZE), buf, True)
    except OSError as e:
        raise DeviceMapperError(e.errno, f"device-mapper {what}: {os.strerror(e.errno or 0)}") from None
    finally:
        os.close(fd)
    return buf


def _header(buf: bytes | bytearray) -> tuple[int, ...]:
    """The integer fields of struct dm_ioctl (version[3] .. dev); name, uuid and data are left off."""
    return struct.unpack_from(DM_IOCTL_FMT, buf, 0)[:11]


def create(name: str, targets: tuple[Target, ...], *, readonly: bool = True, secret: bool = False) -> DmDevice:
    """DM_DEV_CREATE + DM_TABLE_LOAD + resume; the device is removed again if any step fails.

    secret=True: the table holds a key (dm-crypt). The load asks the kernel to wipe its copy of the ioctl
    buffer, and this module wipes its own and the targets' bytearray parameters, whatever happens."""
    out = _call(DM_DEV_CREATE_CMD, _pack(name), f"create {name}")
    dev = _header(out)[10]
    try:
        flags = (DM_READONLY_FLAG if readonly else 0) | (DM_SECURE_DATA_FLAG if secret else 0)
        # Python's fcntl.ioctl copies buffers of up to 1024 bytes through its own stack; a larger one is
        # passed as is, so a key leaves no copy behind that nobody wipes.
        table = _pack(name, flags=flags, targets=targets, buffer=1024 if secret else 0)
        try:
            _call(DM_TABLE_LOAD_CMD, table, f"load table of {name}")
        finally:
            if secret:
                wipe(table)
                for t in targets:
                    if isinstance(t.params, bytearray):
                        wipe(t.params)
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
    """DM_TABLE_STATUS: the live targets with their status (or, with table=True, their table lines, which for
    dm-crypt include the key: never ask for the table of a crypt device other than to check it here)."""
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
