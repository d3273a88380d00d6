"""A real libvirtd for tests: started by the fixture (no systemd here) and stopped afterwards.

/dev/kvm is 0600 root on hosts without udev: with QEMU running as libvirt-qemu, libvirt re-probes QEMU on
every call and a domain start takes about a minute, so the fixture runs QEMU as root (qemu.conf),
restoring the file afterwards. A libvirtd that is already running is left alone (the tests skip).
"""

from __future__ import annotations

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
DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("virtlockd", Path("/run/virtlockd.pid")),
           ("libvirtd", Path("/run/libvirtd.pid")))


def _pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_start_time(pid) is not None else None


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    if shutil.which("libvirtd") is None or os.geteuid() != 0:
        pytest.skip("needs libvirtd and root")
    pytest.importorskip("libvirt")
    if _pid(Path("/run/libvirtd.pid")) is not None:
        pytest.skip("a libvirtd is already running; this fixture only manages its own")
    original = QEMU_CONF.read_bytes() if QEMU_CONF.exists() else None
    QEMU_CONF.write_bytes((original or b"") + b'\nuser = "root"\ngroup = "root"\n')
    started: list[int] = []
    try:
        for daemon, pidfile in DAEMONS:
            if _pid(pidfile) is None:
                run([daemon, "-d"], timeout=30)
                deadline = time.monotonic() + 10
                while _pid(pidfile) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                pid = _pid(pidfile)
                assert pid is not None, f"{daemon} did not start"
                started.append(pid)
        deadline = time.monotonic() + 20
        while not Path("/run/libvirt/libvirt-sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield
    finally:
        for pid in reversed(started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in started:
            deadline = time.monotonic() + 10
            while process_start_time(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
        if original is None:
            QEMU_CONF.unlink(missing_ok=True)
        else:
            QEMU_CONF.write_bytes(original)


