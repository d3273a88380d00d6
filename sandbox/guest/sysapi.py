"""Thin wrappers over the Linux system calls the agent needs and Python 3.11's os module lacks.

mount(2), umount2(2), prctl(2) and reboot(2) through ctypes on the C library, so the UVM needs no
util-linux. Flag values are from include/uapi/linux/mount.h, prctl.h and reboot.h.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 2

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1

LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # glibc's soname; ctypes.util.find_library would fork ldconfig, a second of boot under TCG.
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc.reboot.argtypes = [ctypes.c_int]
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str | Path, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    rc = libc().mount(source.encode(), os.fsencode(target), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None)
    _check(rc, f"mount {source} on {target}" + (f" ({fstype})" if fstype else ""))


def umount(target: str | Path, *, detach: bool = False) -> None:
    _check(libc().umount2(os.fsencode(target), MNT_DETACH if detach else 0), f"umount {target}")


def set_child_subreaper() -> None:
    _check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def power_off() -> None:
    os.sync()
    _check(libc().reboot(LINUX_REBOOT_CMD_POWER_OFF), "reboot(POWER_OFF)")


def mount_points() -> set[str]:
    """Mount points currently visible (from /proc/self/mountinfo, octal escapes decoded)."""
    points: set[str] = set()
    try:
        with open("/proc/self/mountinfo") as f:   # no pathlib on the agent's boot path (agent.py)
            text = f.read()
    except OSError:
        return points
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(_unescape(fields[4]))
    return points


def _unescape(path: str) -> str:
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1:i + 4].isdigit():
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)
