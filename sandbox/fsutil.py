"""Filesystem helpers: reading user-named input files, atomic writes and advisory locks.

Nothing half-written may ever be visible: files are written to a temporary name in the same
directory, fsynced, then renamed into place; directories are staged and renamed as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sandbox.shared.errors import InputError, SandboxError, StateError


def read_input_file(path: Path, expected: str = "a JSON file") -> bytes:
    """The bytes of a user-named input file, with errors that say what was expected there."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected {expected}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None


def _disk_error(path: Path, e: OSError) -> SandboxError:
    if e.errno == errno.ENOSPC:
        return SandboxError(f"no space left on the device holding {path}",
                            hint="free some disk space (or point PARMA_SANDBOX_CACHE elsewhere) and retry")
    return SandboxError(f"cannot write {path}: {e.strerror}")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _disk_error(path, e) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _disk_error(path, e) from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield stage
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.rename(path, old)
            os.rename(stage, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[None]:
    """An flock on `path` (created if needed). Non-blocking mode raises StateError when held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        flags = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            flags |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError as e:
            raise StateError(f"{path} is locked by another parma-sandbox process",
                             hint="wait for it to finish, or check 'parma-sandbox ps'") from e
        yield
    finally:
        os.close(fd)
