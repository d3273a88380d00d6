"""What `ps` shows for sandboxes in every state, and that `down` cleans what a killed `up` left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.launch.lifecycle import down
from sandbox.shared.errors import InputError
from sandbox.state import (
    STATUS_RUNNING,
    STATUS_STARTING,
    ProcessRef,
    SandboxRecord,
    StateStore,
    display_status,
    list_sandboxes,
)


def dead_ref() -> ProcessRef:
    p = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(p.pid)
    p.kill()
    p.wait()
    return ref


def test_display_status() -> None:
    me, dead = ProcessRef.of(os.getpid()), dead_ref()
    assert display_status(SandboxRecord("a", STATUS_STARTING, processes={"launcher": me})) == "starting"
    assert display_status(SandboxRecord("a", STATUS_STARTING, processes={"launcher": dead, "qemu": me})) == "failed"
    assert display_status(SandboxRecord("a", STATUS_STARTING, processes={"launcher": dead})) == "stale"
    assert display_status(SandboxRecord("a", STATUS_RUNNING, processes={"launcher": dead, "qemu": me})) == "running"
    assert display_status(SandboxRecord("a", STATUS_RUNNING, processes={"launcher": dead, "qemu": dead})) == "stale"


def test_down_kills_a_vm_that_a_killed_up_only_left_in_its_pidfile(isolated_dirs: Path) -> None:
    store = StateStore()
    with store.lock("orphan") as state_dir:
        store.save(SandboxRecord("orphan", STATUS_STARTING, processes={"launcher": dead_ref()}))
    # A stand-in "QEMU": its command line names the state dir, as QEMU's does (-pidfile, sockets).
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(state_dir / "qemu.pid")])
    (state_dir / "qemu.pid").write_text(f"{qemu.pid}\n")
    deadline = time.monotonic() + 5   # until the child has exec'd (its cmdline is still ours before)
    while str(state_dir).encode() not in Path(f"/proc/{qemu.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [r["status"] for r in list_sandboxes(store)] == ["stale"]
    assert down("orphan", store=store)["graceful"] is False
    deadline = time.monotonic() + 5
    while qemu.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu.poll() is not None
    assert not state_dir.exists() and list_sandboxes(store) == []


def test_down_of_an_unknown_sandbox_is_an_input_error(isolated_dirs: Path) -> None:
    with pytest.raises(InputError, match="no sandbox named 'ghost'"):
        down("ghost")
