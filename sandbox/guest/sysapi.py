"""Thin wrappers over the Linux system calls the agent needs and Python 3.11's os module lacks.

mount(2), umount2(2), prctl(2) and reboot(2) through ctypes on the C library, so the UVM needs no
util-linux. Flag values are from include/uapi/linux/mount.h, prctl.h and reboot.h.

The agent mounts before it is ready, so this module uses `_ctypes`, the C half of ctypes, with the three
C types these calls take, defined as ctypes itself defines c_int, c_ulong and c_char_p: the `ctypes`
package on top of it (its many types, its endian structures) costs tens of milliseconds under TCG and
is not needed for four functions. Each call is what `ctypes.CDLL("libc.so.6", use_errno=True)` makes.
"""

from __future__ import annotations

import _ctypes
import os
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:   # generic in typeshed only
    _IntData = _ctypes._SimpleCData[int]
    _BytesData = _ctypes._SimpleCData[bytes | None]
else:
    _IntData = _BytesData = _ctypes._SimpleCData


class _CInt(_IntData):        # ctypes.c_int
    _type_ = "i"


class _CULong(_IntData):      # ctypes.c_ulong
    _type_ = "L"


class _CCharP(_BytesData):    # ctypes.c_char_p
    _type_ = "z"


class _LibcFunction(_ctypes.CFuncPtr):
    """A C function returning int, errno saved for get_errno() (CDLL(..., use_errno=True)'s _FuncPtr)."""

    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _CInt


class Libc:
    """The C library's mount, umount2, prctl and reboot."""

    def __init__(self) -> None:
        # glibc's soname; ctypes.util.find_library would fork ldconfig, a second of boot under TCG.
        self._handle = _ctypes.dlopen("libc.so.6", _ctypes.RTLD_LOCAL)
        self.mount = self._function("mount", _CCharP, _CCharP, _CCharP, _CULong, _CCharP)
        self.umount2 = self._function("umount2", _CCharP, _CInt)
        self.prctl = self._function("prctl", _CInt, _CULong, _CULong, _CULong, _CULong)
        self.reboot = self._function("reboot", _CInt)

    def _function(self, name: str, *argtypes: type[_ctypes._SimpleCData[Any]]) -> _LibcFunction:
        function = _LibcFunction((name, self))  # type: ignore[arg-type]  # what it reads is ._handle, as of a CDLL
        function.argtypes = argtypes
        return function


_libc: Libc | None = None


def libc() -> Libc:
    global _libc
    if _libc is None:
        _libc = Libc()
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = _ctypes.get_errno()
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
