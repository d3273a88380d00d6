"""A real, stock libvirtd for tests: started by the fixture (no systemd here), shared, stopped by the last user.

Nothing is configured: /etc/libvirt/qemu.conf stays as the package ships it, so QEMU runs as
libvirt-qemu with dynamic ownership, as on a user's machine (the launcher publishes the domain's
files for it, sandbox/vmm/libvirt_share.py). No virtlockd: the default lock manager needs none.

Several test processes (and helpers) may use the daemon at once: each holds a shared flock on
USERS_LOCK while it runs; the daemon is (re)started under START_LOCK, and the last user stops it if a
fixture started it. A libvirtd someone started by hand is used and left running, unless its binary
has been replaced by a package upgrade since (then it is restarted: a stale daemon runs the old
code).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.run import run
from sandbox.state import process_start_time

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid")))
SOCKET = Path("/run/libvirt/libvirt-sock")
START_LOCK = Path("/run/parma-sandbox-test-libvirtd.start.lock")
USERS_LOCK = Path("/run/parma-sandbox-test-libvirtd.users.lock")
STARTED = Path("/run/parma-sandbox-test-libvirtd.started")   # pids a fixture started


def _pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_start_time(pid) is not None and _running(pid) else None


def _stale(pid: int) -> bool:
    """The daemon's executable was replaced (a package upgrade) after it started."""
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith(" (deleted)")
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (daemons started with -d are reparented to PID 1, which reaps them late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _stop(pids: list[int]) -> None:
    """SIGTERM, and SIGKILL for what still runs after 30 s (libvirtd can be slow to stop on a busy host)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(map(_running, pids)):
            return


def _start_missing() -> list[int]:
    started = []
    for daemon, pidfile in DAEMONS:
        if _pid(pidfile) is None:
            run([daemon, "-d"], timeout=30)
            deadline = time.monotonic() + 15
            while _pid(pidfile) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = _pid(pidfile)
            assert pid is not None, f"{daemon} did not start"
            started.append(pid)
    deadline = time.monotonic() + 20
    while not SOCKET.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return started


def _recorded() -> list[int]:
    try:
        return [int(x) for x in STARTED.read_text().split()]
    except (OSError, ValueError):
        return []


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    if shutil.which("libvirtd") is None or os.geteuid() != 0:
        pytest.skip("needs libvirtd and root")
    pytest.importorskip("libvirt")
    users = os.open(USERS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with open(START_LOCK, "a") as start:
            fcntl.flock(start, fcntl.LOCK_EX)
            running = [p for p in (_pid(f) for _, f in DAEMONS) if p is not None]
            if any(_stale(p) for p in running):
                try:   # restart it only while no other test uses it; otherwise keep using it
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _stop(running)
                    STARTED.unlink(missing_ok=True)
                except BlockingIOError:
                    pass
            started = _start_missing()
            if started:
                STARTED.write_text(" ".join(map(str, _recorded() + started)) + "\n")
            fcntl.flock(users, fcntl.LOCK_SH)   # (downgrades an exclusive lock taken above)
        yield
    finally:
        with open(START_LOCK, "a") as start:   # always START before USERS: no lock-order inversion
            fcntl.flock(start, fcntl.LOCK_EX)
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the last user stops what fixtures started
            except BlockingIOError:
                pass
            else:
                _stop(list(reversed(_recorded())))
                STARTED.unlink(missing_ok=True)
        os.close(users)
