"""The one wrapper through which every external tool runs.

Rules: argv lists only (never a shell), the copy-pasteable command is logged under --debug, a missing
binary is a ToolMissing with an install hint, and a non-zero exit is a ToolError carrying the tail of
stderr. Long-lived processes (qemu, registries, daemons) go through spawn(), which applies the same
logging and lookup rules.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sandbox.log import log
from sandbox.shared.errors import ToolError, ToolMissing

PathLike = str | os.PathLike[str]

# Which Debian package provides each tool we call, for install hints.
PACKAGE_OF = {
    "qemu-system-x86_64": "qemu-system-x86 (from bookworm-backports)",
    "qemu-img": "qemu-utils",
    "veritysetup": "cryptsetup-bin",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mmdebstrap": "mmdebstrap",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "libvirtd": "libvirt-daemon-system",
    "virsh": "libvirt-clients",
    "cpio": "cpio",
    "depmod": "kmod",
    "make": "make",
    "gcc": "gcc",
    "busybox": "busybox-static",
    "zstd": "zstd",
    "lz4": "lz4",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "nasm": "nasm",
    "iasl": "acpica-tools",
    "g++": "g++",
    "patch": "patch",
    "dpkg-deb": "dpkg",
}


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: PR_SET_PDEATHSIG(SIGKILL), then check we were not orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def find_tool(name: str, *, extra_dirs: Sequence[PathLike] = ()) -> Path:
    """Locate an executable on PATH (plus /usr/sbin, /sbin and extra_dirs) or raise ToolMissing."""
    search = os.pathsep.join([*(os.fspath(d) for d in extra_dirs), os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=search)
    if found is None:
        pkg = PACKAGE_OF.get(name)
        hint = f"install the Debian package {pkg} (or run 'make setup')" if pkg else "install it and retry"
        raise ToolMissing(f"required tool '{name}' was not found", hint=hint)
    return Path(found)


def command_line(argv: Sequence[PathLike]) -> str:
    return shlex.join(os.fspath(a) for a in argv)


def _resolve(argv: Sequence[PathLike]) -> list[str]:
    if not argv:
        raise ValueError("empty argv")
    cmd = [os.fspath(a) for a in argv]
    if os.sep not in cmd[0]:
        cmd[0] = os.fspath(find_tool(cmd[0]))
    return cmd


def run(
    argv: Sequence[PathLike],
    *,
    check: bool = True,
    input: bytes | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    cwd: PathLike | None = None,
    timeout: float | None = None,
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool to completion. Output is captured as bytes unless redirected."""
    cmd = _resolve(argv)
    log.debug("+ %s", command_line(cmd))
    full_env = None if env is None else {**os.environ, **env}
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    try:
        proc = subprocess.run(cmd, input=input, stdin=stdin, stdout=stdout, stderr=stderr, env=full_env,
                              cwd=cwd, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise ToolMissing(f"required tool '{cmd[0]}' was not found", hint="run 'make setup'") from e
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{Path(cmd[0]).name} did not finish within {timeout:g} s",
                        hint=f"command: {command_line(cmd)}") from e
    if check and proc.returncode not in ok_codes:
        err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else ""
        tail = "\n".join(err.strip().splitlines()[-8:])
        what = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        hint = f"command: {command_line(cmd)}"
        if tail:
            hint = f"{tail}\n{hint}"
        raise ToolError(f"{Path(cmd[0]).name} failed ({what})", hint=hint, returncode=proc.returncode,
                        stderr=err)
    return proc


def spawn(
    argv: Sequence[PathLike],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: PathLike | None = None,
    new_session: bool = False,
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-lived tool and return its Popen; the caller owns its lifetime.

    die_with_parent: the kernel SIGKILLs the tool when this process dies, even by SIGKILL
    (PR_SET_PDEATHSIG), so an attached VM never outlives the command that runs it.
    """
    cmd = _resolve(argv)
    log.debug("+ %s &", command_line(cmd))
    full_env = None if env is None else {**os.environ, **env}
    try:
        return subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, env=full_env, cwd=cwd,
                                start_new_session=new_session, pass_fds=tuple(pass_fds),
                                preexec_fn=functools.partial(_die_with_parent, os.getpid()) if die_with_parent else None)
    except FileNotFoundError as e:
        raise ToolMissing(f"required tool '{cmd[0]}' was not found", hint="run 'make setup'") from e
